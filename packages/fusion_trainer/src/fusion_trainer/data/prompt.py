"""The prompt a run trains and generates with: the template filled from the dataset's manifest (`render_prompt`)."""

from __future__ import annotations

from climate_text_schema import OpenedDataset

from fusion_trainer.config import DEFAULT_PROMPT_TEMPLATE
from fusion_trainer.errors import ConfigError

__all__ = ["DEFAULT_PROMPT", "render_prompt"]

DEFAULT_PROMPT = DEFAULT_PROMPT_TEMPLATE
"""Prompt template: `{example}` is a one-shot caption built from the train means, `{variables}` the variable names."""



def render_prompt(template: str, ds: OpenedDataset, caption: str = "full") -> str:
    """Fill the prompt template from the manifest: one-shot examples whose numbers come from the train statistics.

    `{example}` lists the train mean of every variable in its units; `{caption_example}` is a caption in template 0's
    phrasing whose numbers are the train means (the range: mean -/+ one std), cut to the `caption` form the run trains
    on (`grounding.caption_target`); `{readout_example}` is the readout line of those same numbers
    (`readout.render_readout`), for runs with `fusion.readout`. `{cold_caption_example}` and
    `{cold_readout_example}` are the same for a window two standard deviations colder (its temperatures often below
    zero, so the LM sees negative numbers copied too), the wind reversed and pressure one std lower.
    """
    import pandas as pd
    from climate_text_schema.caption_reading import caption_target
    from climate_text_schema.captions import caption_quantities, render_facet

    from fusion_trainer.model.readout import render_readout

    manifest = ds.manifest
    parts = []
    for v in manifest.variables:
        stats = manifest.normalization.get(v.name)
        if stats is not None:
            parts.append(f"mean {v.name} {stats.mean:.4g} {v.units}")
    example = "; ".join(parts) + "."
    seconds = pd.Timedelta(manifest.window).total_seconds()
    form = "numbers" if caption == "full" else caption

    def texts(shift: dict[str, float], flip: bool) -> tuple[str, str]:
        stats = {}
        for v, s in manifest.normalization.items():
            m = -s.mean if flip and v in ("U10M", "V10M") else s.mean
            m += shift.get(v, 0.0) * s.std
            stats[v] = {"mean": m, "min": m - s.std, "max": m + s.std}
        values = caption_quantities(stats, seconds)
        text = " ".join(
            t for f in ("temp", "dew", "q", "wind", "slp", "precip") if (t := render_facet(f, values))
        )
        return render_readout(values), caption_target(text, form) if text else ""

    readout, caption_text = texts({}, False)
    cold_readout, cold_caption = texts({"T2M": -2.0, "T2MDEW": -2.0, "SLP": -1.0}, True)
    try:
        return template.format(
            example=example, variables=", ".join(manifest.variable_names), readout_example=readout,
            caption_example=caption_text, cold_readout_example=cold_readout, cold_caption_example=cold_caption,
        )  # fmt: skip
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(
            f"prompt_template {template!r} is invalid ({exc}): use only {{example}}, {{caption_example}}, "
            "{readout_example}, {cold_caption_example}, {cold_readout_example} and {variables}"
        ) from exc
