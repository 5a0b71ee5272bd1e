"""Error measures per kind of quantity (`climate_text_schema.captions.Quantity.kind`), shared by the faithfulness
metrics and the baseline ladder, and a bootstrap interval clustered by time window.

- `linear` (temperatures, speed, pressure, humidity): absolute error.
- `circular` (wind direction, degrees): the angle between the two directions, 0..180.
- `precip` (precipitation totals, mm, >= 0 and heavy-tailed): absolute error of log1p(mm), plus hit rates (does the
  output agree with the truth on "at least 0.1 mm" and "at least 1 mm").
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["HIT_THRESHOLDS_MM", "best_constant", "cluster_bootstrap", "errors", "hit_rates", "train_constant"]

HIT_THRESHOLDS_MM = (0.1, 1.0)
"""Precipitation thresholds of the hit rates (mm in the window)."""


def errors(pred: np.ndarray, true: np.ndarray, kind: str) -> np.ndarray:
    """Per-sample error of `pred` against `true` for a quantity of `kind`."""
    pred, true = np.asarray(pred, dtype=np.float64), np.asarray(true, dtype=np.float64)
    if kind == "circular":
        d = np.abs(np.mod(pred - true, 360.0))
        return np.minimum(d, 360.0 - d)
    if kind == "precip":
        return np.abs(np.log1p(np.maximum(pred, 0.0)) - np.log1p(np.maximum(true, 0.0)))
    return np.abs(pred - true)


def train_constant(values: np.ndarray, kind: str) -> float:
    """What a model that ignores the input would say from the train split: the mean (circular mean for directions,
    the mean in log1p space for precipitation)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan")
    if kind == "circular":
        rad = np.deg2rad(values)
        return float(np.mod(np.degrees(np.arctan2(np.sin(rad).mean(), np.cos(rad).mean())), 360.0))
    if kind == "precip":
        return float(np.expm1(np.log1p(np.maximum(values, 0.0)).mean()))
    return float(values.mean())


def best_constant(true: np.ndarray, kind: str) -> float:
    """The single value with the least mean error on `true` itself (hindsight: no input-blind output beats it)."""
    true = np.asarray(true, dtype=np.float64)
    if kind == "circular":
        grid = np.arange(0.0, 360.0, 0.5)
        return float(grid[np.argmin([errors(np.full_like(true, g), true, kind).mean() for g in grid])])
    if kind == "precip":
        return float(np.expm1(np.median(np.log1p(np.maximum(true, 0.0)))))
    return float(np.median(true))


def hit_rates(
    pred: np.ndarray, true: np.ndarray, thresholds: Sequence[float] = HIT_THRESHOLDS_MM, decimals: int = 1
) -> dict[str, float]:
    """For each threshold: the fraction of samples where `pred >= t` agrees with `true >= t`, the truth taken as a
    caption states it (`decimals` places: "0.1 mm" for 0.07), so a caption that copies the truth exactly hits."""
    pred, true = np.asarray(pred, dtype=np.float64), np.round(np.asarray(true, dtype=np.float64), decimals)
    return {f"{t:g}mm": float(((pred >= t) == (true >= t)).mean()) for t in thresholds} if len(true) else {}


def cluster_bootstrap(
    values: np.ndarray, clusters: Sequence[str] | np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """A percentile interval of the mean of `values`, resampling whole clusters (e.g. time windows) with replacement.

    Samples of one time window share its weather, so they are not independent; resampling windows keeps that.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return (float("nan"), float("nan"))
    labels, inverse = np.unique(np.asarray(clusters), return_inverse=True)
    sums = np.bincount(inverse, weights=values, minlength=len(labels))
    counts = np.bincount(inverse, minlength=len(labels)).astype(np.float64)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(labels), size=(n_boot, len(labels)))
    means = sums[draws].sum(axis=1) / np.maximum(counts[draws].sum(axis=1), 1.0)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return (float(lo), float(hi))
