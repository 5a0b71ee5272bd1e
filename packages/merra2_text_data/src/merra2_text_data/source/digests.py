"""Content hashes of granules read from a folder or an fsspec URL, so that a version id names their bytes.

A CMR record carries a checksum; a folder listing does not, and a granule's name and size alone would let a file
rewritten in place (same name, same size, other values) build under the version id of the old one. `content_digests`
gives every such granule `checksum="SHA256:<hex>"`, the SHA-256 of its bytes: the same for a local copy and an
object-store copy of one file, so the two build the same version.

Hashing reads every byte once. The digests are kept in `<cache>/granule-digests.json`, keyed by the file's location
and what changes with its content (size and mtime for a local file; size and ETag, or modification time, for an
object), so a rebuild, or a second build over the same granules, reads nothing again. A key the store cannot
version (no ETag, no modification time) is hashed on every plan.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import fsspec

from merra2_text_data.tempfiles import temp_sibling

from .download import file_digest
from .granules import Granule

logger = logging.getLogger(__name__)

__all__ = ["DIGEST_FILE", "content_digests"]

DIGEST_FILE = "granule-digests.json"


def _stamp(url: str) -> str | None:
    """What changes when the bytes at `url` change, short of reading them; None when the store says nothing."""
    fs, path = fsspec.core.url_to_fs(url)
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        stat = os.stat(path)  # one stat, no fsspec info call
        return f"{stat.st_size}:{stat.st_mtime_ns}"
    info = fs.info(path)
    size = info.get("size")
    version = info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("LastModified") or info.get(
        "mtime") or info.get("last_modified")  # fmt: skip
    return None if version is None else f"{size}:{version}"


def _load(path: Path) -> dict[str, list[str]]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        logger.warning("ignoring the granule digest cache %s (%s): every granule is hashed again", path, exc)
        return {}
    return {str(k): v for k, v in data.items() if isinstance(v, list) and len(v) == 2} if isinstance(data, dict) else {}


def content_digests(granules: Sequence[Granule], cache_dir: str | Path | None, workers: int = 4,
                    log_every_s: float = 30.0) -> list[Granule]:  # fmt: skip
    """`granules` with `checksum="SHA256:<hex>"` where they had none (a granule with a CMR checksum is kept as is).

    Args:
        granules: granules of a local folder or an fsspec URL (`fetch.find_granules`).
        cache_dir: a local folder for the digest cache (`granule-digests.json`); None keeps no cache.
        workers: files hashed at once (hashing is I/O and hashlib releases the GIL).
        log_every_s: seconds between progress lines on a long hashing pass.
    """
    todo = [i for i, g in enumerate(granules) if not g.checksum]
    if not todo:
        return list(granules)
    cache_path = Path(cache_dir) / DIGEST_FILE if cache_dir is not None else None
    known = _load(cache_path) if cache_path is not None else {}
    stamps = {i: _stamp(granules[i].url) for i in todo}
    digests: dict[int, str] = {}
    for i in todo:
        hit = known.get(granules[i].url)
        if stamps[i] is not None and hit is not None and hit[0] == stamps[i]:
            digests[i] = hit[1]
    missing = [i for i in todo if i not in digests]
    if missing:
        total = sum(granules[i].size or 0 for i in missing)
        logger.info("hashing %d granule(s) (%.1f GB) for the version id; the digests are kept in %s", len(missing),
                    total / 1e9, cache_path or "no cache")  # fmt: skip
        lock = threading.Lock()
        done = [0, time.monotonic()]

        def one(i: int) -> tuple[int, str]:
            digest = file_digest(granules[i].url)
            with lock:
                done[0] += 1
                if time.monotonic() - done[1] >= log_every_s:
                    done[1] = time.monotonic()
                    logger.info("hashed %d/%d granules", done[0], len(missing))
            return i, digest

        with ThreadPoolExecutor(max(1, min(workers, len(missing)))) as pool:
            digests.update(pool.map(one, missing))
        if cache_path is not None:
            for i in missing:
                if stamps[i] is not None:
                    known[granules[i].url] = [str(stamps[i]), digests[i]]
            try:
                cache_path.parent.mkdir(parents=True, exist_ok=True)
                tmp = temp_sibling(str(cache_path))
                Path(tmp).write_text(json.dumps(known, sort_keys=True))
                os.replace(tmp, cache_path)
            except OSError as exc:  # a read-only cache costs a rehash next time, never the build
                logger.warning("could not keep the granule digests in %s (%s)", cache_path, exc)
    out = list(granules)
    for i, digest in digests.items():
        out[i] = replace(out[i], checksum=f"SHA256:{digest}")
    return out
