"""Where things live in a dataset store (CONTRACT section 1). Both the writer and the readers use these helpers."""

from __future__ import annotations

import re

__all__ = [
    "INDEX_FILE",
    "MANIFEST_FILE",
    "QUARANTINE_FILE",
    "README_FILE",
    "SPLITS",
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

_SHARD_RE = re.compile(r"^shards/(train|val|test)-(\d{6})\.tar$")


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


def is_shard_name(path: str) -> bool:
    """True for a path of the form `shards/<split>-<NNNNNN>.tar`."""
    return _SHARD_RE.match(path) is not None
