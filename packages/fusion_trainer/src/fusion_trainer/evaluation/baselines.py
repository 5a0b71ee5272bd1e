"""The baseline ladder: what each quantity's error would be without reading the window, and with a readout that
skips the language model, on the same samples as the fused model.

Rungs (each fitted on the train split only, tuned on val where it has a knob, scored on the evaluated samples):

| rung | sees |
| --- | --- |
| `train_mean` | nothing: the train split's constant (mean; circular mean of directions; log-space mean of rain) |
| `location` | where: the train mean of the same tile (an unseen tile: its latitude row; else the train mean) |
| `location_hour` | where and when: the same tile and local solar hour bin (4 bins of 6 h), plus a linear trend in time when the train period spans 28 days or more; falls back to `location` |
| `persistence` | the past truth: the same tile's previous window (a reference, not a model: it reads the answer of an earlier time) |
| `ridge` | the window: a ridge regression on the raw normalised window (every value), alpha chosen on val |
| `stats_head` | the window: the fused model's own stats head (its readout), without the LM |
| `fused` | the window, through the LM: the numbers parsed from the generated captions |

`best_constant` (the best single value in hindsight on the evaluated samples themselves) is reported as a bound no
input-blind output can beat; it peeks at the answers, so it is not a rung. Every error comes with a 95% bootstrap
interval clustered by time window (`scores.cluster_bootstrap`): samples of one window share its weather.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from climate_text_schema import captions as cap

from fusion_trainer.scores import best_constant, cluster_bootstrap, errors, train_constant

__all__ = ["HOUR_BINS", "fit_ridge", "ladder", "location_of", "predict_ridge", "score_predictions"]

logger = logging.getLogger(__name__)

HOUR_BINS = 4
"""Local solar hour bins of `location_hour` (6 h each)."""
_TILE = re.compile(r"-t(\d+)x(\d+)$")
_ALPHAS = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)


def location_of(index: pd.DataFrame) -> pd.Series:
    """Each sample's location: its tile label (`tYYxXX` from the key) or, for whole-region samples, its bbox."""
    keys = index["key"].astype(str)
    tiles = keys.str.extract(_TILE)
    label = "t" + tiles[0].fillna("") + "x" + tiles[1].fillna("")
    bbox = index["lat_min"].round(3).astype(str) + "," + index["lon_min"].round(3).astype(str)
    return pd.Series(np.where(tiles[0].notna(), label, bbox), index=keys.to_numpy())


def _row_of(location: pd.Series) -> pd.Series:
    return location.str.extract(r"^t(\d+)x")[0].fillna(location)


def _local_hour_bin(index: pd.DataFrame) -> pd.Series:
    mid = pd.to_datetime(index["time_start"]) + (pd.to_datetime(index["time_end"]) - pd.to_datetime(index["time_start"])) / 2
    lon = (index["lon_min"] + ((index["lon_max"] - index["lon_min"]) % 360.0) / 2).to_numpy(dtype=np.float64)
    hours = (mid.dt.hour + mid.dt.minute / 60.0).to_numpy(dtype=np.float64)
    local = np.mod(hours + lon / 15.0, 24.0)
    return pd.Series((local // (24 / HOUR_BINS)).astype(int), index=index["key"].astype(str).to_numpy())


def _grouped_constant(values: pd.Series, groups: pd.Series, kind: str) -> dict[Any, float]:
    frame = pd.DataFrame({"v": values.to_numpy(), "g": groups.to_numpy()})
    return {g: train_constant(part["v"].to_numpy(), kind) for g, part in frame.groupby("g")}


def _baselines(index: pd.DataFrame, truth: pd.DataFrame, keys: Sequence[str]) -> dict[str, dict[str, np.ndarray]]:
    """The input-blind rungs: {rung: {quantity: predictions over `keys`}}."""
    keys = list(keys)
    loc = location_of(index)
    row = _row_of(loc)
    hour = _local_hour_bin(index)
    start = pd.Series(pd.to_datetime(index["time_start"]).to_numpy(), index=loc.index)
    train = truth.index[truth["split"] == "train"] if "split" in truth.columns else truth.index
    span_days = (start[train].max() - start[train].min()) / pd.Timedelta(days=1) if len(train) else 0.0
    out: dict[str, dict[str, np.ndarray]] = {r: {} for r in ("train_mean", "location", "location_hour", "persistence")}
    for q, spec in cap.QUANTITIES.items():
        if q not in truth.columns:
            continue
        kind, values = spec.kind, truth.loc[train, q]
        ok = values.notna()
        values = values[ok]
        tkeys = values.index
        overall = train_constant(values.to_numpy(), kind)
        by_loc = _grouped_constant(values, loc[tkeys], kind)
        by_row = _grouped_constant(values, row[tkeys], kind)
        by_loc_hour = _grouped_constant(values, loc[tkeys] + "|" + hour[tkeys].astype(str), kind)
        place = np.array([by_loc.get(loc[k], by_row.get(row[k], overall)) for k in keys])
        out["train_mean"][q] = np.full(len(keys), overall)
        out["location"][q] = place
        seasonal = np.array([by_loc_hour.get(f"{loc[k]}|{hour[k]}", p) for k, p in zip(keys, place, strict=True)])
        if kind == "linear" and span_days >= 28:  # a linear trend of the residuals over the train period
            fit_resid = values.to_numpy() - np.array([by_loc_hour[f"{loc[k]}|{hour[k]}"] for k in tkeys])
            days = ((start[tkeys] - start[tkeys].min()) / pd.Timedelta(days=1)).to_numpy(dtype=np.float64)
            slope, icpt = np.polyfit(days, fit_resid, 1)
            when = ((start[keys] - start[tkeys].min()) / pd.Timedelta(days=1)).to_numpy(dtype=np.float64)
            seasonal = seasonal + icpt + slope * when
        out["location_hour"][q] = seasonal
        out["persistence"][q] = _persistence(truth[q], loc, start, keys)
    return out


def _persistence(values: pd.Series, loc: pd.Series, start: pd.Series, keys: Sequence[str]) -> np.ndarray:
    """The same location's previous window (any split), NaN where there is none."""
    frame = pd.DataFrame({"loc": loc, "start": start, "v": values.reindex(loc.index)}).sort_values(["loc", "start"])
    frame["prev"] = frame.groupby("loc")["v"].shift(1)
    return frame["prev"].reindex(list(keys)).to_numpy(dtype=np.float64)


# ---- the ridge readout on the raw window ---------------------------------------------------------------------------
def _ridge_targets(truth: pd.DataFrame, keys: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """The regression targets: the linear quantities, the mean wind components (for speed and direction), log1p rain."""
    names, cols = [], []
    for q, spec in cap.QUANTITIES.items():
        if q in truth.columns and spec.kind == "linear" and q != "wind_speed_m_s":
            names.append(q)
            cols.append(truth.loc[list(keys), q].to_numpy(dtype=np.float64))
    if {"wind_speed_m_s", "wind_dir_deg"} <= set(truth.columns):
        speed = truth.loc[list(keys), "wind_speed_m_s"].to_numpy(dtype=np.float64)
        direction = np.deg2rad(np.nan_to_num(truth.loc[list(keys), "wind_dir_deg"].to_numpy(dtype=np.float64)))
        names += ["_u", "_v"]  # the mean vector, blowing TO (u east, v north) from where it blows from
        cols += [-speed * np.sin(direction), -speed * np.cos(direction)]
    if "precip_mm" in truth.columns:
        names.append("_log_precip")
        cols.append(np.log1p(np.maximum(truth.loc[list(keys), "precip_mm"].to_numpy(dtype=np.float64), 0.0)))
    return names, np.stack(cols, axis=1)


def fit_ridge(
    x_train: np.ndarray, truth: pd.DataFrame, train_keys: Sequence[str], x_val: np.ndarray, val_keys: Sequence[str]
) -> dict[str, Any]:
    """A ridge regression from the flattened normalised window to every quantity, alpha chosen on val.

    Returns:
        The fit: {"names", "mean", "scale", "coef", "intercept", "alpha", "val_rmse"}.
    """
    names, y = _ridge_targets(truth, train_keys)
    mu, sd = x_train.mean(axis=0), x_train.std(axis=0) + 1e-6
    z = (x_train - mu) / sd
    y_mean = y.mean(axis=0)
    _, y_val = _ridge_targets(truth, val_keys)
    z_val = (x_val - mu) / sd
    gram = z.T @ z
    best: tuple[float, float, np.ndarray] | None = None
    for alpha in _ALPHAS:
        coef = np.linalg.solve(gram + alpha * len(z) * np.eye(gram.shape[0]), z.T @ (y - y_mean))
        rmse = float(np.sqrt(np.mean((z_val @ coef + y_mean - y_val) ** 2 / (y.std(axis=0) + 1e-9) ** 2)))
        if best is None or rmse < best[0]:
            best = (rmse, alpha, coef)
    assert best is not None
    logger.info("ridge readout: alpha %g (normalised val RMSE %.4f)", best[1], best[0])
    return {"names": names, "mean": mu, "scale": sd, "coef": best[2], "intercept": y_mean, "alpha": best[1],
            "val_rmse": best[0]}  # fmt: skip


def predict_ridge(fit: Mapping[str, Any], x: np.ndarray) -> dict[str, np.ndarray]:
    """The ridge's predictions of each quantity (speed and direction from the predicted mean wind vector)."""
    y = ((x - fit["mean"]) / fit["scale"]) @ fit["coef"] + fit["intercept"]
    cols = dict(zip(fit["names"], y.T, strict=True))
    out = {q: v for q, v in cols.items() if not q.startswith("_")}
    if "_u" in cols:
        u, v = cols["_u"], cols["_v"]
        out["wind_speed_m_s"] = np.hypot(u, v)
        out["wind_dir_deg"] = np.mod(270.0 - np.degrees(np.arctan2(v, u)), 360.0)
    if "_log_precip" in cols:
        out["precip_mm"] = np.expm1(np.maximum(cols["_log_precip"], 0.0))
    return out


# ---- scoring ---------------------------------------------------------------------------------------------------------
def score_predictions(
    pred: np.ndarray, true: np.ndarray, kind: str, clusters: Sequence[str] | np.ndarray, seed: int = 0
) -> dict[str, Any]:
    """Mean error of the kind over the samples with both a prediction and a truth, with its clustered 95% interval."""
    ok = np.isfinite(pred) & np.isfinite(true)
    err = errors(pred[ok], true[ok], kind)
    if not err.size:
        return {"mae": None, "ci95": None, "n": 0}
    lo, hi = cluster_bootstrap(err, np.asarray(clusters)[ok], seed=seed)
    return {"mae": float(err.mean()), "ci95": [lo, hi], "n": int(ok.sum())}


def ladder(
    index: pd.DataFrame,
    keys: Sequence[str],
    readouts: Mapping[str, Mapping[str, np.ndarray]],
    seed: int = 0,
) -> dict[str, Any]:
    """Every rung's error per quantity on the samples `keys`: with a `fused` rung, every rung of a quantity is
    scored on the samples whose caption states it (where `fused` has a value), so each compares with the model on
    the same samples (a caption that does not parse counts against the parse rate, not here).

    Args:
        index: the dataset's whole index (train split for fitting, the samples' rows for scoring).
        keys: the evaluated samples.
        readouts: predictions from rungs that read the window, {rung: {quantity: values over keys}} (`ridge`,
            `stats_head`, `fused`; NaN where a rung has no value, e.g. a caption that does not parse).
        seed: the bootstrap seed.

    Returns:
        {"samples", "windows", "quantities": {q: {"kind", "best_constant", rung: {"mae", "ci95", "n"}}}}.
    """
    truth = cap.quantities_from_index(index)
    keys = list(keys)
    clusters = pd.to_datetime(index.set_index(index["key"].astype(str)).loc[keys, "time_start"]).astype(str).to_numpy()
    rungs = {**_baselines(index, truth, keys), **{k: dict(v) for k, v in readouts.items()}}
    out: dict[str, Any] = {"samples": len(keys), "windows": int(len(set(clusters))), "quantities": {}}
    for q, spec in cap.QUANTITIES.items():
        if q not in truth.columns:
            continue
        true = truth.loc[keys, q].to_numpy(dtype=np.float64)
        fused = (readouts.get("fused") or {}).get(q)
        if fused is not None:  # the samples the model stated this quantity for: every rung on those
            true = np.where(np.isfinite(np.asarray(fused, dtype=np.float64)), true, np.nan)
        ok = np.isfinite(true)
        row: dict[str, Any] = {"kind": spec.kind}
        if ok.any():
            const = np.full_like(true, best_constant(true[ok], spec.kind))
            row["best_constant"] = score_predictions(const, true, spec.kind, clusters, seed)
        for name, preds in rungs.items():
            if q in preds:
                row[name] = score_predictions(np.asarray(preds[q], dtype=np.float64), true, spec.kind, clusters, seed)
        out["quantities"][q] = row
    return out
