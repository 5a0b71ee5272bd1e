"""Dataset references (CONTRACT section 1) resolved on any fsspec store.

A reference is one of:
- a version folder URL: `<out>/<name>/versions/<version>`;
- a manifest URL: `<out>/<name>/versions/<version>/manifest.json`;
- `<out>/<name>@<tag-or-version>`, such as `s3://bucket/merra2-text/conus@latest` (a unique prefix of a version id
  works too).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import fsspec
import pandas as pd
from fsspec import AbstractFileSystem

from .errors import DatasetNotFoundError, ReferenceError_
from .layout import INDEX_FILE, MANIFEST_FILE, join_url, tag_url, tags_url, version_url, versions_url
from .manifest import Manifest, ShardInfo, parse_manifest

__all__ = ["OpenedDataset", "ParsedReference", "open_dataset", "parse_reference", "resolve_version_url"]


@dataclass(frozen=True)
class ParsedReference:
    """The parts of a reference string; exactly one of `version_url` or (`dataset_url`, `selector`) is set."""

    version_url: str | None = None
    dataset_url: str | None = None
    selector: str | None = None


@dataclass
class OpenedDataset:
    """A resolved dataset version: its manifest, where it lives, and the URLs of its shards."""

    reference: str
    version_url: str
    manifest: Manifest
    fs: AbstractFileSystem = field(repr=False)
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def version(self) -> str:
        """The version id (content address)."""
        return self.manifest.version

    def shards(self, split: str | None = None) -> list[ShardInfo]:
        """Shard records (all, or one split's) in manifest order."""
        return list(self.manifest.shards) if split is None else self.manifest.shards_of(split)

    def shard_urls(self, split: str | None = None) -> list[str]:
        """Full URLs of the shards (all, or one split's)."""
        return [join_url(self.version_url, s.path) for s in self.shards(split)]

    def url_of(self, relative: str) -> str:
        """Full URL of a path relative to the version folder."""
        return join_url(self.version_url, relative)

    def read_index(self) -> pd.DataFrame:
        """Read index.parquet of this version."""
        with self.fs.open(_path(self.fs, self.url_of(INDEX_FILE)), "rb") as fh:
            return pd.read_parquet(fh)


def parse_reference(ref: str) -> ParsedReference:
    """Split a reference into its form (see the module docstring). Does no I/O."""
    if not ref or not ref.strip():
        raise ReferenceError_(
            "empty dataset reference: give a version folder, a manifest.json URL or ROOT/NAME@TAG"
        )
    ref = ref.strip().rstrip("/")
    head, _, last = ref.rpartition("/")
    if last == MANIFEST_FILE:
        return ParsedReference(version_url=head)
    if "@" in last:
        name, _, selector = last.partition("@")
        if not name or not selector or "@" in selector:
            raise ReferenceError_(
                f"dataset reference {ref!r} is malformed: write ROOT/NAME@TAG or ROOT/NAME@VERSION "
                "(for example s3://bucket/merra2-text/conus@latest)"
            )
        return ParsedReference(dataset_url=f"{head}/{name}" if head else name, selector=selector)
    return ParsedReference(version_url=ref)


def _path(fs: AbstractFileSystem, url: str) -> str:
    return str(fs._strip_protocol(url))


def _list_names(fs: AbstractFileSystem, url: str) -> list[str]:
    try:
        entries = fs.ls(_path(fs, url), detail=False)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries)


def resolve_version_url(ref: str, fs: AbstractFileSystem) -> str:
    """Resolve a reference to the URL of its version folder (whose manifest.json exists).

    Raises:
        DatasetNotFoundError: no such tag, version or manifest; the message lists what exists.
    """
    parsed = parse_reference(ref)
    if parsed.version_url is not None:
        return parsed.version_url
    assert parsed.dataset_url is not None and parsed.selector is not None
    dataset, selector = parsed.dataset_url, parsed.selector
    tag_file = _path(fs, tag_url(dataset, selector))
    if fs.exists(tag_file):
        version = fs.cat_file(tag_file).decode("utf-8").strip()
        return version_url(dataset, version)
    versions = [v for v in _list_names(fs, versions_url(dataset)) if v.startswith(selector)]
    if len(versions) == 1:
        return version_url(dataset, versions[0])
    tags = _list_names(fs, tags_url(dataset))
    all_versions = _list_names(fs, versions_url(dataset))
    if len(versions) > 1:
        raise DatasetNotFoundError(
            f"{ref!r}: {selector!r} matches several versions ({', '.join(versions)}); give more digits"
        )
    if not tags and not all_versions:
        raise DatasetNotFoundError(
            f"{ref!r}: no dataset at {dataset} (no tags/ or versions/ folder); check the root URL and the name, "
            "or build it with `merra2-text build --out ROOT --name NAME`"
        )
    raise DatasetNotFoundError(
        f"{ref!r}: no tag or version {selector!r} in {dataset}; tags: {', '.join(tags) or 'none'}; "
        f"versions: {', '.join(all_versions) or 'none'}"
    )


def open_dataset(ref: str, storage_options: dict[str, Any] | None = None) -> OpenedDataset:
    """Resolve a dataset reference into its manifest and shard URLs.

    Args:
        ref: a version folder URL, a manifest.json URL, or `ROOT/NAME@TAG-OR-VERSION`, on any fsspec store.
        storage_options: passed to fsspec (for S3: key, secret, endpoint_url, ...); by default the standard
            environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...) is used.

    Returns:
        The opened dataset.

    Raises:
        ReferenceError_: the reference is malformed.
        DatasetNotFoundError: nothing is published there.
        SchemaVersionError: the dataset was written with an unsupported schema version.
        ManifestError: the manifest is damaged.

    Examples:
        >>> ds = open_dataset("s3://bucket/merra2-text/conus@latest")  # doctest: +SKIP
        >>> ds.shard_urls("train")[:1]  # doctest: +SKIP
    """
    options = dict(storage_options or {})
    parsed = parse_reference(ref)
    probe = parsed.version_url or parsed.dataset_url
    assert probe is not None
    fs, _ = fsspec.core.url_to_fs(probe, **options)
    vurl = resolve_version_url(ref, fs)
    murl = join_url(vurl, MANIFEST_FILE)
    try:
        text = fs.cat_file(_path(fs, murl))
    except FileNotFoundError as exc:
        hint = ""
        if fs.exists(_path(fs, tags_url(vurl))) or fs.exists(_path(fs, versions_url(vurl))):
            hint = f"; {vurl} is a dataset folder: write {vurl}@latest"
        raise DatasetNotFoundError(
            f"{ref!r}: no manifest at {murl}: that version does not exist or its build did not finish{hint}"
        ) from exc
    manifest = parse_manifest(text, where=murl)
    return OpenedDataset(reference=ref, version_url=vurl, manifest=manifest, fs=fs, storage_options=options)
