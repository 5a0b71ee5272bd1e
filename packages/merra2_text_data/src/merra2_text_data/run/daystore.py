"""One day of a build's regional cube in the cache: fetched, checked, subset and stored by the task that needs it.

`<cache>/zarr/days/<YYYYMMDD>-<key>.json` is the day's marker, written last and create-only; it names the day's zarr v3
store beside it and records the day's hourly steps, the variables' attributes, the grid and what the granules say
they are. A day exists if and only if its marker does: two workers storing the same day commit once (the other
removes its own store), a writer killed midway leaves a store no marker names (on a local disk under a temporary
name, removed by the next writer), and a marker whose store is gone is dropped and the day stored again. The key
covers the day's granule identities, the variables, the region and `allow_partial_days` (`subset.cache_key`).
See `merra2_text_data.run.cube` for where the days are used.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import logging
import os
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dask
import numpy as np
import xarray as xr
from climate_text_schema import join_url

from merra2_text_data.errors import BuildError
from merra2_text_data.fs import fs_path, is_local, store_error, url_to_fs, write_create_only
from merra2_text_data.source.download import download_granules
from merra2_text_data.source.granules import Granule
from merra2_text_data.source.subset import cache_key, open_region
from merra2_text_data.tempfiles import remove_stale_temps, temp_sibling

if TYPE_CHECKING:
    from .cube_source import CubeSource

__all__ = ["build_day", "day_key", "days_url", "ensure_day", "grid_digest", "open_day", "read_marker", "worker_address"]

logger = logging.getLogger(__name__)

_HALF_HOUR = np.timedelta64(30, "m")


def day_key(source: CubeSource, day: dt.date) -> str:
    """`<YYYYMMDD>-<cache_key>`: the name of a day's marker (and the prefix of its store)."""
    granules = source.granules.get(day)
    if not granules:
        raise BuildError(f"the cube of this build has no granule for {day}: a task asked for a day outside its plan")
    return f"{day:%Y%m%d}-{cache_key(granules, source.variables, source.region, day, day, source.allow_partial_days)}"


def days_url(source: CubeSource) -> str:
    """`<cache>/zarr/days`: where the day stores and markers live (a local path is each worker's own)."""
    fs, url = url_to_fs(source.cache)
    return join_url(url, "zarr", "days") if not is_local(fs) else os.path.join(fs_path(fs, url), "zarr", "days")


def _scratch_base() -> Path:
    """This machine's scratch folder for a build: the dask worker's own directory, else the system's temp folder."""
    try:
        from distributed import get_worker

        base = Path(get_worker().local_directory)
    except (ImportError, ValueError):
        base = Path(tempfile.gettempdir())
    folder = base / "merra2-text"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _scratch() -> Path:
    """Where granules fetched for an object-store cache go (deleted once their day is stored)."""
    return _scratch_base() / "granules"


def _write_zarr(cube: xr.Dataset, path: str) -> None:
    """Write one day as a zarr v3 store on this machine's disk, computing it here (never on the cluster)."""
    with dask.config.set(scheduler="synchronous"):
        cube.to_zarr(path, zarr_format=3, consolidated=False, mode="w")


def _fetch(granules: Sequence[Granule], source: CubeSource) -> tuple[list[Granule], list[Path]]:
    """The granules as files on this machine: remote ones downloaded (into `<cache>/granules` for a local cache,
    into this worker's scratch folder otherwise), local ones as they are. Also returns the scratch files, to delete
    once the day is stored (an object-store cache keeps no granule on the worker)."""
    remote = [g for g in granules if "://" in g.url and not g.url.startswith("file://")]
    if not remote:
        return list(granules), []
    fs, cache = url_to_fs(source.cache)
    folder = _scratch() if source.shared else Path(fs_path(fs, cache)) / "granules"
    fetched = {g.file_name: g for g in download_granules(remote, folder)}
    scratch = [Path(g.url) for g in fetched.values()] if source.shared else []
    return [fetched.get(g.file_name, g) for g in granules], scratch


def grid_digest(lat: np.ndarray, lon: np.ndarray) -> str:
    """A short digest of the grid's exact coordinate values (days of one build must share it)."""
    data = np.ascontiguousarray(lat, dtype=np.float64).tobytes() + np.ascontiguousarray(lon, dtype=np.float64).tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def _describe_day(cube: xr.Dataset, day: dt.date, store: str, kind: str) -> dict[str, Any]:
    """The marker of a stored day: its store, hourly steps, attributes and grid."""
    hours = ((cube["time"].values - np.datetime64(day.isoformat(), "ns") - _HALF_HOUR) // np.timedelta64(1, "h"))
    lat, lon = np.asarray(cube["lat"].values, np.float64), np.asarray(cube["lon"].values, np.float64)
    return {
        "day": day.isoformat(), "store": store, "hours": None if list(hours) == list(range(24)) else hours.tolist(),
        "attrs": {v: {k: str(cube[v].attrs.get(k, "")) for k in ("units", "long_name", "collection")}
                  for v in cube.data_vars},
        "lat": lat.tolist(), "lon": lon.tolist(), "grid": grid_digest(lat, lon), "source_kind": kind,
    }  # fmt: skip


def read_marker(source: CubeSource, day: dt.date) -> dict[str, Any] | None:
    """The marker of a stored day, or None when the day is not stored (a marker whose store is gone is removed).

    A marker found is remembered by this process for the build (`source.build`: markers and stores are immutable
    once committed), so the shard tasks of one worker that read the same day ask the store once.
    """
    try:
        return dict(_committed(source.cache, days_url(source), day_key(source, day), source.build))
    except FileNotFoundError:
        return None


@functools.lru_cache(maxsize=1024)
def _committed(cache: str, root: str, key: str, build: str) -> dict[str, Any]:
    """The committed marker `root/key.json` (FileNotFoundError when there is none: not remembered); `build` keys
    the memory to one build, so a cache emptied between builds is seen."""
    fs, _ = url_to_fs(cache)
    marker = fs_path(fs, join_url(root, f"{key}.json"))
    info = json.loads(fs.cat_file(marker))
    if not fs.exists(fs_path(fs, join_url(root, info["store"], "zarr.json"))):
        logger.warning("%s names the store %s, which is gone; storing that day again", marker, info["store"])
        fs.rm_file(marker)
        raise FileNotFoundError(marker)
    return dict(info)


def build_day(source: CubeSource, day: dt.date) -> dict[str, Any]:
    """Fetch, check and subset one day's granules and commit it to the cache (module rules); return its marker."""
    from merra2_text_data.source.provenance import source_kind

    fs, _ = url_to_fs(source.cache)
    root, key = days_url(source), day_key(source, day)
    granules, scratch = _fetch(source.granules[day], source)
    try:
        cube = open_region(granules, list(source.variables), source.region, day, day,
                           allow_partial_days=source.allow_partial_days)  # fmt: skip
        kind = source_kind(granules)
        final = f"{key}-{uuid.uuid4().hex[:8]}.zarr"
        if is_local(fs):
            os.makedirs(root, exist_ok=True)
            remove_stale_temps(root, recursive=False)  # days of writers killed while writing them
            tmp = temp_sibling(os.path.join(root, final))
            _write_zarr(cube, tmp)
            os.rename(tmp, os.path.join(root, final))
        else:  # written here, then uploaded: one PUT per object (zarr writing to S3 itself sent ~12 requests each)
            with tempfile.TemporaryDirectory(prefix="merra2-day-", dir=_scratch_base()) as local:
                _write_zarr(cube, os.path.join(local, final))
                here, there = Path(local) / final, fs_path(fs, join_url(root, final))
                objects = {f"{there}/{f.relative_to(here).as_posix()}": f.read_bytes()
                           for f in sorted(here.rglob("*")) if f.is_file()}  # fmt: skip
                try:
                    fs.pipe(objects)  # concurrent PUTs (fs.put also asked for the bucket before each file)
                except Exception as exc:  # the store's client errors (botocore, aiohttp, ...) share no base class
                    raise store_error(join_url(root, final), exc) from exc
    finally:
        for file in scratch:
            file.unlink(missing_ok=True)
    info = _describe_day(cube, day, final, kind)
    if not write_create_only(fs, join_url(root, f"{key}.json"), json.dumps(info).encode("utf-8")):
        logger.info("%s was stored by another worker first; using that one", day)
        fs.rm(fs_path(fs, join_url(root, final)), recursive=True)
        existing = read_marker(source, day)
        if existing is None:
            raise BuildError(f"the cache marker of {day} vanished while this worker stored the same day; rerun")
        return existing
    logger.info("stored %s at %s", day, join_url(root, final))
    return info


def ensure_day(source: CubeSource, day: dt.date) -> dict[str, Any]:
    """The marker of `day`, storing the day first when the cache lacks it."""
    return read_marker(source, day) or build_day(source, day)


def open_day(source: CubeSource, day: dt.date) -> xr.Dataset:
    """The stored day as a lazy Dataset (stored first when missing), with times as datetime64[ns]."""
    return _open_store(days_url(source), ensure_day(source, day)["store"], source.build)


@functools.lru_cache(maxsize=64)
def _open_store(root: str, store: str, build: str) -> xr.Dataset:
    """A committed day store, opened once per process and build (lazily: its metadata only; measured 0.17 s per
    open on the moto S3 server, which every shard task paid before)."""
    cube = xr.open_zarr(join_url(root, store), zarr_format=3, consolidated=False,
                        chunks={"time": 24, "lat": -1, "lon": -1})  # fmt: skip
    return cube.assign_coords(time=cube["time"].values.astype("datetime64[ns]"))


def worker_address() -> str | None:
    """The address of the dask worker running this code, or None outside a worker."""
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):
        return None
