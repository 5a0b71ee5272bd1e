"""The read side of a dataset store: list versions, tag, verify, garbage-collect, diff (CONTRACT section 1).

Every function takes a dataset URL (`<out>/<name>`) or a reference and works on any fsspec store.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from climate_text_schema import (
    INDEX_FILE,
    MANIFEST_DIGEST_FILE,
    MANIFEST_FILE,
    QUARANTINE_FILE,
    README_FILE,
    ContractError,
    DatasetNotFoundError,
    IndexValidationError,
    SampleError,
    join_url,
    open_dataset,
    parse_manifest,
    parse_tag,
    tag_url,
    tags_url,
    validate_index,
    version_url,
    versions_url,
)
from fsspec import AbstractFileSystem

from merra2_text_data.errors import PublishError
from merra2_text_data.fs import fs_path, url_to_fs

from .publish import is_tag_name, write_tag
from .shards import read_shard

__all__ = [
    "DiffReport",
    "GcReport",
    "VerifyReport",
    "VersionInfo",
    "diff",
    "gc",
    "list_versions",
    "tag",
    "verify",
]

logger = logging.getLogger(__name__)


@dataclass
class VersionInfo:
    """One committed version of a dataset."""

    id: str
    created: str
    samples: int
    bytes: int
    tags: list[str] = field(default_factory=list)
    parent: str | None = None


@dataclass
class VerifyReport:
    """What `verify` found; `ok` when `problems` is empty."""

    reference: str
    version: str
    shards: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing is wrong."""
        return not self.problems


@dataclass
class GcReport:
    """Objects that no manifest references (and whether they were deleted)."""

    dataset_url: str
    orphans: list[str] = field(default_factory=list)
    bytes: int = 0
    deleted: bool = False
    dangling_tags: list[str] = field(default_factory=list)


@dataclass
class DiffReport:
    """How two versions differ."""

    a: str
    b: str
    config: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    splits: dict[str, tuple[int, int]] = field(default_factory=dict)
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


def _names(fs: AbstractFileSystem, url: str) -> list[str]:
    try:
        return sorted(str(p).rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(fs_path(fs, url), detail=False))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _read_many(fs: AbstractFileSystem, urls: list[str]) -> list[bytes | None]:
    """The contents of small objects in one batched call (None where an object does not exist).

    `cat_ranges` from byte 0 runs the reads concurrently on object stores (one GET each, and no HEAD: s3fs's
    `cat_file` asks for the size first) and one by one on a local disk.
    """
    if not urls:
        return []
    paths = [fs_path(fs, u) for u in urls]
    found = fs.cat_ranges(paths, [0] * len(paths), [None] * len(paths), on_error="return")
    out: list[bytes | None] = []
    for data in found:
        if isinstance(data, FileNotFoundError):
            out.append(None)
        elif isinstance(data, BaseException):
            raise data
        else:
            out.append(bytes(data))
    return out


def _tag_names(fs: AbstractFileSystem, dataset_url: str) -> list[str]:
    return [t for t in _names(fs, tags_url(dataset_url)) if ".tmp-" not in t]


def _tag_values(names: list[str], contents: list[bytes | None]) -> dict[str, str]:
    """{tag: version id}; a damaged tag (no version id) maps to its text, so it shows up as dangling."""
    out = {}
    for t, data in zip(names, contents, strict=True):
        if data is None:
            continue
        text = data.decode("utf-8", "replace")
        try:
            out[t] = parse_tag(text, t)[0]
        except ContractError:
            out[t] = text.strip()[:80]
    return out


def _tags(fs: AbstractFileSystem, dataset_url: str) -> dict[str, str]:
    names = _tag_names(fs, dataset_url)
    return _tag_values(names, _read_many(fs, [tag_url(dataset_url, t) for t in names]))


def list_versions(dataset_url: str, storage_options: dict[str, Any] | None = None) -> list[VersionInfo]:
    """The committed versions of a dataset (`<out>/<name>`), oldest first, with their tags.

    Two listings (tags/, versions/) and one batched read of the tags and the manifests: on S3 that is 2 LIST
    requests and one concurrent round of GETs (no HEAD), whatever the number of versions.

    Raises:
        DatasetNotFoundError: nothing is published at `dataset_url`.
    """
    fs, dataset_url = url_to_fs(dataset_url, storage_options)
    names = _tag_names(fs, dataset_url)
    ids = _names(fs, versions_url(dataset_url))
    murls = [join_url(version_url(dataset_url, vid), MANIFEST_FILE) for vid in ids]
    contents = _read_many(fs, [tag_url(dataset_url, t) for t in names] + murls)
    tags = _tag_values(names, contents[: len(names)])
    out = []
    for vid, murl, text in zip(ids, murls, contents[len(names) :], strict=True):
        if text is None:
            continue  # an unfinished build: not a version
        manifest = parse_manifest(text, where=murl)
        out.append(
            VersionInfo(
                id=vid,
                created=manifest.created_at,
                samples=sum(manifest.splits.values()),
                bytes=sum(s.bytes for s in manifest.shards),
                tags=sorted(t for t, v in tags.items() if v == vid),
                parent=manifest.parent,
            )
        )
    if not out and not tags:
        raise DatasetNotFoundError(
            f"no dataset versions at {dataset_url}; give ROOT/NAME as used by `merra2-text build --out ROOT --name NAME`"
        )
    return sorted(out, key=lambda v: (v.created, v.id))


def tag(ref: str, tag_name: str, storage_options: dict[str, Any] | None = None) -> str:
    """Point `tag_name` at the version `ref` resolves to.

    Returns:
        The reference `<dataset>@<tag_name>`.
    """
    if not tag_name or not is_tag_name(tag_name) or ".tmp-" in tag_name:
        raise PublishError(f"tag {tag_name!r} is not a valid tag name; use letters, digits, '-', '_', '.'")
    ds = open_dataset(ref, storage_options)
    dataset_url = ds.version_url.rsplit("/versions/", 1)[0]
    write_tag(ds.fs, dataset_url, tag_name, ds.version)
    return f"{dataset_url}@{tag_name}"


def verify(ref: str, storage_options: dict[str, Any] | None = None) -> VerifyReport:
    """Re-read every shard of a version: sha256, bytes, sample counts, member names, decoding, and the index.

    Returns:
        A report whose `problems` name each mismatching shard or index row (empty when the version is intact).
    """
    ds = open_dataset(ref, storage_options)
    m = ds.manifest
    report = VerifyReport(reference=ref, version=m.version, shards=len(m.shards))
    found: dict[str, set[str]] = {}
    for shard in m.shards:
        try:
            content = read_shard(ds.fs, ds.url_of(shard.path), len(m.variables))
        except FileNotFoundError:
            report.problems.append(f"{shard.path}: missing")
            continue
        except SampleError as exc:
            report.problems.append(f"{shard.path}: unreadable: {exc}")
            continue
        found[shard.path] = set(content.keys)
        report.samples += len(content.keys)
        if content.sha256 != shard.sha256:
            report.problems.append(f"{shard.path}: sha256 {content.sha256} != manifest {shard.sha256}")
        if content.bytes != shard.bytes:
            report.problems.append(f"{shard.path}: {content.bytes} bytes != manifest {shard.bytes}")
        if len(content.keys) != shard.samples:
            report.problems.append(f"{shard.path}: {len(content.keys)} samples != manifest {shard.samples}")
    try:
        index = ds.read_index()
    except ContractError as exc:  # altered after publishing: say so, and check its content too
        report.problems.append(f"{INDEX_FILE}: {exc}")
        try:
            with ds.fs.open(fs_path(ds.fs, ds.url_of(INDEX_FILE)), "rb") as fh:
                index = pd.read_parquet(fh)
        except Exception:  # unreadable as well
            return report
    except Exception as exc:  # missing or unreadable parquet
        report.problems.append(f"{INDEX_FILE}: unreadable ({exc})")
        return report
    try:
        validate_index(index, m.variable_names)
    except IndexValidationError as exc:
        report.problems.append(f"{INDEX_FILE}: {exc}")
    if "shard" in index.columns and "key" in index.columns:
        for path, keys in found.items():
            listed = set(index.loc[index["shard"] == path, "key"])
            if listed != keys:
                report.problems.append(
                    f"{path}: index lists {len(listed)} keys, the shard holds {len(keys)} "
                    f"(only in index: {sorted(listed - keys)[:5]}, only in shard: {sorted(keys - listed)[:5]})"
                )
        unknown = sorted(set(index["shard"]) - {s.path for s in m.shards})
        if unknown:
            report.problems.append(f"{INDEX_FILE}: rows point at shards not in the manifest: {unknown}")
        counts = index["split"].value_counts().to_dict()
        for split, n in m.splits.items():
            if int(counts.get(split, 0)) != n:
                report.problems.append(
                    f"split {split}: index has {counts.get(split, 0)} rows, manifest says {n}"
                )
    try:
        n_quarantined = len(pd.read_parquet(io.BytesIO(ds.read_file(QUARANTINE_FILE))))
        if n_quarantined != m.quarantined:
            report.problems.append(f"{QUARANTINE_FILE}: {n_quarantined} rows, manifest says {m.quarantined}")
    except FileNotFoundError:
        report.problems.append(f"{QUARANTINE_FILE}: missing")
    except ContractError as exc:
        report.problems.append(f"{QUARANTINE_FILE}: {exc}")
    try:
        ds.read_file(README_FILE)
    except FileNotFoundError:
        report.problems.append(f"{README_FILE}: missing")
    except ContractError as exc:
        report.problems.append(f"{README_FILE}: {exc}")
    if m.files is not None and not ds.fs.exists(fs_path(ds.fs, ds.url_of(MANIFEST_DIGEST_FILE))):
        report.problems.append(
            f"{MANIFEST_DIGEST_FILE}: missing (the build was killed right after its commit): rerun the build"
        )
    return report


def gc(dataset_url: str, delete: bool = False, storage_options: dict[str, Any] | None = None) -> GcReport:
    """Find (and with `delete` remove) objects that no manifest references: shards of dead builds, stale temp files,
    staging receipts. Never touches committed files. Do not run with `delete` while a build of this dataset runs.
    """
    fs, dataset_url = url_to_fs(dataset_url, storage_options)
    report = GcReport(dataset_url=dataset_url)
    tags = _tags(fs, dataset_url)
    committed: set[str] = set()
    keep: set[str] = set()
    for vid in _names(fs, versions_url(dataset_url)):
        vurl = version_url(dataset_url, vid)
        murl = join_url(vurl, MANIFEST_FILE)
        try:
            manifest = parse_manifest(fs.cat_file(fs_path(fs, murl)), where=murl)
        except FileNotFoundError:
            continue
        committed.add(vid)
        for rel in (
            MANIFEST_FILE,
            MANIFEST_DIGEST_FILE,
            INDEX_FILE,
            QUARANTINE_FILE,
            README_FILE,
            *(s.path for s in manifest.shards),
        ):
            keep.add(fs_path(fs, join_url(vurl, rel)))
    report.dangling_tags = sorted(t for t, v in tags.items() if v not in committed)
    for sub in ("versions", "staging"):
        root = fs_path(fs, join_url(dataset_url, sub))
        try:
            files = fs.find(root, detail=True)
        except FileNotFoundError:
            continue
        for path, info in sorted(files.items()):
            if path not in keep:
                report.orphans.append(path)
                report.bytes += int(info.get("size") or 0)
    for path in (
        sorted(fs.find(fs_path(fs, tags_url(dataset_url))))
        if fs.exists(fs_path(fs, tags_url(dataset_url)))
        else []
    ):
        if ".tmp-" in path:
            report.orphans.append(path)
    if delete and report.orphans:
        fs.rm(report.orphans)
        report.deleted = True
    return report


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def diff(ref_a: str, ref_b: str, storage_options: dict[str, Any] | None = None) -> DiffReport:
    """Compare two versions: config keys that differ, samples per split, keys added and removed (a -> b)."""
    a, b = open_dataset(ref_a, storage_options), open_dataset(ref_b, storage_options)
    report = DiffReport(a=a.version, b=b.version)
    ca, cb = _flatten(a.manifest.config), _flatten(b.manifest.config)
    for key in sorted(set(ca) | set(cb)):
        if ca.get(key) != cb.get(key):
            report.config[key] = (ca.get(key), cb.get(key))
    for split in sorted(set(a.manifest.splits) | set(b.manifest.splits)):
        report.splits[split] = (a.manifest.splits.get(split, 0), b.manifest.splits.get(split, 0))
    keys_a, keys_b = set(a.read_index()["key"]), set(b.read_index()["key"])
    report.added, report.removed = sorted(keys_b - keys_a), sorted(keys_a - keys_b)
    return report
