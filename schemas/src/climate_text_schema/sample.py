"""One sample, one WebDataset key (CONTRACT section 2): member names, array layout and metadata."""

from __future__ import annotations

import io
import re

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import SampleError
from .layout import SPLITS
from .variables import FILL_VALUE

__all__ = [
    "ARRAY_DIMS",
    "ARRAY_DTYPE",
    "CLIMATE_MEMBER",
    "KEY_PATTERN",
    "META_MEMBER",
    "SAMPLE_MEMBERS",
    "TEXT_MEMBER",
    "SampleAnomalies",
    "SampleEvent",
    "SampleMeta",
    "check_climate_array",
    "check_sample_key",
    "member_suffix_problem",
    "decode_climate",
    "decode_meta",
    "decode_text",
]

CLIMATE_MEMBER = "climate.npy"
TEXT_MEMBER = "txt"
META_MEMBER = "json"
SAMPLE_MEMBERS: tuple[str, ...] = (CLIMATE_MEMBER, TEXT_MEMBER, META_MEMBER)
"""Member suffixes of one sample: `<key>.climate.npy`, `<key>.txt`, `<key>.json`."""

ARRAY_DIMS: tuple[str, ...] = ("time", "variable", "lat", "lon")
ARRAY_DTYPE = np.dtype("float32")

KEY_PATTERN = re.compile(r"^[A-Za-z0-9_\-]+$")
"""Keys hold no dots (WebDataset splits member names at the first dot) and no path separators."""


class SampleEvent(BaseModel):
    """One reported event joined to a sample (an entry of `SampleMeta.events`)."""

    model_config = ConfigDict(extra="allow")

    id: str = Field(description="the report's id in its source (NOAA EVENT_ID or the text table's id)")
    type: str = Field(description="the event type, e.g. Hail, Heavy Snow")
    begin: str = Field(description="ISO 8601, UTC")


class SampleAnomalies(BaseModel):
    """The window's departure from a day-of-year climatology (`SampleMeta.anomalies`)."""

    model_config = ConfigDict(extra="allow")

    values: dict[str, float] = Field(description="{V: sample mean - climatological mean} in physical units")
    reference: dict[str, float] | None = Field(default=None, description="{V: climatological mean}")
    period: str = Field(default="", description="the years behind the climatology, e.g. 2015-2019")


class SampleMeta(BaseModel):
    """The `<key>.json` member.

    Every sample a writer encodes with `model_dump` carries every field, so all the samples of a version have the
    same keys (`events` is `[]` and `anomalies` is null when there are none): readers that infer a schema from the
    first samples (Hugging Face `datasets`, pyarrow) see every field.
    """

    model_config = ConfigDict(extra="allow")

    key: str
    split: str
    time_start: str = Field(description="ISO 8601, UTC")
    time_end: str = Field(description="ISO 8601, UTC")
    region: str
    bbox: list[float] = Field(min_length=4, max_length=4, description="[W, S, E, N] in degrees")
    variables: list[str] = Field(min_length=1)
    units: list[str]
    lat: list[float] = Field(min_length=1, description="ascending, south to north")
    lon: list[float] = Field(
        min_length=1, description="ascending, west to east (across the antimeridian: wraps)"
    )
    stats: dict[str, dict[str, float]] = Field(description="{V: {mean, min, max}} in physical units")
    time_step: str | None = Field(default=None, description="the time resolution inside the window, e.g. 1h")
    tile: list[int] | None = Field(
        default=None, description="[row from the south, column from the west]; null for a whole-region sample"
    )
    anomalies: SampleAnomalies | None = Field(
        default=None, description="departure from the climatology; null when the build or the date has none"
    )
    events: list[SampleEvent] = Field(
        default_factory=list, description="the reports joined to the window; [] when there are none"
    )

    @field_validator("key")
    @classmethod
    def _key_ok(cls, value: str) -> str:
        if not KEY_PATTERN.match(value):
            raise ValueError(f"key {value!r} must match {KEY_PATTERN.pattern} (no dots, no slashes)")
        return value

    @field_validator("split")
    @classmethod
    def _split_ok(cls, value: str) -> str:
        if value not in SPLITS:
            raise ValueError(f"split {value!r} is not one of {', '.join(SPLITS)}")
        return value


def member_suffix_problem(name: str, where: str = "shard") -> str | None:
    """Why a tar member's name has a suffix outside the contract (`<key>.climate.npy`, `.txt`, `.json` only), or None.

    The one rule for every reader (`merra2-text verify` and the trainer): a member such as `<key>.pickle` or
    `<key>.pyd` is refused, never silently left out.
    """
    key, dot, suffix = name.partition(".")
    if not dot or suffix not in SAMPLE_MEMBERS:
        return f"{where}: member {name!r} is not <key>.{{{','.join(SAMPLE_MEMBERS)}}}"
    return None


def check_sample_key(key: str, where: str = "shard") -> str:
    """Return `key` if it is a flat sample key (`KEY_PATTERN`); raise otherwise.

    A reader calls this on the key of every sample it reads from a tar (the part of a member name before the first
    dot), so a member named like a path (`../../x.txt`, `/etc/x.txt`, `dir/x.txt`) is refused by name, never opened
    or written anywhere.

    Args:
        key: the sample key (or the whole member name, for a message about a name without a dot).
        where: the shard, for the message.

    Raises:
        SampleError: the key is a path (absolute, `..`, a folder, a backslash) or has characters outside
            `[A-Za-z0-9_-]`.
    """
    if key.startswith(("/", ".")) or "/" in key or "\\" in key or ".." in key:
        raise SampleError(
            f"{where}: member {key!r}.* is a path (absolute, '..' or a folder); shards hold flat names "
            "<key>.<suffix>: the shard was not written by this contract's writer, rebuild it"
        )
    if not KEY_PATTERN.match(key):
        raise SampleError(
            f"{where}: sample key {key!r} must match {KEY_PATTERN.pattern} (no dots, no slashes)"
        )
    return key


def check_climate_array(array: np.ndarray, n_variables: int | None = None) -> list[str]:
    """Return every way `array` breaks the climate-array contract (an empty list when it is valid).

    Args:
        array: the decoded `<key>.climate.npy`.
        n_variables: the manifest's number of variables, if known.
    """
    problems: list[str] = []
    if array.dtype != ARRAY_DTYPE:
        problems.append(f"dtype is {array.dtype}, expected float32")
    if array.ndim != 4:
        problems.append(f"array has {array.ndim} dims {array.shape}, expected 4 {ARRAY_DIMS}")
        return problems
    if min(array.shape) == 0:
        problems.append(f"array has an empty dimension: shape {array.shape}")
    if n_variables is not None and array.shape[1] != n_variables:
        problems.append(f"array has {array.shape[1]} variables, the manifest lists {n_variables}")
    n_nan = int(np.isnan(array).sum())
    if n_nan:
        problems.append(f"{n_nan} NaN values")
    n_fill = int((np.abs(array) >= FILL_VALUE * 0.5).sum())
    if n_fill:
        problems.append(f"{n_fill} fill values (1e15)")
    return problems


def decode_climate(data: bytes, key: str = "?") -> np.ndarray:
    """Decode a `.climate.npy` member with `allow_pickle=False` (a pickled payload is refused, never executed)."""
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as exc:
        raise SampleError(f"sample {key!r}: climate.npy is not a plain numeric .npy array ({exc})") from exc
    except Exception as exc:  # truncated or garbage bytes
        raise SampleError(f"sample {key!r}: climate.npy cannot be decoded ({exc})") from exc
    return array


def decode_text(data: bytes, key: str = "?") -> str:
    """Decode a `.txt` member (UTF-8, non-empty)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SampleError(f"sample {key!r}: txt member is not UTF-8 ({exc})") from exc
    if not text.strip():
        raise SampleError(f"sample {key!r}: txt member is empty")
    return text


def decode_meta(data: bytes, key: str = "?") -> SampleMeta:
    """Decode and validate a `.json` member.

    Parsed and validated in one call of pydantic's own JSON parser: 4x faster than `json.loads` and
    `model_validate` on a member of 11 variables' statistics (docs/performance.md, "Streaming"), with the same
    result."""
    try:
        return SampleMeta.model_validate_json(data)
    except ValidationError as exc:
        invalid = [e for e in exc.errors() if e["type"] == "json_invalid"]
        if invalid:
            raise SampleError(f"sample {key!r}: json member is not valid JSON ({invalid[0]['msg']})") from exc
        raise SampleError(f"sample {key!r}: json member breaks the contract:\n{exc}") from exc
