"""The evaluation sections that test whether the model reads the window (`fusion-eval` runs them after the losses):

- `same_place_gain`: the grounding gain against the same location's climate at another time (so it measures "which
  numbers", not "which place"), its standard error clustered by time window;
- `ladder`: every quantity's error for the baseline ladder and the fused model on the generated samples
  (`baselines.ladder`), over all of them and, when the dataset holds tiles out of training, over the temporal
  (trained locations) and spatial (held-out locations) parts;
- `interventions`: the slopes of the generated numbers under shifts of one variable and their movement under a grid
  permutation (`interventions.intervention_report`), on up to `intervene_limit` windows spread over the split;
- `goals`: the science goals of the project checked mechanically against the figures above.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from climate_text_schema.caption_reading import parse_caption_numbers
from climate_text_schema.captions import QUANTITIES

from fusion_trainer.model.readout import readout_values

from .baselines import fit_ridge, ladder, location_of, predict_ridge
from .interventions import intervention_report, parse_intervention

if TYPE_CHECKING:
    from .core import EvalContext

__all__ = [
    "MAX_RIDGE_FEATURES", "interventions_section", "ladder_section", "same_place_gain_section", "same_place_partners",
    "split_arrays",
]  # fmt: skip

logger = logging.getLogger(__name__)

MAX_RIDGE_FEATURES = 2048
"""The ridge reads the window's raw normalised values, average-pooled over space (then time) to at most this many."""


def split_arrays(dataset: Any, split: str, keys: Sequence[str] | None = None) -> tuple[list[str], np.ndarray]:
    """The normalised climate arrays of a split `(N, T, V, H, W)` in manifest order (only `keys` when given)."""
    from fusion_trainer.data.stream import decode_sample, epoch_samples

    wanted = set(keys) if keys is not None else None
    out_keys, arrays = [], []
    for raw in epoch_samples(dataset, split, epoch=0, rank=0, world=1, seed=0, shuffle=False):
        if wanted is None or raw.key in wanted:
            sample = decode_sample(raw, dataset)
            out_keys.append(sample.key)
            arrays.append(sample.climate_x)
    if not arrays:
        return [], np.zeros((0,), dtype=np.float32)
    return out_keys, np.stack(arrays)


def _features(x: np.ndarray) -> np.ndarray:
    """Flatten windows `(N, T, V, H, W)`, average-pooling space (2 x 2 at a time), then time, to fit the budget."""
    while x[0].size > MAX_RIDGE_FEATURES and min(x.shape[3:]) >= 2:
        n, t, v, h, w = x.shape
        x = x[:, :, :, : h - h % 2, : w - w % 2].reshape(n, t, v, h // 2, 2, w // 2, 2).mean(axis=(4, 6))
    while x[0].size > MAX_RIDGE_FEATURES and x.shape[1] >= 2:
        n, t = x.shape[:2]
        x = x[:, : t - t % 2].reshape(n, t // 2, 2, *x.shape[2:]).mean(axis=2)
    return x.reshape(x.shape[0], -1).astype(np.float64)


def _head_predictions(ctx: EvalContext, x: np.ndarray) -> dict[str, np.ndarray] | None:
    """The fused model's stats head on the windows, as caption quantities (None without a head)."""
    model = ctx.model
    head = model.encoder.stats_head
    cfg = model.config
    if head is None or cfg.variables is None or cfg.normalization is None:
        return None
    seconds = pd.Timedelta(ctx.dataset.manifest.window).total_seconds()
    rows: list[dict[str, float]] = []
    with torch.no_grad():
        for i in range(0, len(x), 64):
            chunk = torch.from_numpy(x[i : i + 64]).to(ctx.device)
            stats = head(model.encoder.encode(chunk).tokens, chunk)
            rows += readout_values(stats, cfg.variables, cfg.normalization, seconds)
    return {q: np.array([r.get(q, np.nan) for r in rows]) for q in QUANTITIES}


def ladder_section(ctx: EvalContext) -> dict[str, Any]:
    """The baseline ladder on the generated samples (module docstring)."""
    rows = ctx.generated()
    if not rows:
        return {"ladder": None}
    index = ctx.dataset.read_index()
    keys = [r["key"] for r in rows]
    parsed = [parse_caption_numbers(r["generated"]) for r in rows]
    readouts: dict[str, dict[str, np.ndarray]] = {
        "fused": {q: np.array([p.get(q, np.nan) for p in parsed]) for q in QUANTITIES}
    }
    eval_keys, x_eval = split_arrays(ctx.dataset, ctx.split, keys)
    order = {k: i for i, k in enumerate(eval_keys)}
    x_eval = x_eval[[order[k] for k in keys]]
    head = _head_predictions(ctx, x_eval)
    if head is not None:
        readouts["stats_head"] = head
    train_keys, x_train = split_arrays(ctx.dataset, "train")
    val_keys, x_val = split_arrays(ctx.dataset, "val")
    if len(train_keys) and len(val_keys):
        from climate_text_schema.captions import quantities_from_index

        truth = quantities_from_index(index)
        fit = fit_ridge(_features(x_train), truth, train_keys, _features(x_val), val_keys)
        readouts["ridge"] = predict_ridge(fit, _features(x_eval))
    result: dict[str, Any] = {"all": ladder(index, keys, readouts, ctx.seed)}
    held = set((ctx.dataset.manifest.model_extra or {}).get("holdout_tiles") or [])
    if held:
        where = location_of(index)
        for part, pick in (("temporal", lambda k: where[k] not in held), ("spatial", lambda k: where[k] in held)):
            mask = np.array([pick(k) for k in keys])
            if mask.any():
                sub = {r: {q: v[mask] for q, v in preds.items()} for r, preds in readouts.items()}
                result[part] = ladder(index, [k for k, m in zip(keys, mask, strict=True) if m], sub, ctx.seed)
    return {"ladder": result}


def _spread(keys: Sequence[str], starts: pd.Series, limit: int) -> list[str]:
    """Up to `limit` keys spread evenly over the split's times (sorted by time, then key)."""
    ordered = sorted(keys, key=lambda k: (starts[k], k))
    if len(ordered) <= limit:
        return ordered
    return [ordered[int(i)] for i in np.linspace(0, len(ordered) - 1, limit).round()]


def interventions_section(ctx: EvalContext) -> dict[str, Any]:
    """Shift, permute, generate and read back (module docstring); nothing when no intervention was asked for."""
    if not ctx.interventions:
        return {"interventions": None}
    variables = list(ctx.model.config.variables or ctx.dataset.manifest.variable_names)
    shifts = [parse_intervention(text, variables) for text in ctx.interventions]
    index = ctx.dataset.read_index().set_index("key", drop=False)
    starts = pd.to_datetime(index["time_start"])
    keys, x = split_arrays(ctx.dataset, ctx.split)
    chosen = _spread(keys, starts, ctx.intervene_limit)
    order = {k: i for i, k in enumerate(keys)}
    norm = ctx.dataset.manifest.normalization
    mean = np.array([norm[v].mean for v in variables], dtype=np.float32)[None, None, :, None, None]
    std = np.array([norm[v].std for v in variables], dtype=np.float32)[None, None, :, None, None]
    physical = x[[order[k] for k in chosen]] * std + mean

    def describe(windows: np.ndarray) -> list[str]:
        out: list[str] = []
        size = ctx.generate_batch_size
        for i in range(0, len(windows), size):
            chunk = torch.from_numpy(((windows[i : i + size] - mean) / std).astype(np.float32)).to(ctx.device)
            out += ctx.model.generate(chunk, ctx.prompt, max_new_tokens=ctx.max_new_tokens, do_sample=False,
                                     one_line=True, no_repeat_ngram=ctx.no_repeat_ngram,
                                     draft_caption=ctx.config.caption)  # fmt: skip
        return out

    clusters = starts[chosen].astype(str).tolist()
    rows = physical.shape[-2]  # the windows' rows lie evenly from lat_min to lat_max (the builder's regular grids)
    lats = np.stack([np.linspace(index.at[k, "lat_min"], index.at[k, "lat_max"], rows) for k in chosen])
    report = intervention_report(describe, physical, variables, clusters, shifts, permute=True, seed=ctx.seed,
                                 lats=lats)  # fmt: skip
    report["keys"] = chosen
    return {"interventions": report}


def same_place_partners(index: pd.DataFrame, split: str, keys: Sequence[str], seed: int) -> dict[str, str | None]:
    """For each key, another sample of `split` at the same location and another time (chosen at random, seeded), or
    None when the split holds none. Drawn from the whole split, not only from the scored samples: a spread of a
    split ordered by time rarely scores one location twice (65 of the demo's 96 loss samples would have had no
    partner among them)."""
    rows = index[index["split"] == split]
    where = location_of(rows)
    starts = pd.Series(pd.to_datetime(rows["time_start"]).to_numpy(), index=rows["key"].astype(str))
    by_place: dict[str, list[str]] = {}
    for key in sorted(starts.index, key=lambda k: (starts[k], k)):
        by_place.setdefault(str(where[key]), []).append(key)
    rng = np.random.default_rng(seed)
    out: dict[str, str | None] = {}
    for key in keys:
        others = [k for k in by_place.get(str(where[key]), []) if starts[k] != starts[key]] if key in where.index else []
        out[key] = others[int(rng.integers(len(others)))] if others else None
    return out


def same_place_gain_section(ctx: EvalContext) -> dict[str, Any]:
    """The grounding gain with each scored sample's climate swapped for the same location's at another time of the
    split (`same_place_partners`), its standard error clustered by the sample's time window."""
    from .core import grounding_gain

    index = ctx.dataset.read_index()
    starts = pd.Series(pd.to_datetime(index["time_start"]).astype(str).to_numpy(), index=index["key"].astype(str))

    def partners(keys: list[str]) -> dict[str, torch.Tensor | None]:
        chosen = same_place_partners(index, ctx.split, keys, ctx.seed)
        got, arrays = split_arrays(ctx.dataset, ctx.split, keys=sorted({k for k in chosen.values() if k}))
        window = {k: torch.from_numpy(a) for k, a in zip(got, arrays, strict=True)}
        return {k: window.get(p) if p else None for k, p in chosen.items()}

    gain = grounding_gain(ctx.model, ctx.batches(), ctx.device, ctx.max_batches, ctx.seed,
                          cluster_of=lambda k: str(starts[k]), own_losses=ctx.own_token_losses,
                          partners=partners)  # fmt: skip
    gain["swapped_within"] = "same location, another time of the split"
    return {"same_place_gain": gain}


def _check(ok: bool | None, figure: Any, target: str) -> dict[str, Any]:
    return {"met": ok, "figure": figure, "target": target}


def science_goals(result: dict[str, Any]) -> dict[str, Any]:
    """The project's goals for a model that reads the window, each met / not met (None: not measured) with its figure.

    - every quantity parses in at least 95% of the outputs;
    - temperatures, wind speed and pressure: error below half of the location x hour climatology's;
    - wind direction and precipitation: error below the location x hour climatology's;
    - intervention slope (median) between 0.8 and 1.2 for T2M, SLP and WIND, each shifted alone;
    - permuting the grid moves the mean temperature by less than 0.5 °C;
    - the grounding gain against the same location's other times exceeds 2 clustered standard errors.
    """
    goals: dict[str, Any] = {}
    faith = (result.get("faithfulness") or {}).get("quantities") or {}
    for q, row in faith.items():
        goals[f"parsed {q}"] = _check(row["parsed_fraction"] >= 0.95, row["parsed_fraction"], ">= 0.95")
    quantities = (((result.get("ladder") or {}).get("all") or {}).get("quantities")) or {}
    for q, row in quantities.items():
        fused, clim = (row.get("fused") or {}).get("mae"), (row.get("location_hour") or {}).get("mae")
        if fused is None or clim is None:
            goals[f"error {q}"] = _check(None, None, "")
            continue
        half = QUANTITIES[q].kind == "linear"
        limit = clim * (0.5 if half else 1.0)
        goals[f"error {q}"] = _check(fused < limit, {"fused": fused, "location_hour": clim},
                                     f"< {'half of ' if half else ''}the location x hour climatology's")  # fmt: skip
    slopes = ((result.get("interventions") or {}).get("slopes")) or {}
    for var in ("T2M", "SLP", "WIND"):
        median = (slopes.get(var) or {}).get("median")
        goals[f"slope {var}"] = _check(None if median is None else 0.8 <= median <= 1.2, median, "0.8..1.2")
    moved = ((((result.get("interventions") or {}).get("permute")) or {}).get("t2m_mean_c") or {}).get("mean_change")
    goals["permute t2m_mean_c"] = _check(None if moved is None else moved < 0.5, moved, "< 0.5 °C")
    gain = ((result.get("same_place_gain") or {}).get("caption")) or {}
    if gain.get("gain") is not None and gain.get("stderr") is not None:
        goals["same-place gain"] = _check(gain["gain"] > 2 * gain["stderr"], gain, "> 2 clustered standard errors")
    else:
        goals["same-place gain"] = _check(None, gain or None, "> 2 clustered standard errors")
    met = [g["met"] for g in goals.values()]
    return {"all_met": all(m is True for m in met), "met": sum(m is True for m in met),
            "missed": sum(m is False for m in met), "not_measured": sum(m is None for m in met), "goals": goals}  # fmt: skip
