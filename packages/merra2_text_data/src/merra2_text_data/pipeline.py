"""The build: wiring only. Plan first (`run/plan.py`: granules, gaps, version id), then execute, then commit.

1. Resolve the granules (earthaccess search or a folder/URL); missing days fail unless `allow_gaps`.
2. Version id = digest of the resolved config (with the caption format `text.TEXT_FORMAT`), the granule identities,
   event files and the schema version. If that version is already committed, stop: nothing is written.
3. Open the region (zarr cache), plan samples and splits, and pack each split's samples into shard tasks whose
   numbering follows from the plan alone (`<split>-<NNNNNN>` = position of the task in its split).
4. Pass 1, only when the windows span several years and T2M is built: each task records its samples' T2M statistics
   under `<name>/staging/<version>/stats/`; the day-of-year climatology is computed from them (a few floats per
   sample, so memory stays bounded).
5. Pass 2: each task reads one window at a time, captions (with the anomaly), validates (quarantine or `strict`),
   writes its shard straight to the store and a receipt under `<name>/staging/<version>/` (`tasks`). Tasks run in
   this process, on a `LocalCluster` (`workers`) or on an existing dask scheduler (`scheduler`). On a cluster, or
   with an object-store cache, step 3's cube is built by the tasks too (`cube`: one task per day fetches, checks and
   subsets its granules into a zarr store in the cache) and every task opens what it reads where it runs: the client
   holds only the plan and the receipts, and never opens a granule.
6. A rerun after an interruption skips tasks whose receipt (and shard) exist, and ends with the same version.
7. Index (validated), quarantine table, dataset card, manifest last, tag.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr
from climate_text_schema import (
    BASE_COLUMNS,
    KNOWN_VARIABLES,
    SCHEMA_VERSION,
    SPLITS,
    BuilderInfo,
    Manifest,
    NormStats,
    ShardInfo,
    VariableInfo,
    open_dataset,
)

from .config.build import BuildConfig
from .errors import BuildError, MissingDataError
from .fs import url_to_fs
from .run import cube as _cube
from .run import tasks as _tasks
from .run.cube_source import CubeSource
from .run.plan import BuildPlan, cache_dir, data_config, plan_build
from .run.runner import connect, run_tasks
from .run.tasks import ANOMALY_VARIABLE, STATS_STAGE, ShardTask, units_of
from .samples.climatology import DayOfYearClimatology, by_time_of_day, climatology_group, spans_several_years
from .samples.events import Event, grid_margins, load_storm_events, load_text_table, match_events
from .samples.normalize import NormAccumulator
from .samples.pairs import SamplePlan, parse_duration, plan_samples
from .samples.splits import assign_splits, holdout_tiles
from .samples.validate import quarantine_frame
from .source.download import download_granules
from .source.era5 import (
    ERA5_ATTRIBUTION,
    describe_spacing,
    era5_url,
    is_era5,
    open_era5,
)
from .source.granules import Granule, collection_for
from .source.provenance import source_kind, text_sources
from .store.card import make_card
from .store.publish import (
    clean_up,
    commit_version,
    manifest_exists,
    tag_points_at,
    write_tag,
)
from .store.shards import estimate_sample_bytes, pack_by_size
from .version import __version__

__all__ = ["BuildPlan", "ProgressHook", "ShardTask", "build", "plan_build"]

logger = logging.getLogger(__name__)

ProgressHook = Callable[[str, int, int], None]
"""`(stage, done, total)`: called as work advances (the CLI draws progress bars from it)."""


def _open_cube(plan: BuildPlan, show_progress: bool) -> tuple[xr.Dataset, list[Granule]]:
    from .source.subset import open_region

    cfg = plan.config
    start, end = cfg.subset.period()
    if is_era5(cfg.source.source):  # already a zarr store: read lazily from it, no regional cache needed
        return open_era5(era5_url(cfg.source.source), cfg.subset.variables, plan.region, start, end), []
    cache = cache_dir(cfg)
    granules = plan.granules
    if cfg.source.source == "earthaccess":
        granules = download_granules(granules, cache / "granules", show_progress=show_progress)
    cube = open_region(granules, list(cfg.subset.variables), plan.region, start, end, cache_dir=cache / "zarr",
                       show_progress=show_progress, allow_partial_days=cfg.source.allow_partial_days)  # fmt: skip
    return cube, list(granules)


def _plan_tasks(plan: BuildPlan, cube: xr.Dataset) -> tuple[list[ShardTask], list[SamplePlan]]:
    cfg = plan.config
    lat, lon = np.asarray(cube["lat"].values, dtype=float), np.asarray(cube["lon"].values, dtype=float)
    samples = plan_samples(cube["time"].values, lat.size, lon.size, lat, lon, plan.name, cfg.sample.window,
                           cfg.sample.stride, cfg.sample.tile_shape(), plan.region.bbox,
                           cfg.sample.edge_tiles, cfg.source.allow_partial_days or is_era5(cfg.source.source))  # fmt: skip
    if not samples:
        raise MissingDataError(
            f"no complete {cfg.sample.window} window in {cfg.subset.period()[0]}..{cfg.subset.period()[1]} "
            f"(the cube has {cube.sizes['time']} hourly step(s), {_span(cube)}); lengthen the period or shorten "
            "--window (a window needs every one of its hours)"
            + (
                f"; the ERA5 store's steps are {describe_spacing(cube)}: --window 1h makes one-step samples"
                if is_era5(cfg.source.source)
                else ""
            )
        )
    samples = assign_splits(
        samples, cfg.sample.val_fraction, cfg.sample.test_fraction, cfg.sample.split_years(),
        holdout_tiles(samples, cfg.sample.holdout_tiles, cfg.sample.seed),
    )  # fmt: skip
    n_steps = int(parse_duration(cfg.sample.window) / parse_duration(cfg.sample.time_step))
    n_var = len(cfg.subset.variables)
    tasks: list[ShardTask] = []
    for split in SPLITS:
        members = [p for p in samples if p.split == split]
        sizes = [estimate_sample_bytes((n_steps, n_var, p.lat_stop - p.lat_start, p.lon_stop - p.lon_start))
                 for p in members]  # fmt: skip
        for number, group in enumerate(pack_by_size(sizes, cfg.shard.shard_size)):
            tasks.append(ShardTask(split, number, tuple(members[i] for i in group)))
    return tasks, samples


def _span(cube: xr.Dataset) -> str:
    times = pd.DatetimeIndex(cube["time"].values)
    return f"{times[0]:%Y-%m-%d %H:%M} .. {times[-1]:%Y-%m-%d %H:%M}" if len(times) else "none"


def _climatology(
    plan: BuildPlan, tasks: list[ShardTask], samples: list[SamplePlan], cube: Any,
    progress: ProgressHook | None, client: Any = None,
) -> DayOfYearClimatology | None:  # fmt: skip
    cfg = plan.config
    if ANOMALY_VARIABLE not in cfg.subset.variables or not spans_several_years(p.time_start for p in samples):
        return None
    receipts = run_tasks(STATS_STAGE, _tasks.run_stats_task, tasks, cube, cfg, plan.dataset_url,
                                plan.version, progress=progress, client=client)  # fmt: skip
    hourly = by_time_of_day(cfg.sample.window, cfg.sample.stride)  # sub-daily windows: per time of day
    rows = ((climatology_group(tile, pd.Timestamp(start), hourly), pd.Timestamp(start),
             {ANOMALY_VARIABLE: {"mean": mean}}) for rec in receipts for _, tile, start, mean in rec["rows"])  # fmt: skip
    clim = DayOfYearClimatology.from_samples(rows, variables=[ANOMALY_VARIABLE], time_of_day=hourly)
    if clim is not None:
        logger.info("climatology of %s over %s from %d samples", ANOMALY_VARIABLE, clim.period,
                    sum(len(r["rows"]) for r in receipts))  # fmt: skip
    return clim


def _events(config: BuildConfig, cube: xr.Dataset, samples: list[SamplePlan]) -> dict[str, list[Event]]:
    frames = []
    if config.sample.events:
        frames.append(load_storm_events(config.sample.events))
    if config.sample.text_table:
        frames.append(load_text_table(config.sample.text_table))
    if not frames:
        return {}
    margins = grid_margins(cube["lat"].values, cube["lon"].values)  # half a step per axis: lat and lon steps differ
    return match_events(pd.concat(frames, ignore_index=True), samples, margin_deg=margins)


_EXTRA_COLUMNS = {"T2M_clim": "float64", "T2M_anom": "float64", "n_events": "int64", "event_types": "str"}


def _index(receipts: list[dict[str, Any]], variables: Sequence[str]) -> pd.DataFrame:
    rows = [r for rec in receipts for r in rec["rows"]]
    stats = [f"{v}_{s}" for v in variables for s in ("mean", "min", "max")]
    extra = [
        c
        for c in _EXTRA_COLUMNS
        if any(c in r for r in rows) or (c.startswith("T2M_") and "T2M" in variables)
    ]
    columns = [*BASE_COLUMNS, *stats, *extra]
    df = pd.DataFrame(rows, columns=columns)
    for col in ("time_start", "time_end"):
        df[col] = pd.to_datetime(df[col], utc=True)
    for col in ["lat_min", "lat_max", "lon_min", "lon_max", *stats]:
        df[col] = df[col].astype("float64")
    for col in ("key", "split", "shard", "region", "text"):
        df[col] = df[col].astype(str)
    for col in extra:
        kind = _EXTRA_COLUMNS[col]
        df[col] = df[col].fillna("").astype(str) if kind == "str" else df[col].astype(np.dtype(kind))
    return df


def _normalization(receipts: list[dict[str, Any]], variables: Sequence[str]) -> dict[str, NormStats]:
    total = NormAccumulator(variables)
    for rec in receipts:
        total.merge(NormAccumulator.from_dict(rec["norm"]))
    return {v: NormStats(**s) for v, s in total.result().items()}


def _variable_infos(cube: xr.Dataset, variables: Sequence[str], units: dict[str, str]) -> list[VariableInfo]:
    """The manifest's variables: names, units, long names and the collection each came from."""
    return [
        VariableInfo(name=v, units=units[v], long_name=str(cube[v].attrs.get("long_name") or KNOWN_VARIABLES[v].long_name),
                     collection=str(cube[v].attrs.get("collection") or collection_for(v)))
        for v in variables
    ]  # fmt: skip


def _array_shape(config: BuildConfig, samples: list[SamplePlan]) -> list[int] | None:
    """[time, variable, lat, lon] shared by every sample, or None when tiles differ (`sample.edge_tiles: keep`)."""
    grids = {(p.lat_stop - p.lat_start, p.lon_stop - p.lon_start) for p in samples}
    if len(grids) != 1:
        return None
    n_steps = int(parse_duration(config.sample.window) / parse_duration(config.sample.time_step))
    (grid,) = grids
    return [n_steps, len(config.subset.variables), *grid]


def build(config: BuildConfig, progress: ProgressHook | None = None) -> str:
    """Build (or find) the dataset version the config describes and return its reference.

    Args:
        config: the build config.
        progress: optional `(stage, done, total)` callback (no output is drawn by the library itself).

    Returns:
        `<out>/<name>@<version>`.

    Raises:
        MissingDataError: missing days (without allow_gaps) or no complete window.
        SampleValidationError: with strict, an invalid sample.
        PublishError: the commit failed (no manifest was written).
        BuildError: anything else that stops the build.

    Examples:
        >>> build(BuildConfig.from_options(region="conus", years="2019", source="/data/merra2"))  # doctest: +SKIP
        '/abs/datasets/conus@3f2a...'
    """
    show = not config.run.quiet and progress is not None
    plan = plan_build(config)
    fs, _ = url_to_fs(config.publish.out)
    ref = f"{plan.dataset_url}@{plan.version}"
    if manifest_exists(fs, plan.dataset_url, plan.version):
        logger.info("version %s is already published at %s: nothing to do", plan.version, plan.dataset_url)
        if config.publish.tag and not tag_points_at(fs, plan.dataset_url, config.publish.tag, plan.version):
            write_tag(fs, plan.dataset_url, config.publish.tag, plan.version)
        clean_up(fs, plan.dataset_url, plan.version)  # a build killed between its commit and its clean-up
        return ref
    with connect(config) as client:
        read: xr.Dataset | CubeSource  # what the tasks read: the cube, or what opens it where they run
        if _cube.on_workers(config):  # the tasks fetch, subset and read the cube where they run
            staged = _cube.stage_cube(config, plan.granules, plan.region, plan.dataset_url, plan.version, client,
                                      progress)  # fmt: skip
            cube, read, kind, where = staged.skeleton, staged.source, staged.source_kind, staged.where
        else:
            cube, granules = _open_cube(plan, show)
            read, where = cube, None
            kind = "era5" if is_era5(config.source.source) else source_kind(granules, cache_dir(config))
        tasks, samples = _plan_tasks(plan, cube)
        logger.info(
            "plan: %d samples in %d shard task(s), version %s", len(samples), len(tasks), plan.version
        )
        events = _events(config, cube, samples)
        climatology = _climatology(plan, tasks, samples, read, progress, client)
        clim = client.scatter(climatology, broadcast=True) if client is not None and climatology else climatology
        receipts = run_tasks(
            "samples", _tasks.run_task, tasks, read, config, plan.dataset_url, plan.version,
            extra=lambda t: ({p.key: events.get(p.key, []) for p in t.plans}, clim), progress=progress,
            client=client, where=where,
        )  # fmt: skip
    variables = list(config.subset.variables)
    index = _index(receipts, variables)
    quarantine = quarantine_frame([q for rec in receipts for q in rec["quarantine"]])
    if index.empty:
        raise BuildError(
            f"every one of the {len(samples)} samples was quarantined; see the log for the reasons"
        )
    shards = [ShardInfo.model_validate(rec["shard"]) for rec in receipts if rec["shard"] is not None]
    units = units_of(cube, variables)
    parent = open_dataset(config.publish.parent).version if config.publish.parent else None
    texts = text_sources(config.sample.events, config.sample.text_table)
    manifest = Manifest.model_validate(dict(
        schema_version=SCHEMA_VERSION, name=plan.name, version=plan.version,
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        builder=BuilderInfo(package="merra2-text-data", version=__version__),
        config=data_config(config, plan.gaps),
        variables=_variable_infos(cube, variables, units),
        window=config.sample.window, time_step=config.sample.time_step,
        splits={s: int((index["split"] == s).sum()) for s in SPLITS if (index["split"] == s).any()},
        shards=shards, normalization=_normalization(receipts, variables), sources=plan.sources,
        quarantined=len(quarantine), parent=parent, gaps=plan.gaps, inputs=plan.inputs,
        source_kind=kind,
        attribution=ERA5_ATTRIBUTION if is_era5(config.source.source) else None, climatology=None if climatology is None else climatology.describe(),
        text_sources=texts, samples_with_events=int((index["n_events"] > 0).sum()) if "n_events" in index else 0,
        array_shape=_array_shape(config, samples),
        holdout_tiles=holdout_tiles(samples, config.sample.holdout_tiles, config.sample.seed) or None,
    ))  # fmt: skip
    card = make_card(manifest, index, plan.region, grid=(cube["lat"].values, cube["lon"].values))
    commit_version(fs, plan.dataset_url, manifest, index, quarantine, card, tag=config.publish.tag)
    logger.info("published %s (%d samples, %d quarantined)", ref, len(index), len(quarantine))
    return ref
