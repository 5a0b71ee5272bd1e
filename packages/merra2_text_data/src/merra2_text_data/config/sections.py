"""The sections of the build configuration: one pydantic model per concern (`source`, `subset`, `sample`, `shard`,
`publish`, `run`), each validating its own keys.

`merra2_text_data.config.build` composes them into `BuildConfig` and loads it from YAML, flags and overrides; import the
sections from there (this module is where they are defined).
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import PurePath
from typing import TYPE_CHECKING, Annotated, Any, Literal

import pandas as pd
from climate_text_schema import DEFAULT_VARIABLES, KNOWN_VARIABLES, MAX_SHARD_BYTES
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .records import ERA5_FIRST_YEAR, FIRST_YEAR, record_of, source_record

if TYPE_CHECKING:
    from merra2_text_data.regions import Region

__all__ = [
    "ERA5_FIRST_YEAR",
    "FIRST_YEAR",
    "PublishConfig",
    "RunConfig",
    "SampleConfig",
    "ShardConfig",
    "SourceConfig",
    "SubsetConfig",
    "parse_size",
    "record_of",
]

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


def _text(what: str) -> AfterValidator:
    """The validator of a text field that may be absent (None) but never empty or blank, used as
    `Annotated[str | None, _text("a local folder")]`; `what` is what the key should hold, for the message."""
    return AfterValidator(lambda value: _not_empty(value, what))


def _duration(value: str) -> pd.Timedelta:
    from .durations import parse_duration

    return parse_duration(value)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SourceConfig(Section):
    """Where the MERRA-2 granules come from."""

    source: Annotated[str, _text("'earthaccess', a folder/URL of MERRA-2 granules, or era5:URL")] = (
        "earthaccess"
    )
    """`earthaccess` (NASA Earthdata), a folder/URL (any fsspec store) holding MERRA-2 granules, or `era5:URL`: an
    ERA5 zarr store (ARCO-ERA5, WeatherBench2, `merra2-text era5-sample`; see `merra2_text_data.source.era5`)."""
    cache: Annotated[str | None, _text("a local folder or a URL such as s3://bucket/prefix")] = None
    """Where downloaded granules and the zarr regional cache live: a local folder, or any fsspec URL (an object store
    such as `s3://bucket/prefix`, for a cluster whose workers share no disk). On a cluster (`run.workers`,
    `run.scheduler`) a local folder is each worker's own. Default: `<out>/.cache` for a local output or any build on
    a cluster, else `~/.cache/merra2-text`."""
    cache_dir: Annotated[str | None, _text("a local folder")] = None
    """The older name of `cache`, read when `cache` is not set (so `--cache` overrides a YAML's `cache_dir`)."""

    allow_gaps: bool = False
    """Build around missing days (recorded in the manifest) instead of failing with MissingDataError."""
    hash_granules: bool = True
    """Hash the bytes (SHA-256) of granules read from a folder or an fsspec URL, so the version id and the manifest
    name their content, not only their names and sizes (`merra2_text_data.source.digests`). It reads each file once;
    the digests are kept in the cache (`granule-digests.json`) keyed by size and mtime or ETag. Off: a file rewritten
    in place with the same size keeps the old version id. CMR records (earthaccess) carry checksums of their own."""
    allow_partial_days: bool = False
    """Accept temporal subsets (OPeNDAP/Harmony/GES DISC subsetter outputs): granules holding only some of their
    day's 24 hourly steps (still on the HH:30 grid). Windows then start at the first step's hour, and only windows
    whose every hour is present become samples (e.g. `--window 1h` or `2h` for a two-step subset)."""

    def cache_location(self) -> str | None:
        """The cache the build uses: `cache`, else `cache_dir`, else None (the default)."""
        return self.cache or self.cache_dir


class SubsetConfig(Section):
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
    """Variable names (the contract's, MERRA-2's), in array order. Default: MERRA-2's surface set; for an ERA5 source
    T2M, U10M, V10M, SLP, PRECTOT."""

    @field_validator("years", mode="before")
    @classmethod
    def _years_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) else value

    @field_validator("years")
    @classmethod
    def _years_ok(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        match = _YEARS_RE.match(value)
        if not match:
            raise ValueError(f"{value!r} is not a year or a year range; write 2019 or 2018-2020")
        first = int(match.group(1))
        last = int(match.group(2) or first)
        now, (record, since) = dt.date.today().year, source_record(info)
        for year in (first, last):
            if not since <= year <= now:
                raise ValueError(f"year {year} in {value!r} is outside {since}..{now} ({record}'s record)")
        if last < first:
            raise ValueError(f"{value!r} ends before it starts; write {last}-{first}")
        return f"{first}" if first == last else f"{first}-{last}"

    @field_validator("start", "end")
    @classmethod
    def _date_ok(cls, value: dt.date | None, info: ValidationInfo) -> dt.date | None:
        record, since = source_record(info)
        if value is not None and not dt.date(since, 1, 1) <= value <= dt.date.today():
            raise ValueError(f"{value} is outside {since}-01-01..{dt.date.today()} ({record}'s record)")
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
        """Checked here, in the field's own validator, so a bad region is reported under `subset.region` beside
        every other problem (tests/merra2_text_data/test_config.py); the model validator below keeps the result."""
        from merra2_text_data.regions import parse_region

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
        from merra2_text_data.regions import parse_region

        self._region = parse_region(self.region)  # parsed once here (and again on assignment), read everywhere
        if self.years is not None:
            first, _, last = self.years.partition("-")
            self._period = dt.date(int(first), 1, 1), min(dt.date(int(last or first), 12, 31), dt.date.today())
        else:
            assert self.start is not None and self.end is not None  # checked above
            self._period = self.start, self.end
        return self

    _region: Region = PrivateAttr()
    _period: tuple[dt.date, dt.date] = PrivateAttr()

    @property
    def parsed_region(self) -> Region:
        """`region` parsed (a `Region`: name and bbox), once per validation."""
        return self._region

    def period(self) -> tuple[dt.date, dt.date]:
        """The first and last day (both inclusive), computed once per validation (a build that runs past midnight on
        the last day of `years` keeps the period it started with)."""
        return self._period


class SampleConfig(Section):
    """How the climate cube is cut into samples and split, and how text is made."""

    window: str = "1d"
    """Time span of one sample, e.g. 1d, 12h, 7d."""
    stride: str | None = None
    """Step between sample starts (default: the window)."""
    time_step: str = "1h"
    """Time resolution inside a sample: 1h, 3h, 1d (means over the hourly source steps)."""
    tile: str | None = None
    """Cut the region into tiles of LATxLON grid points, e.g. 16x16 (default: the whole region per sample)."""
    edge_tiles: Literal["drop", "keep"] = "drop"
    """Where `tile` does not divide the region grid: `drop` the partial tiles at the north/east edge (every sample has
    the same array shape; the card states the strip left out) or `keep` those of at least half a tile (smaller
    arrays, so one dataset holds several shapes: plain webdataset batching and the trainer need one)."""
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
    holdout_tiles: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Fraction of the tiles held out of training altogether: every window of those tiles goes to test (a spatial
    hold-out; the manifest lists them as `holdout_tiles`). 0: none."""
    events: list[str] = Field(default_factory=list)
    """NOAA Storm Events CSV(.gz) files whose events are woven into the captions."""
    text_table: Annotated[str | None, _text("the path of a CSV or Parquet table")] = None
    """A table of extra text keyed by sample time/region (CSV or Parquet)."""
    strict: bool = False
    """Fail on the first invalid sample instead of quarantining it."""

    @field_validator("window", "time_step", "stride")
    @classmethod
    def _duration_ok(cls, value: str | None) -> str | None:
        if value is None:
            return None
        _duration(value)
        return value.strip().lower()

    @field_validator("val_years", "test_years")
    @classmethod
    def _years_in_record(cls, value: list[int], info: ValidationInfo) -> list[int]:
        now, (record, since) = dt.date.today().year, source_record(info)
        outside = [y for y in value if not since <= y <= now]
        if outside:
            raise ValueError(f"year(s) {outside} are outside {since}..{now} ({record}'s record)")
        return value

    @field_validator("events")
    @classmethod
    def _events_ok(cls, value: list[str]) -> list[str]:
        seen: dict[str, str] = {}
        for path in value:  # the version id and the manifest know an events file by its name alone
            _not_empty(path, "the path of a NOAA Storm Events CSV(.gz)")
            if (name := PurePath(path).name) in seen:
                raise ValueError(f"{path} is listed twice: list it once" if seen[name] == path else
                                 f"{seen[name]} and {path} have the same file name {name!r}, by which the version "
                                 "id and the manifest know an events file: rename one of them")  # fmt: skip
            seen[name] = path
        return value

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


class ShardConfig(Section):
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
        if value > MAX_SHARD_BYTES:
            raise ValueError(
                f"{value} bytes is over the contract's largest shard ({MAX_SHARD_BYTES} bytes, 1GiB: readers verify "
                "a whole shard in memory before using it); use at most 1GiB (default 256MB)"
            )
        return value


class PublishConfig(Section):
    """Where and under which name the version is published."""

    out: Annotated[str, _text("a folder or URL such as ./datasets or s3://bucket/prefix")] = "./datasets"
    """Dataset root: a local folder or any fsspec URL (s3://bucket/prefix)."""
    name: str | None = None
    """Dataset name (default: the region name, or `bbox` for a W,S,E,N region)."""
    tag: str = "latest"
    """Tag moved to the new version."""
    parent: Annotated[str | None, _text("a dataset reference such as ./datasets/conus@latest")] = None
    """Reference of the version this build extends (recorded in the manifest lineage)."""

    @field_validator("name", "tag")
    @classmethod
    def _name_ok(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$", value):
            raise ValueError(f"{value!r} must be letters, digits, '_', '-', '.' (no slashes, no '@')")
        return value


class RunConfig(Section):
    """How the build runs (never changes the data)."""

    workers: int = Field(default=0, ge=0)
    """Start a local dask cluster with this many workers (0: run in this process)."""
    scheduler: Annotated[str | None, _text("a dask scheduler address such as tcp://host:8786")] = None
    """Address of an existing dask scheduler (tcp://host:8786); exclusive with workers."""
    quiet: bool = False
    """No progress bars."""
