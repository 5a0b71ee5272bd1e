"""The readout: what the encoder reads off a climate window, written as text the frozen LM can copy from.

With `FusionConfig.readout`, the stats head (`encoder.StatsHead` with its direct features: the window's per-variable
mean, minimum and maximum, plus a learned correction from the climate tokens) predicts every variable's window
statistics; they are turned into the caption's quantities in its units (`climate_text_schema.captions
.caption_quantities`: the area-mean 2 m temperature and its range, the mean wind vector's speed and direction,
pressure, the precipitation total) and written as one line,

    Readout: temperature 7.0 °C, ranging from 2.1 °C to 12.4 °C; wind 7.6 m/s from the west-southwest; pressure
    1018.5 hPa; precipitation 0.2 mm.

which is inserted after the prompt, before the soft tokens and the caption (`insert_tokens`). The LM learns to turn
it into the caption; a pretrained LM copies numbers from its context readily. The line is discrete text, so the
caption loss does not reach the head: the head learns from the auxiliary stats loss (`TrainConfig
.stats_loss_weight`), the soft tokens and the encoder from the caption loss. Every number still comes from the
window: the evaluation's interventions (shift one variable, permute the grid) and its ladder (the readout alone, a
ridge on the raw window) measure how much.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from climate_text_schema.captions import COMPASS, caption_quantities, format_number, render_facet
from torch import Tensor

__all__ = ["READOUT_PREFIX", "insert_tokens", "readout_caption", "readout_values", "render_readout"]

READOUT_PREFIX = "Readout: "


def render_readout(values: Mapping[str, float]) -> str:
    """One readout line (ends with a newline) from caption quantities (`caption_quantities` keys); absent ones are
    left out. An empty mapping gives `Readout: none.`"""
    parts: list[str] = []
    if {"t2m_mean_c", "t2m_min_c", "t2m_max_c"} <= set(values):
        parts.append(f"temperature {format_number(values['t2m_mean_c'])} °C, ranging from "
                     f"{format_number(values['t2m_min_c'])} °C to {format_number(values['t2m_max_c'])} °C")  # fmt: skip
    if "dewpoint_c" in values:
        parts.append(f"dew point {format_number(values['dewpoint_c'])} °C")
    if "qv_g_kg" in values:
        parts.append(f"humidity {format_number(values['qv_g_kg'])} g/kg")
    if "wind_speed_m_s" in values:
        speed = format_number(values["wind_speed_m_s"])
        if speed == "0.0" or "wind_dir_deg" not in values:
            parts.append(f"wind {speed} m/s with no prevailing direction")
        else:
            parts.append(f"wind {speed} m/s from the {COMPASS[int((values['wind_dir_deg'] + 11.25) // 22.5) % 16]}")
    if "slp_hpa" in values:
        parts.append(f"pressure {format_number(values['slp_hpa'])} hPa")
    if "precip_mm" in values:
        parts.append(f"precipitation {format_number(values['precip_mm'])} mm")
    return READOUT_PREFIX + ("; ".join(parts) if parts else "none") + ".\n"


def readout_caption(values: Mapping[str, float], form: str) -> str:
    """The caption that states `values` (`caption_quantities` keys) in template 0's phrasing, cut to the caption
    `form` ("full" gives the number sentences, "numbers" or "temperature": `caption_target`); "" when none apply.
    The one-shot examples of the prompt are such captions, and so is what a LM trained with `readout_truth` writes
    after a readout line: generation's draft (`FusedGeneration.generate(draft_caption=...)`)."""
    from fusion_trainer.grounding import caption_target  # DataError for an unknown form

    facets = ("temp", "dew", "q", "wind", "slp", "precip")
    text = " ".join(t for f in facets if (t := render_facet(f, values)))
    return caption_target(text, "numbers" if form == "full" else form) if text else ""


def readout_values(
    stats: Tensor, variables: Sequence[str], normalization: Mapping[str, Any], seconds: float
) -> list[dict[str, float]]:
    """Caption quantities from the stats head's normalised predictions `(B, V, 3)` (mean, min, max per variable).

    Args:
        stats: the predictions, in the manifest's normalised units.
        variables: the variable names in array order.
        normalization: {variable: {"mean", "std"}} the data were normalised with.
        seconds: the window's length (for the precipitation total).
    """
    mean = torch.tensor([float(_get(normalization[v], "mean")) for v in variables], dtype=torch.float64)
    std = torch.tensor([float(_get(normalization[v], "std")) for v in variables], dtype=torch.float64)
    physical = stats.detach().double().cpu() * std[None, :, None] + mean[None, :, None]  # (B, V, 3)
    out = []
    for row in physical.tolist():
        window = {v: {"mean": r[0], "min": r[1], "max": r[2]} for v, r in zip(variables, row, strict=True)}
        out.append(caption_quantities(window, seconds))
    return out


def _get(stats: Any, key: str) -> float:
    return float(stats[key] if isinstance(stats, Mapping) else getattr(stats, key))


def insert_tokens(
    input_ids: Tensor, attention_mask: Tensor, labels: Tensor | None, at: Tensor, new: Sequence[Sequence[int]],
    pad_id: int,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:  # fmt: skip
    """Insert token ids into every row of a right-padded batch at position `at[b]`; they get labels -100.

    Returns:
        `(input_ids, attention_mask, labels, positions)`: the new right-padded batch `(B, L')` and, for each original
        token, its index in the new row `(B, L)`.
    """
    b, length = input_ids.shape
    device = input_ids.device
    lengths = attention_mask.sum(dim=1).tolist()
    widths = [int(n) + len(t) for n, t in zip(lengths, new, strict=True)]
    width = max(max(widths), length + max(len(t) for t in new))
    ids = torch.full((b, width), pad_id, dtype=input_ids.dtype, device=device)
    mask = torch.zeros((b, width), dtype=attention_mask.dtype, device=device)
    out_labels = torch.full((b, width), -100, dtype=labels.dtype, device=device) if labels is not None else None
    positions = torch.arange(length, device=device)[None].repeat(b, 1)  # (B, L)
    for row, (cut, extra) in enumerate(zip(at.tolist(), new, strict=True)):
        cut, k = int(cut), len(extra)
        inserted = torch.tensor(list(extra), dtype=input_ids.dtype, device=device)
        ids[row, :cut], ids[row, cut : cut + k], ids[row, cut + k : cut + k + length - cut] = (
            input_ids[row, :cut], inserted, input_ids[row, cut:],
        )  # fmt: skip
        mask[row, :cut], mask[row, cut : cut + k] = attention_mask[row, :cut], 1
        mask[row, cut + k : cut + k + length - cut] = attention_mask[row, cut:]
        if out_labels is not None and labels is not None:
            out_labels[row, :cut], out_labels[row, cut + k : cut + k + length - cut] = labels[row, :cut], labels[row, cut:]
        positions[row, cut:] += k
    used = int(max(widths))
    ids, mask = ids[:, :width], mask[:, :width]
    if used < width:  # trailing columns that hold only padding in every row
        keep = max(used, int(positions.max()) + 1)
        ids, mask = ids[:, :keep], mask[:, :keep]
        out_labels = out_labels[:, :keep] if out_labels is not None else None
    return ids, mask, out_labels, positions
