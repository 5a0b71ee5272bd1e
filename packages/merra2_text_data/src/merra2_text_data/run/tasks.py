"""The units of work of a build and where they run (this process, a LocalCluster, or an existing dask scheduler).

A `ShardTask` is the samples of one shard. Two passes run over the same tasks:

- `run_stats_task` (pass 1, only when the build spans several years): reads T2M alone, window by window, and records
  each sample's statistics in `staging/<version>/stats/<task>.json`: the input of the day-of-year climatology.
- `run_task` (pass 2): computes, captions (with anomalies when a climatology exists), validates (quarantine or
  `strict`) and writes one shard straight to the store, then its receipt `staging/<version>/<task>.json`.

Both passes read one window at a time (memory bounded by a window, not by the period) and skip tasks whose receipt
already exists, so an interrupted build resumes where it stopped. `cube` is the cube itself (a build in this process
with a local cache) or a `cube.CubeSource`, which each task opens where it runs (a build on a cluster or with an
object-store cache: the client then reads no data). One dask client serves every stage of a build (`connect`).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import xarray as xr
from climate_text_schema import KNOWN_VARIABLES, SampleMeta, ShardInfo, version_url

from merra2_text_data.config.build import BuildConfig
from merra2_text_data.errors import PublishError
from merra2_text_data.fs import url_to_fs
from merra2_text_data.regions import REGIONS
from merra2_text_data.samples.climatology import DayOfYearClimatology, by_time_of_day, climatology_group
from merra2_text_data.samples.events import Event
from merra2_text_data.samples.normalize import NormAccumulator
from merra2_text_data.samples.pairs import SamplePlan, iter_samples
from merra2_text_data.samples.text import describe_region, make_caption
from merra2_text_data.samples.validate import quarantine_row, raise_if_invalid, validate_sample
from merra2_text_data.store.publish import manifest_exists, write_receipt
from merra2_text_data.store.shards import SampleRecord, write_shard

from .cube import days_of, open_cube
from .cube_source import CubeSource

__all__ = [
    "ANOMALY_VARIABLE",
    "STATS_STAGE",
    "ShardTask",
    "run_stats_task",
    "run_task",
    "units_of",
]

logger = logging.getLogger(__name__)

ANOMALY_VARIABLE = "T2M"
"""The variable whose anomaly captions state (and whose `_clim`/`_anom` columns the index holds)."""
STATS_STAGE = "stats"
"""Staging sub-folder of the first pass's receipts."""


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

    @property
    def days(self) -> list[dt.date]:
        """The UTC days its windows touch (what it reads of the cube)."""
        return days_of(self.plans)


def _cube_of(task: ShardTask, cube: xr.Dataset | CubeSource) -> xr.Dataset:
    return open_cube(cube, task.plans) if isinstance(cube, CubeSource) else cube


def units_of(cube: xr.Dataset, variables: Sequence[str]) -> dict[str, str]:
    """`{V: units}` from the cube's attributes (the contract's units where a variable has none)."""
    return {v: str(cube[v].attrs.get("units") or KNOWN_VARIABLES[v].units) for v in variables}


def run_stats_task(
    task: ShardTask, cube: xr.Dataset | CubeSource, config: BuildConfig, dataset_url: str, version: str
) -> dict[str, Any]:
    """Pass 1: the statistics of `ANOMALY_VARIABLE` for every sample of the task, recorded as a stats receipt.

    Returns:
        `{"task": name, "rows": [[key, tile_label, time_start ISO, mean], ...]}` (samples with a finite mean only).
    """
    fs, _ = url_to_fs(config.publish.out)
    rows: list[list[Any]] = []
    cube = _cube_of(task, cube)
    for sample in iter_samples(cube, list(task.plans), [ANOMALY_VARIABLE], config.sample.time_step):
        mean = sample.stats[ANOMALY_VARIABLE]["mean"]
        if math.isfinite(mean):
            p = sample.plan
            rows.append([p.key, p.tile_label, p.time_start.isoformat(), mean])
    receipt = {"task": task.name, "rows": rows}
    write_receipt(fs, dataset_url, version, task.name, receipt, stage=STATS_STAGE)
    return receipt


def _row(sample: Any, region_name: str, text: str, variables: Sequence[str]) -> dict[str, Any]:
    p = sample.plan
    row: dict[str, Any] = {
        "key": p.key, "split": p.split, "shard": "", "time_start": p.time_start.isoformat(),
        "time_end": p.time_end.isoformat(), "region": region_name, "lat_min": float(sample.lat.min()),
        "lat_max": float(sample.lat.max()), "lon_min": float(p.bbox[0]), "lon_max": float(p.bbox[2]), "text": text,
    }  # fmt: skip
    for v in variables:
        row.update({f"{v}_{s}": float(sample.stats[v][s]) for s in ("mean", "min", "max")})
    return row


def run_task(
    task: ShardTask,
    cube: xr.Dataset | CubeSource,
    config: BuildConfig,
    dataset_url: str,
    version: str,
    events: dict[str, list[Event]],
    climatology: DayOfYearClimatology | None = None,
) -> dict[str, Any]:
    """Pass 2: compute, caption, validate and write the samples of one shard, then record its receipt.

    Returns:
        The receipt: `shard` (ShardInfo dict or None when every sample was quarantined), `rows` (index rows, with
        `T2M_clim`/`T2M_anom` and `n_events`/`event_types`), `quarantine` (rows), `norm` (train moments).

    Raises:
        SampleValidationError: with `strict`, the first invalid sample.
    """
    fs, _ = url_to_fs(config.publish.out)
    cube = _cube_of(task, cube)
    variables = list(config.subset.variables)
    region = config.subset.parsed_region
    words = REGIONS[region.name].describe() if region.name in REGIONS else region.describe()
    units = units_of(cube, variables)
    records: list[SampleRecord] = []
    rows: list[dict[str, Any]] = []
    quarantined: list[dict[str, Any]] = []
    acc = NormAccumulator(variables)
    hourly = by_time_of_day(config.sample.window, config.sample.stride)
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
        group = climatology_group(p.tile_label, p.time_start, hourly)
        anomalies = None if climatology is None else climatology.anomalies(group, p.time_start, sample.stats)
        joined = events.get(p.key) or []
        text = make_caption(p.key, region_words, p.time_start, p.time_end, sample.stats, units, anomalies,
                            events=joined)  # fmt: skip
        extra: dict[str, Any] = {
            "time_step": config.sample.time_step,
            "tile": None if p.tile is None else list(p.tile),
        }
        if anomalies is not None:
            extra["anomalies"] = {
                "values": anomalies.values,
                "reference": anomalies.reference,
                "period": anomalies.period,
            }
        if joined:
            extra["events"] = [
                {"id": e.event_id, "type": e.event_type, "begin": e.begin.isoformat()} for e in joined
            ]
        meta = SampleMeta.model_validate(dict(
            key=p.key, split=p.split, time_start=p.time_start.isoformat(), time_end=p.time_end.isoformat(),
            region=region.name, bbox=list(p.bbox), variables=variables, units=[units[v] for v in variables],
            lat=[float(x) for x in sample.lat], lon=[float(x) for x in sample.lon], stats=sample.stats, **extra,
        ))  # fmt: skip
        records.append(SampleRecord(key=p.key, array=sample.array, text=text, meta=meta))
        row = _row(sample, region.name, text, variables)
        if ANOMALY_VARIABLE in variables:
            delta = None if anomalies is None else anomalies.values.get(ANOMALY_VARIABLE)
            ref = (
                None
                if anomalies is None or anomalies.reference is None
                else anomalies.reference.get(ANOMALY_VARIABLE)
            )
            row[f"{ANOMALY_VARIABLE}_clim"] = math.nan if ref is None else float(ref)
            row[f"{ANOMALY_VARIABLE}_anom"] = math.nan if delta is None else float(delta)
        row["n_events"] = len(joined)
        row["event_types"] = "; ".join(dict.fromkeys(e.event_type for e in joined))
        rows.append(row)
        if p.split == "train":
            acc.update(sample.array)
    info: ShardInfo | None = None
    if records:
        if manifest_exists(fs, dataset_url, version):  # never rewrite a shard of a committed version
            raise PublishError(
                f"not writing shard {task.name} of {version_url(dataset_url, version)}: another build committed "
                "that version meanwhile; its files are kept. Rerun the same command: it finds the version and stops"
            )
        info, _ = write_shard(fs, version_url(dataset_url, version), task.split, task.number, records)
        for row in rows:
            row["shard"] = info.path
    receipt = {"task": task.name, "shard": None if info is None else info.model_dump(), "rows": rows,
               "quarantine": quarantined, "norm": acc.to_dict()}  # fmt: skip
    receipt = json.loads(json.dumps(receipt, default=str))
    write_receipt(fs, dataset_url, version, task.name, receipt)
    return receipt
