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

import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import time
from typing import Any

import pandas as pd
from climate_text_schema import (
    INDEX_FILE,
    MANIFEST_DIGEST_FILE,
    MANIFEST_FILE,
    QUARANTINE_FILE,
    README_FILE,
    SCHEMA_VERSION,
    ContractError,
    IndexValidationError,
    Manifest,
    ShardInfo,
    SourceInfo,
    format_tag,
    join_url,
    parse_tag,
    tag_url,
    validate_index,
    version_url,
)
from fsspec import AbstractFileSystem

from merra2_text_data.errors import PublishError, StoreError
from merra2_text_data.fs import fs_path, is_local, write_atomic, write_create_only
from merra2_text_data.tempfiles import is_stale_temp, remove_stale_temps, temp_sibling

__all__ = [
    "VERSION_LENGTH",
    "clean_up",
    "commit_version",
    "compute_version",
    "manifest_exists",
    "read_receipts",
    "staging_url",
    "tag_points_at",
    "write_receipt",
    "write_tag",
]

logger = logging.getLogger(__name__)

VERSION_LENGTH = 20
"""Hex digits of the sha256 kept as the version id (80 bits)."""


_TAG_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")


def is_tag_name(tag: str) -> bool:
    """True for a tag name the contract allows (no path separators, not starting with a dot)."""
    return _TAG_NAME.fullmatch(tag) is not None


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


def write_tag(fs: AbstractFileSystem, dataset_url: str, tag: str, version: str) -> None:
    """Point `tags/<tag>` at `version` (which must be committed): the tag file holds the version id."""
    if not is_tag_name(tag):
        raise PublishError(
            f"tag {tag!r} is not a tag name: use letters, digits, '.', '_' and '-' (not first '.')"
        )
    if not manifest_exists(fs, dataset_url, version):
        raise PublishError(
            f"cannot tag {version!r} as {tag!r} in {dataset_url}: that version has no manifest (it was never "
            "committed); list versions with `merra2-text versions`"
        )
    write_atomic(fs, tag_url(dataset_url, tag), format_tag(version).encode("utf-8"))


def tag_points_at(fs: AbstractFileSystem, dataset_url: str, tag: str, version: str) -> bool:
    """True when `tags/<tag>` exists, is well-formed and names `version`."""
    path = fs_path(fs, tag_url(dataset_url, tag))
    if not fs.exists(path):
        return False
    try:
        return parse_tag(fs.cat_file(path).decode("utf-8", "replace"), tag)[0] == version
    except ContractError:
        return False


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


def _committed_manifest(fs: AbstractFileSystem, vurl: str) -> bytes | None:
    try:
        return bytes(fs.cat_file(fs_path(fs, join_url(vurl, MANIFEST_FILE))))
    except FileNotFoundError:
        return None


def _refuse_rewrite(fs: AbstractFileSystem, vurl: str, what: str) -> None:
    """Raise before a write under `vurl` once that version is committed (nothing published is ever rewritten)."""
    if _committed_manifest(fs, vurl) is not None:
        raise PublishError(
            f"not writing {what} of {vurl}: that version is already committed (another build published it first); "
            "its published files are kept as they are. Rerun the same command: it finds the version and stops"
        )


def _lock_url(dataset_url: str, version: str) -> str:
    return join_url(staging_url(dataset_url, version), COMMIT_LOCK)


COMMIT_LOCK = "COMMIT.lock"
"""`staging/<v>/COMMIT.lock`: created create-only by the build that commits version v (its host, pid and time)."""
LOCK_STALE_SECONDS = 3600.0
"""A commit lock older than this (or, on a local disk, whose writer on this host is dead) is taken over."""


def _acquire_commit_lock(fs: AbstractFileSystem, dataset_url: str, version: str) -> str:
    """Create the commit lock of a version or raise: two builds of one version never commit at the same time."""
    url = _lock_url(dataset_url, version)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time(),
          "temp": temp_sibling("lock").rsplit("/", 1)[-1]}  # fmt: skip
    data = json.dumps(me, sort_keys=True).encode("utf-8")
    for _ in range(2):
        if write_create_only(fs, url, data):
            return url
        try:
            owner = json.loads(fs.cat_file(fs_path(fs, url)))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            owner = {}
        age = time.time() - float(owner.get("time", 0) or 0)
        dead = is_stale_temp(str(owner.get("temp", "")))
        if dead or age > LOCK_STALE_SECONDS:
            logger.warning("taking over the commit lock of %s left by a %s build (%s)", version,
                           "dead" if dead else "stale", owner)  # fmt: skip
            with contextlib.suppress(FileNotFoundError):
                fs.rm_file(fs_path(fs, url))
            continue
        raise PublishError(
            f"another build (host {owner.get('host')!r}, pid {owner.get('pid')}) is committing version {version} of "
            f"{dataset_url} right now ({url}); this build wrote nothing under the version. Rerun the same command "
            "once it finished (it then finds the version published), or delete the lock if no build runs"
        )
    raise PublishError(f"cannot take the commit lock {url}; rerun the same command")


def _write_version_file(fs: AbstractFileSystem, vurl: str, name: str, data: bytes) -> None:
    """Write one file of an uncommitted version; identical bytes already there are left as they are."""
    _refuse_rewrite(fs, vurl, name)
    url = join_url(vurl, name)
    try:
        if bytes(fs.cat_file(fs_path(fs, url))) == data:
            return
    except FileNotFoundError:
        pass
    write_atomic(fs, url, data)


def commit_version(
    fs: AbstractFileSystem,
    dataset_url: str,
    manifest: Manifest,
    index: pd.DataFrame,
    quarantine: pd.DataFrame,
    card: str,
    tag: str | None = "latest",
) -> str:
    """Commit a version whose shards are already written: index, quarantine, card, then the manifest (which records
    their sha256), its digest, then the tag.

    The commit holds the version's lock (`staging/<v>/COMMIT.lock`), and every write first checks that the version
    is not committed: a second build of a committed version raises and rewrites nothing, and of two concurrent
    builds of one version one commits and the other raises.

    Returns:
        The version folder URL.

    Raises:
        PublishError: the index fails the shared schema, a shard listed in the manifest is missing or has another
            size, the version is already committed (by another build), or another build is committing it.
    """
    vurl = version_url(dataset_url, manifest.version)
    try:
        validate_index(index, manifest.variable_names)
    except IndexValidationError as exc:
        raise PublishError(f"not committing {vurl}: the index fails the shared schema\n{exc}") from exc
    files = {INDEX_FILE: _parquet_bytes(index), QUARANTINE_FILE: _parquet_bytes(quarantine),
             README_FILE: card.encode("utf-8")}  # fmt: skip
    manifest = manifest.model_copy(
        update={"files": {k: hashlib.sha256(v).hexdigest() for k, v in files.items()}}
    )
    text = manifest.to_json().encode("utf-8")
    committed = _committed_manifest(fs, vurl)
    if (
        committed == text
    ):  # this very commit is already stored (a rerun of an identical build): nothing to write
        logger.info("version %s is already committed with this manifest; nothing rewritten", manifest.version)
        if tag and not tag_points_at(fs, dataset_url, tag, manifest.version):
            write_tag(fs, dataset_url, tag, manifest.version)
        clean_up(fs, dataset_url, manifest.version)
        return vurl
    _refuse_rewrite(fs, vurl, MANIFEST_FILE)
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
    lock = _acquire_commit_lock(fs, dataset_url, manifest.version)
    try:
        for name, data in files.items():
            _write_version_file(fs, vurl, name, data)
        written = write_create_only(fs, join_url(vurl, MANIFEST_FILE), text)
        if not written and _committed_manifest(fs, vurl) != text:
            raise PublishError(
                f"not committing {vurl}: another build committed that version first; its manifest is kept"
            )
    finally:
        with contextlib.suppress(FileNotFoundError, StoreError):
            fs.rm_file(fs_path(fs, lock))
    if tag:
        write_tag(fs, dataset_url, tag, manifest.version)
    clean_up(fs, dataset_url, manifest.version)
    return vurl


def clean_up(fs: AbstractFileSystem, dataset_url: str, version: str) -> None:
    """After a commit: remove the version's staging receipts and, on a local disk, the temporary files that killed
    writers left in the version folder and among the tags (never those of a live build). A manifest digest that a
    build killed right after its commit did not write is written now."""
    vurl = version_url(dataset_url, version)
    manifest = _committed_manifest(fs, vurl)
    if manifest is not None and not fs.exists(fs_path(fs, join_url(vurl, MANIFEST_DIGEST_FILE))):
        digest = hashlib.sha256(manifest).hexdigest()
        write_create_only(fs, join_url(vurl, MANIFEST_DIGEST_FILE), (digest + "\n").encode("utf-8"))
    staging = fs_path(fs, staging_url(dataset_url, version))
    if fs.exists(staging):
        fs.rm(staging, recursive=True)
        parent = staging.rsplit("/", 1)[0]
        if is_local(fs) and fs.exists(parent) and not fs.ls(parent):
            fs.rmdir(parent)
    if is_local(fs):
        remove_stale_temps(fs_path(fs, version_url(dataset_url, version)))
        remove_stale_temps(fs_path(fs, join_url(dataset_url, "tags")), recursive=False)
