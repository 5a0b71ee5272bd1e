"""Tar archives for tests: one writer for every suite that builds shards by hand."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable


def tar_bytes(members: Iterable[tuple[str, bytes]], fmt: int = tarfile.GNU_FORMAT) -> bytes:
    """A tar holding the (name, bytes) `members` in order, mtime 0 and mode 644; GNU format (as the builder writes)
    unless `fmt` says otherwise."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()
