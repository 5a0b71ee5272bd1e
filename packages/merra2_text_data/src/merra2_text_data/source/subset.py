"""Lazy regional subsetting of MERRA-2 granules into one hourly cube, with a zarr v3 cache.

Each granule is checked (readable, has the variables, its time axis is the day its name says, complete), cut to the
region's MERRA-2 grid points (two slices across the antimeridian), then SLV and FLX are merged on time and the days
concatenated. Nothing is read until computed; dask chunks hold one day.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import fsspec
import h5py
import numpy as np
import xarray as xr
from climate_text_schema import KNOWN_VARIABLES

from merra2_text_data.errors import ConfigError, GranuleError, MissingDataError
from merra2_text_data.regions import Region, grid_points
from merra2_text_data.tempfiles import remove_stale_temps, temp_sibling

from .checks import check_chunks, check_collection, check_time
from .granules import Granule, collection_for

__all__ = ["cache_key", "open_region", "variable_collection"]

logger = logging.getLogger(__name__)

_CACHE_FORMAT = 1


def variable_collection(variable: str) -> str:
    """The collection that holds a variable (the contract's table first, then the collections' variable lists).

    Raises:
        ConfigError: unknown variable.
    """
    spec = KNOWN_VARIABLES.get(variable)
    return spec.collection if spec is not None else collection_for(variable)


def cache_key(granules: Sequence[Granule], variables: Sequence[str], region: Region, start: date, end: date,
              allow_partial_days: bool = False) -> str:  # fmt: skip
    """The hex digest naming a regional cube: region, dates, variables and the identities of the granules.

    Granule identity is (granule_id, file name, size, checksum): moving files does not change it, new data does.
    """
    payload = {
        "format": _CACHE_FORMAT,
        "region": [region.name, *region.bbox],
        "start": start.isoformat(),
        "end": end.isoformat(),
        "variables": list(variables),
        "allow_partial_days": allow_partial_days,
        "granules": sorted([g.granule_id, g.file_name, g.size, g.checksum] for g in granules),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _runs(indices: np.ndarray) -> list[slice]:
    """Split an index sequence into slices of consecutive ascending indices."""
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    return [slice(int(run[0]), int(run[-1]) + 1) for run in np.split(indices, breaks)]


def _select(axis: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Positions in `axis` of each wanted coordinate value (tolerance 1e-6 degrees), or -1 where absent."""
    order = np.argsort(axis)
    pos = np.clip(np.searchsorted(axis[order], wanted), 0, axis.size - 1)
    best = order[pos]
    left = order[np.clip(pos - 1, 0, axis.size - 1)]
    best = np.where(np.abs(axis[left] - wanted) < np.abs(axis[best] - wanted), left, best)
    return np.where(np.abs(axis[best] - wanted) <= 1e-6, best, -1)


@contextmanager
def _h5(url: str) -> Iterator[h5py.File]:
    """Open a granule with h5py: a local path directly, any other URL through an fsspec file object."""
    if "://" in url and not url.startswith("file://"):
        with fsspec.open(url, "rb") as src, h5py.File(src, "r") as f:
            yield f
    else:
        with h5py.File(url.removeprefix("file://"), "r") as f:
            yield f


def _attr(value: Any) -> Any:
    """An HDF5 attribute as netCDF readers see it: text as str, one-element arrays as (typed) scalars."""
    if isinstance(value, bytes | np.bytes_):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray) and value.size == 1:
        return value.reshape(())[()]
    return value


_CF_ATTRS = ("_FillValue", "missing_value", "scale_factor", "add_offset")
_VARIABLE_ATTRS = ("units", "long_name", *_CF_ATTRS)
"""The only variable attributes read. Reading every attribute would also read DIMENSION_LIST, whose variable-length
references live in the file's global heap: a damaged heap makes HDF5 loop forever there (measured)."""
_TIME_ATTRS = ("units", "calendar")
# exceptions h5py/HDF5 raise on damaged files (a damaged dimension scale can also surface as AttributeError/TypeError)
_READ_ERRORS = (OSError, KeyError, RuntimeError, ValueError, TypeError, AttributeError, IndexError)


def _attrs(obj: h5py.HLObject, names: Sequence[str]) -> dict[str, Any]:
    return {k: _attr(obj.attrs[k]) for k in names if k in obj.attrs}


def _dims(f: h5py.File, dset: h5py.Dataset) -> tuple[str, ...]:
    """A variable's dimension names: from netCDF-4's `_Netcdf4Coordinates` dimension ids (fixed-size attributes, as
    GES DISC granules carry them), else from the HDF5 dimension scales."""
    if "_Netcdf4Coordinates" in dset.attrs:
        ids = {
            int(f[c].attrs["_Netcdf4Dimid"]): c
            for c in ("time", "lat", "lon")
            if "_Netcdf4Dimid" in f[c].attrs
        }
        wanted = [int(i) for i in np.atleast_1d(dset.attrs["_Netcdf4Coordinates"])]
        if all(i in ids for i in wanted):
            return tuple(ids[i] for i in wanted)
    return tuple(d[0].name.rsplit("/", 1)[-1] if len(d) else d.label for d in dset.dims)


def _unreadable(granule: Granule, exc: Exception) -> GranuleError:
    return GranuleError(
        f"{granule.file_name} ({granule.url}) cannot be read as a MERRA-2 netCDF4/HDF5 file: {exc}; it is probably "
        "truncated or corrupt: delete it and download it again"
    )


@dataclass
class _Layout:
    """What a granule holds, read from its metadata only."""

    times: np.ndarray
    lat: np.ndarray
    lon: np.ndarray
    attrs: dict[str, dict[str, Any]]


def _inspect(granule: Granule, variables: Sequence[str]) -> _Layout:
    """Check a granule's structure, variables and coordinates without reading any data."""
    try:
        with _h5(granule.url) as f:
            if any(k not in f or f[k].ndim != 1 for k in ("time", "lat", "lon")):
                raise GranuleError(
                    f"{granule.file_name}: no 1-D time, lat and lon coordinates (it has {sorted(f)}); a GrADS Data "
                    "Server export (lowercase names, 'hours since' time, point subsets) is not supported: use the "
                    "GES DISC granules MERRA2_<stream>.<product>.<YYYYMMDD>.nc4"
                )
            check_collection(granule, _attrs(f, ("ShortName",)).get("ShortName"))
            fields = sorted(k for k in f if k not in ("time", "lat", "lon"))
            missing = [v for v in variables if v not in f]
            if missing:
                raise GranuleError(f"{granule.file_name} lacks {missing}; it has {fields}: pick variables of "
                                   f"{granule.collection} or fetch the full granule")  # fmt: skip
            for name in variables:
                dims = _dims(f, f[name])
                if dims != ("time", "lat", "lon"):
                    raise GranuleError(f"{granule.file_name}: {name} has dimensions {dims}, not MERRA-2's "
                                       "(time, lat, lon)")  # fmt: skip
            time_attrs = _attrs(f["time"], _TIME_ATTRS)
            raw_time = f["time"][:]
            layout = _Layout(np.empty(0), f["lat"][:], f["lon"][:],
                             {v: _attrs(f[v], _VARIABLE_ATTRS) for v in variables})  # fmt: skip
    except _READ_ERRORS as exc:
        raise _unreadable(granule, exc) from exc
    try:
        times = xr.coding.times.decode_cf_datetime(raw_time, time_attrs["units"], time_attrs.get("calendar"))
    except (KeyError, ValueError, TypeError, OverflowError, ImportError) as exc:
        raise GranuleError(f"{granule.file_name}: its time coordinate (units {time_attrs.get('units')!r}) cannot be "
                           f"decoded: {exc}") from exc  # fmt: skip
    layout.times = np.asarray(times).astype("datetime64[ns]")
    return layout


def _read_block(granule: Granule, names: Sequence[str], lat_runs: Sequence[slice],
                lon_runs: Sequence[slice]) -> np.ndarray:  # fmt: skip
    """Read the region's hyperslabs of several variables of one granule: raw (variable, time, lat, lon)."""
    try:
        with _h5(granule.url) as f:
            for n in names:
                check_chunks(granule, n, f[n], lat_runs, lon_runs)
            return np.stack([
                np.concatenate([np.concatenate([f[n][:, la, lo] for lo in lon_runs], axis=2) for la in lat_runs],
                               axis=1)
                for n in names
            ])  # fmt: skip
    except _READ_ERRORS as exc:
        raise _unreadable(granule, exc) from exc


def _read_decoded(granule: Granule, names: Sequence[str], lat_runs: Sequence[slice], lon_runs: Sequence[slice],
                  cf: Sequence[dict[str, Any]]) -> np.ndarray:  # fmt: skip
    """`_read_block`, each variable decoded by xarray's own CF rules (fill values to NaN, scale and offset applied) on
    the numbers in memory: float32 (variable, time, lat, lon). Here, in the granule's one task, the dask graph stays at
    one task per granule (docs/performance.md, "Build: the fixed cost")."""
    raw, out = _read_block(granule, names, lat_runs, lon_runs), []
    for k, name in enumerate(names):
        try:
            out.append(np.asarray(xr.conventions.decode_cf_variable(name, xr.Variable(("time", "lat", "lon"), raw[k],
                       cf[k]), mask_and_scale=True, decode_times=False).values, np.float32))  # fmt: skip
        except (TypeError, ValueError, OverflowError) as exc:
            raise GranuleError(f"{granule.file_name}: {name} cannot be decoded with its attributes {cf[k]} ({exc}); "
                               "the file is probably damaged: delete it and download it again") from exc  # fmt: skip
    return np.stack(out)


def _open_granule(granule: Granule, variables: Sequence[str], lat: np.ndarray, lon: np.ndarray,
                  allow_partial_days: bool) -> xr.Dataset:  # fmt: skip
    """One granule cut to the region's grid points: lazy float32 (time, lat, lon), one dask task per granule,
    fill values masked to NaN by xarray's CF decoding."""
    layout = _inspect(granule, variables)
    check_time(granule, layout.times, allow_partial_days)
    lat_idx, lon_idx = _select(layout.lat, lat), _select(layout.lon, lon)
    if (lat_idx < 0).any() or (lon_idx < 0).any():
        raise GranuleError(
            f"{granule.file_name} covers lat {layout.lat.min()}..{layout.lat.max()}, lon {layout.lon.min()}.."
            f"{layout.lon.max()}, which misses grid points of the region (lat {lat[0]}..{lat[-1]}, lon {lon[0]}.."
            f"{lon[-1]}): use granules that cover the whole region"
        )
    shape = (len(variables), layout.times.size, lat.size, lon.size)
    cf = [{key: layout.attrs[name][key] for key in _CF_ATTRS if key in layout.attrs[name]} for name in variables]  # fmt: skip
    block = dask.delayed(_read_decoded, pure=True)(granule, list(variables), _runs(lat_idx), _runs(lon_idx), cf)  # fmt: skip
    decoded = da.from_delayed(block, shape=shape, dtype=np.float32)
    data = {}
    for k, name in enumerate(variables):
        attrs = layout.attrs[name]
        data[name] = xr.Variable(("time", "lat", "lon"), decoded[k], {"units": str(attrs.get("units", "")),
                                 "long_name": str(attrs.get("long_name", name)), "collection": granule.collection})  # fmt: skip
    coords = {"time": ("time", layout.times), "lat": ("lat", layout.lat[lat_idx], {"units": "degrees_north",
              "long_name": "latitude"}), "lon": ("lon", layout.lon[lon_idx], {"units": "degrees_east",
              "long_name": "longitude"})}  # fmt: skip
    return xr.Dataset(data, coords=coords)


def _plan(
    granules: Sequence[Granule], variables: Sequence[str], start: date, end: date
) -> dict[date, list[Granule]]:
    """The granules to read, by day; raises on duplicates and on days where a needed collection is missing."""
    if not variables:
        raise ConfigError("no variables requested: name at least one, e.g. T2M")
    if len(set(variables)) != len(variables):
        raise ConfigError(f"variables {list(variables)} repeat a name: list each once")
    if end < start:
        raise ConfigError(f"end {end} is before start {start}: give an end on or after the start")
    needed = {variable_collection(v) for v in variables}
    by_key: dict[tuple[str, date], Granule] = {}
    for g in granules:
        if g.collection in needed and start <= g.day <= end:
            other = by_key.setdefault((g.collection, g.day), g)
            if other is not g and other != g:
                raise GranuleError(f"two granules for {g.collection} on {g.day}: {other.file_name} and "
                                   f"{g.file_name}; keep one (find_granules picks the newest stream)")  # fmt: skip
    days = sorted({d for _, d in by_key})
    if not days:
        raise MissingDataError(f"no granule of {sorted(needed)} between {start} and {end}: fetch them first")
    gaps = [f"{c} {d}" for d in days for c in sorted(needed) if (c, d) not in by_key]
    if gaps:
        raise MissingDataError(f"granules missing for {', '.join(gaps)} while other collections have those days: "
                               "fetch them, or leave those days out")  # fmt: skip
    return {d: [by_key[(c, d)] for c in sorted(needed)] for d in days}


def _build(plan: dict[date, list[Granule]], variables: Sequence[str], region: Region,
           allow_partial_days: bool) -> xr.Dataset:  # fmt: skip
    lat, lon = grid_points(region)
    days = []
    for day, day_granules in plan.items():
        parts = [_open_granule(g, [v for v in variables if variable_collection(v) == g.collection], lat, lon,
                               allow_partial_days) for g in day_granules]  # fmt: skip
        try:
            days.append(
                xr.merge(parts, join="exact", combine_attrs="override") if len(parts) > 1 else parts[0]
            )
        except ValueError as exc:
            names = ", ".join(g.file_name for g in day_granules)
            raise GranuleError(
                f"{names} disagree on the time, lat or lon coordinates of {day}: {exc}"
            ) from exc
    cube = (
        xr.concat(days, dim="time", data_vars="all", coords="minimal", compat="override", join="exact")
        if len(days) > 1
        else days[0]
    )
    cube = cube[list(variables)].chunk({"time": 24, "lat": -1, "lon": -1})
    return cube


def _describe(
    cube: xr.Dataset, plan: dict[date, list[Granule]], region: Region, start: date, end: date
) -> None:
    cube.attrs = {
        "title": f"MERRA-2 hourly means over {region.describe()}",
        "region": region.name,
        "bbox": [float(v) for v in region.bbox],
        "start": start.isoformat(),
        "end": end.isoformat(),
        "source_granules": [g.file_name for gs in plan.values() for g in gs],
        "source_granule_ids": [g.granule_id or g.file_name for gs in plan.values() for g in gs],
    }


def _open_cached(path: str) -> xr.Dataset:
    cube = xr.open_zarr(path, zarr_format=3, consolidated=False, chunks={"time": 24, "lat": -1, "lon": -1})
    return cube.assign_coords(time=cube["time"].values.astype("datetime64[ns]"))


def open_region(
    granules: Sequence[Granule],
    variables: Sequence[str],
    region: Region,
    start: date,
    end: date,
    cache_dir: str | Path | None = None,
    show_progress: bool = False,
    *,
    allow_partial_days: bool = False,
) -> xr.Dataset:
    """The hourly cube of `variables` over `region` for start..end from MERRA-2 granules.

    Args:
        granules: granules of the needed collections (others and days outside start..end are ignored); url is a
            local path or an fsspec URL.
        variables: MERRA-2 names, in the order wanted; SLV and FLX variables may be mixed.
        region: the box; bounds inclusive, antimeridian-aware.
        start: first day, inclusive.
        end: last day, inclusive.
        cache_dir: when set, the cube is stored at `cache_dir/regional/<digest>.zarr` (zarr v3) and later calls with
            the same inputs open it without reading any granule.
        show_progress: show a progress bar while the cache is written.
        allow_partial_days: accept temporal subsets (hourly steps at HH:30 of the named day, not all 24).

    Returns:
        A Dataset with dims (time, lat, lon): time datetime64[ns] UTC at HH:30, lat south to north, lon west to
        east (original values, e.g. 170..179.375 then -180..-170 across the antimeridian), float32 variables in
        physical units with fill values as NaN, attrs units/long_name/collection, dataset attrs naming the
        source granules. Days without any granule are absent (gaps).

    Raises:
        ConfigError: no/duplicate/unknown variables, end before start, a box without grid points.
        MissingDataError: no granule in the period, or a day that has one collection but not another.
        GranuleError: unreadable file, missing variable, name/content date mismatch, incomplete time axis,
            or a file not covering the region (each message names the file).
    """
    plan = _plan(granules, variables, start, end)
    used = [g for gs in plan.values() for g in gs]
    target: str | None = None
    if cache_dir is not None:
        folder = str(cache_dir).removeprefix("file://")
        if "://" in folder:
            raise ConfigError(f"cache_dir {cache_dir} must be a local folder (the regional cache is renamed into "
                              "place atomically): give a local path")  # fmt: skip
        key = cache_key(used, variables, region, start, end, allow_partial_days)
        target = os.path.join(folder, "regional", f"{key}.zarr")
        if os.path.isdir(target):
            logger.info("regional cache hit: %s", target)
            return _open_cached(target)
    cube = _build(plan, variables, region, allow_partial_days)
    _describe(cube, plan, region, start, end)
    logger.info("regional cube %s: %s over %s, %d day(s) from %d granule(s)", region.name, list(variables),
                region.bbox, len(plan), len(used))  # fmt: skip
    if target is None:
        return cube
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(Path(target).parent, recursive=False)  # cubes of builds killed while writing them
    tmp = temp_sibling(target)
    if show_progress:
        from dask.diagnostics import ProgressBar

        bar: Any = ProgressBar()
    else:
        bar = nullcontext()
    try:
        with bar:
            cube.to_zarr(tmp, zarr_format=3, consolidated=False, mode="w")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.rename(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isdir(target):  # else another process finished the same cube first: use it
            raise
    logger.info("regional cache written: %s", target)
    return _open_cached(target)
