"""Streaming the contract's WebDataset shards into training batches.

The sample order of an epoch is a pure function of (seed, epoch, rank, world): shards are shuffled with
`seed + epoch`, dealt to ranks so their sample counts balance, read as tar streams through fsspec (local, file://,
s3://, ...), shuffled in a buffer seeded per (seed, epoch, rank), and cut or cycled to exactly
`floor(total / world)` samples so every rank runs the same number of steps. Resuming at a `DataPosition` replays the
epoch's stream and skips the samples already consumed, so the order from that batch on is reproduced exactly.

Each stage is an `Iterator -> Iterator` generator; `ClimateTextStream` wires them into an `IterableDataset` that
yields collated batches (so DataLoader workers each build whole batches, round-robin, in the same order as 0 workers).
With `lanes=L` (training) the rank's epoch is cut into L disjoint lanes (`lane_samples`, batch k from lane k % L) so
that DataLoader workers split the shards instead of each reading all of them; the order then depends on L (never on
the number of workers) and resumes exactly. See `ClimateTextStream`.

Speed (docs/performance.md, "Streaming"): tar members are read by a lean ustar/GNU/pax reader through the shared
`HashingReader` (sha256 in 1 MiB reads), `.npy` members in np.save's own float32 layout skip np.load's header parser,
one min/max pair clears the contract's NaN/fill check, a micro-batch's captions are tokenised in one call and their
ids kept for later epochs (`token_cache_mb`), and ids, labels and masks are built as numpy arrays.

Bad input: a shard that is truncated or fails its checksum always stops the run (`DataError` naming the shard). A bad
sample (a member named like a path, an array that is not a plain numeric .npy, a .json that is not the contract's
metadata, a missing member) stops it too, naming the shard and the sample, unless `skip_bad_samples`: then it is
logged, counted (`batch["skipped"]`) and left out before the epoch is cut, so every rank still sees its full epoch.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
import re
import tarfile
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
from climate_text_schema import (
    CLIMATE_MEMBER,
    FILL_VALUE,
    META_MEMBER,
    TEXT_MEMBER,
    ContractError,
    HashingReader,
    OpenedDataset,
    SampleError,
    ShardInfo,
    check_climate_array,
    check_sample_key,
    decode_climate,
    decode_meta,
    decode_text,
    open_dataset,
)
from webdataset.tariterators import group_by_keys

from .config import DEFAULT_PROMPT_TEMPLATE
from .encoder import STATS
from .errors import ConfigError, DataError

__all__ = [
    "DEFAULT_PROMPT", "ClimateTextStream", "DataPosition", "RawSample", "Sample", "assign_shards",
    "collate", "decode_sample", "encode_sample", "encode_texts", "epoch_samples", "iter_shard", "lane_samples",
    "open_shards", "per_rank_samples", "render_prompt", "shuffle_samples",
]  # fmt: skip

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = DEFAULT_PROMPT_TEMPLATE
"""Prompt template: `{example}` is a one-shot caption built from the train means, `{variables}` the variable names."""


@dataclass(frozen=True)
class DataPosition:
    """Where a rank stands in the data: samples consumed in `epoch` (the same on every rank), the data seed, and the
    number of lanes the epoch's order was cut into (`ClimateTextStream(lanes=...)`; 1 in checkpoints written before
    lanes existed)."""

    epoch: int = 0
    consumed: int = 0
    seed: int = 0
    lanes: int = 1

    def to_dict(self) -> dict[str, int]:
        """Plain dict for checkpoints."""
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DataPosition:
        """Inverse of `to_dict`."""
        return cls(
            epoch=int(raw["epoch"]), consumed=int(raw["consumed"]), seed=int(raw["seed"]),
            lanes=int(raw.get("lanes", 1)),
        )  # fmt: skip


@dataclass(frozen=True)
class Sample:
    """One decoded sample: normalised climate `(T, V, H, W)`, its text and (from its `.json`) its window statistics
    `(V, 3)` (mean, min, max per variable, normalised like the climate; None when the sample has no `.json`)."""

    key: str
    shard: str
    climate_x: np.ndarray
    text: str
    stats: np.ndarray | None = None


@dataclass(frozen=True)
class RawSample:
    """One sample as read from a shard: its members' bytes, or (once checked by `skip_bad_samples`) decoded."""

    key: str
    shard: str
    members: dict[str, bytes]
    decoded: Sample | None = None


BadSampleHook = Callable[[str, str, str], None]
"""`(shard, key, reason)`: called for each bad sample that is skipped instead of raised."""

_MEMBERS = (CLIMATE_MEMBER, TEXT_MEMBER, META_MEMBER)


def open_shards(ref: str, storage_options: dict[str, Any] | None = None) -> OpenedDataset:
    """Resolve a dataset reference through the shared contract.

    Args:
        ref: a version folder, a manifest.json URL or `ROOT/NAME@TAG` on any fsspec store.
        storage_options: fsspec options (default: the standard environment, e.g. AWS_ENDPOINT_URL).

    Returns:
        The opened dataset (manifest + shard URLs).

    Raises:
        DataError: the reference is malformed or resolves to nothing, the schema version is unsupported, or the
            manifest is damaged; the message is the contract's, which names the reference and the way out.
    """
    try:
        return open_dataset(ref, storage_options)
    except ContractError as exc:
        raise DataError(f"--shards {ref}: {exc}") from exc
    except (OSError, ValueError) as exc:
        raise DataError(f"--shards {ref}: cannot read the dataset ({type(exc).__name__}: {exc})") from exc


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


def _tar_members(stream: Any, url: str, limit: int | None = None) -> Iterator[dict[str, Any]]:
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


def _group_problem(group: dict[str, Any], key: str, url: str) -> str | None:
    """Why a group of tar members is not a sample (a key that is a path, a missing member), or None."""
    try:
        check_sample_key(key, f"shard {url}")
    except SampleError as exc:
        return str(exc)
    missing = [m for m in _MEMBERS if m not in group]
    if missing:
        return f"shard {url}: sample {key!r} lacks member(s) {', '.join(missing)}"
    return None


def iter_shard(
    ds: OpenedDataset, shard: ShardInfo, verify: bool = True, on_bad: BadSampleHook | None = None
) -> Generator[RawSample, None, None]:
    """Stream the samples of one shard, checking its sample count, size and (if `verify`) sha256 at its end.

    Members are only read into memory, never extracted: a member named like a path (`../../x.txt`) is refused by
    name.

    Args:
        ds: the opened dataset.
        shard: one of its shards.
        verify: check the sha256 (size and sample count are always checked).
        on_bad: called for a sample whose key is a path or that lacks a member, which is then left out; None:
            raise.

    Raises:
        DataError: the shard is missing, unreadable, truncated or fails its checks; a bad sample without `on_bad`.
    """
    url = ds.url_of(shard.path)
    n = 0
    try:
        with ds.fs.open(ds.fs._strip_protocol(url), "rb") as fh:
            reader = HashingReader(fh)  # hashes in 1 MiB reads under tarfile's 10 KiB ones
            files = _tar_members(reader.buffered(), url, limit=shard.bytes)
            for group in group_by_keys(files):
                key = str(group["__key__"])
                n += 1
                problem = _group_problem(group, key, url)
                if problem is not None:
                    if on_bad is None:
                        raise DataError(problem)
                    on_bad(shard.path, key, problem)
                    continue
                yield RawSample(key=key, shard=shard.path, members={m: group[m] for m in _MEMBERS})
            reader.drain()
    except DataError:
        raise
    except FileNotFoundError as exc:
        raise DataError(f"shard {url} listed in the manifest does not exist: re-publish the dataset") from exc
    except (tarfile.TarError, OSError, ValueError, EOFError) as exc:
        raise DataError(
            f"shard {url} is truncated or corrupt ({type(exc).__name__}: {exc}); re-publish it"
        ) from exc
    problems = []
    if n != shard.samples:
        problems.append(f"{n} samples where the manifest lists {shard.samples}")
    if reader.nbytes != shard.bytes:
        problems.append(f"{reader.nbytes} bytes where the manifest lists {shard.bytes}")
    if verify and reader.hexdigest() != shard.sha256:
        problems.append(f"sha256 {reader.hexdigest()} where the manifest lists {shard.sha256}")
    if problems:
        raise DataError(
            f"shard {url} fails its checks ({'; '.join(problems)}): it is truncated or was altered"
        )


def assign_shards(shards: list[ShardInfo], world: int, rng: random.Random) -> list[list[ShardInfo]] | None:
    """Shuffle shards and deal each to the rank with the fewest samples so far; None when a rank would get none."""
    if len(shards) < world:
        return None
    order = list(shards)
    rng.shuffle(order)
    out: list[list[ShardInfo]] = [[] for _ in range(world)]
    counts = [0] * world
    for shard in order:
        r = min(range(world), key=lambda i: (counts[i], i))
        out[r].append(shard)
        counts[r] += shard.samples
    return out if all(counts) else None


def per_rank_samples(ds: OpenedDataset, split: str, world: int) -> int:
    """Samples every rank sees per epoch: floor(total / world) from the manifest's counts."""
    total = sum(s.samples for s in ds.shards(split))
    return total // world


def shuffle_samples(samples: Iterator[RawSample], bufsize: int, rng: random.Random) -> Iterator[RawSample]:
    """A seeded shuffle buffer: fill `bufsize`, then emit a random element per incoming sample."""
    if bufsize <= 1:
        yield from samples
        return
    buf: list[RawSample] = []
    for sample in samples:
        buf.append(sample)
        if len(buf) >= bufsize:
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


def _take_cycled(make: Callable[[], Iterator[RawSample]], n: int) -> Iterator[RawSample]:
    """Exactly `n` samples: the stream, restarted from its beginning as often as needed, cut at `n`."""
    produced = 0
    while produced < n:
        before = produced
        for sample in make():
            yield sample
            produced += 1
            if produced >= n:
                return
        if produced == before:
            raise DataError("a rank's shards hold no samples; the dataset is empty")


def _rank_shards(
    shards: list[ShardInfo], *, epoch: int, rank: int, world: int, seed: int, shuffle: bool
) -> list[ShardInfo] | None:
    """The shards one rank reads in one epoch, in reading order; None: strided (every rank reads every shard)."""
    rng = random.Random(seed + epoch)
    if world == 1:
        return rng.sample(shards, len(shards)) if shuffle else list(shards)
    if shuffle:
        assigned = assign_shards(shards, world, rng)
        return None if assigned is None else assigned[rank]
    return None


def epoch_samples(
    ds: OpenedDataset,
    split: str,
    *,
    epoch: int,
    rank: int,
    world: int,
    seed: int,
    shuffle: bool,
    shuffle_buffer: int = 256,
    verify: bool = True,
    on_bad: BadSampleHook | None = None,
) -> Iterator[RawSample]:
    """The raw samples one rank sees in one epoch: exactly `per_rank_samples` of them, disjoint across ranks.

    Training (`shuffle`): shards are shuffled with `seed + epoch` and dealt to ranks, balanced by sample count; a
    rank short of samples cycles its own shards, one with extra is cut. Evaluation, or fewer shards than ranks: every
    rank reads every shard in manifest order and keeps every `world`-th sample.

    With `on_bad`, every sample is decoded here (`decode_sample`) and a bad one is reported to `on_bad` and left out
    before the count is cut, so the epoch stays full; the samples come back decoded.
    """
    shards = ds.shards(split)
    n = per_rank_samples(ds, split, world)
    if n == 0:
        return
    mine = _rank_shards(shards, epoch=epoch, rank=rank, world=world, seed=seed, shuffle=shuffle)
    if mine is None:  # evaluation, or fewer shards than ranks: strided over every shard

        def make() -> Iterator[RawSample]:
            for i, sample in enumerate(s for shard in shards for s in _read(ds, shard, verify, on_bad)):
                if i % world == rank:
                    yield sample

    else:

        def make() -> Iterator[RawSample]:
            return (s for shard in mine for s in _read(ds, shard, verify, on_bad))

    def shuffled() -> Iterator[RawSample]:
        if not shuffle:
            return make()
        return shuffle_samples(make(), shuffle_buffer, random.Random(f"{seed}/{epoch}/{rank}"))

    yield from _take_cycled(shuffled, n)


def _read(
    ds: OpenedDataset, shard: ShardInfo, verify: bool, on_bad: BadSampleHook | None
) -> Iterator[RawSample]:
    """One shard's samples; with `on_bad`, decoded, the bad ones reported and left out."""
    samples = iter_shard(ds, shard, verify, on_bad)
    if on_bad is None:
        yield from samples
        return
    for raw in samples:
        try:
            decoded = decode_sample(raw, ds)
        except DataError as exc:
            on_bad(raw.shard, raw.key, str(exc))
            continue
        yield replace(raw, members={}, decoded=decoded)


def lane_samples(
    ds: OpenedDataset,
    split: str,
    *,
    epoch: int,
    rank: int,
    world: int,
    seed: int,
    lane: int,
    lanes: int,
    micro_batch: int,
    shuffle_buffer: int = 256,
    verify: bool = True,
) -> Iterator[RawSample]:
    """The training samples of one lane of one rank's epoch, shuffled; batch `k` of the epoch is lane `k % lanes`'s.

    The rank's epoch is its shards as `epoch_samples` reads them (shuffled with `seed + epoch`, dealt to ranks,
    cycled when short), cut to whole micro-batches, then into `lanes` consecutive runs: lane `l` gets `micro_batch`
    samples for each batch `k < batches_per_epoch` with `k % lanes == l`, and shuffles them in its own seeded buffer.
    So the lanes are disjoint, their union is the epoch, and a lane reads only the shards its run touches: DataLoader
    workers that each serve their own lanes split the shards between them. A shard split between two lanes is read
    by both; the lane holding its last sample reads it to the end and checks its sample count, size and sha256, the
    other stops after its part.

    Raises:
        DataError: a shard is missing, damaged or fails its checks, a bad sample, or the rank's shards are empty.
    """
    shards = ds.shards(split)
    batches = per_rank_samples(ds, split, world) // micro_batch
    mine = _rank_shards(shards, epoch=epoch, rank=rank, world=world, seed=seed, shuffle=True)
    sizes = [len(range(lane_, batches, lanes)) * micro_batch for lane_ in range(lanes)]
    pieces = _lane_pieces(_segments(shards, mine, rank, world), sizes)[lane]
    rng = random.Random(f"{seed}/{epoch}/{rank}/lane{lane}of{lanes}")
    yield from shuffle_samples(_read_pieces(ds, pieces, verify), shuffle_buffer, rng)


_Piece = tuple[ShardInfo, range, bool]
"""(shard, indices of its samples to keep, read it to the end and check it)."""


def _segments(
    shards: list[ShardInfo], mine: list[ShardInfo] | None, rank: int, world: int
) -> list[tuple[ShardInfo, range]]:
    """One pass over a rank's samples as (shard, sample indices): its own shards, or every `world`-th sample."""
    if mine is not None:
        return [(s, range(s.samples)) for s in mine if s.samples]
    out, first = [], 0
    for s in shards:
        indices = range(
            (rank - first) % world, s.samples, world
        )  # global index first + i == rank (mod world)
        if len(indices):
            out.append((s, indices))
        first += s.samples
    return out


def _lane_pieces(cycle: list[tuple[ShardInfo, range]], sizes: list[int]) -> list[list[_Piece]]:
    """Cut `cycle`, repeated as often as needed, into consecutive runs of `sizes` samples, one list per lane."""
    total = sum(sizes)
    if total and not cycle:
        raise DataError("a rank's shards hold no samples; the dataset is empty")
    flat: list[
        tuple[int, ShardInfo, range]
    ] = []  # (occurrence, shard, indices): the cycled pass, cut at total
    taken = 0
    while taken < total:
        for shard, indices in cycle:
            part = indices[: total - taken]
            flat.append((len(flat), shard, part))
            taken += len(part)
            if taken >= total:
                break
    cut: list[list[tuple[int, ShardInfo, range]]] = []
    i, offset = 0, 0
    for size in sizes:
        pieces: list[tuple[int, ShardInfo, range]] = []
        while size:
            occurrence, shard, indices = flat[i]
            part = indices[offset : offset + size]
            pieces.append((occurrence, shard, part))
            size -= len(part)
            offset += len(part)
            if offset == len(indices):
                i, offset = i + 1, 0
        cut.append(pieces)
    ends = [p for pieces in cut for p in pieces]
    last = {occurrence: n for n, (occurrence, _, _) in enumerate(ends)}  # last piece of each occurrence
    out, n = [], 0
    for pieces in cut:
        lane: list[_Piece] = []
        for occurrence, shard, part in pieces:
            lane.append((shard, part, last[occurrence] == n))
            n += 1
        out.append(lane)
    return out


def _read_pieces(ds: OpenedDataset, pieces: list[_Piece], verify: bool) -> Iterator[RawSample]:
    """The samples of each piece, in order; a piece that is not its shard's end stops reading after its part."""
    for shard, indices, to_end in pieces:
        samples = iter_shard(ds, shard, verify)
        try:
            for i, raw in enumerate(samples):
                if i in indices:
                    yield raw
                if not to_end and i >= indices[-1]:
                    break
        finally:
            samples.close()


def decode_sample(raw: RawSample, ds: OpenedDataset) -> Sample:
    """Decode (allow_pickle=False), check against the contract and normalise `(x - mean) / std` per variable.

    The `.json` member, when present, must be the contract's metadata of this very key.

    Raises:
        DataError: the sample breaks the contract or the manifest lacks normalisation for a variable.
    """
    return _decode(raw, ds, _norm_arrays(ds))


def _norm_arrays(ds: OpenedDataset) -> tuple[np.ndarray, np.ndarray]:
    """The manifest's per-variable (mean, std), each shaped `(1, V, 1, 1)` float32."""
    manifest = ds.manifest
    names = manifest.variable_names
    missing = [v for v in names if v not in manifest.normalization]
    if missing:
        raise DataError(f"dataset {ds.version_url}: manifest has no normalization for {', '.join(missing)}")
    mean = np.array([manifest.normalization[v].mean for v in names], dtype=np.float32)[None, :, None, None]
    std = np.array([manifest.normalization[v].std for v in names], dtype=np.float32)[None, :, None, None]
    return mean, std


_NPY_HEADER = re.compile(
    rb"\{'descr': '<f4', 'fortran_order': False, 'shape': \((\d+), (\d+), (\d+), (\d+)\), \} *\n"
)
"""The header `np.save` writes for a C-order little-endian float32 4-D array (.npy format 1.0)."""


def _load_climate(data: bytes, key: str) -> np.ndarray:
    """`decode_climate`, with a fast path for exactly what `np.save` writes for the contract's arrays.

    The fast path reads the raw float32 values after a header that matches `_NPY_HEADER` and a size that matches its
    shape (never unpickling anything); every other payload goes through the contract's `decode_climate`.
    """
    if data[:8] == b"\x93NUMPY\x01\x00":
        end = 10 + int.from_bytes(data[8:10], "little")
        match = _NPY_HEADER.fullmatch(data, 10, end)
        if match is not None:
            shape = tuple(int(g) for g in match.groups())
            count = math.prod(shape)
            if len(data) == end + 4 * count:
                return np.frombuffer(data, dtype="<f4", count=count, offset=end).reshape(shape)
    return decode_climate(data, key)


def _decode(raw: RawSample, ds: OpenedDataset, norm: tuple[np.ndarray, np.ndarray]) -> Sample:
    if raw.decoded is not None:
        return raw.decoded
    n_variables = len(ds.manifest.variables)
    try:
        array = _load_climate(raw.members[CLIMATE_MEMBER], raw.key)
        text = decode_text(raw.members[TEXT_MEMBER], raw.key).strip()
        meta = decode_meta(raw.members[META_MEMBER], raw.key) if META_MEMBER in raw.members else None
    except ContractError as exc:
        raise DataError(f"shard {raw.shard}: {exc}") from exc
    if meta is not None and meta.key != raw.key:
        raise DataError(f"shard {raw.shard}: sample {raw.key!r} carries the metadata of {meta.key!r}")
    limit = FILL_VALUE * 0.5
    plain = array.dtype == np.float32 and array.ndim == 4 and array.size and array.shape[1] == n_variables
    # min/max propagate NaN, so one pair of reductions clears the usual case; anything else gets the full check
    if not (plain and -limit < array.min() and array.max() < limit):
        problems = check_climate_array(array, n_variables)
        if problems:
            raise DataError(
                f"shard {raw.shard}: sample {raw.key!r} breaks the contract: {'; '.join(problems)}"
            )
    mean, std = norm
    climate = np.subtract(array, mean, dtype=np.float32)
    climate /= std
    stats = _normalised_stats(meta.stats, ds, raw, norm) if meta is not None else None
    return Sample(key=raw.key, shard=raw.shard, climate_x=climate, text=text, stats=stats)


def _normalised_stats(
    stats: dict[str, dict[str, float]], ds: OpenedDataset, raw: RawSample, norm: tuple[np.ndarray, np.ndarray]
) -> np.ndarray:
    """The `.json` stats as `(V, 3)` float32 (mean, min, max per variable in manifest order), normalised."""
    try:
        values = [[stats[v][k] for k in STATS] for v in ds.manifest.variable_names]
    except KeyError as exc:
        raise DataError(
            f"shard {raw.shard}: sample {raw.key!r} has no {exc.args[0]!r} in its .json stats; the contract gives "
            f"{{variable: {{mean, min, max}}}} for every variable {ds.manifest.variable_names}"
        ) from exc
    mean, std = norm
    return (np.array(values, dtype=np.float32) - mean.reshape(-1, 1)) / std.reshape(-1, 1)


def render_prompt(template: str, ds: OpenedDataset, caption: str = "full") -> str:
    """Fill the prompt template from the manifest: a one-shot example whose numbers are the train means.

    `{example}` lists the train mean of every variable in its units; `{caption_example}` is a compact caption in the
    dataset's own phrasing (`grounding.example_caption`) with the train means as its numbers, cut to the `caption`
    form the run trains on (`grounding.caption_target`).
    """
    from .grounding import caption_target, example_caption

    manifest = ds.manifest
    parts = []
    for v in manifest.variables:
        stats = manifest.normalization.get(v.name)
        if stats is not None:
            parts.append(f"mean {v.name} {stats.mean:.4g} {v.units}")
    example = "; ".join(parts) + "."
    norm = {v: (s.mean, s.std) for v, s in manifest.normalization.items()}
    try:
        return template.format(
            example=example, variables=", ".join(manifest.variable_names),
            caption_example=caption_target(example_caption(norm, manifest.window), "numbers" if caption == "full"
                                           else caption) if "{caption_example}" in template else "",
        )  # fmt: skip
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(
            f"prompt_template {template!r} is invalid ({exc}): use only {{example}}, {{caption_example}} and "
            "{variables}"
        ) from exc


def encode_sample(
    text: str, prompt_ids: list[int], tokenizer: Any, max_length: int
) -> tuple[list[int], list[int]]:
    """Token ids of prompt + caption + EOS and labels with the prompt masked (-100), truncated to `max_length`."""
    return encode_texts([text], prompt_ids, tokenizer, max_length)[0]


def encode_texts(
    texts: Sequence[str], prompt_ids: list[int], tokenizer: Any, max_length: int
) -> list[tuple[list[int], list[int]]]:
    """`encode_sample` for several captions with one tokenizer call (a fast tokenizer encodes them as one batch)."""
    if not texts:
        return []
    captions = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    eos = [int(tokenizer.eos_token_id)] if tokenizer.eos_token_id is not None else []
    masked = [-100] * len(prompt_ids)
    out = []
    for caption in captions:
        tail = [*caption, *eos]
        out.append(((prompt_ids + tail)[:max_length], (masked + tail)[:max_length]))
    return out


def _rows(rows: list[list[int]], fill: int) -> np.ndarray:
    """Right-pad int rows with `fill` into one `(B, L)` int64 array (filled through one boolean mask)."""
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    out = np.full((len(rows), int(lengths.max(initial=0))), fill, dtype=np.int64)
    out[np.arange(out.shape[1]) < lengths[:, None]] = np.fromiter(
        itertools.chain.from_iterable(rows), dtype=np.int64, count=int(lengths.sum())
    )
    return out


def collate(samples: list[Sample], encoded: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, Any]:
    """Stack climate `(B, T, V, H, W)`, right-pad ids (mask 0, labels -100), keep keys and texts.

    Tiles of one dataset may differ in grid size (the builder keeps partial edge tiles of at least half a tile): the
    climate of a batch is padded to its largest H and W with 0, which in normalised units is the train mean. Samples
    whose time steps or variables differ cannot share a batch.
    """
    id_rows = [ids for ids, _ in encoded]
    input_ids = _rows(id_rows, pad_id)  # (B, L)
    lengths = np.fromiter(map(len, id_rows), dtype=np.int64, count=len(id_rows))
    mask = (np.arange(input_ids.shape[1]) < lengths[:, None]).astype(np.int64)  # (B, L)
    labels = np.full_like(input_ids, -100)  # (B, L)
    label_rows = _rows([lab for _, lab in encoded], -100)
    n_labels = min(label_rows.shape[1], input_ids.shape[1])
    labels[:, :n_labels] = label_rows[:, :n_labels]
    return _batch(samples, _stack_climate(samples), input_ids, labels, mask)


def _stack_climate(samples: list[Sample]) -> np.ndarray:
    """`(B, T, V, H, W)`, smaller grids padded with 0; refuses samples whose (time, variable) shapes differ."""
    shapes = {s.climate_x.shape for s in samples}
    if len({shape[:2] for shape in shapes}) > 1:
        keys = ", ".join(s.key for s in samples)
        raise DataError(
            f"samples {keys} have different (time, variable) shapes {sorted(shapes)}; one batch needs one "
            "window, time step and variable list"
        )
    if len(shapes) == 1:
        return np.stack([s.climate_x for s in samples])
    height, width = max(shape[2] for shape in shapes), max(shape[3] for shape in shapes)
    stacked = np.zeros((len(samples), *samples[0].climate_x.shape[:2], height, width), dtype=np.float32)
    for i, s in enumerate(samples):
        stacked[i, :, :, : s.climate_x.shape[2], : s.climate_x.shape[3]] = s.climate_x
    return stacked


def _batch(
    samples: list[Sample], climate: np.ndarray, input_ids: np.ndarray, labels: np.ndarray, mask: np.ndarray
) -> dict[str, Any]:
    batch: dict[str, Any] = {
        "climate_x": torch.from_numpy(climate),  # (B, T, V, H, W)
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(mask),
        "labels": torch.from_numpy(labels),
        "keys": [s.key for s in samples],
        "texts": [s.text for s in samples],
    }
    if all(s.stats is not None for s in samples):
        batch["stats"] = torch.from_numpy(np.stack([s.stats for s in samples]))  # type: ignore[misc]  # (B, V, 3)
    return batch


class ClimateTextStream(torch.utils.data.IterableDataset):
    """Collated batches of one split for one rank; infinite over epochs (training) or one pass (evaluation).

    Each batch carries `position`: the `DataPosition` right after it, for checkpoints.

    DataLoader workers: batch `i` of the iterator is built by worker `i % num_workers` (the order DataLoader hands
    batches back in). With `lanes=1` (the default) every worker reads every shard of the rank's epoch and builds only
    its own batches, so the batches are those of 0 workers. With `lanes=L` (training only) the epoch's order is cut
    into L lanes (`lane_samples`: batch k comes from lane k % L, each lane a disjoint run of the rank's shards with its
    own shuffle buffer); a worker reads only the lanes its batches come from, so with `num_workers == lanes` each
    worker reads about 1/L of the shards. The order then depends on `lanes` but not on `num_workers` (0 workers read
    all lanes themselves and give the same batches), it is as deterministic, and resuming at a position continues it
    exactly, provided the resumed stream has the same `lanes` and `micro_batch` (checked).

    `token_cache_mb`: the token ids of captions already tokenised are kept (int32, up to this many MiB per stream,
    about 35,000 captions of 300 tokens at the default; 0 turns it off), so epochs after the first skip tokenisation.
    The batches are the same either way.
    """

    def __init__(
        self, ds: OpenedDataset, split: str, tokenizer: Any, *, prompt: str, micro_batch: int, max_length: int,
        rank: int = 0, world: int = 1, seed: int = 0, start: DataPosition | None = None, train: bool = True,
        shuffle_buffer: int = 256, verify: bool = True, caption: str = "full", skip_bad_samples: bool = False,
        lanes: int = 1, token_cache_mb: float = 64.0,
    ) -> None:  # fmt: skip
        super().__init__()
        if caption not in ("full", "numbers", "temperature"):
            raise ConfigError(f"caption {caption!r} is unknown; use 'full', 'numbers' or 'temperature'")
        if lanes < 1:
            raise ConfigError(f"lanes {lanes} must be at least 1 (1: one shuffled stream per rank)")
        if lanes > 1 and train and skip_bad_samples:
            raise ConfigError(
                f"lanes {lanes} cannot be combined with skip_bad_samples (each worker would count only the bad "
                "samples of its own lanes): use lanes 1 or drop skip_bad_samples"
            )
        self.caption = caption
        self.ds, self.split, self.tokenizer = ds, split, tokenizer
        self.micro_batch, self.max_length = micro_batch, max_length
        self.rank, self.world, self.seed, self.train = rank, world, seed, train
        self.shuffle_buffer, self.verify, self.skip_bad_samples = shuffle_buffer, verify, skip_bad_samples
        self.lanes = lanes if train else 1
        self.start = start or DataPosition(seed=seed, lanes=self.lanes)
        if (self.start.epoch, self.start.consumed) != (0, 0) and self.start.lanes != self.lanes:
            raise ConfigError(
                f"the data position {self.start.to_dict()} was taken with lanes {self.start.lanes}, this stream has "
                f"lanes {self.lanes}: resume with the same lanes"
            )
        self.per_rank = per_rank_samples(ds, split, world)
        self.prompt_ids = list(tokenizer(prompt)["input_ids"])
        if len(self.prompt_ids) >= max_length:
            raise ConfigError(
                f"max_length {max_length} leaves no room for the caption: the prompt alone is {len(self.prompt_ids)} "
                "tokens; raise max_length or shorten prompt_template"
            )
        if train and self.per_rank < micro_batch:
            raise ConfigError(
                f"micro_batch {micro_batch} does not fit split {split!r}: {self.per_rank} sample(s) per rank per epoch "
                f"({sum(s.samples for s in ds.shards(split))} total over {world} rank(s)); lower micro_batch or nproc"
            )
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad if pad is not None else 0)
        self._norm: tuple[np.ndarray, np.ndarray] | None = None
        self._tokens: dict[str, np.ndarray] = {}  # target text -> caption ids + EOS, int32 (`_caption_ids`)
        self._token_room = int(token_cache_mb * (1 << 20))

    def target_text(self, text: str) -> str:
        """The text the model learns to write: the caption, or a compact form of it (`grounding.caption_target`)."""
        from .grounding import caption_target

        return caption_target(text, self.caption)

    @property
    def batches_per_epoch(self) -> int:
        """Batches each rank yields per epoch (the same on every rank)."""
        if self.train:
            return self.per_rank // self.micro_batch
        return -(-self.per_rank // self.micro_batch)

    def _batches(
        self, epoch: int, skip: int, on_bad: BadSampleHook | None = None
    ) -> Iterator[tuple[int, list[RawSample]]]:
        samples = epoch_samples(
            self.ds, self.split, epoch=epoch, rank=self.rank, world=self.world, seed=self.seed,
            shuffle=self.train, shuffle_buffer=self.shuffle_buffer, verify=self.verify, on_bad=on_bad,
        )  # fmt: skip
        # training drops the last partial batch (every step has micro_batch samples); evaluation keeps it
        limit = self.batches_per_epoch * self.micro_batch if self.train else self.per_rank
        batch: list[RawSample] = []
        for i, raw in enumerate(samples):
            if i >= limit:
                break
            if i < skip:
                continue
            batch.append(raw)
            if len(batch) == self.micro_batch or i == limit - 1:
                yield i + 1, batch
                batch = []

    def _lane_batches(
        self, epoch: int, skip: int, mine: Callable[[int], bool]
    ) -> Iterator[tuple[int, list[RawSample] | None]]:
        """(consumed, raw samples) of each training batch k >= skip / micro_batch; None for a batch `mine(k)` rejects
        (a lane is only read when one of its batches is wanted)."""
        mb, lanes = self.micro_batch, self.lanes
        if skip % mb:
            raise ConfigError(
                f"the data position consumed {skip} samples, not a multiple of micro_batch {mb}: resume with the "
                "micro_batch the checkpoint was trained with"
            )
        streams: dict[int, Iterator[RawSample]] = {}
        read: dict[int, int] = {}  # samples taken from each lane so far
        for k in range(skip // mb, self.batches_per_epoch):
            if not mine(k):
                yield (k + 1) * mb, None
                continue
            lane, q = k % lanes, k // lanes
            if lane not in streams:
                streams[lane] = lane_samples(
                    self.ds, self.split, epoch=epoch, rank=self.rank, world=self.world, seed=self.seed, lane=lane,
                    lanes=lanes, micro_batch=mb, shuffle_buffer=self.shuffle_buffer, verify=self.verify,
                )  # fmt: skip
                read[lane] = 0
            stream = streams[lane]
            for _ in itertools.islice(
                stream, q * mb - read[lane]
            ):  # batches of this lane other workers build
                pass
            batch = list(itertools.islice(stream, mb))
            read[lane] = (q + 1) * mb
            if len(batch) != mb:  # an internal invariant: lane_samples yields exactly its share
                raise DataError(
                    f"lane {lane} of rank {self.rank} ran out of samples at batch {k} of epoch {epoch}"
                )
            yield (k + 1) * mb, batch

    def _collate_raw(self, raws: list[RawSample]) -> dict[str, Any]:
        """Decode, check and normalise each sample, tokenise the captions (one call for the batch) and collate:
        the same batch as `collate(decoded, encode_texts(...), pad_id)`, built from numpy arrays."""
        if self._norm is None:
            self._norm = _norm_arrays(self.ds)
        decoded = [_decode(r, self.ds, self._norm) for r in raws]
        texts = (
            [s.text for s in decoded]
            if self.caption == "full"
            else [self.target_text(s.text) for s in decoded]
        )
        captions = self._caption_ids(texts)
        n_prompt = len(self.prompt_ids)
        lengths = [min(n_prompt + len(c), self.max_length) for c in captions]
        input_ids = np.full((len(captions), max(lengths)), self.pad_id, dtype=np.int64)  # (B, L)
        labels = np.full_like(input_ids, -100)  # (B, L)
        input_ids[:, :n_prompt] = self.prompt_ids
        for i, (caption, length) in enumerate(zip(captions, lengths, strict=True)):
            input_ids[i, n_prompt:length] = labels[i, n_prompt:length] = caption[: length - n_prompt]
        mask = (np.arange(input_ids.shape[1]) < np.array(lengths)[:, None]).astype(np.int64)  # (B, L)
        return _batch(decoded, _stack_climate(decoded), input_ids, labels, mask)

    def _caption_ids(self, texts: list[str]) -> list[np.ndarray]:
        """Caption ids + EOS of each text: tokenised in one call, and kept (up to `token_cache_mb`) for later epochs,
        so an epoch whose captions were all seen before costs no tokenisation."""
        cache = self._tokens
        todo = list(dict.fromkeys(t for t in texts if t not in cache))
        fresh: dict[str, np.ndarray] = {}
        if todo:
            eos = [] if self.tokenizer.eos_token_id is None else [int(self.tokenizer.eos_token_id)]
            for text, ids in zip(
                todo, self.tokenizer(todo, add_special_tokens=False)["input_ids"], strict=True
            ):
                fresh[text] = array = np.array([*ids, *eos], dtype=np.int32)
                cost = array.nbytes + len(text) + 200  # ids, key and the dict's own overhead, roughly
                if cost <= self._token_room:
                    cache[text] = array
                    self._token_room -= cost
        return [cache[t] if t in cache else fresh[t] for t in texts]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, skip = self.start.epoch, self.start.consumed
        if self.train and skip >= self.batches_per_epoch * self.micro_batch:
            epoch, skip = epoch + 1, 0
        bad: set[tuple[str, str]] = (
            set()
        )  # (shard, key) of each bad sample left out (an epoch may meet one twice)

        def on_bad(shard: str, key: str, reason: str) -> None:
            if (shard, key) not in bad:
                bad.add((shard, key))
                logger.warning("skipped bad sample %r of %s (%d so far, rank %d): %s", key, shard, len(bad),
                               self.rank, reason)  # fmt: skip

        j = 0  # index of the next batch of this iterator, over all workers
        while True:
            batches: Iterator[tuple[int, list[RawSample] | None]]
            if self.lanes > 1:
                offset = j - skip // self.micro_batch  # iterator index of the epoch's batch k: offset + k

                def mine(k: int, offset: int = offset) -> bool:
                    return (offset + k) % workers == worker

                batches = self._lane_batches(epoch, skip, mine)
            else:
                batches = self._batches(epoch, skip, on_bad if self.skip_bad_samples else None)
            for consumed, raws in batches:
                if raws is not None and j % workers == worker:
                    batch = self._collate_raw(raws)
                    batch["position"] = DataPosition(
                        epoch=epoch, consumed=consumed, seed=self.seed, lanes=self.lanes
                    ).to_dict()
                    batch["skipped"] = len(bad)  # distinct bad samples this rank's stream has left out so far
                    yield batch
                j += 1
            if not self.train:
                return
            epoch, skip = epoch + 1, 0
