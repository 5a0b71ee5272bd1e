"""Content-addressed, immutable dataset versions on any fsspec store (CONTRACT section 1).

A version id is a sha256 over the canonical resolved build config, the identities of the source granules and the
schema version, so the same inputs always give the same version. Commit protocol:

1. shards (written straight into `versions/<v>/shards/`, each atomically) and a receipt per finished shard under
   `<name>/staging/<v>/` (what lets an interrupted build resume without redoing finished shards);
2. `index.parquet` (validated with the shared schema first), `quarantine.parquet`, `README.md`;
3. `manifest.json`, create-only: a conditional PUT (`If-None-Match: *`) on S3, a hard link (which never replaces) on
   a local disk, check-then-write elsewhere. The version exists from this moment on;
4. `tags/<tag>` (default `latest`), then the staging receipts are removed.

This module is the write side; `versions` is the read side (list, tag, verify, gc, diff). Readers resolve references
with `climate_text_schema.open_dataset` only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any

import fsspec
import pandas as pd
from climate_text_schema import (
    INDEX_FILE,
    MANIFEST_FILE,
    QUARANTINE_FILE,
    README_FILE,
    SCHEMA_VERSION,
    IndexValidationError,
    Manifest,
    ShardInfo,
    SourceInfo,
    join_url,
    tag_url,
    validate_index,
    version_url,
)
from fsspec import AbstractFileSystem

from .errors import PublishError
from .shards import fs_path, is_local, store_error, write_atomic
from .tempfiles import remove_stale_temps, temp_sibling

__all__ = [
    "VERSION_LENGTH",
    "clean_up",
    "commit_version",
    "compute_version",
    "manifest_exists",
    "read_receipts",
    "staging_url",
    "url_to_fs",
    "write_create_only",
    "write_receipt",
    "write_tag",
]

logger = logging.getLogger(__name__)

VERSION_LENGTH = 20
"""Hex digits of the sha256 kept as the version id (80 bits)."""


def url_to_fs(url: str, storage_options: dict[str, Any] | None = None) -> tuple[AbstractFileSystem, str]:
    """The fsspec filesystem of `url` and the URL itself (a local path is made absolute)."""
    if "://" not in url:
        url = os.path.abspath(os.path.expanduser(url))
    fs, _ = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, url


def compute_version(
    config: dict[str, Any], sources: list[SourceInfo], inputs: dict[str, str] | None = None
) -> str:
    """The content address of a build.

    Args:
        config: `BuildConfig.resolved()`.
        sources: the source granules (granule id, file name, bytes, checksum); order does not matter.
        inputs: digests of other input files (event tables), `{name: sha256}`.

    Returns:
        The first VERSION_LENGTH hex digits of the sha256 of the canonical JSON of all of it and SCHEMA_VERSION.
    """
    payload = {
        "schema_version": SCHEMA_VERSION,
        "config": config,
        "sources": sorted(
            ([s.granule, s.file, s.bytes, s.checksum] for s in sources), key=lambda s: (str(s[0]), str(s[1]))
        ),
        "inputs": dict(sorted((inputs or {}).items())),
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:VERSION_LENGTH]


def manifest_exists(fs: AbstractFileSystem, dataset_url: str, version: str) -> bool:
    """True when `version` of the dataset is committed (its manifest.json exists)."""
    return bool(fs.exists(fs_path(fs, join_url(version_url(dataset_url, version), MANIFEST_FILE))))


def write_create_only(fs: AbstractFileSystem, url: str, data: bytes) -> bool:
    """Write `data` at `url` only if nothing is there yet.

    Returns:
        True if written, False if an object already existed (it is left untouched).
    """
    path = fs_path(fs, url)
    if is_local(fs):
        parent = path.rsplit("/", 1)[0]
        fs.makedirs(parent, exist_ok=True)
        tmp = temp_sibling(path)
        fs.pipe_file(tmp, data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        return True
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    if "s3" in protocols or "s3a" in protocols:
        try:
            fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        except Exception as exc:
            raise store_error(url, exc) from exc
        return True
    if fs.exists(path):  # no conditional write on this store: check, then write
        return False
    fs.pipe_file(path, data)
    return True


def write_tag(fs: AbstractFileSystem, dataset_url: str, tag: str, version: str) -> None:
    """Point `tags/<tag>` at `version` (which must be committed)."""
    if not manifest_exists(fs, dataset_url, version):
        raise PublishError(
            f"cannot tag {version!r} as {tag!r} in {dataset_url}: that version has no manifest (it was never "
            "committed); list versions with `merra2-text versions`"
        )
    write_atomic(fs, tag_url(dataset_url, tag), (version + "\n").encode("utf-8"))


def staging_url(dataset_url: str, version: str) -> str:
    """`<name>/staging/<version>`: receipts of finished shards of a build not yet committed."""
    return join_url(dataset_url, "staging", version)


def write_receipt(
    fs: AbstractFileSystem,
    dataset_url: str,
    version: str,
    task: str,
    payload: dict[str, Any],
    stage: str | None = None,
) -> None:
    """Record that a build task finished (its shard info, index rows, ...), so a rerun can skip it.

    Args:
        fs: the store's filesystem.
        dataset_url: `<out>/<name>`.
        version: the version being built.
        task: the task name (`<split>-<NNNNNN>`).
        payload: JSON-ready receipt.
        stage: None for shard receipts (`staging/<v>/<task>.json`), else a sub-folder such as `stats`
            (`staging/<v>/stats/<task>.json`: the per-sample statistics of the first pass).
    """
    data = json.dumps(payload, sort_keys=True, default=str).encode("utf-8")
    root = staging_url(dataset_url, version)
    write_atomic(fs, join_url(root, stage, f"{task}.json") if stage else join_url(root, f"{task}.json"), data)


def read_receipts(
    fs: AbstractFileSystem, dataset_url: str, version: str, stage: str | None = None
) -> dict[str, dict[str, Any]]:
    """The receipts of a build's finished tasks (of `stage`, see `write_receipt`), by task name.

    A shard receipt whose shard is missing or has another size is ignored (that task is redone).
    """
    root = fs_path(fs, staging_url(dataset_url, version))
    if stage:
        root = fs_path(fs, join_url(staging_url(dataset_url, version), stage))
    out: dict[str, dict[str, Any]] = {}
    try:
        names = fs.ls(root, detail=False)
    except FileNotFoundError:
        return out
    vurl = version_url(dataset_url, version)
    for name in sorted(str(n) for n in names):
        if not name.endswith(".json"):
            continue
        try:
            payload = json.loads(fs.cat_file(name))
        except (json.JSONDecodeError, FileNotFoundError):
            continue
        shard = payload.get("shard")
        if shard is not None:
            info = ShardInfo.model_validate(shard)
            try:
                size = fs.size(fs_path(fs, join_url(vurl, info.path)))
            except FileNotFoundError:
                size = None
            if size != info.bytes:
                logger.info("receipt %s: shard %s missing or resized; redoing it", name, info.path)
                continue
        out[name.rsplit("/", 1)[-1].removesuffix(".json")] = payload
    return out


def _parquet_bytes(df: pd.DataFrame) -> bytes:
    import io

    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()


def commit_version(
    fs: AbstractFileSystem,
    dataset_url: str,
    manifest: Manifest,
    index: pd.DataFrame,
    quarantine: pd.DataFrame,
    card: str,
    tag: str | None = "latest",
) -> str:
    """Commit a version whose shards are already written: index, quarantine, card, then the manifest, then the tag.

    Returns:
        The version folder URL.

    Raises:
        PublishError: the index fails the shared schema, a shard listed in the manifest is missing or has another
            size, or a different manifest already exists for this version.
    """
    vurl = version_url(dataset_url, manifest.version)
    try:
        validate_index(index, manifest.variable_names)
    except IndexValidationError as exc:
        raise PublishError(f"not committing {vurl}: the index fails the shared schema\n{exc}") from exc
    problems = []
    for shard in manifest.shards:
        try:
            size = fs.size(fs_path(fs, join_url(vurl, shard.path)))
        except FileNotFoundError:
            size = None
        if size != shard.bytes:
            problems.append(f"{shard.path}: expected {shard.bytes} bytes, found {size}")
    if problems:
        raise PublishError(f"not committing {vurl}: shards are missing or damaged: " + "; ".join(problems))
    write_atomic(fs, join_url(vurl, INDEX_FILE), _parquet_bytes(index))
    write_atomic(fs, join_url(vurl, QUARANTINE_FILE), _parquet_bytes(quarantine))
    write_atomic(fs, join_url(vurl, README_FILE), card.encode("utf-8"))
    written = write_create_only(fs, join_url(vurl, MANIFEST_FILE), manifest.to_json().encode("utf-8"))
    if not written:
        logger.info(
            "version %s was already committed by another build; leaving it as it is", manifest.version
        )
    if tag:
        write_tag(fs, dataset_url, tag, manifest.version)
    clean_up(fs, dataset_url, manifest.version)
    return vurl


def clean_up(fs: AbstractFileSystem, dataset_url: str, version: str) -> None:
    """After a commit: remove the version's staging receipts and, on a local disk, the temporary files that killed
    writers left in the version folder and among the tags (never those of a live build)."""
    staging = fs_path(fs, staging_url(dataset_url, version))
    if fs.exists(staging):
        fs.rm(staging, recursive=True)
        parent = staging.rsplit("/", 1)[0]
        if is_local(fs) and fs.exists(parent) and not fs.ls(parent):
            fs.rmdir(parent)
    if is_local(fs):
        remove_stale_temps(fs_path(fs, version_url(dataset_url, version)))
        remove_stale_temps(fs_path(fs, join_url(dataset_url, "tags")), recursive=False)
