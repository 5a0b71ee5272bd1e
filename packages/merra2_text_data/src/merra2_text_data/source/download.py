"""Resumable granule downloads into a local cache: Range requests, retries with backoff, size and CMR checksum checks,
the Earthdata token over https only."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import fsspec

from merra2_text_data.errors import CredentialsError, GranuleError

from .cmr import login_earthaccess
from .granules import Granule, hash_name, plain_http

__all__ = ["download_granules", "file_digest"]

logger = logging.getLogger(__name__)


class _SizeMismatch(Exception):
    pass



def file_digest(path: Path | str, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes (a local path or any fsspec URL; read 1 MiB at a time)."""
    digest = hashlib.new(algorithm)
    with fsspec.open(str(path), "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _checksum_problem(granule: Granule, path: Path) -> str | None:
    """Why `path` is not the granule the CMR record describes (its checksum differs), or None (also when unknown)."""
    if not granule.checksum or ":" not in granule.checksum:
        return None
    algorithm, _, expected = granule.checksum.partition(":")
    name = hash_name(algorithm)
    if name is None:
        return None
    found = file_digest(path, name)
    if found.lower() != expected.strip().lower():
        return f"its {algorithm} is {found} where the CMR record lists {expected.strip()}"
    return None


def _verified_mark(target: Path) -> Path:
    return target.with_name(f".{target.name}.verified")


def _is_verified(granule: Granule, target: Path) -> bool:
    """The cached file was checked against this checksum before, and is unchanged since (size, mtime)."""
    stat = target.stat()
    try:
        return _verified_mark(target).read_text() == f"{granule.checksum} {stat.st_size} {stat.st_mtime_ns}"
    except FileNotFoundError:
        return False


def _mark_verified(granule: Granule, target: Path) -> None:
    if granule.checksum:
        stat = target.stat()
        _verified_mark(target).write_text(f"{granule.checksum} {stat.st_size} {stat.st_mtime_ns}")


def _refuse_plain_http_redirect(response: Any, *args: Any, **kwargs: Any) -> Any:
    """A requests response hook: never follow a redirect of an authenticated download to plain http."""
    location = str(response.headers.get("Location", "")) if getattr(response, "is_redirect", False) else ""
    if plain_http(location):
        raise CredentialsError(
            f"the download of {response.url.split('?', 1)[0]} redirects to plain http ({location.split('?', 1)[0]}): "
            "the Earthdata token is only ever sent over https; not following it"
        )
    return response


def _transfer(granule: Granule, part: Path, session: Any, chunk: int = 1 << 16) -> int | None:
    """Copy the granule into `part`, resuming from its current size when the server supports ranges.

    Returns the total size the server announced (None when unknown).
    """
    offset = part.stat().st_size if part.exists() else 0
    if granule.size is not None and offset > granule.size:
        offset = 0
    if granule.size is not None and offset == granule.size:
        return granule.size
    if granule.url.startswith(("http://", "https://")):
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        with session.get(granule.url, headers=headers, stream=True, timeout=60) as resp:
            if resp.status_code in (401, 403):
                raise CredentialsError(f"{granule.file_name}: the server answered HTTP {resp.status_code}; log in "
                                       "to Earthdata and accept the GES DISC data use agreement")  # fmt: skip
            if resp.status_code == 416:
                part.unlink(missing_ok=True)
                raise _SizeMismatch(f"range {offset}- not satisfiable")
            resp.raise_for_status()
            if resp.status_code != 206:
                offset = 0
            length = resp.headers.get("Content-Length")
            total = int(length) + offset if length is not None else None
            with part.open("ab" if offset else "wb") as out:
                out.truncate(offset)
                for block in resp.iter_content(chunk):
                    out.write(block)
        return total
    with fsspec.open(granule.url, "rb") as src, part.open("ab" if offset else "wb") as out:
        out.truncate(offset)
        src.seek(offset)
        while block := src.read(chunk):
            out.write(block)
    return None


def _download_one(granule: Granule, target: Path, session: Any, retries: int, backoff_s: float) -> None:
    part = target.with_name(target.name + ".part")
    problem = ""
    for attempt in range(retries + 1):
        try:
            announced = _transfer(granule, part, session)
            expected = granule.size if granule.size is not None else announced
            actual = part.stat().st_size
            if expected is not None and actual != expected:
                if actual > expected:
                    part.unlink()
                raise _SizeMismatch(f"got {actual} bytes, expected {expected}")
            wrong = _checksum_problem(granule, part)
            if wrong is not None:
                part.unlink()  # wrong bytes (a same-size corruption, or a .part of an older file): start again
                raise _SizeMismatch(wrong)
            os.replace(part, target)
            _mark_verified(granule, target)
            logger.info("downloaded %s (%d bytes)", target, actual)
            return
        except (OSError, _SizeMismatch) as exc:  # requests' errors are OSErrors
            problem = str(exc)
            logger.warning("download of %s failed (attempt %d/%d): %s", granule.file_name, attempt + 1,
                           retries + 1, problem)  # fmt: skip
            if attempt < retries:
                time.sleep(backoff_s * 2**attempt)
    raise GranuleError(f"could not download {granule.file_name} from {granule.url} after {retries + 1} attempts: "
                       f"{problem}; the partial file {part} is kept for a later resume")  # fmt: skip


def download_granules(
    granules: Sequence[Granule],
    cache_dir: str | Path,
    show_progress: bool = False,
    retries: int = 3,
    *,
    session: Any = None,
    backoff_s: float = 1.0,
) -> list[Granule]:
    """Download granules into `cache_dir/<collection>/<YYYY>/`, skipping complete files and resuming partial ones.

    A file is complete when its size matches the record (any existing file counts when the size is unknown).
    Partial data lives in a `.part` sibling, resumed with an HTTP Range request when the server honours it (else
    restarted), retried with exponential backoff, then renamed atomically.

    Args:
        granules: granules whose url is https, http, an fsspec URL or a local path.
        cache_dir: local folder for the files.
        show_progress: show a rich progress bar.
        retries: attempts after the first one.
        session: a `requests.Session` for http(s); default: earthaccess's authenticated session (logging in).
        backoff_s: first retry delay in seconds, doubled at each retry.

    Returns:
        The granules with `url` set to the local path (and `size` to the file's size).

    Raises:
        CredentialsError: https downloads without Earthdata credentials, or HTTP 401/403.
        GranuleError: a file could not be downloaded completely (size mismatch after the retries).
    """
    cache = Path(cache_dir)
    todo: list[tuple[Granule, Path]] = []
    done: dict[Granule, Path] = {}
    for g in granules:
        target = cache / g.collection / f"{g.day:%Y}" / g.file_name
        if not target.resolve().is_relative_to(cache.resolve()):
            raise GranuleError(f"{g.file_name!r} would be written outside the cache {cache}; refusing it")
        if target.exists() and (g.size is None or target.stat().st_size == g.size):
            wrong = None if not g.checksum or _is_verified(g, target) else _checksum_problem(g, target)
            if wrong is not None:
                logger.warning("%s: %s; downloading it again", target, wrong)
                target.unlink()
                todo.append((g, target))
                continue
            _mark_verified(g, target)
            logger.debug("%s already complete", target)
            done[g] = target
        else:
            todo.append((g, target))
    if todo and session is None and any(g.url.startswith(("http://", "https://")) for g, _ in todo):
        plain = [g.file_name for g, _ in todo if plain_http(g.url)]
        if plain:
            raise CredentialsError(
                f"{plain[0]} (and {len(plain) - 1} more) would be downloaded over plain http with the Earthdata "
                "token: it is only ever sent over https; use the https links"
            )
        import earthaccess

        login_earthaccess()
        session = earthaccess.get_requests_https_session()
        session.hooks.setdefault("response", []).append(_refuse_plain_http_redirect)
    progress: Any = None
    if show_progress and todo:
        from rich.progress import Progress

        progress = Progress()
        progress.start()
        task = progress.add_task("downloading granules", total=len(todo))
    try:
        for g, target in todo:
            target.parent.mkdir(parents=True, exist_ok=True)
            _download_one(g, target, session, retries, backoff_s)
            done[g] = target
            if progress is not None:
                progress.advance(task)
    finally:
        if progress is not None:
            progress.stop()
    return [replace(g, url=str(done[g]), size=done[g].stat().st_size) for g in granules]
