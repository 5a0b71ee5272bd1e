"""A lean reader of the regular-file members of an uncompressed tar stream (ustar, GNU or pax).

It replaces `tarfile` in streaming mode, which costs about as much as the rest of a sample (docs/performance.md,
"Streaming"): each header is checked and its data read in one call. `shards.iter_shard` runs it over the
bytes of a shard it already checked and groups its members into samples with webdataset's `group_by_keys`.
"""

from __future__ import annotations

import logging
import re
import tarfile
from collections.abc import Iterator
from typing import Any

__all__: list[str] = []  # package-internal: `shards.iter_shard` is the public way to read a shard

logger = logging.getLogger(__name__)

_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_REGULAR = (b"0", b"\0", b"7")  # regular file, old-style regular file, contiguous file
# webdataset's metadata members, skipped as its tar_file_iterator skips them
_SKIP_META = re.compile(r"__[^/]*__($|/)")


def _tar_number(field: bytes) -> int:
    """A numeric tar header field: octal text, or GNU base-256 when the first bit is set."""
    if field[:1] and field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    text = field.replace(b"\0", b" ").strip()
    try:
        return int(text, 8) if text else 0
    except ValueError as exc:
        raise tarfile.HeaderError(
            f"tar header field {field!r} is not a number: not a tar, or a damaged one"
        ) from exc


def _tar_text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _pax_records(data: bytes) -> dict[str, str]:
    """The `length key=value\\n` records of a pax extended header."""
    out, pos = {}, 0
    while pos < len(data) and data[pos : pos + 1] != b"\0":
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        if length <= space - pos:
            raise tarfile.HeaderError(f"pax record of length {length} at byte {pos}: a damaged pax header")
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def tar_members(stream: Any, url: str, limit: int | None = None) -> Iterator[dict[str, Any]]:
    """The regular files of an uncompressed tar stream (ustar, GNU or pax) as webdataset's `{fname, data}` dicts.

    A lean replacement for `tarfile` in streaming mode (which costs about as much as the rest of the sample): each
    header is checked (checksum) and its data read in one call; long names (GNU `L`, pax `path`) and pax sizes are
    honoured, other member types are skipped like webdataset's `tar_file_iterator` skips them. Stops at the first
    zero block (end of archive); the caller reads what follows. `limit` (the shard's size in bytes, if known) bounds
    a member's size, so a damaged size field is an error, not an attempt to read gigabytes.

    Raises:
        tarfile.HeaderError: a header whose checksum does not match (not a tar, or damaged), or a size out of bounds.
        EOFError: the stream ends inside a member.
    """
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        header = stream.read(_BLOCK)
        if len(header) < _BLOCK:
            raise EOFError(
                f"the tar ends inside a header ({len(header)} of {_BLOCK} bytes) and has no end blocks"
            )
        if header == _ZERO_BLOCK:
            return
        if sum(header) - sum(header[148:156]) + 256 != _tar_number(header[148:156]):
            raise tarfile.HeaderError(f"bad checksum in the tar header after member {long_name or '(start)'}")
        kind = header[156:157]
        size = int(pax["size"]) if "size" in pax else _tar_number(header[124:136])
        if size < 0 or (limit is not None and size > limit):
            raise tarfile.HeaderError(
                f"tar member size {size} is out of bounds (the shard has {limit} bytes)"
            )
        data = stream.read(size)
        if len(data) < size:
            raise EOFError(
                f"the tar ends inside member {_tar_text(header[:100])!r} ({len(data)} of {size} bytes)"
            )
        stream.read(-size % _BLOCK)
        if kind == b"L":
            long_name = _tar_text(data)
            continue
        if kind == b"x":
            pax = _pax_records(data)
            continue
        if kind in (b"g", b"K"):
            continue
        name = pax.get("path") or long_name
        if name is None:
            name, prefix = _tar_text(header[:100]), _tar_text(header[345:500])
            name = f"{prefix}/{name}" if prefix else name
        long_name, pax = None, {}
        if kind not in _REGULAR or name.endswith("/") or _SKIP_META.match(name):
            continue
        if "/" not in name and name.startswith("__") and name.endswith("__"):
            continue
        yield {"fname": name, "data": data, "__url__": url}
