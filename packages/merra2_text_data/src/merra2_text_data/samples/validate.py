"""Per-sample validation: every reason a sample must be rejected, and the quarantine table.

The builder's policy (in `pipeline`): a sample with reasons is quarantined (a row of `quarantine.parquet`), or, with
`--strict`, the build fails with `SampleValidationError`. This module only finds the reasons.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from climate_text_schema import KNOWN_VARIABLES, check_climate_array

from merra2_text_data.errors import SampleValidationError

__all__ = ["QUARANTINE_COLUMNS", "quarantine_frame", "quarantine_row", "raise_if_invalid", "validate_sample"]

logger = logging.getLogger(__name__)

QUARANTINE_COLUMNS: tuple[str, ...] = ("key", "split", "time_start", "time_end", "reason")
_STATS = ("mean", "min", "max")
_REL_TOL = 1e-5


def _check_stats(stats: Mapping[str, Mapping[str, float]], variables: Sequence[str]) -> list[str]:
    reasons = []
    for v in variables:
        entry = stats.get(v)
        if entry is None or any(s not in entry for s in _STATS):
            reasons.append(f"{v}: statistics missing (need mean, min, max; found {sorted(entry or {})})")
            continue
        values = {s: float(entry[s]) for s in _STATS}
        bad = [s for s, x in values.items() if not math.isfinite(x)]
        if bad:
            reasons.append(f"{v}: {', '.join(f'{s}={values[s]}' for s in bad)} in statistics")
            continue
        tol = _REL_TOL * max(abs(values["mean"]), 1e-12)
        if not values["min"] - tol <= values["mean"] <= values["max"] + tol:
            reasons.append(
                f"{v}: statistics out of order: min {values['min']}, mean {values['mean']}, max {values['max']}"
            )
        spec = KNOWN_VARIABLES.get(v)
        if spec is not None:
            for s in ("min", "max"):
                if not spec.lower <= values[s] <= spec.upper:
                    reasons.append(
                        f"{v}: {s} {values[s]:.6g} {spec.units} is outside the plausible range "
                        f"{spec.lower:g}..{spec.upper:g} (unit mistake or corrupt data)"
                    )
    return reasons


def _check_against_array(
    array: np.ndarray, stats: Mapping[str, Mapping[str, float]], variables: Sequence[str]
) -> list[str]:
    if array.ndim != 4 or array.shape[1] != len(variables) or array.size == 0 or np.isnan(array).any():
        return []
    reasons = []
    lo, hi = array.min(axis=(0, 2, 3)).astype(float), array.max(axis=(0, 2, 3)).astype(float)
    for i, v in enumerate(variables):
        entry = stats.get(v, {})
        for name, actual in (("min", lo[i]), ("max", hi[i])):
            stated = float(entry.get(name, math.nan))
            if math.isfinite(stated) and abs(stated - actual) > _REL_TOL * max(abs(actual), 1e-12):
                reasons.append(f"{v}: statistics {name} {stated:.6g} differs from the array's {actual:.6g}")
    return reasons


def _check_coords(lat: np.ndarray, lon: np.ndarray, array: np.ndarray) -> list[str]:
    reasons = []
    if array.ndim == 4 and (lat.size, lon.size) != array.shape[2:]:
        reasons.append(
            f"coordinates {lat.size} lat x {lon.size} lon do not match the array grid {array.shape[2:]}"
        )
    if not np.isfinite(lat).all() or not np.isfinite(lon).all():
        return [*reasons, "NaN or infinite lat/lon coordinates"]
    if lat.size and (lat.min() < -90 or lat.max() > 90):
        reasons.append(f"lat {lat.min()}..{lat.max()} outside -90..90")
    if lat.size > 1 and not (np.diff(lat) > 0).all():
        reasons.append(f"lat is not strictly ascending south to north: {lat[:4].tolist()}...")
    if lon.size and (lon.min() < -180 or lon.max() > 360):
        reasons.append(f"lon {lon.min()}..{lon.max()} outside -180..360")
    if lon.size > 1:
        raw = np.diff(lon)
        steps = raw % 360.0
        if (steps == 0).any() or (steps >= 180).any() or (raw < 0).sum() > 1 or steps.sum() >= 360:
            reasons.append(
                f"lon is not ascending west to east (one antimeridian wrap allowed): {lon[:4].tolist()}..."
            )
    return reasons


def _where_nan(array: np.ndarray, variables: Sequence[str]) -> str:
    """Which variables hold the NaN (missing) values, and what they mean."""
    if array.ndim != 4 or array.shape[1] != len(variables):
        return ""
    counts = np.isnan(array).sum(axis=(0, 2, 3))
    where = ", ".join(f"{v} {int(n)}" for v, n in zip(variables, counts, strict=True) if n)
    return f" ({where}): missing data, i.e. the source's _FillValue 1e15 (masked) or NaN"


def validate_sample(
    array: np.ndarray,
    stats: Mapping[str, Mapping[str, float]],
    variables: Sequence[str],
    lat: np.ndarray | Sequence[float],
    lon: np.ndarray | Sequence[float],
) -> list[str]:
    """Return every reason to reject a sample (an empty list when it is valid).

    Checks: the climate-array contract (`check_climate_array`: float32, 4-D, no NaN, no fill values), statistics
    present and finite for every variable, min <= mean <= max, min/max within the contract's plausibility bounds
    (`KNOWN_VARIABLES`), statistics equal to the array's extremes, lat strictly ascending within -90..90, lon ascending
    west to east with at most one antimeridian wrap, and coordinates matching the grid.

    Args:
        array: `[time, variable, lat, lon]`.
        stats: `{V: {"mean", "min", "max"}}`.
        variables: variable names in array order.
        lat: lat coordinate values.
        lon: lon coordinate values.

    Returns:
        Human-readable reasons, each naming the variable or coordinate and the offending value.
    """
    values = np.asarray(array)
    reasons = [
        f"climate array: {p}{_where_nan(values, variables) if p.endswith('NaN values') else ''}"
        for p in check_climate_array(values, len(variables))
    ]
    reasons += _check_stats(stats, variables)
    reasons += _check_against_array(np.asarray(array), stats, variables)
    reasons += _check_coords(np.asarray(lat, dtype=float), np.asarray(lon, dtype=float), np.asarray(array))
    return reasons


def raise_if_invalid(key: str, reasons: Sequence[str]) -> None:
    """The `--strict` policy: raise SampleValidationError naming the sample and every reason."""
    if reasons:
        raise SampleValidationError(
            f"sample {key!r} failed validation: {'; '.join(reasons)}; rerun without --strict to quarantine it"
        )


def quarantine_row(
    key: str, split: str, time_start: pd.Timestamp, time_end: pd.Timestamp, reasons: Sequence[str] | str
) -> dict[str, Any]:
    """One quarantine row; several reasons are joined with `; `."""
    reason = reasons if isinstance(reasons, str) else "; ".join(reasons)
    return {"key": key, "split": split, "time_start": time_start, "time_end": time_end, "reason": reason}


def quarantine_frame(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """The quarantine table: columns key, split, reason (str) and time_start, time_end (UTC timestamps).

    Args:
        rows: mappings with those five keys (`quarantine_row`); `reason` may be a list of reasons. No rows is fine.

    Returns:
        A frame with exactly `QUARANTINE_COLUMNS`, same dtypes with 0 rows or many.
    """
    records = [dict(r) for r in rows]
    for r in records:
        if not isinstance(r.get("reason"), str):
            r["reason"] = "; ".join(map(str, r.get("reason") or []))
    data: dict[str, Any] = {}
    for col in QUARANTINE_COLUMNS:
        values = [r.get(col) for r in records]
        if col.startswith("time_"):
            data[col] = pd.Series(
                pd.to_datetime(pd.Series(values, dtype=object), utc=True), dtype="datetime64[us, UTC]"
            )
        else:
            data[col] = pd.Series([str(v) for v in values], dtype=str)
    if records:
        logger.info("quarantined %d sample(s)", len(records))
    return pd.DataFrame(data, columns=list(QUARANTINE_COLUMNS))
