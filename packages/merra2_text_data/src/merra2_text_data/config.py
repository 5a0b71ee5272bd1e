"""Build configuration: one pydantic model per concern, composed into `BuildConfig`.

A config comes from YAML (`pipelines/*.yaml`), from CLI flags, or from Python. Every problem is collected and raised
once as a `ConfigError` whose message names each YAML key (`subset.years`, `sample.window`, ...).

`BuildConfig.resolved()` is the canonical dict that goes into the manifest and the version digest: it holds only what
changes the data (never `out`, `cache_dir`, `workers`, `scheduler`, `quiet`, `allow_gaps` or `strict`).
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from climate_text_schema import DEFAULT_VARIABLES, KNOWN_VARIABLES
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError

__all__ = [
    "FIRST_YEAR",
    "BuildConfig",
    "PublishConfig",
    "RunConfig",
    "SampleConfig",
    "ShardConfig",
    "SourceConfig",
    "SubsetConfig",
    "parse_size",
]

FIRST_YEAR = 1980
"""MERRA-2 starts on 1980-01-01."""

_YEARS_RE = re.compile(r"^\s*(\d{4})\s*(?:-\s*(\d{4})\s*)?$")
_TILE_RE = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*$")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_size(value: int | str) -> int:
    """Parse a byte size: an int, or text such as `256MB`, `1.5GB`, `64MiB`.

    Raises:
        ValueError: the text is not a size.
    """
    if isinstance(value, int):
        return value
    match = _SIZE_RE.match(str(value))
    if not match:
        raise ValueError(f"{value!r} is not a size; write bytes or a number with a unit, e.g. 256MB")
    number, unit = float(match.group(1)), (match.group(2) or "").lower()
    factor = 1024 ** "kmgt".index(unit[0]) * 1024 if "i" in unit else _UNITS[unit[:1]]
    return int(number * factor)


def _not_empty(value: str | None, what: str) -> str | None:
    """None stays None; an empty or blank text is an error that says what to give instead."""
    if value is not None and not value.strip():
        raise ValueError(f"is empty; give {what}, or leave the key out")
    return value


def _duration(value: str) -> pd.Timedelta:
    from .pairs import parse_duration

    return parse_duration(value)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SourceConfig(_Section):
    """Where the MERRA-2 granules come from."""

    source: str = "earthaccess"
    """`earthaccess` (NASA Earthdata) or a folder/URL (any fsspec store) holding MERRA-2 granules."""
    cache_dir: str | None = None
    """Local cache for downloads and the zarr regional cache (default: `<out>/.cache` for local outputs)."""
    allow_gaps: bool = False
    """Build around missing days (recorded in the manifest) instead of failing with MissingDataError."""

    @field_validator("source")
    @classmethod
    def _source_ok(cls, value: str) -> str:
        return str(_not_empty(value, "'earthaccess' or a folder/URL of MERRA-2 granules"))

    @field_validator("cache_dir")
    @classmethod
    def _cache_ok(cls, value: str | None) -> str | None:
        return _not_empty(value, "a local folder")


class SubsetConfig(_Section):
    """Which region, period and variables."""

    region: str
    """A named region (see `merra2-text regions`) or `W,S,E,N` in degrees east/north."""
    years: str | None = None
    """`2019` or `2018-2020` (whole calendar years); exclusive with start/end."""
    start: dt.date | None = None
    """First day (inclusive), e.g. 2020-01-01."""
    end: dt.date | None = None
    """Last day (inclusive), e.g. 2020-03-31."""
    variables: list[str] = Field(default_factory=lambda: list(DEFAULT_VARIABLES))
    """MERRA-2 variable names, in array order."""

    @field_validator("years", mode="before")
    @classmethod
    def _years_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) else value

    @field_validator("years")
    @classmethod
    def _years_ok(cls, value: str | None) -> str | None:
        if value is None:
            return None
        match = _YEARS_RE.match(value)
        if not match:
            raise ValueError(f"{value!r} is not a year or a year range; write 2019 or 2018-2020")
        first = int(match.group(1))
        last = int(match.group(2) or first)
        now = dt.date.today().year
        for year in (first, last):
            if not FIRST_YEAR <= year <= now:
                raise ValueError(
                    f"year {year} in {value!r} is outside {FIRST_YEAR}..{now} (MERRA-2's record)"
                )
        if last < first:
            raise ValueError(f"{value!r} ends before it starts; write {last}-{first}")
        return f"{first}" if first == last else f"{first}-{last}"

    @field_validator("start", "end")
    @classmethod
    def _date_ok(cls, value: dt.date | None) -> dt.date | None:
        if value is not None and not dt.date(FIRST_YEAR, 1, 1) <= value <= dt.date.today():
            raise ValueError(f"{value} is outside {FIRST_YEAR}-01-01..{dt.date.today()} (MERRA-2's record)")
        return value

    @field_validator("variables", mode="before")
    @classmethod
    def _variables_text(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @field_validator("variables")
    @classmethod
    def _variables_ok(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("no variables given; write e.g. T2M,U10M,V10M")
        unknown = [v for v in value if v not in KNOWN_VARIABLES]
        if unknown:
            raise ValueError(
                f"unknown variable(s) {', '.join(unknown)}; known: {', '.join(sorted(KNOWN_VARIABLES))}"
            )
        dupes = sorted({v for v in value if value.count(v) > 1})
        if dupes:
            raise ValueError(f"variable(s) listed twice: {', '.join(dupes)}")
        return value

    @field_validator("region")
    @classmethod
    def _region_ok(cls, value: str) -> str:
        from .regions import parse_region

        try:
            parse_region(value)
        except Exception as exc:  # the regions module raises ConfigError/ValueError naming the value
            raise ValueError(str(exc)) from exc
        return value.strip()

    @model_validator(mode="after")
    def _period_ok(self) -> SubsetConfig:
        if self.years is not None and (self.start is not None or self.end is not None):
            raise ValueError("give either years or start/end, not both")
        if self.years is None and (self.start is None or self.end is None):
            raise ValueError("give years (2019 or 2018-2020) or both start and end (YYYY-MM-DD)")
        if self.start is not None and self.end is not None and self.end < self.start:
            raise ValueError(f"end {self.end} is before start {self.start}")
        return self

    def period(self) -> tuple[dt.date, dt.date]:
        """The first and last day (both inclusive)."""
        if self.years is not None:
            first, _, last = self.years.partition("-")
            return dt.date(int(first), 1, 1), min(dt.date(int(last or first), 12, 31), dt.date.today())
        assert self.start is not None and self.end is not None
        return self.start, self.end


class SampleConfig(_Section):
    """How the climate cube is cut into samples and split, and how text is made."""

    window: str = "1d"
    """Time span of one sample, e.g. 1d, 12h, 7d."""
    stride: str | None = None
    """Step between sample starts (default: the window)."""
    time_step: str = "1h"
    """Time resolution inside a sample: 1h, 3h, 1d (means over the hourly source steps)."""
    tile: str | None = None
    """Cut the region into tiles of LATxLON grid points, e.g. 16x16 (default: the whole region per sample)."""
    val_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    """Fraction of windows that go to the val split (ignored for years listed in val_years/test_years)."""
    test_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    """Fraction of windows that go to the test split."""
    val_years: list[int] = Field(default_factory=list)
    """Whole years that go to val (overrides the fractions for those years)."""
    test_years: list[int] = Field(default_factory=list)
    """Whole years that go to test."""
    seed: int = 0
    """Seed of the split assignment."""
    events: list[str] = Field(default_factory=list)
    """NOAA Storm Events CSV(.gz) files whose events are woven into the captions."""
    text_table: str | None = None
    """A table of extra text keyed by sample time/region (CSV or Parquet)."""
    strict: bool = False
    """Fail on the first invalid sample instead of quarantining it."""

    @field_validator("window", "time_step")
    @classmethod
    def _duration_ok(cls, value: str) -> str:
        _duration(value)
        return value.strip().lower()

    @field_validator("stride")
    @classmethod
    def _stride_ok(cls, value: str | None) -> str | None:
        if value is None:
            return None
        _duration(value)
        return value.strip().lower()

    @field_validator("val_years", "test_years")
    @classmethod
    def _years_in_record(cls, value: list[int]) -> list[int]:
        now = dt.date.today().year
        outside = [y for y in value if not FIRST_YEAR <= y <= now]
        if outside:
            raise ValueError(f"year(s) {outside} are outside {FIRST_YEAR}..{now} (MERRA-2's record)")
        return value

    @field_validator("events")
    @classmethod
    def _events_ok(cls, value: list[str]) -> list[str]:
        for path in value:
            _not_empty(path, "the path of a NOAA Storm Events CSV(.gz)")
        return value

    @field_validator("text_table")
    @classmethod
    def _text_table_ok(cls, value: str | None) -> str | None:
        return _not_empty(value, "the path of a CSV or Parquet table")

    @field_validator("tile")
    @classmethod
    def _tile_ok(cls, value: str | None) -> str | None:
        if value is None or str(value).strip().lower() in ("", "none"):
            return None
        match = _TILE_RE.match(str(value).lower())
        if not match or int(match.group(1)) < 1 or int(match.group(2)) < 1:
            raise ValueError(f"{value!r} is not a tile size; write LATxLON grid points, e.g. 16x16")
        return f"{int(match.group(1))}x{int(match.group(2))}"

    @model_validator(mode="after")
    def _consistent(self) -> SampleConfig:
        problems = []
        window, step = _duration(self.window), _duration(self.time_step)
        if step > window:
            problems.append(f"time_step {self.time_step} is longer than window {self.window}")
        elif window % step != pd.Timedelta(0):
            problems.append(f"window {self.window} is not a whole number of time_step {self.time_step}")
        if self.val_fraction + self.test_fraction >= 1.0:
            problems.append(
                f"val_fraction {self.val_fraction} + test_fraction {self.test_fraction} leave no train samples"
            )
        both = sorted(set(self.val_years) & set(self.test_years))
        if both:
            problems.append(f"year(s) {both} are in both val_years and test_years")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def tile_shape(self) -> tuple[int, int] | None:
        """The tile as (n_lat, n_lon) grid points, or None."""
        if self.tile is None:
            return None
        a, b = self.tile.split("x")
        return int(a), int(b)

    def split_years(self) -> dict[int, str]:
        """{year: split} for the years pinned to val or test."""
        return {**{y: "val" for y in self.val_years}, **{y: "test" for y in self.test_years}}


class ShardConfig(_Section):
    """How samples are packed into WebDataset shards."""

    shard_size: int = 256_000_000
    """Target bytes per shard (a new shard starts when the next sample would pass it); accepts 256MB, 1GB."""

    @field_validator("shard_size", mode="before")
    @classmethod
    def _size_text(cls, value: Any) -> Any:
        return parse_size(value) if isinstance(value, str) else value

    @field_validator("shard_size")
    @classmethod
    def _size_ok(cls, value: int) -> int:
        if value < 1024:
            raise ValueError(f"{value} bytes is too small for a shard; use at least 1KB (default 256MB)")
        return value


class PublishConfig(_Section):
    """Where and under which name the version is published."""

    out: str = "./datasets"
    """Dataset root: a local folder or any fsspec URL (s3://bucket/prefix)."""
    name: str | None = None
    """Dataset name (default: the region name, or `bbox` for a W,S,E,N region)."""
    tag: str = "latest"
    """Tag moved to the new version."""
    parent: str | None = None
    """Reference of the version this build extends (recorded in the manifest lineage)."""

    @field_validator("out")
    @classmethod
    def _out_ok(cls, value: str) -> str:
        return str(_not_empty(value, "a folder or URL such as ./datasets or s3://bucket/prefix"))

    @field_validator("parent")
    @classmethod
    def _parent_ok(cls, value: str | None) -> str | None:
        return _not_empty(value, "a dataset reference such as ./datasets/conus@latest")

    @field_validator("name", "tag")
    @classmethod
    def _name_ok(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$", value):
            raise ValueError(f"{value!r} must be letters, digits, '_', '-', '.' (no slashes, no '@')")
        return value


class RunConfig(_Section):
    """How the build runs (never changes the data)."""

    workers: int = Field(default=0, ge=0)
    """Start a local dask cluster with this many workers (0: run in this process)."""
    scheduler: str | None = None
    """Address of an existing dask scheduler (tcp://host:8786); exclusive with workers."""
    quiet: bool = False
    """No progress bars."""

    @field_validator("scheduler")
    @classmethod
    def _scheduler_ok(cls, value: str | None) -> str | None:
        return _not_empty(value, "a dask scheduler address such as tcp://host:8786")


class BuildConfig(_Section):
    """Everything a build needs. `resolved()` is the canonical, data-defining part.

    Examples:
        >>> cfg = BuildConfig.from_options(region="-105,35,-95,45", years="2019", source="/data/merra2")
        >>> cfg.subset.period()
        (datetime.date(2019, 1, 1), datetime.date(2019, 12, 31))
    """

    source: SourceConfig = Field(default_factory=SourceConfig)
    subset: SubsetConfig
    sample: SampleConfig = Field(default_factory=SampleConfig)
    shard: ShardConfig = Field(default_factory=ShardConfig)
    publish: PublishConfig = Field(default_factory=PublishConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @model_validator(mode="after")
    def _run_ok(self) -> BuildConfig:
        if self.run.workers and self.run.scheduler:
            raise ValueError(
                f"run.workers={self.run.workers} and run.scheduler={self.run.scheduler!r} exclude each other"
            )
        return self

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> BuildConfig:
        """Validate a nested dict, raising one ConfigError that names every bad key."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(_format_errors(exc, where)) from exc

    @classmethod
    def from_options(cls, overrides: list[str] | None = None, **options: Any) -> BuildConfig:
        """Build from flat CLI-style options (`region=`, `years=`, `window=`, ...; None means unset).

        Args:
            overrides: `a.b=v` strings applied last.
            **options: flat option names, see `FLAT_KEYS`.
        """
        data: dict[str, Any] = {}
        _apply_flat(data, options)
        _apply_overrides(data, overrides or [])
        return cls.from_dict(data, where="options")

    @classmethod
    def from_yaml(
        cls, path: str | Path, overrides: list[str] | None = None, options: dict[str, Any] | None = None
    ) -> BuildConfig:
        """Load a YAML build config, then apply flat `options` (CLI flags) and `a.b=v` overrides.

        Raises:
            ConfigError: the file is missing or not YAML, or any key is invalid (all are listed).
        """
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except FileNotFoundError as exc:
            raise ConfigError(
                f"config file {path} does not exist; give a path such as pipelines/build-demo.yaml"
            ) from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(
                f"config file {path} must hold a mapping of sections, found {type(raw).__name__}"
            )
        _apply_flat(raw, options or {})
        _apply_overrides(raw, overrides or [])
        return cls.from_dict(raw, where=str(path))

    # ---- derived values -----------------------------------------------------------------------------------------
    def dataset_name(self) -> str:
        """The dataset name: `publish.name`, else the named region, else `bbox`."""
        if self.publish.name:
            return self.publish.name
        from .regions import REGIONS, parse_region

        region = parse_region(self.subset.region)
        if region.name in REGIONS:
            return region.name
        return "bbox" + "_".join(f"{v:g}" for v in region.bbox)

    def resolved(self) -> dict[str, Any]:
        """The canonical dict of everything that defines the data (manifest `config`, version digest)."""
        from .regions import parse_region

        region = parse_region(self.subset.region)
        start, end = self.subset.period()
        return {
            "name": self.dataset_name(),
            "region": {"name": region.name, "bbox": [float(x) for x in region.bbox]},
            "start": start.isoformat(),
            "end": end.isoformat(),
            "variables": list(self.subset.variables),
            "window": self.sample.window,
            "stride": self.sample.stride or self.sample.window,
            "time_step": self.sample.time_step,
            "tile": self.sample.tile,
            "val_fraction": self.sample.val_fraction,
            "test_fraction": self.sample.test_fraction,
            "val_years": sorted(self.sample.val_years),
            "test_years": sorted(self.sample.test_years),
            "seed": self.sample.seed,
            "events": [Path(p).name for p in self.sample.events],
            "text_table": Path(self.sample.text_table).name if self.sample.text_table else None,
            "shard_size": self.shard.shard_size,
        }


_SECTIONS: dict[str, type[_Section]] = {
    "source": SourceConfig, "subset": SubsetConfig, "sample": SampleConfig, "shard": ShardConfig,
    "publish": PublishConfig, "run": RunConfig,
}  # fmt: skip
FLAT_KEYS: dict[str, str] = {
    field: f"{section}.{field}" for section, model in _SECTIONS.items() for field in model.model_fields
}
"""Flat option (CLI flag) name -> nested YAML key."""


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = data
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[last] = value


def _apply_flat(data: dict[str, Any], options: dict[str, Any]) -> None:
    unknown = sorted(set(options) - set(FLAT_KEYS))
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(FLAT_KEYS))}")
    for name, value in options.items():
        if value is not None:
            _set(data, FLAT_KEYS[name], value)
    # --years and --start/--end from the command line replace each other's YAML values
    subset = data.get("subset")
    if isinstance(subset, dict):
        if options.get("years") is not None:
            subset.pop("start", None)
            subset.pop("end", None)
        elif options.get("start") is not None or options.get("end") is not None:
            subset.pop("years", None)


def _apply_overrides(data: dict[str, Any], overrides: list[str]) -> None:
    bad = [o for o in overrides if "=" not in o or not o.partition("=")[0].strip()]
    if bad:
        raise ConfigError(
            f"override(s) {', '.join(map(repr, bad))} are not KEY=VALUE; write e.g. sample.window=2d"
        )
    for item in overrides:
        key, _, text = item.partition("=")
        key = key.strip()
        value = yaml.safe_load(text) if text.strip() else None
        _set(data, FLAT_KEYS.get(key, key), value)


def _format_errors(exc: ValidationError, where: str) -> str:
    lines = [f"{where}: {exc.error_count()} problem(s) in the build config:"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key; see pipelines/build-demo.yaml for the known keys"
        elif err["type"] == "missing":
            msg = "required; set it in the YAML or on the command line"
        given = err.get("input")
        shown = (
            f" (given {given!r})"
            if err["type"] not in ("missing", "model_type") and not isinstance(given, dict)
            else ""
        )
        lines.append(f"  - {key}: {msg}{shown}")
    return "\n".join(lines)
