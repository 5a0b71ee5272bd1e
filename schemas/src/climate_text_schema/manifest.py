"""manifest.json (CONTRACT section 4) and the schema version check between writer and reader."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ManifestError, SchemaVersionError
from .layout import INDEX_FILE, MAX_SHARD_BYTES, QUARANTINE_FILE, README_FILE, is_shard_name

__all__ = [
    "DIGEST_FILES",
    "SCHEMA_VERSION",
    "BuilderInfo",
    "Manifest",
    "NormStats",
    "ShardInfo",
    "SourceInfo",
    "VariableInfo",
    "check_schema_version",
    "parse_manifest",
]

SCHEMA_VERSION = "1.2"
"""MAJOR.MINOR. A reader accepts its own major version and any minor (minor versions only add fields).

1.1: the manifest's `array_shape`; every sample's `.json` carries every `SampleMeta` field (`events: []`,
`anomalies: null` when there are none).
1.2: the manifest's `files` (sha256 of index.parquet, quarantine.parquet and README.md) and the sibling
`manifest.json.sha256`; shards are at most `MAX_SHARD_BYTES`.
"""

DIGEST_FILES: tuple[str, ...] = (INDEX_FILE, QUARANTINE_FILE, README_FILE)
"""The files of a version whose sha256 the manifest records in `files` (schema 1.2)."""


class VariableInfo(BaseModel):
    """One variable of the dataset, in the order of the climate array's variable axis."""

    name: str
    units: str
    long_name: str = ""
    collection: str = ""


class ShardInfo(BaseModel):
    """One WebDataset shard."""

    path: str = Field(description="relative to the version folder: shards/<split>-<NNNNNN>.tar")
    split: str
    samples: int = Field(ge=0)
    bytes: int = Field(ge=0, le=MAX_SHARD_BYTES)
    sha256: str = Field(min_length=64, max_length=64, pattern=r"^[0-9a-f]{64}$")

    @model_validator(mode="after")
    def _path_in_contract(self) -> ShardInfo:
        # a manifest is input: a path such as ../../elsewhere.tar must never be opened
        if not is_shard_name(self.path, self.split):
            raise ValueError(
                f"shard path {self.path!r} (split {self.split!r}) is not shards/{self.split}-<NNNNNN>.tar"
            )
        return self


class SourceInfo(BaseModel):
    """One source granule the dataset was built from."""

    granule: str
    file: str
    bytes: int | None = None
    checksum: str | None = None


class NormStats(BaseModel):
    """Per-variable normalisation over the train split (physical units)."""

    mean: float
    std: float = Field(gt=0)


class BuilderInfo(BaseModel):
    """The package (and version) that wrote the dataset."""

    package: str
    version: str


class Manifest(BaseModel):
    """The commit record of a dataset version: a version exists if and only if its manifest exists."""

    model_config = ConfigDict(extra="allow")

    schema_version: str
    name: str
    version: str
    created_at: str
    builder: BuilderInfo
    config: dict[str, Any]
    variables: list[VariableInfo] = Field(min_length=1)
    window: str
    time_step: str
    splits: dict[str, int]
    shards: list[ShardInfo]
    normalization: dict[str, NormStats]
    sources: list[SourceInfo]
    quarantined: int = Field(ge=0)
    parent: str | None = None
    array_shape: list[int] | None = Field(
        default=None,
        description="[time, variable, lat, lon] of every sample's climate array when they all share it (the builder's "
        "default since schema 1.1); null when samples differ (edge tiles kept) or the writer predates 1.1",
    )
    files: dict[str, str] | None = Field(
        default=None,
        description="sha256 of index.parquet, quarantine.parquet and README.md (since schema 1.2; null before)",
    )

    @field_validator("files")
    @classmethod
    def _digests(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return value
        for name, digest in value.items():
            if name not in DIGEST_FILES:
                raise ValueError(f"files lists {name!r}; only {', '.join(DIGEST_FILES)} are recorded")
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError(f"files[{name!r}] = {digest!r} is not a sha256 hex digest")
        return value

    @property
    def variable_names(self) -> list[str]:
        """Variable names in array order."""
        return [v.name for v in self.variables]

    def shards_of(self, split: str) -> list[ShardInfo]:
        """The shards of one split, in order."""
        return [s for s in self.shards if s.split == split]

    def to_json(self) -> str:
        """Canonical JSON text (sorted keys, indented) as written to storage."""
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"


def check_schema_version(found: str, where: str = "dataset") -> None:
    """Raise SchemaVersionError unless `found` is readable by this version of the contract.

    Args:
        found: the `schema_version` a writer recorded.
        where: what is being read, for the message (a URL).
    """
    ours = SCHEMA_VERSION.split(".")[0]
    try:
        major = str(int(str(found).split(".")[0]))
    except ValueError as exc:
        raise SchemaVersionError(f"{where}: schema_version {found!r} is not of the form MAJOR.MINOR") from exc
    if major != ours:
        newer = int(major) > int(ours)
        hint = (
            "upgrade climate-text-schema (and the trainer) to a release that reads it"
            if newer
            else "rebuild the dataset with the current merra2-text"
        )
        raise SchemaVersionError(
            f"{where} was written with schema_version {found}; this reader supports {SCHEMA_VERSION} "
            f"(major {ours}.x only): {hint}"
        )


def parse_manifest(text: str | bytes, where: str = "manifest.json") -> Manifest:
    """Parse manifest JSON, checking the schema version first (so a future layout fails clearly, not later)."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{where} is not valid JSON ({exc}); the version is damaged: rebuild it") from exc
    if not isinstance(raw, dict) or "schema_version" not in raw:
        raise ManifestError(f"{where} has no schema_version field; it is not a merra2-text manifest")
    check_schema_version(str(raw["schema_version"]), where)
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        raise ManifestError(f"{where} breaks the manifest contract:\n{exc}") from exc
