"""Interventions: change the window in physical units and see whether the generated numbers follow.

A model that reads the window moves its number by the shift (slope about 1); a model that recognises the place and
time does not (slope about 0). Shifts (`parse_intervention`):

- `T2M=+3`, `SLP=-500`, any variable `V=+d`: add d (the variable's units: K, Pa, ...) to that variable of every grid
  point and time step, nothing else. The quantity read back is the one the variable drives (`DRIVES`): T2M ->
  mean 2 m temperature (°C, so the slope is per K), SLP -> pressure (hPa per Pa x 100), ...
- `WIND=+2`: scale the U10M and V10M fields of each window by one factor so that the speed of its mean vector (the
  caption's: cos(latitude)-weighted when the windows' latitudes are given) rises by 2 m/s, its direction kept; read
  back: the wind speed.
- `permute`: the grid points of each latitude row shuffled among themselves (one permutation per row and window, the
  same for every variable and time step), so the caption's statistics (the cos(latitude)-weighted mean, the minimum
  and the maximum) are exactly unchanged: how far each generated number moves, in its own error measure.

The slope of each sample is the least-squares slope of its generated value on the shifts (0 included); reported:
the median (the goal's figure), the mean, and a 95% bootstrap interval of the mean slope clustered by time window.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from climate_text_schema.caption_reading import parse_caption_numbers
from climate_text_schema.captions import QUANTITIES

from fusion_trainer.errors import ConfigError, ModelError
from fusion_trainer.scores import cluster_bootstrap, errors

__all__ = [
    "DRIVES", "Intervention", "apply_intervention", "intervention_report", "parse_intervention", "permute_grid",
    "row_weights",
]  # fmt: skip

logger = logging.getLogger(__name__)

DRIVES: dict[str, tuple[str, float]] = {
    "T2M": ("t2m_mean_c", 1.0),
    "T2MDEW": ("dewpoint_c", 1.0),
    "SLP": ("slp_hpa", 0.01),
    "QV2M": ("qv_g_kg", 1000.0),
    "WIND": ("wind_speed_m_s", 1.0),
}
"""Variable -> (the caption quantity it drives, quantity units per variable unit)."""
_SHIFT = re.compile(r"^\s*([A-Za-z0-9]+)\s*=\s*([+-]?\d+(?:\.\d+)?)\s*$")


@dataclass(frozen=True)
class Intervention:
    """One shift: `variable` by `delta` in its physical units (`WIND`: the mean wind speed in m/s)."""

    variable: str
    delta: float

    @property
    def label(self) -> str:
        """`T2M=+3`."""
        return f"{self.variable}={self.delta:+g}"


def parse_intervention(text: str, variables: Sequence[str]) -> Intervention:
    """Parse `V=+d` (or `WIND=+d`) against the run's variables.

    Raises:
        ConfigError: malformed text, an unknown variable, or a variable whose caption quantity is not read back.
    """
    match = _SHIFT.match(text)
    if not match:
        raise ConfigError(f"--intervene {text!r}: write VARIABLE=+DELTA in its units, e.g. T2M=+3, SLP=-500, WIND=+2")
    name, delta = match.group(1).upper(), float(match.group(2))
    if name == "WIND":
        if not {"U10M", "V10M"} <= set(variables):
            raise ConfigError(f"--intervene {text!r}: WIND needs U10M and V10M; the run has {list(variables)}")
    elif name not in variables:
        raise ConfigError(f"--intervene {text!r}: {name} is not one of the run's variables {list(variables)}")
    if name not in DRIVES:
        raise ConfigError(f"--intervene {text!r}: no caption number follows {name}; shift one of {sorted(DRIVES)}")
    return Intervention(name, delta)


def row_weights(lats: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    """Each window's row weights `(B, H)` summing to 1: cos(latitude) of `lats` `(B, H)` as the captions weigh their
    means (`merra2_text_data`'s statistics), or equal weights without latitudes."""
    b, h = shape[0], shape[-2]
    if lats is None:
        return np.full((b, h), 1.0 / h)
    w = np.maximum(np.cos(np.deg2rad(np.asarray(lats, dtype=np.float64).reshape(b, h))), 1e-12)
    return w / w.sum(axis=1, keepdims=True)


def apply_intervention(
    climate: np.ndarray, variables: Sequence[str], shift: Intervention, lats: np.ndarray | None = None
) -> np.ndarray:
    """A shifted copy of windows `(B, T, V, H, W)` in physical units (module docstring); `lats` `(B, H)`: each
    window's row latitudes, so a WIND shift raises the caption's (weighted) mean-vector speed by exactly its delta."""
    x = np.array(climate, dtype=np.float32, copy=True)
    if shift.variable != "WIND":
        x[:, :, list(variables).index(shift.variable)] += np.float32(shift.delta)
        return x
    iu, iv = list(variables).index("U10M"), list(variables).index("V10M")
    weights = row_weights(lats, x.shape)  # (B, H)
    u = np.einsum("bthw,bh->b", x[:, :, iu].astype(np.float64), weights) / (x.shape[1] * x.shape[-1])
    v = np.einsum("bthw,bh->b", x[:, :, iv].astype(np.float64), weights) / (x.shape[1] * x.shape[-1])
    speed = np.hypot(u, v)
    factor = np.where(speed > 1e-3, (speed + shift.delta) / np.maximum(speed, 1e-3), 1.0).astype(np.float32)
    factor = np.maximum(factor, 0.0)
    x[:, :, iu] *= factor[:, None, None, None]
    x[:, :, iv] *= factor[:, None, None, None]
    return x


def permute_grid(climate: np.ndarray, seed: int = 0) -> np.ndarray:
    """Each window's points shuffled within each latitude row (one permutation per row and window, the same for
    every variable and time step): the cos(latitude)-weighted mean, the minimum and the maximum stay exactly as
    they were; only where in its row each value sits changes."""
    x = np.array(climate, dtype=np.float32, copy=True)
    b, _, _, h, w = x.shape
    rng = np.random.default_rng(seed)
    for i in range(b):
        for row in range(h):
            x[i, :, :, row] = x[i, :, :, row][..., rng.permutation(w)]
    return x


def _slopes(deltas: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Per-sample least-squares slope of `values` `(B, S)` on `deltas` `(S,)`, NaN where fewer than 2 parse."""
    out = np.full(values.shape[0], np.nan)
    for i, row in enumerate(values):
        ok = np.isfinite(row)
        if ok.sum() >= 2 and np.ptp(deltas[ok]) > 0:
            out[i] = np.polyfit(deltas[ok], row[ok], 1)[0]
    return out


def intervention_report(
    describe: Callable[[np.ndarray], list[str]],
    climate: np.ndarray,
    variables: Sequence[str],
    clusters: Sequence[str],
    shifts: Sequence[Intervention],
    permute: bool = True,
    seed: int = 0,
    max_windows: int = 320,
    lats: np.ndarray | None = None,
) -> dict[str, Any]:
    """Generate for the windows as they are, shifted, and permuted; report the slopes and the movement.

    Args:
        describe: windows `(B, T, V, H, W)` in physical units -> captions (`FusionRun.describe`).
        climate: the windows, physical units.
        variables: their variable names.
        clusters: each window's time window (for the bootstrap).
        shifts: the shifts to apply (several deltas per variable give the slope).
        permute: also permute each window's grid.
        seed: the permutation and bootstrap seed.
        max_windows: at most this many windows (the variants of `climate` side by side) per `describe` call.
        lats: each window's row latitudes `(B, H)`: a WIND shift then moves the caption's area-weighted mean vector
            by its delta (without them, the plain mean vector: the caption's speed moves by about the delta).
    """
    by_var: dict[str, list[Intervention]] = {}
    for s in shifts:
        by_var.setdefault(s.variable, []).append(s)
    ordered = [s for group in by_var.values() for s in group]
    variants: list[Callable[[], np.ndarray]] = [lambda: climate]
    variants += [functools.partial(apply_intervention, climate, variables, s, lats) for s in ordered]
    if permute:
        variants.append(functools.partial(permute_grid, climate, seed))
    # several variants a call, so `describe` fills whole batches (the demo's 13 variants of 24 windows: 5 batches of
    # 64 instead of 26 of at most 16), at most `max_windows` windows at once (a copy of each is in memory)
    n = climate.shape[0]
    per_call = max(1, max_windows // max(n, 1))
    texts: list[str] = []
    for i in range(0, len(variants), per_call):
        windows = np.concatenate([make() for make in variants[i : i + per_call]], axis=0)
        got = describe(windows)
        if len(got) != len(windows):
            raise ModelError(f"describe returned {len(got)} texts for {len(windows)} windows; it must give one each")
        texts += got
    parsed = [[parse_caption_numbers(t) for t in texts[i * n : (i + 1) * n]] for i in range(len(variants))]
    base = parsed[0]
    shifted = dict(zip(ordered, parsed[1 : 1 + len(ordered)], strict=True))
    report: dict[str, Any] = {"samples": int(n), "slopes": {}, "permute": None}
    for var, group in by_var.items():
        quantity, per_unit = DRIVES[var]
        deltas = np.array([0.0] + [s.delta * per_unit for s in group])
        values = np.full((n, len(deltas)), np.nan)
        values[:, 0] = [p.get(quantity, math.nan) for p in base]
        for j, shift in enumerate(group, start=1):
            values[:, j] = [p.get(quantity, math.nan) for p in shifted[shift]]
        slopes = _slopes(deltas, values)
        ok = np.isfinite(slopes)
        report["slopes"][var] = {
            "quantity": quantity, "shifts": [s.label for s in group], "quantity_shifts": deltas[1:].tolist(),
            "median": float(np.median(slopes[ok])) if ok.any() else None,
            "mean": float(slopes[ok].mean()) if ok.any() else None,
            "ci95": list(cluster_bootstrap(slopes[ok], np.asarray(clusters)[ok], seed=seed)) if ok.any() else None,
            "samples": int(ok.sum()),
            "per_shift_mean_change": [float(np.nanmean(values[:, j] - values[:, 0])) for j in range(1, len(deltas))],
        }  # fmt: skip
    if permute:
        moved = parsed[-1]
        out: dict[str, Any] = {}
        for q, spec in QUANTITIES.items():
            pairs = [(b[q], m[q]) for b, m in zip(base, moved, strict=True) if q in b and q in m]
            if pairs:
                a, c = np.array(pairs).T
                out[q] = {"mean_change": float(errors(c, a, spec.kind).mean()), "samples": len(pairs)}
        report["permute"] = out
    return report
