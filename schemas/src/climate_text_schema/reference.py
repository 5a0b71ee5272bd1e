"""Dataset references (CONTRACT section 1) resolved on any fsspec store.

A reference is one of:
- a version folder URL: `<out>/<name>/versions/<version>`;
- a manifest URL: `<out>/<name>/versions/<version>/manifest.json`;
- `<out>/<name>@<tag-or-version>`, such as `s3://bucket/merra2-text/conus@latest` (a unique prefix of a version id
  works too).
"""

from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pandas as pd
from fsspec import AbstractFileSystem

from .errors import DatasetNotFoundError, ManifestError, ReferenceError_
from .layout import (
    INDEX_FILE,
    MANIFEST_DIGEST_FILE,
    MANIFEST_FILE,
    is_version_id,
    join_url,
    tag_url,
    tags_url,
    version_url,
    versions_url,
)
from .manifest import DIGEST_FILES, Manifest, ShardInfo, parse_manifest

__all__ = [
    "OpenedDataset",
    "ParsedReference",
    "format_tag",
    "open_dataset",
    "parse_reference",
    "parse_tag",
    "resolve_version_url",
]

_SELECTOR_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")
"""A tag name or a version (prefix): no path separators, no leading dot (so never `..`)."""
_TAG_DIGEST = "manifest-sha256 "


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

    def read_file(self, name: str) -> bytes:
        """The bytes of one of the version's files (`index.parquet`, `quarantine.parquet`, `README.md`), checked
        against the sha256 the manifest records for it (schema 1.2; older manifests record none).

        Raises:
            ManifestError: the file's bytes differ from the manifest's record (it was altered or damaged).
            FileNotFoundError: the file is missing.
        """
        data = bytes(self.fs.cat_file(_path(self.fs, self.url_of(name))))
        expected = (self.manifest.files or {}).get(name)
        if expected is None and self.manifest.files is not None and name in DIGEST_FILES:
            raise ManifestError(f"{self.version_url}: the manifest records no sha256 for {name}; rebuild it")
        if expected is not None and hashlib.sha256(data).hexdigest() != expected:
            raise ManifestError(
                f"{self.url_of(name)}: its sha256 {hashlib.sha256(data).hexdigest()} is not the manifest's "
                f"{expected}: the file was altered or damaged after the version was published; rebuild the version "
                "(or restore the file from a copy)"
            )
        return data

    def read_index(self) -> pd.DataFrame:
        """Read index.parquet of this version (checked against the manifest's sha256, see `read_file`)."""
        return pd.read_parquet(io.BytesIO(self.read_file(INDEX_FILE)))


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
        if not name or not selector or "@" in selector or not _SELECTOR_RE.fullmatch(selector):
            raise ReferenceError_(
                f"dataset reference {ref!r} is malformed: write ROOT/NAME@TAG or ROOT/NAME@VERSION "
                "(for example s3://bucket/merra2-text/conus@latest; a tag is letters, digits, '.', '_' and '-')"
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


def format_tag(version: str, manifest_sha256: str | None = None) -> str:
    """The text of a tag file: the version id; optionally `manifest-sha256 <hex>` on a second line, which readers
    then check (the builder writes the version id only, so readers before schema 1.2 read its tags too)."""
    lines = [version] + ([f"{_TAG_DIGEST}{manifest_sha256}"] if manifest_sha256 else [])
    return "\n".join(lines) + "\n"


def parse_tag(text: str, where: str) -> tuple[str, str | None]:
    """(version id, manifest sha256 or None) from a tag file's text (see `format_tag`).

    Raises:
        ReferenceError_: the tag does not hold a well-formed version id (a tag is data, never a path).
    """
    lines = [line.strip() for line in text.strip().splitlines()]
    version = lines[0] if lines else ""
    digest = None
    rest = lines[1:]
    if rest and rest[0].startswith(_TAG_DIGEST):
        digest = rest.pop(0)[len(_TAG_DIGEST) :].strip()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            rest.insert(0, digest)
    if not is_version_id(version) or rest:
        raise ReferenceError_(
            f"tag {where} holds {text[:80]!r}, not a version id (8 to 64 lower-case hex digits, optionally a "
            "`manifest-sha256 <hex>` line): the tag is damaged; point it at a version again with "
            "`merra2-text tag`, or give the version id itself"
        )
    return version, digest


def _resolve(ref: str, fs: AbstractFileSystem) -> tuple[str, str | None]:
    """(version folder URL, the manifest sha256 its tag records or None)."""
    parsed = parse_reference(ref)
    if parsed.version_url is not None:
        return parsed.version_url, None
    assert parsed.dataset_url is not None and parsed.selector is not None
    dataset, selector = parsed.dataset_url, parsed.selector
    tag_file = _path(fs, tag_url(dataset, selector))
    if fs.exists(tag_file):
        raw = fs.cat_file(tag_file)[:4096].decode("utf-8", "replace")
        version, digest = parse_tag(raw, tag_url(dataset, selector))
        return version_url(dataset, version), digest
    versions = [v for v in _list_names(fs, versions_url(dataset)) if v.startswith(selector)]
    if len(versions) == 1:
        return version_url(dataset, versions[0]), None
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


def resolve_version_url(ref: str, fs: AbstractFileSystem) -> str:
    """Resolve a reference to the URL of its version folder (whose manifest.json exists).

    Raises:
        ReferenceError_: the reference is malformed, or its tag holds no version id.
        DatasetNotFoundError: no such tag, version or manifest; the message lists what exists.
    """
    return _resolve(ref, fs)[0]


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
    vurl, tag_digest = _resolve(ref, fs)
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
    _check_identity(fs, vurl, murl, bytes(text), manifest, tag_digest)
    return OpenedDataset(reference=ref, version_url=vurl, manifest=manifest, fs=fs, storage_options=options)


def _check_identity(
    fs: AbstractFileSystem, vurl: str, murl: str, text: bytes, manifest: Manifest, tag_digest: str | None
) -> None:
    """The manifest belongs to its folder and its bytes are those published (the tag's and the sibling's digest)."""
    folder = vurl.rstrip("/").rsplit("/", 1)[-1]
    if not is_version_id(manifest.version) or manifest.version != folder:
        raise ManifestError(
            f"{murl} names version {manifest.version!r} but lies in folder {folder!r}: a manifest copied or moved "
            "from another version is not trusted; open the version by its own folder, or rebuild it"
        )
    digest = hashlib.sha256(text).hexdigest()
    if tag_digest is not None and digest != tag_digest:
        raise ManifestError(
            f"{murl}: its sha256 {digest} is not the {tag_digest} its tag records: the manifest was changed after "
            "it was published; rebuild the version (a published version is never rewritten)"
        )
    try:
        sibling = fs.cat_file(_path(fs, join_url(vurl, MANIFEST_DIGEST_FILE)))[:200].decode(
            "utf-8", "replace"
        )
    except FileNotFoundError:
        return  # written before schema 1.2, or by a build killed right after its commit (`verify` reports it)
    if sibling.strip() != digest:
        raise ManifestError(
            f"{murl}: its sha256 {digest} is not the {sibling.strip()[:64]!r} of {MANIFEST_DIGEST_FILE}: the "
            "manifest was changed after it was published; rebuild the version"
        )
