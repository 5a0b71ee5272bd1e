"""Where things live in a dataset store (CONTRACT section 1). Both the writer and the readers use these helpers."""

from __future__ import annotations

import re

__all__ = [
    "INDEX_FILE",
    "MANIFEST_DIGEST_FILE",
    "MAX_SHARD_BYTES",
    "MANIFEST_FILE",
    "QUARANTINE_FILE",
    "README_FILE",
    "SPLITS",
    "is_shard_name",
    "is_version_id",
    "join_url",
    "shard_name",
    "tag_url",
    "tags_url",
    "version_url",
    "versions_url",
]

SPLITS: tuple[str, ...] = ("train", "val", "test")
MANIFEST_FILE = "manifest.json"
INDEX_FILE = "index.parquet"
QUARANTINE_FILE = "quarantine.parquet"
README_FILE = "README.md"
MANIFEST_DIGEST_FILE = "manifest.json.sha256"
"""Sibling of manifest.json (schema 1.2): the sha256 of the manifest's bytes, written create-only after it."""

MAX_SHARD_BYTES = 1 << 30
"""The largest shard the contract allows (1 GiB). The builder refuses to write a larger one and readers refuse a
manifest that lists one: a reader verifies a whole shard (size, sha256, sample count) in memory before it hands out
any of its samples, so this bounds that memory."""

_SHARD_RE = re.compile(r"^shards/(train|val|test)-(\d{6})\.tar$")
_VERSION_RE = re.compile(r"^[0-9a-f]{8,64}$")


def join_url(base: str, *parts: str) -> str:
    """Join URL or path parts with '/', without doubling separators (works for local paths and fsspec URLs)."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def versions_url(dataset_url: str) -> str:
    """`<out>/<name>/versions`."""
    return join_url(dataset_url, "versions")


def version_url(dataset_url: str, version: str) -> str:
    """`<out>/<name>/versions/<version>`."""
    return join_url(dataset_url, "versions", version)


def tags_url(dataset_url: str) -> str:
    """`<out>/<name>/tags`."""
    return join_url(dataset_url, "tags")


def tag_url(dataset_url: str, tag: str) -> str:
    """`<out>/<name>/tags/<tag>`: a small text file holding a version id."""
    return join_url(dataset_url, "tags", tag)


def shard_name(split: str, number: int) -> str:
    """Path of a shard relative to the version folder: `shards/<split>-<NNNNNN>.tar`."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    if not 0 <= number <= 999_999:
        raise ValueError(f"shard number {number} is outside 0..999999")
    return f"shards/{split}-{number:06d}.tar"


def is_shard_name(path: str, split: str | None = None) -> bool:
    """True for a path of the form `shards/<split>-<NNNNNN>.tar` (of that `split` when given)."""
    match = _SHARD_RE.fullmatch(path)
    return match is not None and (split is None or match.group(1) == split)


def is_version_id(text: str) -> bool:
    """True for a well-formed version id: 8 to 64 lower-case hex digits (the builder writes 20)."""
    return _VERSION_RE.fullmatch(text) is not None
