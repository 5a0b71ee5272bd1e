"""The builder's one filesystem module: fsspec filesystems of URLs, paths, and the two safe ways to write.

`write_atomic` makes a write all-or-nothing (local disk: a temp sibling, then rename; object stores: one PUT to the
final key, which an object store shows only once complete). `write_create_only` never replaces what is there (local
disk: a hard link; S3: a conditional PUT `If-None-Match: *`, after a once-per-folder probe that the store honours
it; elsewhere: check, then write). Every failed write raises `StoreError` naming the object and the way out.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from typing import Any

import fsspec
from fsspec import AbstractFileSystem

from .errors import PublishError, StoreError
from .tempfiles import temp_sibling

__all__ = [
    "check_conditional_writes",
    "fs_path",
    "is_local",
    "store_error",
    "url_to_fs",
    "write_atomic",
    "write_create_only",
]


def url_to_fs(url: str, storage_options: dict[str, Any] | None = None) -> tuple[AbstractFileSystem, str]:
    """The fsspec filesystem of `url` and the URL itself (a local path is made absolute)."""
    if "://" not in url:
        url = os.path.abspath(os.path.expanduser(url))
    fs, _ = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, url


def fs_path(fs: AbstractFileSystem, url: str) -> str:
    """The filesystem-internal path of a URL (strips `s3://`, `file://`)."""
    return str(fs._strip_protocol(url))


def is_local(fs: AbstractFileSystem) -> bool:
    """True for the local-disk filesystem (where rename is atomic and hard links exist)."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return "file" in protocols or "local" in protocols


def store_error(url: str, exc: Exception) -> StoreError:
    """The error of a failed write to the store: names the object and the way out."""
    return StoreError(
        f"writing {url} failed ({type(exc).__name__}: {exc}); the store is unreachable, throttling or refusing the "
        "write: check it and your credentials, then rerun the same command (what is already stored is kept)"
    )


def write_atomic(fs: AbstractFileSystem, url: str, data: bytes) -> None:
    """Write `data` at `url` so that a reader sees either nothing (or the old object) or all of it.

    Local disk: a temp sibling, then rename. Object stores: one PUT to the final key.

    Raises:
        StoreError: the write failed (after the store client's own retries); nothing partial is visible.
    """
    try:
        _write_atomic(fs, url, data)
    except StoreError:
        raise
    except Exception as exc:
        raise store_error(url, exc) from exc


def _write_atomic(fs: AbstractFileSystem, url: str, data: bytes) -> None:
    path = fs_path(fs, url)
    if is_local(fs):
        parent = path.rsplit("/", 1)[0]
        fs.makedirs(parent, exist_ok=True)
        tmp = temp_sibling(path)
        try:
            fs.pipe_file(tmp, data)
            fs.mv(tmp, path)
        except BaseException:
            if fs.exists(tmp):
                fs.rm_file(tmp)
            raise
    else:
        fs.pipe_file(path, data)


def _protocols(fs: AbstractFileSystem) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def write_create_only(fs: AbstractFileSystem, url: str, data: bytes) -> bool:
    """Write `data` at `url` only if nothing is there yet.

    Local disk: a temp sibling hard-linked onto the name (a link never replaces); the temp file is removed whatever
    happens. S3: a conditional PUT (`If-None-Match: *`), after a once-per-folder probe that the store honours it
    (`check_conditional_writes`). Elsewhere: check, then write.

    Returns:
        True if written, False if an object already existed (it is left untouched).

    Raises:
        StoreError: the write failed; no temp file is left.
        PublishError: the store ignores conditional writes (an object would be silently replaced).
    """
    path = fs_path(fs, url)
    if is_local(fs):
        parent = path.rsplit("/", 1)[0]
        tmp = temp_sibling(path)
        try:
            fs.makedirs(parent, exist_ok=True)
            fs.pipe_file(tmp, data)
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError as exc:
            raise store_error(url, exc) from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return True
    protocols = _protocols(fs)
    if "s3" in protocols or "s3a" in protocols:
        check_conditional_writes(fs, path)
        try:
            fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        except Exception as exc:
            raise store_error(url, exc) from exc
        return True
    if fs.exists(path):  # no conditional write on this store: check, then write
        return False
    try:
        fs.pipe_file(path, data)
    except Exception as exc:
        raise store_error(url, exc) from exc
    return True


_CONDITIONAL_OK: set[str] = set()
"""Folders (filesystem class, options digest, `protocol://bucket/folder`) where the store was seen to refuse a second
create-only PUT of one key."""


def check_conditional_writes(fs: AbstractFileSystem, path: str) -> None:
    """Once per folder: write a probe object create-only twice in the folder of `path`; the second write must be
    refused.

    Some S3-compatible stores accept `If-None-Match: *` and ignore it, so a create-only manifest write would replace
    a published one silently. Such a store is refused here, before anything is committed to it. The probe is a
    temporary sibling of `path` (`.merra2-text-probe.tmp-...`, removed at once; `gc` reaps one left in a dataset), so
    credentials limited to the dataset's or the cache's prefix can write it.

    Raises:
        PublishError: the store replaced the probe (it ignores conditional writes).
        StoreError: the probe could not be written.
    """
    lead = "/" if path.startswith("/") else ""
    folder = path.strip("/").rsplit("/", 1)[0]
    where = f"{_protocols(fs)[0]}://{folder}"
    options = hashlib.sha256(repr(sorted(fs.storage_options.items())).encode()).hexdigest()[:16]
    key = (
        f"{type(fs).__name__} {options} {where}"  # the same bucket name on another endpoint is another store
    )
    if key in _CONDITIONAL_OK:
        return
    probe = temp_sibling(f"{lead}{folder}/.merra2-text-probe")
    try:
        fs.pipe_file(probe, b"1", mode="create")
        try:
            fs.pipe_file(probe, b"2", mode="create")
            replaced = True
        except FileExistsError:
            replaced = False
    except Exception as exc:
        raise store_error(f"{where}/{probe.rsplit('/', 1)[-1]}", exc) from exc
    finally:
        with contextlib.suppress(Exception):
            fs.rm_file(probe)
    if replaced:
        raise PublishError(
            f"the store of {where} ignores conditional writes (If-None-Match: *): a second create-only PUT of a probe "
            "object replaced it, so a published manifest could be overwritten silently. Publish to a store that "
            "honours If-None-Match (AWS S3, MinIO, recent Ceph) or to a local folder"
        )
    _CONDITIONAL_OK.add(key)
