"""The build: wiring only. Plan first (granules x region x windows x tiles x shards), then execute, then commit.

1. Resolve the granules (earthaccess search or a folder/URL); missing days fail unless `allow_gaps`.
2. Version id = digest of the resolved config, the granule identities, event files and the schema version. If that
   version is already committed, stop: nothing is written.
3. Open the region (zarr cache), plan samples and splits, and pack each split's samples into shard tasks whose
   numbering follows from the plan alone (`<split>-<NNNNNN>` = position of the task in its split).
4. Each task reads one window at a time (memory bounded by a window), captions, validates (quarantine or `strict`),
   writes its shard straight to the store and a receipt under `<name>/staging/<version>/`. Tasks run in this process,
   on a `LocalCluster` (`workers`) or on an existing dask scheduler (`scheduler`).
5. A rerun after an interruption skips tasks whose receipt and shard exist, and ends with the same version.
6. Index (validated), quarantine table, dataset card, manifest last, tag.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr
from climate_text_schema import (
    KNOWN_VARIABLES,
    SCHEMA_VERSION,
    SPLITS,
    BuilderInfo,
    Manifest,
    NormStats,
    SampleMeta,
    ShardInfo,
    SourceInfo,
    VariableInfo,
    join_url,
    open_dataset,
    version_url,
)

from . import __version__
from .card import make_card
from .config import BuildConfig
from .errors import BuildError, MissingDataError
from .events import Event, load_storm_events, load_text_table, match_events
from .fetch import Granule, collection_for, download_granules, find_granules, missing_days, search_earthaccess
from .normalize import NormAccumulator
from .pairs import SamplePlan, iter_samples, parse_duration, plan_samples
from .splits import assign_splits
from .publish import (
    commit_version,
    compute_version,
    manifest_exists,
    read_receipts,
    url_to_fs,
    write_receipt,
    write_tag,
)
from .regions import REGIONS, Region, parse_region
from .shards import SampleRecord, estimate_sample_bytes, fs_path, is_local, pack_by_size, write_shard
from .text import describe_region, make_caption
from .validate import quarantine_frame, quarantine_row, raise_if_invalid, validate_sample

__all__ = ["BuildPlan", "ProgressHook", "ShardTask", "build", "plan_build", "run_task"]

logger = logging.getLogger(__name__)

ProgressHook = Callable[[str, int, int], None]
"""`(stage, done, total)`: called as work advances (the CLI draws progress bars from it)."""


@dataclass(frozen=True)
class ShardTask:
    """One unit of work: the samples of one shard. Serialisable (plans as dicts)."""

    split: str
    number: int
    plans: tuple[SamplePlan, ...]

    @property
    def name(self) -> str:
        """`<split>-<NNNNNN>`: the shard's name and the task's receipt name."""
        return f"{self.split}-{self.number:06d}"


@dataclass
class BuildPlan:
    """Everything decided before samples are computed."""

    config: BuildConfig
    region: Region
    name: str
    dataset_url: str
    version: str
    granules: list[Granule]
    sources: list[SourceInfo]
    gaps: list[str]
    inputs: dict[str, str]


def _ranges(days: Sequence[dt.date]) -> str:
    out: list[str] = []
    days = sorted(days)
    i = 0
    while i < len(days):
        j = i
        while j + 1 < len(days) and days[j + 1] - days[j] == dt.timedelta(days=1):
            j += 1
        out.append(str(days[i]) if i == j else f"{days[i]}..{days[j]}")
        i = j + 1
    return ", ".join(out)


def _file_digest(path: str) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError as exc:
        raise MissingDataError(
            f"input file {path} cannot be read ({exc}); check the path given to --events"
        ) from exc


def plan_build(config: BuildConfig) -> BuildPlan:
    """Resolve the granules and compute the version id (cheap: reads no granule content).

    Raises:
        MissingDataError: days are missing from the source (listed) and `allow_gaps` is off, or nothing is found.
    """
    region = parse_region(config.subset.region)
    start, end = config.subset.period()
    collections = sorted({collection_for(v) for v in config.subset.variables})
    source = config.source.source
    if source == "earthaccess":
        granules = search_earthaccess(collections, start, end, region)
        missing = missing_days(granules, collections, start, end)
    else:
        granules, missing = find_granules(source, collections, start, end)
    if not granules:
        raise MissingDataError(
            f"no {'/'.join(collections)} granules for {start}..{end} in {source}; check --source and the period "
            "(make test files with `merra2-text synth`)"
        )
    if missing and not config.source.allow_gaps:
        raise MissingDataError(
            f"{len(missing)} day(s) lack a granule of {'/'.join(collections)} in {source}: {_ranges(missing)}; "
            "add the files, shorten the period, or pass --allow-gaps to build around them"
        )
    sources = [SourceInfo(granule=g.granule_id or g.file_name, file=g.file_name, bytes=g.size, checksum=g.checksum)
               for g in granules]  # fmt: skip
    inputs = {f"events:{Path(p).name}": _file_digest(p) for p in config.sample.events}
    if config.sample.text_table:
        inputs[f"text_table:{Path(config.sample.text_table).name}"] = _file_digest(config.sample.text_table)
    _, out = url_to_fs(config.publish.out)
    name = config.dataset_name()
    version = compute_version({**config.resolved(), "gaps": [str(d) for d in missing]}, sources, inputs)
    return BuildPlan(config, region, name, join_url(out, name), version, granules, sources,
                     [str(d) for d in missing], inputs)  # fmt: skip


def _cache_dir(config: BuildConfig) -> Path:
    if config.source.cache_dir:
        return Path(config.source.cache_dir).expanduser()
    fs, out = url_to_fs(config.publish.out)
    return Path(fs_path(fs, out)) / ".cache" if is_local(fs) else Path.home() / ".cache" / "merra2-text"


def _open_cube(plan: BuildPlan, show_progress: bool) -> xr.Dataset:
    from .subset import open_region

    cfg = plan.config
    cache = _cache_dir(cfg)
    granules = plan.granules
    if cfg.source.source == "earthaccess":
        granules = download_granules(granules, cache / "granules", show_progress=show_progress)
    start, end = cfg.subset.period()
    return open_region(granules, list(cfg.subset.variables), plan.region, start, end, cache_dir=cache / "zarr",
                       show_progress=show_progress)  # fmt: skip


def _plan_tasks(plan: BuildPlan, cube: xr.Dataset) -> tuple[list[ShardTask], list[SamplePlan]]:
    cfg = plan.config
    lat, lon = np.asarray(cube["lat"].values, dtype=float), np.asarray(cube["lon"].values, dtype=float)
    samples = plan_samples(cube["time"].values, lat.size, lon.size, lat, lon, plan.name, cfg.sample.window,
                           cfg.sample.stride, cfg.sample.tile_shape(), plan.region.bbox)  # fmt: skip
    if not samples:
        raise MissingDataError(
            f"no complete {cfg.sample.window} window in {cfg.subset.period()[0]}..{cfg.subset.period()[1]}; "
            "lengthen the period or shorten --window"
        )
    samples = assign_splits(
        samples, cfg.sample.val_fraction, cfg.sample.test_fraction, cfg.sample.split_years()
    )
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


def _units(cube: xr.Dataset, variables: Sequence[str]) -> dict[str, str]:
    return {v: str(cube[v].attrs.get("units") or KNOWN_VARIABLES[v].units) for v in variables}


def run_task(
    task: ShardTask,
    cube: xr.Dataset,
    config: BuildConfig,
    dataset_url: str,
    version: str,
    events: dict[str, list[Event]],
) -> dict[str, Any]:
    """Compute, caption, validate and write the samples of one shard, then record its receipt.

    Returns:
        The receipt: `shard` (ShardInfo dict or None when every sample was quarantined), `rows` (index rows),
        `quarantine` (rows), `norm` (train moments: count, mean, m2 per variable).

    Raises:
        SampleValidationError: with `strict`, the first invalid sample.
    """
    fs, _ = url_to_fs(config.publish.out)
    variables = list(config.subset.variables)
    region = parse_region(config.subset.region)
    words = REGIONS[region.name].describe() if region.name in REGIONS else region.describe()
    units = _units(cube, variables)
    records: list[SampleRecord] = []
    rows: list[dict[str, Any]] = []
    quarantined: list[dict[str, Any]] = []
    acc = NormAccumulator(variables)
    for sample in iter_samples(cube, list(task.plans), variables, config.sample.time_step):
        p = sample.plan
        reasons = validate_sample(sample.array, sample.stats, variables, sample.lat, sample.lon)
        if config.sample.strict:
            raise_if_invalid(p.key, reasons)
        if reasons:
            logger.warning("quarantined %s: %s", p.key, "; ".join(reasons))
            quarantined.append(quarantine_row(p.key, p.split, p.time_start, p.time_end, reasons))
            continue
        region_words = describe_region(words, p.bbox if p.tile is not None else None)
        text = make_caption(p.key, region_words, p.time_start, p.time_end, sample.stats, units,
                            events=events.get(p.key))  # fmt: skip
        meta = SampleMeta.model_validate(dict(
            key=p.key, split=p.split, time_start=p.time_start.isoformat(), time_end=p.time_end.isoformat(),
            region=region.name, bbox=list(p.bbox), variables=variables, units=[units[v] for v in variables],
            lat=[float(x) for x in sample.lat], lon=[float(x) for x in sample.lon], stats=sample.stats,
            time_step=config.sample.time_step, tile=None if p.tile is None else list(p.tile),
        ))  # fmt: skip
        records.append(SampleRecord(key=p.key, array=sample.array, text=text, meta=meta))
        row: dict[str, Any] = {
            "key": p.key, "split": p.split, "shard": "", "time_start": p.time_start.isoformat(),
            "time_end": p.time_end.isoformat(), "region": region.name, "lat_min": float(sample.lat.min()),
            "lat_max": float(sample.lat.max()), "lon_min": float(p.bbox[0]), "lon_max": float(p.bbox[2]), "text": text,
        }  # fmt: skip
        for v in variables:
            row.update({f"{v}_{s}": float(sample.stats[v][s]) for s in ("mean", "min", "max")})
        rows.append(row)
        if p.split == "train":
            acc.update(sample.array)
    info: ShardInfo | None = None
    if records:
        info, _ = write_shard(fs, version_url(dataset_url, version), task.split, task.number, records)
        for row in rows:
            row["shard"] = info.path
    receipt = {
        "task": task.name, "shard": None if info is None else info.model_dump(), "rows": rows,
        "quarantine": quarantined,
        "norm": acc.to_dict(),
    }  # fmt: skip
    receipt = json.loads(json.dumps(receipt, default=str))
    write_receipt(fs, dataset_url, version, task.name, receipt)
    return receipt


def _execute(
    tasks: list[ShardTask], cube: xr.Dataset, plan: BuildPlan, events: dict[str, list[Event]],
    progress: ProgressHook | None,
) -> list[dict[str, Any]]:  # fmt: skip
    cfg = plan.config
    fs, _ = url_to_fs(cfg.publish.out)
    done = read_receipts(fs, plan.dataset_url, plan.version)
    if done:
        logger.info("resuming: %d of %d shard task(s) already finished", len(done), len(tasks))
    todo = [t for t in tasks if t.name not in done]
    results: dict[str, dict[str, Any]] = dict(done)
    total = len(tasks)
    if progress:
        progress("samples", len(done), total)
    if todo and (cfg.run.workers or cfg.run.scheduler):
        from distributed import Client, LocalCluster, as_completed

        cluster = LocalCluster(n_workers=cfg.run.workers, threads_per_worker=1) if cfg.run.workers else None
        try:
            with Client(cluster if cluster is not None else cfg.run.scheduler) as client:
                cube_f = client.scatter(cube, broadcast=True)
                futures = [client.submit(run_task, t, cube_f, cfg, plan.dataset_url, plan.version,
                                         {p.key: events.get(p.key, []) for p in t.plans}, key=f"task-{plan.version}-{t.name}",
                                         pure=False) for t in todo]  # fmt: skip
                for fut in as_completed(futures):
                    receipt = fut.result()
                    results[receipt["task"]] = receipt
                    if progress:
                        progress("samples", len(results), total)
        finally:
            if cluster is not None:
                cluster.close()
    else:
        for t in todo:
            results[t.name] = run_task(t, cube, cfg, plan.dataset_url, plan.version, events)
            if progress:
                progress("samples", len(results), total)
    return [results[t.name] for t in tasks]


def _index(receipts: list[dict[str, Any]], variables: Sequence[str]) -> pd.DataFrame:
    rows = [r for rec in receipts for r in rec["rows"]]
    columns = ["key", "split", "shard", "time_start", "time_end", "region", "lat_min", "lat_max", "lon_min",
               "lon_max", "text"] + [f"{v}_{s}" for v in variables for s in ("mean", "min", "max")]  # fmt: skip
    df = pd.DataFrame(rows, columns=columns)
    for col in ("time_start", "time_end"):
        df[col] = pd.to_datetime(df[col], utc=True)
    for col in columns[6:10] + columns[11:]:
        df[col] = df[col].astype("float64")
    for col in ("key", "split", "shard", "region", "text"):
        df[col] = df[col].astype(str)
    return df


def _normalization(receipts: list[dict[str, Any]], variables: Sequence[str]) -> dict[str, NormStats]:
    total = NormAccumulator(variables)
    for rec in receipts:
        total.merge(NormAccumulator.from_dict(rec["norm"]))
    return {v: NormStats(**s) for v, s in total.result().items()}


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
        if config.publish.tag:
            tag_file = fs_path(fs, join_url(plan.dataset_url, "tags", config.publish.tag))
            if not fs.exists(tag_file) or fs.cat_file(tag_file).decode().strip() != plan.version:
                write_tag(fs, plan.dataset_url, config.publish.tag, plan.version)
        return ref
    cube = _open_cube(plan, show)
    tasks, samples = _plan_tasks(plan, cube)
    logger.info("plan: %d samples in %d shard task(s), version %s", len(samples), len(tasks), plan.version)
    events: dict[str, list[Event]] = {}
    frames = []
    if config.sample.events:
        frames.append(load_storm_events(config.sample.events))
    if config.sample.text_table:
        frames.append(load_text_table(config.sample.text_table))
    if frames:
        step = (
            float(np.abs(np.diff(np.asarray(cube["lat"].values, dtype=float))).min())
            if cube.sizes["lat"] > 1
            else 0.5
        )
        events = match_events(pd.concat(frames, ignore_index=True), samples, margin_deg=step / 2)
    receipts = _execute(tasks, cube, plan, events, progress)
    variables = list(config.subset.variables)
    index = _index(receipts, variables)
    quarantine = quarantine_frame([q for rec in receipts for q in rec["quarantine"]])
    if index.empty:
        raise BuildError(
            f"every one of the {len(samples)} samples was quarantined; see the log for the reasons"
        )
    shards = [ShardInfo.model_validate(rec["shard"]) for rec in receipts if rec["shard"] is not None]
    units = _units(cube, variables)
    parent = open_dataset(config.publish.parent).version if config.publish.parent else None
    manifest = Manifest.model_validate(dict(
        schema_version=SCHEMA_VERSION, name=plan.name, version=plan.version,
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        builder=BuilderInfo(package="merra2-text-data", version=__version__),
        config={**config.resolved(), "gaps": plan.gaps},
        variables=[VariableInfo(name=v, units=units[v], long_name=KNOWN_VARIABLES[v].long_name,
                                collection=collection_for(v)) for v in variables],
        window=config.sample.window, time_step=config.sample.time_step,
        splits={s: int((index["split"] == s).sum()) for s in SPLITS if (index["split"] == s).any()},
        shards=shards, normalization=_normalization(receipts, variables), sources=plan.sources,
        quarantined=len(quarantine), parent=parent, gaps=plan.gaps, inputs=plan.inputs,
    ))  # fmt: skip
    card = make_card(manifest, index, plan.region)
    commit_version(fs, plan.dataset_url, manifest, index, quarantine, card, tag=config.publish.tag)
    logger.info("published %s (%d samples, %d quarantined)", ref, len(index), len(quarantine))
    return ref
