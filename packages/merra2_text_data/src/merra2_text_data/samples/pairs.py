"""From a regional hourly cube to samples: the plan (windows x tiles), splits, arrays and statistics.

Everything here is a pure function over plain values or an in-memory `xr.Dataset` (dims time, lat, lon; hourly means
stamped at HH:30 UTC; lat S->N; lon W->E in array order, wrapping across the antimeridian).

Rules (also the dataset card's wording):

- Windows start at 00:00 UTC of the first whole day (the first day whose 00:30 step is present), every `stride`
  (for temporal subsets, `partial_days`: at the hour of the first step);
  a window `[start, end)` holds the hourly steps whose HH:30 stamps fall inside it, and only complete windows
  (`window / 1h` steps present) become samples.
- Tiles of `(ny, nx)` grid points are cut from the south-west corner. Where the tile does not divide the region grid,
  the rest at the north or east edge is handled by `edge_tiles`: `drop` (the default) leaves it out, so every sample of
  a dataset has the same array shape (and the card states the strip no sample covers); `keep` keeps a partial edge
  tile of at least half a tile along that axis (`2 * rest >= size`), smaller than the others, so one dataset then
  holds several array shapes. Without a tile size the whole region is one sample.
- Keys: `<region>-<YYYYMMDD>T<HHMM>[-t<iy>x<ix>]`, e.g. `conus-20190101T0000-t03x05` (tile row 3 from the south,
  column 5 from the west).
- Arrays are float32 `[time, variable, lat, lon]`: means over the hourly steps of each `time_step` bucket.
- Statistics are computed on that stored array (the aggregated resolution): `mean` is the cos(latitude)-weighted mean
  over grid points and time steps (identical to the hourly one, as buckets are equal-sized means), `min`/`max` are the
  extremes of the stored array. Captions quote these same numbers.
- Durations (`durations`), tile ranges (`tiles`), splits (`splits`) and train normalisation (`normalize`) live in
  their own modules.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from merra2_text_data.config.durations import HOUR, check_time_step, format_duration, parse_duration
from merra2_text_data.errors import BuildError, ConfigError, MissingDataError

from .tiles import EDGE_TILES, dividing_tiles, tile_ranges

__all__ = [
    "EDGE_TILES", "HOUR", "UNASSIGNED", "SampleData", "SamplePlan", "check_time_step", "dividing_tiles", "extract_sample",
    "extract_window", "format_duration", "iter_samples", "parse_duration", "plan_samples", "tile_ranges", "with_split",
]  # fmt: skip

logger = logging.getLogger(__name__)

UNASSIGNED = "unassigned"
"""The split of a plan before `assign_splits`."""

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]+")


@dataclass(frozen=True)
class SamplePlan:
    """One sample to build: a time window over one tile. Serialisable with `to_dict` / `from_dict`."""

    key: str
    time_start: pd.Timestamp
    """Window start (UTC, inclusive)."""
    time_end: pd.Timestamp
    """Window end (UTC, exclusive)."""
    lat_start: int
    lat_stop: int
    lon_start: int
    lon_stop: int
    bbox: tuple[float, float, float, float]
    """(W, S, E, N) of the tile's grid points; W > E across the antimeridian."""
    split: str = UNASSIGNED
    region: str = ""
    tile: tuple[int, int] | None = None
    """(row from the south, column from the west), or None for a whole-region sample."""

    @property
    def lat_slice(self) -> slice:
        """Index slice of the tile along lat."""
        return slice(self.lat_start, self.lat_stop)

    @property
    def lon_slice(self) -> slice:
        """Index slice of the tile along lon."""
        return slice(self.lon_start, self.lon_stop)

    @property
    def tile_label(self) -> str:
        """`t03x05`, or `all` for a whole-region sample (the grouping of `DayOfYearClimatology`)."""
        return "all" if self.tile is None else f"t{self.tile[0]:02d}x{self.tile[1]:02d}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (times as ISO 8601 UTC)."""
        out: dict[str, Any] = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["time_start"], out["time_end"] = self.time_start.isoformat(), self.time_end.isoformat()
        out["bbox"] = list(self.bbox)
        out["tile"] = None if self.tile is None else list(self.tile)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplePlan:
        """Inverse of `to_dict`."""
        d = dict(data)
        d["time_start"], d["time_end"] = _utc(d["time_start"]), _utc(d["time_end"])
        d["bbox"] = tuple(float(x) for x in d["bbox"])
        d["tile"] = None if d.get("tile") is None else tuple(d["tile"])
        return cls(**d)


@dataclass(frozen=True, eq=False)
class SampleData:
    """The data of one sample, ready for validation, captioning and writing."""

    plan: SamplePlan
    array: np.ndarray
    """float32 `[time, variable, lat, lon]` in physical units."""
    lat: np.ndarray
    lon: np.ndarray
    times: pd.DatetimeIndex
    """Start of each time step (UTC)."""
    variables: tuple[str, ...]
    stats: dict[str, dict[str, float]] = field(default_factory=dict)
    """{V: {"mean", "min", "max"}}: cos-latitude weighted mean, extremes of `array` (plain floats)."""


def _utc(value: Any) -> pd.Timestamp:
    ts = pd.Timestamp(value)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def _utc_index(times: Any) -> pd.DatetimeIndex:
    idx = pd.DatetimeIndex(times)
    return idx.tz_localize("UTC") if idx.tz is None else idx.tz_convert("UTC")


def _window_starts(
    times: pd.DatetimeIndex, window: pd.Timedelta, stride: pd.Timedelta, partial_days: bool = False
) -> list[pd.Timestamp]:
    if partial_days:  # temporal subsets: the grid of windows starts at the first step's hour
        first = times[0].floor("h")
    else:
        first = times[0].floor("D")
        if times[0] >= first + HOUR:  # the first day is not whole
            first += pd.Timedelta(days=1)
    n = int((times[-1] - first) // stride) + 1 if times[-1] >= first else 0
    if n == 0:
        return []
    starts = pd.date_range(first, periods=n, freq=stride)
    counts = times.searchsorted(starts + window, side="left") - times.searchsorted(starts, side="left")
    complete = counts == int(window / HOUR)
    if (~complete).any():
        logger.info("skipped %d incomplete window(s) of %d (gaps or period edges)", int((~complete).sum()), n)
    return list(starts[complete])


def plan_samples(
    times: Any,
    n_lat: int,
    n_lon: int,
    lat: Sequence[float] | np.ndarray,
    lon: Sequence[float] | np.ndarray,
    region_name: str,
    window: str | pd.Timedelta = "1d",
    stride: str | pd.Timedelta | None = None,
    tile: tuple[int, int] | None = None,
    bbox: tuple[float, float, float, float] | None = None,
    edge_tiles: str = "drop",
    partial_days: bool = False,
) -> list[SamplePlan]:
    """Plan every sample (windows x tiles) before any data is read.

    Args:
        times: the cube's hourly time stamps (UTC; naive values are taken as UTC), ascending and unique.
        n_lat: number of lat points of the region grid.
        n_lon: number of lon points.
        lat: lat values, ascending S->N.
        lon: lon values in array order W->E (may wrap across the antimeridian).
        region_name: the region's short name, used in keys (unsafe characters become `_`).
        window: span of one sample (default 1d).
        stride: step between window starts (default: the window).
        tile: (ny, nx) grid points per tile, or None for the whole region.
        bbox: the requested region (W, S, E, N); when given, a grid far outside it is logged as a warning.
        edge_tiles: `drop` or `keep` the partial tiles at the north/east edge (module rules).
        partial_days: the cube holds temporal subsets: windows start at the hour of the first step instead of 00:00
            of the first whole day (`source.allow_partial_days`).

    Returns:
        The plans ordered by time, then tile row and column, with split `unassigned`.

    Raises:
        ConfigError: bad window/stride/tile, or a tile that leaves no sample.
        BuildError: times not ascending and unique, or coordinates that do not match n_lat/n_lon.
    """
    w = parse_duration(window)
    s = w if stride is None else parse_duration(stride)
    lat_a, lon_a = np.asarray(lat, dtype=float), np.asarray(lon, dtype=float)
    if lat_a.shape != (n_lat,) or lon_a.shape != (n_lon,):
        raise BuildError(
            f"grid of {lat_a.size} x {lon_a.size} coordinates does not match n_lat={n_lat}, n_lon={n_lon}"
        )
    idx = _utc_index(times)
    if len(idx) == 0:
        raise MissingDataError("the cube has no time steps; check the period and --allow-gaps")
    if len(idx) > 1 and not (np.diff(idx.asi8) > 0).all():
        bad = int(np.argmin(np.diff(idx.asi8) > 0))
        raise BuildError(
            f"cube times are not ascending and unique at position {bad} ({idx[bad]}, {idx[bad + 1]})"
        )
    if tile is not None and (len(tile) != 2 or min(tile) < 1):
        raise ConfigError(f"tile {tile!r} must be two positive grid-point counts, e.g. 16x16")
    lat_tiles = tile_ranges(n_lat, None if tile is None else tile[0], edge_tiles)
    lon_tiles = tile_ranges(n_lon, None if tile is None else tile[1], edge_tiles)
    if not lat_tiles or not lon_tiles:
        assert tile is not None
        limit = "larger than" if edge_tiles == "drop" else "more than twice"
        raise ConfigError(
            f"tile {tile[0]}x{tile[1]} is {limit} the region grid {n_lat}x{n_lon} (lat x lon): no sample fits; "
            f"choose a smaller --tile (e.g. {dividing_tiles(n_lat, tile[0])[0]}x{dividing_tiles(n_lon, tile[1])[0]}, "
            "which divides the grid) or a larger region"
        )
    if tile is not None:
        _log_edges(n_lat, n_lon, tile, lat_tiles, lon_tiles, edge_tiles)
    if bbox is not None:
        _warn_outside(lat_a, lon_a, bbox)
    slug = _KEY_UNSAFE.sub("_", region_name).strip("_") or "region"
    plans = []
    for start in _window_starts(idx, w, s, partial_days):
        stamp = f"{slug}-{start:%Y%m%dT%H%M}"
        for iy, (y0, y1) in enumerate(lat_tiles):
            for ix, (x0, x1) in enumerate(lon_tiles):
                box = (float(lon_a[x0]), float(lat_a[y0]), float(lon_a[x1 - 1]), float(lat_a[y1 - 1]))
                key = stamp if tile is None else f"{stamp}-t{iy:02d}x{ix:02d}"
                plans.append(
                    SamplePlan(key, start, start + w, y0, y1, x0, x1, box, region=region_name,
                               tile=None if tile is None else (iy, ix))
                )  # fmt: skip
    logger.info("planned %d samples: %d tile(s) x %d window(s)", len(plans), len(lat_tiles) * len(lon_tiles),
                len(plans) // max(1, len(lat_tiles) * len(lon_tiles)))  # fmt: skip
    return plans


def _log_edges(n_lat: int, n_lon: int, tile: tuple[int, int], lat_tiles: list[tuple[int, int]],
               lon_tiles: list[tuple[int, int]], edge_tiles: str) -> None:  # fmt: skip
    """Say what a tile that does not divide the grid does at the edges, and which tiles would divide it."""
    left_lat, left_lon = n_lat - lat_tiles[-1][1], n_lon - lon_tiles[-1][1]
    if n_lat % tile[0] == 0 and n_lon % tile[1] == 0:
        return
    suggest = f"{dividing_tiles(n_lat, tile[0])[0]}x{dividing_tiles(n_lon, tile[1])[0]}"
    if edge_tiles == "drop":
        logger.warning(
            "tile %dx%d does not divide the region grid %dx%d (lat x lon): the northernmost %d row(s) and "
            "easternmost %d column(s) are in no sample (sample.edge_tiles: drop keeps one array shape; the card "
            "states the strip). A tile that divides the grid: %s; or sample.edge_tiles: keep for smaller edge tiles",
            tile[0], tile[1], n_lat, n_lon, left_lat, left_lon, suggest,
        )  # fmt: skip
    else:
        shapes = sorted({(y1 - y0, x1 - x0) for y0, y1 in lat_tiles for x0, x1 in lon_tiles})
        logger.warning(
            "tile %dx%d does not divide the region grid %dx%d: sample.edge_tiles: keep gives %d array shapes %s in "
            "one dataset (plain webdataset batching needs one; the trainer refuses them). A tile that divides the "
            "grid: %s",
            tile[0], tile[1], n_lat, n_lon, len(shapes), shapes, suggest,
        )  # fmt: skip


def _warn_outside(lat: np.ndarray, lon: np.ndarray, bbox: tuple[float, float, float, float]) -> None:
    west, south, east, north = bbox
    tol = 1.0
    span = (east - west) % 360.0 or 360.0
    lon_off = ((lon - west) % 360.0) > span + tol
    lon_off &= ((west - lon) % 360.0) > tol
    if lat.min() < south - tol or lat.max() > north + tol or lon_off.any():
        logger.warning("grid lat %.3f..%.3f, lon %.3f..%.3f reaches outside the region bbox %s",
                       lat.min(), lat.max(), lon[0], lon[-1], bbox)  # fmt: skip


def _load_block(
    cube: xr.Dataset, variables: Sequence[str], start: pd.Timestamp, end: pd.Timestamp
) -> np.ndarray:
    missing = [v for v in variables if v not in cube.data_vars]
    if missing:
        raise MissingDataError(
            f"variable(s) {', '.join(missing)} are not in the cube (it has {', '.join(map(str, cube.data_vars))}); "
            "add them to the source or drop them from --variables"
        )
    idx = _utc_index(cube["time"].values)
    i0, i1 = int(idx.searchsorted(start, side="left")), int(idx.searchsorted(end, side="left"))
    expected = int((end - start) / HOUR)
    if i1 - i0 != expected:
        raise MissingDataError(
            f"window {start.isoformat()}..{end.isoformat()} has {i1 - i0} hourly steps in the cube, expected "
            f"{expected}; pass a cube covering the whole window (or plan with plan_samples, which skips gaps)"
        )
    # one compute for every variable of the block: a dask compute per variable cost a graph optimisation and a
    # scheduler round each (88 of them for 8 days of 11 variables, a third of the 1x build's shard stage)
    block = cube[list(variables)].isel(time=slice(i0, i1)).compute()
    layers = [
        np.asarray(block[v].transpose("time", "lat", "lon").values, dtype=np.float32) for v in variables
    ]
    return np.stack(layers, axis=1)  # (T, V, lat, lon)


def _stats(array: np.ndarray, lat: np.ndarray, variables: Sequence[str]) -> dict[str, dict[str, float]]:
    weights = np.maximum(np.cos(np.deg2rad(lat)), 1e-12)
    weights = weights / weights.sum()
    a64 = array.astype(np.float64)
    means = np.einsum("tvyx,y->v", a64, weights) / (array.shape[0] * array.shape[3])
    mins, maxs = a64.min(axis=(0, 2, 3)), a64.max(axis=(0, 2, 3))
    return {
        v: {"mean": float(means[i]), "min": float(mins[i]), "max": float(maxs[i])}
        for i, v in enumerate(variables)
    }


def extract_window(
    cube: xr.Dataset,
    plans: Sequence[SamplePlan],
    variables: Sequence[str],
    time_step: str | pd.Timedelta = "1h",
) -> list[SampleData]:
    """Extract every tile of one time window from one loaded block (one `.values` read per variable).

    Args:
        cube: the regional cube (or any time slice of it that covers the window).
        plans: plans that share the same `time_start` and `time_end` (usually all tiles of one window).
        variables: variable names, in array order.
        time_step: resolution inside the sample; the array holds means over the hourly steps of each bucket.

    Returns:
        One SampleData per plan, in the order of `plans`. NaN in the source stays NaN (validation rejects it).

    Raises:
        ConfigError: plans of different windows, or a time step that does not divide the window.
        MissingDataError: a variable or hourly step of the window is missing from the cube.
    """
    if not plans:
        return []
    start, end = plans[0].time_start, plans[0].time_end
    if any(p.time_start != start or p.time_end != end for p in plans):
        raise ConfigError("extract_window needs plans of one window; group them with iter_samples")
    step = check_time_step(end - start, time_step)
    block = _load_block(cube, variables, start, end)
    k = int(step / HOUR)
    if k > 1:
        t, v, ny, nx = block.shape
        block = block.reshape(t // k, k, v, ny, nx).mean(axis=1, dtype=np.float64).astype(np.float32)
    times = pd.date_range(start, end, freq=step, inclusive="left")
    lat_all, lon_all = (
        np.asarray(cube["lat"].values, dtype=float),
        np.asarray(cube["lon"].values, dtype=float),
    )
    out = []
    for plan in plans:
        arr = np.ascontiguousarray(block[:, :, plan.lat_slice, plan.lon_slice])
        lat = lat_all[plan.lat_slice].copy()
        out.append(SampleData(plan, arr, lat, lon_all[plan.lon_slice].copy(), times, tuple(variables),
                              _stats(arr, lat, variables)))  # fmt: skip
    return out


def extract_sample(
    cube: xr.Dataset, plan: SamplePlan, variables: Sequence[str], time_step: str | pd.Timedelta = "1h"
) -> SampleData:
    """Extract one sample (see `extract_window`, which does all tiles of a window in one read)."""
    return extract_window(cube, [plan], variables, time_step)[0]


def iter_samples(
    cube: xr.Dataset,
    plans: Sequence[SamplePlan],
    variables: Sequence[str],
    time_step: str | pd.Timedelta = "1h",
) -> Iterator[SampleData]:
    """Stream the samples of `plans`, reading each window once (plans of one window must be adjacent)."""
    i = 0
    while i < len(plans):
        j = i + 1
        while (
            j < len(plans)
            and plans[j].time_start == plans[i].time_start
            and plans[j].time_end == plans[i].time_end
        ):
            j += 1
        yield from extract_window(cube, plans[i:j], variables, time_step)
        i = j


def with_split(plan: SamplePlan, split: str) -> SamplePlan:
    """A copy of `plan` with `split` set."""
    return replace(plan, split=split)
