"""The prompt a run trains and generates with: the template filled from the dataset's manifest (`render_prompt`)."""

from __future__ import annotations

from climate_text_schema import OpenedDataset

from fusion_trainer.config import DEFAULT_PROMPT_TEMPLATE, prompt_fields_hint
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
    `{thaw_caption_example}` and `{thaw_readout_example}`: a window whose mean 2 m temperature is 1 °C (T2M and
    T2MDEW moved by the same kelvins, the rest at the train means), its range one std either side: a mean just above
    freezing next to a minimum below it, the pair whose signs the demo's LM confused (docs/results.md, settings 10 and 12).
    """
    import pandas as pd
    from climate_text_schema.captions import caption_quantities

    from fusion_trainer.model.readout import readout_caption, render_readout

    manifest = ds.manifest
    parts = []
    for v in manifest.variables:
        stats = manifest.normalization.get(v.name)
        if stats is not None:
            parts.append(f"mean {v.name} {stats.mean:.4g} {v.units}")
    example = "; ".join(parts) + "."
    seconds = pd.Timedelta(manifest.window).total_seconds()

    def texts(shift: dict[str, float], flip: bool, kelvins: float = 0.0) -> tuple[str, str]:
        """The readout line and caption of the train means moved by `shift` stds (and `kelvins` for T2M, T2MDEW)."""
        stats = {}
        for v, s in manifest.normalization.items():
            m = -s.mean if flip and v in ("U10M", "V10M") else s.mean
            m += shift.get(v, 0.0) * s.std + (kelvins if v in ("T2M", "T2MDEW") else 0.0)
            stats[v] = {"mean": m, "min": m - s.std, "max": m + s.std}
        values = caption_quantities(stats, seconds)
        return render_readout(values), readout_caption(values, caption)

    readout, caption_text = texts({}, False)
    cold_readout, cold_caption = texts({"T2M": -2.0, "T2MDEW": -2.0, "SLP": -1.0}, True)
    t2m = manifest.normalization.get("T2M")
    thaw_readout, thaw_caption = texts({}, False, 274.15 - t2m.mean) if t2m is not None else ("", "")
    try:
        return template.format(
            example=example, variables=", ".join(manifest.variable_names), readout_example=readout,
            caption_example=caption_text, cold_readout_example=cold_readout, cold_caption_example=cold_caption,
            thaw_readout_example=thaw_readout, thaw_caption_example=thaw_caption,
        )  # fmt: skip
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(f"prompt_template {template!r} is invalid ({exc}): {prompt_fields_hint()}") from exc
