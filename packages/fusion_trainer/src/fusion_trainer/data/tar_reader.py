"""A lean reader of the regular-file members of an uncompressed tar stream (ustar, GNU or pax).

It replaces `tarfile` in streaming mode, which costs about as much as the rest of a sample (docs/performance.md,
"Streaming"): members are sliced out of the shard's bytes by offset, every header checksum checked in one numpy pass.
`shard_reader.iter_shard` runs `tar_samples` over the bytes of a shard it already checked: the members grouped into
samples exactly as webdataset's `group_by_keys` groups them.
"""

from __future__ import annotations

import logging
import re
import tarfile
from collections.abc import Iterator
from typing import Any

import numpy as np

__all__: list[str] = []  # package-internal: `shard_reader.iter_shard` is the public way to read a shard

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


def tar_members(data: bytes | memoryview, url: str, limit: int | None = None) -> Iterator[dict[str, Any]]:
    """The regular files of an uncompressed tar archive held in memory (ustar, GNU or pax), as webdataset's
    `{fname, data}` dicts.

    A lean replacement for `tarfile` in streaming mode (which costs about as much as the rest of the sample): members
    are `memoryview` slices of `data` (no copy: the shard's bytes stay alive while any member of it does); long names (GNU `L`, pax `path`) and pax sizes are honoured, other member types
    are skipped like webdataset's `tar_file_iterator` skips them. Stops at the first zero block (end of archive).
    `limit` (the shard's size in bytes, if known) bounds a member's size, so a damaged size field is an error, not an
    attempt to read gigabytes. Every header's checksum is checked, all of them in one numpy pass once the archive has
    been walked (no member is handed out before), since a checksum per header in Python cost a tenth of a sample.

    Raises:
        tarfile.HeaderError: a header whose checksum does not match (not a tar, or damaged), or a size out of bounds.
        EOFError: the archive ends inside a member or has no end-of-archive block.
    """
    members: list[dict[str, Any]] = []
    headers: list[int] = []  # offset of every header read, checked together at the end
    long_name: str | None = None
    pax: dict[str, str] = {}
    pos, end, view = 0, len(data), memoryview(data)
    try:
        while True:
            header = view[pos : pos + _BLOCK].tobytes()
            if len(header) < _BLOCK:
                raise EOFError(
                    f"the tar ends inside a header ({len(header)} of {_BLOCK} bytes) and has no end blocks"
                )
            if header == _ZERO_BLOCK:
                break
            headers.append(pos)
            kind = header[156:157]
            size = int(pax["size"]) if "size" in pax else _tar_number(header[124:136])
            if size < 0 or (limit is not None and size > limit):
                raise tarfile.HeaderError(
                    f"tar member size {size} is out of bounds (the shard has {limit} bytes)"
                )
            start = pos + _BLOCK
            if start + size > end:
                raise EOFError(
                    f"the tar ends inside member {_tar_text(header[:100])!r} ({end - start} of {size} bytes)"
                )
            pos = start + size + (-size % _BLOCK)
            if kind == b"L":
                long_name = _tar_text(view[start : start + size].tobytes())
                continue
            if kind == b"x":
                pax = _pax_records(view[start : start + size].tobytes())
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
            members.append({"fname": name, "data": view[start : start + size], "__url__": url})
    finally:  # a damaged header is named as such, before anything it led to
        _check_sums(data, headers)
    yield from members


def _check_sums(data: bytes | memoryview, offsets: list[int]) -> None:
    """Raise `tarfile.HeaderError` for the first header at `offsets` whose checksum does not match its bytes."""
    if not offsets:
        return
    blocks = np.frombuffer(data, dtype=np.uint8, count=len(data) // _BLOCK * _BLOCK).reshape(-1, _BLOCK)  # a view
    rows = np.array(offsets) // _BLOCK  # headers start on block boundaries
    for start in range(0, len(rows), _SUM_BATCH):  # a bounded copy of headers at a time, however many members
        part = rows[start : start + _SUM_BATCH]
        headers = blocks[part]  # (n, 512)
        fields = headers[:, 148:156]  # the checksum field counts as 8 spaces
        sums = headers.sum(axis=1, dtype=np.int64) - fields.sum(axis=1, dtype=np.int64) + 8 * 32
        for i in np.flatnonzero(sums != [_stored_sum(bytes(f)) for f in fields]):
            k = start + int(i)
            before = "(start)" if k == 0 else repr(_tar_text(bytes(data[offsets[k - 1] : offsets[k - 1] + 100])))
            raise tarfile.HeaderError(f"bad checksum in the tar header after member {before}")


_SUM_BATCH = 4096


def _stored_sum(field: bytes) -> int:
    try:
        return _tar_number(field)
    except tarfile.HeaderError:
        return -1


_KEY_SUFFIX = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
"""webdataset's `base_plus_ext`: the key is the name up to the first dot after its last slash."""


def tar_samples(data: bytes | memoryview, url: str, limit: int | None = None) -> list[dict[str, Any]]:
    """The members of `data` grouped into samples, exactly as webdataset's `group_by_keys(tar_members(...))` groups
    them: consecutive members with the same key form one `{"__key__", "__url__", suffix: bytes}` dict, suffixes
    lower-cased, a name without a suffix skipped.

    Raises:
        ValueError: a suffix appears twice in one sample (webdataset's "duplicate file name").
        tarfile.HeaderError, EOFError: as `tar_members`.
    """
    samples: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    for member in tar_members(data, url, limit):
        match = _KEY_SUFFIX.match(member["fname"])
        if match is None:
            continue
        key, suffix = match.group(1), match.group(2).lower()
        if current is None or key != current["__key__"]:
            current = {"__key__": key, "__url__": url}
            samples.append(current)
        if suffix in current:
            raise ValueError(f"{member['fname']}: duplicate file name in tar file {suffix} {current.keys()}")
        current[suffix] = member["data"]
    return samples
