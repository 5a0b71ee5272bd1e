"""The regional cube of a build whose data work runs on the workers, and what the client keeps of it.

A cluster build (`run.workers`, `run.scheduler`) or a build whose cache is an object store (`--cache s3://...`) never
reads a granule in the client. Its cube is described by a `CubeSource`, a few hundred bytes that every task carries
(narrowed to the days it reads), and opened by each task where it runs:

- MERRA-2 granules: the cube stage (`stage_cube`: one `run_day_task` per day) fetches each day's granules on a
  worker with `download_granules` (the same retries, resume and size checks as a local build; into the worker's
  scratch directory when the cache is an object store, deleted once the day is stored; into `<cache>/granules` when
  it is a local folder), checks and subsets them with `open_region`, and stores the day in the cache (`daystore`).
  Its receipt holds what the client plans with: the day's hourly steps, the variables' attributes, a digest of the
  grid (the grid itself for the first day), what the granules say they are, and the worker that stored it.
- A source that already is a zarr store (ERA5, `era5:URL`): there is no cube stage; each task opens the store URL
  lazily itself and reads its windows from it.

Shard tasks (`tasks.run_task`, `tasks.run_stats_task`) call `open_cube(source, plans)`: the day stores their windows
touch, concatenated lazily. With a per-worker local cache a day stored on another worker is missing there, and the
task stores it itself; shard tasks are placed, where possible, on the worker that stored their first day
(`preferred_worker`). The client holds only the plan, the receipts and `skeleton_cube` (coordinates and attributes,
no readable data).
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr
from climate_text_schema import join_url

from merra2_text_data.errors import BuildError, GranuleError
from merra2_text_data.fs import fs_path, is_local, url_to_fs
from merra2_text_data.regions import Region
from merra2_text_data.samples.pairs import SamplePlan
from merra2_text_data.source.granules import Granule

from . import daystore as _daystore
from .cube_source import CubeSource

__all__ = [
    "CUBE_STAGE",
    "CubeSource",
    "DayTask",
    "StagedCube",
    "cube_source",
    "day_tasks",
    "days_of",
    "default_cache",
    "on_workers",
    "open_cube",
    "preferred_worker",
    "run_day_task",
    "skeleton_cube",
    "stage_cube",
]

logger = logging.getLogger(__name__)

CUBE_STAGE = "cube"
"""Stage (and staging sub-folder) of the day receipts."""
_HALF_HOUR = np.timedelta64(30, "m")


@dataclass(frozen=True)
class DayTask:
    """One day of the cube stage."""

    day: dt.date
    with_grid: bool = False
    """Also return the grid (lat/lon values) in the receipt: set for the first day only, so the client holds it once."""

    @property
    def name(self) -> str:
        """`YYYYMMDD`: the task's receipt name."""
        return f"{self.day:%Y%m%d}"

    @property
    def days(self) -> list[dt.date]:
        """The day it stores."""
        return [self.day]


@dataclass
class StagedCube:
    """What the client has of the cube once the cube stage ran (`stage_cube`)."""

    skeleton: xr.Dataset
    """Coordinates and attributes only (`skeleton_cube`; a zarr source's lazy cube)."""
    source: CubeSource
    """What every task carries to open the cube where it runs."""
    source_kind: str
    """`synthetic`, `merra2` or `era5` (the manifest's `source_kind`)."""
    where: Callable[[Any], str | None] | None = None
    """Where a shard task should preferably run (a per-worker local cache), for `tasks.run_tasks`."""


def on_workers(config: Any) -> bool:
    """True when the tasks build and read the cube where they run: a build on a cluster (`run.workers`,
    `run.scheduler`) or with an object-store cache."""
    cache = config.source.cache_location()
    remote_cache = cache is not None and not is_local(url_to_fs(cache)[0])
    return bool(config.run.workers or config.run.scheduler) or remote_cache


def stage_cube(config: Any, granules: Sequence[Granule], region: Region, dataset_url: str, version: str,
               client: Any = None, progress: Callable[[str, int, int], None] | None = None) -> StagedCube:  # fmt: skip
    """Run the cube stage (one `run_day_task` per day, on the cluster of `client` or here) and return what the
    client plans with. A zarr source (ERA5) has no cube stage: only its coordinates are read here.

    Raises:
        GranuleError: a day's granules cannot be fetched or read, or days disagree on the grid.
    """
    from .runner import run_tasks

    cache = config.source.cache_location()  # a local path is resolved where it is used: each worker's own
    source = cube_source(config, granules, region, cache or default_cache(config.publish.out), version)
    if source.era5 is not None:
        assert source.start is not None and source.end is not None
        return StagedCube(_open_era5(source.era5, source.variables, region, source.start, source.end), source, "era5")
    days = run_tasks(CUBE_STAGE, run_day_task, day_tasks(source), source, config, dataset_url, version,
                     progress=progress, client=client)  # fmt: skip
    kind = "synthetic" if any(r["source_kind"] == "synthetic" for r in days) else "merra2"
    by_day = {str(r["task"]): r for r in days}
    where = None if source.shared or client is None else (lambda task: preferred_worker(task.plans, by_day))
    return StagedCube(skeleton_cube(days, config.subset.variables), source, kind, where)


def default_cache(out: str) -> str:
    """The cache of a build on a cluster without `--cache`: `<out>/.cache`, which every worker reaches (they write
    the shards under `out`)."""
    fs, url = url_to_fs(out)
    return join_url(url, ".cache") if not is_local(fs) else os.path.join(fs_path(fs, url), ".cache")


def cube_source(config: Any, granules: Sequence[Granule], region: Region, cache: str, build: str = "") -> CubeSource:
    """The `CubeSource` of a build (`config`: the BuildConfig) from its planned granules; `build`: its version id."""
    from merra2_text_data.source.era5 import era5_url, is_era5

    start, end = config.subset.period()
    if is_era5(config.source.source):
        return CubeSource(cache, tuple(config.subset.variables), region, era5=era5_url(config.source.source),
                          start=start, end=end, build=build)  # fmt: skip
    by_day: dict[dt.date, list[Granule]] = {}
    for g in granules:
        if start <= g.day <= end:
            by_day.setdefault(g.day, []).append(g)
    return CubeSource(cache, tuple(config.subset.variables), region, config.source.allow_partial_days,
                      {d: tuple(gs) for d, gs in sorted(by_day.items())}, build=build)  # fmt: skip


def day_tasks(source: CubeSource) -> list[DayTask]:
    """One task per day of the source's granules (none for a zarr source), the first carrying the grid."""
    days = sorted(source.granules)
    return [DayTask(d, with_grid=i == 0) for i, d in enumerate(days)]


def days_of(plans: Sequence[SamplePlan]) -> list[dt.date]:
    """The UTC days the windows of `plans` touch (a window [start, end) ends on the day of its last instant)."""
    days: set[dt.date] = set()
    for p in plans:
        first, last = p.time_start.date(), (p.time_end - pd.Timedelta(microseconds=1)).date()
        days.update(first + dt.timedelta(days=i) for i in range((last - first).days + 1))
    return sorted(days)


def run_day_task(task: DayTask, source: CubeSource, config: Any, dataset_url: str, version: str) -> dict[str, Any]:
    """The cube stage: store one day in the cache unless it is there already; return its receipt.

    Returns:
        `{"task", "day", "hours" (None: all 24), "attrs", "grid", "source_kind", "worker"}`, plus `lat`/`lon` when
        `task.with_grid`.

    Raises:
        GranuleError: a granule cannot be fetched or read, or does not match its day or the region (as locally).
    """
    from merra2_text_data.store.publish import write_receipt

    info = _daystore.ensure_day(source.narrow([task.day]), task.day)
    receipt = {k: info[k] for k in ("day", "hours", "attrs", "grid", "source_kind")}
    receipt.update(task=task.name, worker=_daystore.worker_address())
    if task.with_grid:
        receipt.update(lat=info["lat"], lon=info["lon"])
    fs, _ = url_to_fs(config.publish.out)
    write_receipt(fs, dataset_url, version, task.name, receipt, stage=CUBE_STAGE)
    return receipt


def preferred_worker(plans: Sequence[SamplePlan], receipts: dict[str, dict[str, Any]]) -> str | None:
    """The worker that built the first day a task reads (where a per-worker local cache has it), if known."""
    days = days_of(plans)
    return receipts.get(f"{days[0]:%Y%m%d}", {}).get("worker") if days else None


@functools.lru_cache(maxsize=4)
def _open_era5(url: str, variables: tuple[str, ...], region: Region, start: dt.date, end: dt.date) -> xr.Dataset:
    from merra2_text_data.source.era5 import open_era5

    return open_era5(url, list(variables), region, start, end)


def open_cube(source: CubeSource, plans: Sequence[SamplePlan]) -> xr.Dataset:
    """The lazy cube covering the windows of `plans`, opened where the task runs.

    Days missing from the cache (a per-worker local cache, a cache emptied since the cube stage) are built here.
    """
    if source.era5 is not None:
        assert source.start is not None and source.end is not None
        return _open_era5(source.era5, source.variables, source.region, source.start, source.end)
    days = [d for d in days_of(plans) if d in source.granules]
    if not days:
        raise BuildError("a shard task has no day of the plan's granules: the plan and the task disagree")
    parts = [_daystore.open_day(source, d) for d in days]
    if len(parts) == 1:
        return parts[0]
    return xr.concat(parts, dim="time", data_vars="all", coords="minimal", compat="override", join="override")


def _unread(*_: Any) -> np.ndarray:
    raise BuildError("the client tried to read the cube's data; on a cluster only the workers read it")


def skeleton_cube(receipts: Sequence[dict[str, Any]], variables: Sequence[str]) -> xr.Dataset:
    """The cube as the client sees it: every hourly step of the days the receipts list, the grid and the
    variables' attributes, with data that cannot be read (the tasks read it where they run).

    Raises:
        GranuleError: days disagree on the grid or nothing was stored.
    """
    if not receipts:
        raise BuildError("the cube stage stored no day")
    first = next((r for r in receipts if "lat" in r), None)
    if first is None:
        raise BuildError("no day receipt carries the grid; delete the build's staging folder and rerun")
    grids = {r["grid"] for r in receipts}
    if len(grids) != 1:
        odd = [r["day"] for r in receipts if r["grid"] != first["grid"]][:5]
        raise GranuleError(f"the granules of {', '.join(odd)} cover another grid than those of {first['day']}: use "
                           "granules of one product and region")  # fmt: skip
    times = np.concatenate([
        np.datetime64(r["day"], "ns") + _HALF_HOUR + np.asarray(r["hours"] if r["hours"] is not None else range(24),
                                                                 dtype="int64") * np.timedelta64(1, "h")
        for r in sorted(receipts, key=lambda r: str(r["day"]))
    ])  # fmt: skip
    lat, lon = np.asarray(first["lat"], np.float64), np.asarray(first["lon"], np.float64)
    attrs = sorted(receipts, key=lambda r: str(r["day"]))[0]["attrs"]
    shape = (times.size, lat.size, lon.size)
    data = {
        v: (("time", "lat", "lon"), da.from_delayed(dask.delayed(_unread)(v), shape, dtype=np.float32), attrs[v])
        for v in variables
    }
    coords = {"time": ("time", times), "lat": ("lat", lat, {"units": "degrees_north", "long_name": "latitude"}),
              "lon": ("lon", lon, {"units": "degrees_east", "long_name": "longitude"})}  # fmt: skip
    return xr.Dataset(data, coords=coords)
