"""The build's plan (`plan_build`): the granules resolved, the gaps checked, the version id computed, before any
granule's content is read; and where the plan keeps its caches. `pipeline.build` executes it."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from climate_text_schema import SourceInfo, join_url

from merra2_text_data.config.build import BuildConfig
from merra2_text_data.errors import MissingDataError
from merra2_text_data.fs import fs_path, is_local, url_to_fs
from merra2_text_data.regions import Region
from merra2_text_data.samples import text as _text
from merra2_text_data.samples.climatology import by_time_of_day
from merra2_text_data.source.cmr import search_earthaccess
from merra2_text_data.source.digests import content_digests
from merra2_text_data.source.era5 import era5_days, era5_source_info, era5_url, is_era5
from merra2_text_data.source.fetch import find_granules
from merra2_text_data.source.granules import Granule, collection_for, missing_days
from merra2_text_data.store.publish import compute_version

from .tasks import ANOMALY_VARIABLE

__all__ = ["BuildPlan", "cache_dir", "data_config", "plan_build"]


@dataclass
class BuildPlan:
    """Everything decided before samples are computed."""

    config: BuildConfig
    name: str
    dataset_url: str
    version: str
    granules: list[Granule]
    sources: list[SourceInfo]
    gaps: list[str]
    inputs: dict[str, str]

    @property
    def region(self) -> Region:
        """The build's region, as the config parsed it."""
        return self.config.subset.parsed_region


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


def _file_digest(path: str, option: str) -> str:
    """The SHA-256 of an input file; `option` is the flag that named it (`--events`, `--text-table`), for the error."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError as exc:
        raise MissingDataError(
            f"input file {path} cannot be read ({exc}); check the path given to {option}"
        ) from exc


def plan_build(config: BuildConfig) -> BuildPlan:
    """Resolve the granules and compute the version id (cheap: reads no granule content).

    Raises:
        MissingDataError: days are missing from the source (listed) and `allow_gaps` is off, or nothing is found.
    """
    start, end = config.subset.period()
    source = config.source.source
    if is_era5(source):
        return _plan_era5(config)
    collections = sorted({collection_for(v) for v in config.subset.variables})
    if source == "earthaccess":
        granules = search_earthaccess(collections, start, end, config.subset.parsed_region)
        missing = missing_days(granules, collections, start, end)
    else:
        granules, missing = find_granules(source, collections, start, end)
    if missing and config.source.allow_gaps:  # a day short of one collection is a gap too: none of it is read
        gap_days = set(missing)
        granules = [g for g in granules if g.day not in gap_days]
    if config.source.hash_granules and source != "earthaccess":
        granules = content_digests(granules, _digest_cache_dir(config))
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
    return _finish_plan(config, granules, sources, [str(d) for d in missing])


def _plan_era5(config: BuildConfig) -> BuildPlan:
    """The plan of an `era5:URL` build: the store's identity and the days of the period it has no step on."""
    url = era5_url(config.source.source)
    start, end = config.subset.period()
    have = set(era5_days(url))
    missing = [start + dt.timedelta(days=i) for i in range((end - start).days + 1)]
    missing = [d for d in missing if d not in have]
    if len(missing) == (end - start).days + 1:
        raise MissingDataError(f"ERA5 store {url} has no step in {start}..{end}; it covers {min(have, default='-')} "
                               f"..{max(have, default='-')}: change --start/--end or --years")  # fmt: skip
    if missing and not config.source.allow_gaps:
        raise MissingDataError(
            f"{len(missing)} day(s) of {start}..{end} have no step in ERA5 store {url}: {_ranges(missing)}; shorten "
            "the period, or pass --allow-gaps to build around them"
        )
    sources = [era5_source_info(url, config.subset.variables)]
    return _finish_plan(config, [], sources, [str(d) for d in missing])


def _finish_plan(
    config: BuildConfig, granules: list[Granule], sources: list[SourceInfo], gaps: list[str]
) -> BuildPlan:
    inputs = {f"events:{Path(p).name}": _file_digest(p, "--events") for p in config.sample.events}
    if config.sample.text_table:
        table = config.sample.text_table
        inputs[f"text_table:{Path(table).name}"] = _file_digest(table, "--text-table")
    _, out = url_to_fs(config.publish.out)
    name = config.dataset_name()
    version = compute_version(data_config(config, gaps), sources, inputs)
    return BuildPlan(config, name, join_url(out, name), version, granules, sources, gaps, inputs)


def data_config(config: BuildConfig, gaps: list[str]) -> dict[str, Any]:
    """What the version id hashes and the manifest records as `config`: the resolved build config, the missing days
    built around, the caption format of this builder (`text.TEXT_FORMAT`, read at call time), and `climatology:
    time_of_day` where sub-daily T2M windows are compared with their time of day (their anomalies, hence their
    captions, differ from those of builds before that rule), and `event_margins: per_axis` where event reports are
    joined (since the join widens each tile by half of each axis's grid step, not the latitude's on both, a build
    with events may pair other reports than one before it: its id changes, so no stale version is reused)."""
    sample = config.sample
    hourly = ANOMALY_VARIABLE in config.subset.variables and by_time_of_day(sample.window, sample.stride)
    joins = bool(sample.events or sample.text_table)
    return {**config.resolved(), "gaps": gaps, "text_format": _text.TEXT_FORMAT,
            **({"climatology": "time_of_day"} if hourly else {}),
            **({"event_margins": "per_axis"} if joins else {})}  # fmt: skip


def cache_dir(config: BuildConfig) -> Path:
    """The cache folder of a build that reads the cube here: `source.cache` (a `file://` URL as its path), else
    `<out>/.cache` for a local output, else ~/.cache/merra2-text."""
    location = config.source.cache_location()
    if location:
        fs, url = url_to_fs(location)
        return Path(fs_path(fs, url)) if is_local(fs) else Path(location).expanduser()
    fs, out = url_to_fs(config.publish.out)
    return Path(fs_path(fs, out)) / ".cache" if is_local(fs) else Path.home() / ".cache" / "merra2-text"


def _digest_cache_dir(config: BuildConfig) -> Path:
    """The client's folder for granule digests: a local cache of this machine, else ~/.cache/merra2-text."""
    cache = config.source.cache_location()
    if cache is not None and (config.run.scheduler or not is_local(url_to_fs(str(cache))[0])):
        return Path.home() / ".cache" / "merra2-text"
    return cache_dir(config)
