"""WebDataset shards (CONTRACT section 2) written with Python's tarfile, byte-for-byte deterministic.

Each sample is three members: `<key>.climate.npy` (np.save of a float32 array, no pickle), `<key>.txt` (UTF-8) and
`<key>.json` (SampleMeta). Members carry a fixed mtime/uid/gid/mode and appear in sample order, so the same samples
always give the same bytes and the same sha256.

Atomicity on the store: a shard is built completely in memory and then written by `write_atomic`, which on a local
disk writes a temp sibling and renames it, and on an object store (S3, GCS, ...) issues one PUT to the final key (an
object store makes an object visible only once its upload is complete, so a reader never sees half a shard).

The reader (`iter_shard`) is what `verify` uses: it checks member names (no paths, no `..`, only the three contract
suffixes, every sample complete), decodes arrays with `allow_pickle=False`, and hashes the bytes as it streams.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np
from climate_text_schema import (
    ARRAY_DTYPE,
    CLIMATE_MEMBER,
    MAX_SHARD_BYTES,
    META_MEMBER,
    SAMPLE_MEMBERS,
    TEXT_MEMBER,
    HashingReader,
    SampleError,
    SampleMeta,
    ShardInfo,
    check_climate_array,
    decode_climate,
    decode_meta,
    decode_text,
    join_url,
    member_suffix_problem,
    shard_name,
)
from fsspec import AbstractFileSystem

from merra2_text_data.fs import fs_path, write_atomic

__all__ = [
    "SampleRecord",
    "ShardContent",
    "encode_sample",
    "estimate_sample_bytes",
    "iter_shard",
    "pack_by_size",
    "read_shard",
    "shard_bytes",
    "write_shard",
    "write_shards",
]

logger = logging.getLogger(__name__)

_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE
_MTIME = 0
_MODE = 0o644


@dataclass(frozen=True)
class SampleRecord:
    """One sample ready to be written: its key, climate array `[time, variable, lat, lon]`, text and metadata."""

    key: str
    array: np.ndarray
    text: str
    meta: SampleMeta


@dataclass
class ShardContent:
    """What `iter_shard`/`read_shard` found in a shard."""

    keys: list[str] = field(default_factory=list)
    sha256: str = ""
    bytes: int = 0


def _encode_meta(meta: SampleMeta) -> bytes:
    return (json.dumps(meta.model_dump(mode="json"), sort_keys=True, ensure_ascii=False) + "\n").encode(
        "utf-8"
    )


def _encode_array(array: np.ndarray, key: str) -> bytes:
    if array.dtype != ARRAY_DTYPE or array.ndim != 4:
        raise SampleError(
            f"sample {key!r}: climate array is {array.dtype} {array.shape}, expected float32 4-D"
        )
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def encode_sample(record: SampleRecord) -> list[tuple[str, bytes]]:
    """The three tar members of one sample, in contract order."""
    if record.meta.key != record.key:
        raise SampleError(f"sample {record.key!r}: its metadata names key {record.meta.key!r}")
    return [
        (f"{record.key}.{CLIMATE_MEMBER}", _encode_array(record.array, record.key)),
        (f"{record.key}.{TEXT_MEMBER}", record.text.encode("utf-8")),
        (f"{record.key}.{META_MEMBER}", _encode_meta(record.meta)),
    ]


def _member_bytes(size: int) -> int:
    return _BLOCK + math.ceil(size / _BLOCK) * _BLOCK


def _tar_size(member_sizes: Iterable[int]) -> int:
    raw = sum(_member_bytes(s) for s in member_sizes) + 2 * _BLOCK
    return math.ceil(raw / _RECORD) * _RECORD


def estimate_sample_bytes(shape: tuple[int, ...], text_bytes: int = 2048, meta_bytes: int = 4096) -> int:
    """Bytes one sample of this array shape takes in a shard (exact for the array; text/meta estimated)."""
    array = 128 + int(np.prod(shape)) * ARRAY_DTYPE.itemsize
    return _member_bytes(array) + _member_bytes(text_bytes) + _member_bytes(meta_bytes)


def pack_by_size(sizes: list[int], shard_size: int) -> list[list[int]]:
    """Group consecutive items into shards of at most `shard_size` bytes (an oversized item gets its own shard).

    Returns:
        Lists of item indices, one per shard, in order.
    """
    groups: list[list[int]] = []
    current: list[int] = []
    total = 2 * _BLOCK
    for i, size in enumerate(sizes):
        if current and total + size > shard_size:
            groups.append(current)
            current, total = [], 2 * _BLOCK
        current.append(i)
        total += size
    if current:
        groups.append(current)
    return groups


def shard_bytes(records: Iterable[SampleRecord]) -> tuple[bytes, list[str]]:
    """Build a deterministic tar of `records`; returns its bytes and the sample keys in order."""
    buf = io.BytesIO()
    keys: list[str] = []
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for record in records:
            if record.key in keys:
                raise SampleError(f"sample key {record.key!r} appears twice in one shard")
            keys.append(record.key)
            for name, data in encode_sample(record):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), _MTIME, _MODE
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue(), keys


def write_shard(
    fs: AbstractFileSystem, version_url: str, split: str, number: int, records: Iterable[SampleRecord]
) -> tuple[ShardInfo, list[str]]:
    """Write one shard `shards/<split>-<NNNNNN>.tar` under `version_url` atomically.

    Returns:
        The shard's record for the manifest and the keys it holds.
    """
    relative = shard_name(split, number)
    data, keys = shard_bytes(records)
    if len(data) > MAX_SHARD_BYTES:
        raise SampleError(
            f"{relative}: {len(data)} bytes ({len(keys)} sample(s)) is over the contract's largest shard "
            f"({MAX_SHARD_BYTES} bytes): readers verify a whole shard in memory; lower shard.shard_size, or use a "
            "smaller tile or window so one sample fits"
        )
    write_atomic(fs, join_url(version_url, relative), data)
    info = ShardInfo(
        path=relative,
        split=split,
        samples=len(keys),
        bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )
    logger.debug("wrote %s: %d samples, %d bytes", relative, info.samples, info.bytes)
    return info, keys


def write_shards(
    fs: AbstractFileSystem,
    version_url: str,
    split: str,
    records: Iterable[SampleRecord],
    shard_size: int,
    first_number: int = 0,
) -> list[tuple[ShardInfo, list[str]]]:
    """Write a stream of samples as consecutive shards, rolling to a new shard at `shard_size` bytes.

    Only one shard's samples are held in memory at a time.
    """
    out: list[tuple[ShardInfo, list[str]]] = []
    pending: list[SampleRecord] = []
    sizes: list[int] = []
    number = first_number
    for record in records:
        size = sum(len(d) for _, d in encode_sample(record))
        if pending and _tar_size([*sizes, size]) > shard_size:
            out.append(write_shard(fs, version_url, split, number, pending))
            number, pending, sizes = number + 1, [], []
        pending.append(record)
        sizes.append(size)
    if pending:
        out.append(write_shard(fs, version_url, split, number, pending))
    return out


def _check_name(name: str, shard: str) -> tuple[str, str]:
    if name.startswith("/") or "\\" in name or ".." in name.split("/") or "/" in name:
        raise SampleError(
            f"{shard}: member {name!r} is a path (absolute, '..' or a folder); shards hold flat names"
        )
    problem = member_suffix_problem(name, shard)
    if problem is not None:
        raise SampleError(problem)
    key, _, suffix = name.partition(".")
    return key, suffix


def iter_shard(
    stream: IO[bytes], shard: str = "shard", n_variables: int | None = None
) -> Iterator[dict[str, Any]]:
    """Stream the samples of a shard, checking names and decoding each member.

    Args:
        stream: a binary file object positioned at the start of the tar.
        shard: the shard's name for messages.
        n_variables: the manifest's number of variables (checked against each array) if given.

    Yields:
        {"key", "climate" (np.ndarray), "text" (str), "meta" (SampleMeta)} per sample.

    Raises:
        SampleError: a bad member name, an incomplete sample, or a member that does not decode.
    """
    current: dict[str, Any] = {}
    seen: set[str] = set()
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for info in tar:
                if not info.isfile():
                    raise SampleError(f"{shard}: member {info.name!r} is not a regular file")
                key, suffix = _check_name(info.name, shard)
                if current and current["key"] != key:
                    yield _finish(current, shard, n_variables)
                    current = {}
                if not current:
                    if key in seen:
                        raise SampleError(
                            f"{shard}: sample {key!r} appears twice (or its members are not together)"
                        )
                    seen.add(key)
                    current = {"key": key}
                handle = tar.extractfile(info)
                assert handle is not None
                current[suffix] = handle.read()
    except tarfile.TarError as exc:
        raise SampleError(f"{shard}: not a readable tar ({exc})") from exc
    if current:
        yield _finish(current, shard, n_variables)


def _finish(raw: dict[str, Any], shard: str, n_variables: int | None) -> dict[str, Any]:
    key = raw["key"]
    missing = [s for s in SAMPLE_MEMBERS if s not in raw]
    if missing:
        raise SampleError(f"{shard}: sample {key!r} lacks member(s) {', '.join(missing)}")
    array = decode_climate(raw[CLIMATE_MEMBER], key)
    problems = check_climate_array(array, n_variables)
    if problems:
        raise SampleError(f"{shard}: sample {key!r}: {'; '.join(problems)}")
    meta = decode_meta(raw[META_MEMBER], key)
    if meta.key != key:
        raise SampleError(f"{shard}: sample {key!r} has metadata for key {meta.key!r}")
    return {"key": key, "climate": array, "text": decode_text(raw[TEXT_MEMBER], key), "meta": meta}


def read_shard(fs: AbstractFileSystem, url: str, n_variables: int | None = None) -> ShardContent:
    """Re-read a whole shard: hash its bytes and decode every sample (memory: one sample at a time).

    Raises:
        SampleError: the shard's content breaks the sample contract (the message names the shard).
        FileNotFoundError: no object at `url`.
    """
    content = ShardContent()
    name = url.rsplit("/", 1)[-1]
    with fs.open(fs_path(fs, url), "rb") as raw:
        reader = HashingReader(raw)
        buffered = reader.buffered()
        for sample in iter_shard(buffered, name, n_variables):
            content.keys.append(sample["key"])
        reader.drain()
    content.sha256, content.bytes = reader.hexdigest(), reader.nbytes
    return content
