"""Reading a dataset's shards and dealing them out: one shard's samples, checked whole first (`iter_shard`), the balanced
assignment of shards to ranks, the seeded shuffle buffer, and one rank's epoch (`epoch_samples`).

The sample order of an epoch is a pure function of (seed, epoch, rank, world): see `epoch_samples`. The lane cut of
a rank's epoch (DataLoader workers reading disjoint shards) is in `lanes.py`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import tarfile
import threading
from collections.abc import Callable, Generator, Iterator
from dataclasses import replace
from typing import Any

from climate_text_schema import (
    CLIMATE_MEMBER,
    MAX_SHARD_BYTES,
    META_MEMBER,
    READ_SIZE,
    TEXT_MEMBER,
    ContractError,
    OpenedDataset,
    SampleError,
    ShardInfo,
    check_sample_key,
    member_suffix_problem,
    open_dataset,
)
from climate_text_schema.captions import check_text_format
from fsspec.implementations.local import LocalFileSystem

from fusion_trainer.errors import DataError

from .decode import decode_sample
from .samples import BadSampleHook, RawSample
from .tar_reader import tar_samples

__all__ = [
    "VerifiedShards", "assign_shards", "epoch_samples", "iter_shard", "open_shards", "per_rank_samples",
    "shuffle_samples",
]  # fmt: skip

logger = logging.getLogger(__name__)

_MEMBERS = (CLIMATE_MEMBER, TEXT_MEMBER, META_MEMBER)


def open_shards(ref: str, storage_options: dict[str, Any] | None = None) -> OpenedDataset:
    """Resolve a dataset reference through the shared contract.

    Args:
        ref: a version folder, a manifest.json URL or `ROOT/NAME@TAG` on any fsspec store.
        storage_options: fsspec options (default: the standard environment, e.g. AWS_ENDPOINT_URL).

    Returns:
        The opened dataset (manifest + shard URLs).

    Raises:
        DataError: the reference is malformed or resolves to nothing, the schema version is unsupported, the
            manifest is damaged, or its captions are in a text format this trainer does not read; the message is the
            contract's, which names the reference and the way out.
    """
    try:
        ds = open_dataset(ref, storage_options)
        check_text_format(ds.manifest.config.get("text_format"), f"dataset {ds.version_url}")
        return ds
    except ContractError as exc:
        raise DataError(f"--shards {ref}: {exc}") from exc
    except (OSError, ValueError) as exc:
        raise DataError(f"--shards {ref}: cannot read the dataset ({type(exc).__name__}: {exc})") from exc


def _group_problem(group: dict[str, Any], key: str, url: str) -> str | None:
    """Why a group of tar members is not a sample (a key that is a path, a missing member), or None."""
    try:
        check_sample_key(key, f"shard {url}")
    except SampleError as exc:
        return str(exc)
    for suffix in sorted(k for k in group if not k.startswith("__")):
        problem = member_suffix_problem(f"{key}.{suffix}", f"shard {url}")
        if problem is not None:  # the rule `merra2-text verify` applies: never silently left out
            return problem
    missing = [m for m in _MEMBERS if m not in group]
    if missing:
        return f"shard {url}: sample {key!r} lacks member(s) {', '.join(missing)}"
    return None


class VerifiedShards:
    """The local shard files one stream has hashed, each with its file identity (device, inode, size, modification
    and status-change times in ns): `iter_shard` does not hash such a file again while its identity is the same
    before and after the read as when it passed. The bytes of a later epoch then come from the page cache the hashed
    ones were read into, and any write to the file, even one that restores its modification time, changes its
    status-change time. Shards on an object store are hashed on every read (every read downloads them again).

    Re-hashing an unchanged 10 MB shard cost a fifth of a warm epoch (docs/performance.md, "Streaming")."""

    def __init__(self) -> None:
        self._identity: dict[tuple[str, str], tuple[int, ...]] = {}

    def unchanged(self, url: str, sha256: str, identity: tuple[int, ...] | None) -> bool:
        """Whether the file at `url` was hashed and found to be `sha256` with this very identity."""
        return identity is not None and self._identity.get((url, sha256)) == identity

    def record(self, url: str, sha256: str, identity: tuple[int, ...] | None) -> None:
        """`url` was just hashed and found to be `sha256`, its identity unchanged during the read."""
        if identity is not None:
            self._identity[(url, sha256)] = identity


class _Sha256(threading.Thread):
    """The sha256 of a buffer being filled, computed in a thread of its own: `ready(n)` says the first `n` bytes are
    in; the thread hashes whatever has arrived since its last pass in one call (hashlib releases the GIL over large
    buffers), so hashing overlaps the read and then the tar's parsing, and needs the GIL only between passes: a pass
    per chunk could wait a whole switch interval for it while the reader parses. `result()` waits for the end.
    Reading, checking and parsing a 10 MB local shard here: 10.2 -> about 7.5 ms (docs/performance.md,
    "Streaming"); on an object store the hash hides behind the download."""

    def __init__(self, buf: memoryview) -> None:
        super().__init__(name="shard-sha256", daemon=True)
        self._buf, self._ready, self._closed, self._hexdigest = buf, 0, False, ""
        self._cond = threading.Condition()
        self.start()

    def ready(self, n: int) -> None:
        with self._cond:
            self._ready = n
            self._cond.notify()

    def run(self) -> None:
        h, done = hashlib.sha256(), 0
        while True:
            with self._cond:
                while self._ready == done and not self._closed:
                    self._cond.wait()
                ready = self._ready
            if ready == done:  # closed, and everything hashed
                break
            h.update(self._buf[done:ready])
            done = ready
        self._hexdigest = h.hexdigest()

    def result(self) -> str:
        """The hex digest of the buffer's first `n` bytes, `n` from the last `ready(n)` (idempotent)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self.join()
        self._buf = memoryview(b"")  # the shard's bytes are no longer held here
        return self._hexdigest


def _identity(fh: Any) -> tuple[int, ...]:
    st = os.fstat(fh.fileno())
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def iter_shard(
    ds: OpenedDataset,
    shard: ShardInfo,
    verify: bool = True,
    on_bad: BadSampleHook | None = None,
    verified: VerifiedShards | None = None,
) -> Generator[RawSample, None, None]:
    """The samples of one shard, handed out only once the whole shard has passed its checks.

    The shard is read whole into memory (at most `MAX_SHARD_BYTES`, which the manifest contract and the builder
    enforce), its size and (if `verify`) sha256 are compared with the manifest, then its members are parsed and its
    sample count compared: no sample of a shard that fails a check is ever yielded, however early its reader stops
    (an evaluation pass, a cut epoch, `generate --limit`). Members are only read into memory, never extracted: a
    member named like a path (`../../x.txt`) is refused by name. The shard's bytes are parsed in place (its members
    are views) and each sample gets its own copy of its climate array as it is handed out, so a reader holds the
    shard it reads plus the samples it keeps (a shuffle buffer), as when every member was copied at parse time.

    Args:
        ds: the opened dataset.
        shard: one of its shards.
        verify: check the sha256 (size and sample count are always checked).
        on_bad: called for a sample whose key is a path or that lacks a member, which is then left out; None:
            raise.
        verified: with `verify`, the local files this reader has already hashed (`VerifiedShards`): one of them
            whose identity has not changed is not hashed again (its size and sample count still are checked).

    Raises:
        DataError: the shard is missing, unreadable, truncated or fails its checks; a bad sample without `on_bad`.
    """
    url = ds.url_of(shard.path)
    if (
        shard.bytes > MAX_SHARD_BYTES
    ):  # the manifest contract refuses it too; a ShardInfo built by hand may not
        raise DataError(
            f"shard {url}: {shard.bytes} bytes is over the contract's {MAX_SHARD_BYTES}; re-publish it"
        )
    digest: _Sha256 | None = None
    try:
        with ds.fs.open(ds.fs._strip_protocol(url), "rb") as fh:
            local = verify and verified is not None and isinstance(ds.fs, LocalFileSystem)
            before = _identity(fh) if local else None
            known = verified is not None and verified.unchanged(url, shard.sha256, before)
            buf = memoryview(bytearray(shard.bytes + 1))  # one byte more than listed: a longer object is caught too
            digest = _Sha256(buf) if verify and not known else None  # hashes as the bytes arrive
            data = _read_into(fh, buf, digest)
            identity = before if local and _identity(fh) == before else None
    except BaseException as exc:
        if digest is not None:  # never leave the hashing thread waiting
            digest.result()
        if isinstance(exc, FileNotFoundError):
            raise DataError(f"shard {url} listed in the manifest does not exist: re-publish the dataset") from exc
        if not isinstance(exc, OSError):
            raise
        raise DataError(f"shard {url} cannot be read ({type(exc).__name__}: {exc}); check the store") from exc
    del buf
    if verify and digest is None and identity is None:  # the file changed while it was read: hash what was read
        digest = _Sha256(data)
        digest.ready(len(data))
    try:
        samples = _parse_checked(shard, url, data, digest, identity, verified)
    finally:
        if digest is not None:
            digest.result()
    del data, digest
    yield from _hand_out(samples, shard, on_bad)


def _parse_checked(
    shard: ShardInfo,
    url: str,
    data: memoryview,
    digest: _Sha256 | None,
    identity: tuple[int, ...] | None,
    verified: VerifiedShards | None,
) -> list[tuple[RawSample, str | None]]:
    """The shard's samples, each with the reason it is bad (or None), once every check of the shard has passed.

    Raises:
        DataError: the size, the sha256 (`digest`), the tar or the sample count is not the manifest's.
    """
    if len(data) != shard.bytes:
        more = "more than " if len(data) > shard.bytes else ""
        raise DataError(
            f"shard {url} fails its checks ({more}{len(data)} bytes where the manifest lists {shard.bytes}): it is "
            "truncated or was altered"
        )
    parse_error: Exception | None = None
    samples: list[tuple[RawSample, str | None]] = []
    try:  # while the last bytes are hashed: parse the tar, check every sample's names (nothing is handed out yet)
        groups = tar_samples(data, url, limit=shard.bytes)
        for group in groups:
            key = str(group["__key__"])
            problem = _group_problem(group, key, url)
            members = (
                {}
                if problem is not None
                else {m: group[m] if m == CLIMATE_MEMBER else bytes(group[m]) for m in _MEMBERS}
            )
            samples.append((RawSample(key=key, shard=shard.path, members=members), problem))
    except (tarfile.TarError, OSError, ValueError, EOFError) as exc:
        parse_error = exc
    finally:
        hexdigest = None if digest is None else digest.result()
    if hexdigest is not None:
        if hexdigest != shard.sha256:
            raise DataError(
                f"shard {url} fails its checks (sha256 {hexdigest} where the manifest lists {shard.sha256}): it is "
                "truncated or was altered"
            )
        if verified is not None:
            verified.record(url, shard.sha256, identity)
    if parse_error is not None:
        raise DataError(
            f"shard {url} is truncated or corrupt ({type(parse_error).__name__}: {parse_error}); re-publish it"
        ) from parse_error
    if len(samples) != shard.samples:
        raise DataError(
            f"shard {url} fails its checks ({len(samples)} samples where the manifest lists {shard.samples}): it is "
            "truncated or was altered"
        )
    return samples


def _hand_out(
    samples: list[tuple[RawSample, str | None]], shard: ShardInfo, on_bad: BadSampleHook | None
) -> Generator[RawSample, None, None]:
    """Yield the good samples (a bad one raises, or goes to `on_bad`), each with its own copy of its climate member,
    made as it is handed out: a view would keep the shard's whole buffer alive as long as the sample lives, in a
    shuffle buffer for instance (a simulated 256-sample buffer over shards of 24 to 1,000 samples would hold 3.5 to 43
    shards). One copy at a time reuses the memory of the samples already consumed; copying every member when the
    shard was parsed cost 64 us a sample in page faults (docs/performance.md, "Streaming at the floor")."""
    for i in range(len(samples)):
        raw, problem = samples[i]
        samples[i] = _HANDED_OUT  # this list no longer holds it
        if problem is not None:
            if on_bad is None:
                raise DataError(problem)
            on_bad(shard.path, raw.key, problem)
            continue
        raw.members[CLIMATE_MEMBER] = bytes(raw.members[CLIMATE_MEMBER])
        yield raw


_HANDED_OUT: tuple[RawSample, str | None] = (RawSample(key="", shard="", members={}), None)


def _read_into(fh: Any, buf: memoryview, digest: _Sha256 | None = None) -> memoryview:
    """Fill `buf` from `fh` as far as it goes, in `READ_SIZE` reads (a store may return short reads); `digest` is
    told of each part as it arrives. Returns the part read."""
    readinto = getattr(fh, "readinto", None)
    n, limit = 0, len(buf)
    while n < limit:
        chunk = buf[n : min(n + READ_SIZE, limit)]
        if readinto is not None:
            k = readinto(chunk) or 0
        else:
            part = fh.read(len(chunk))
            k = len(part)
            chunk[:k] = part
        if k == 0:
            break
        n += k
        if digest is not None:
            digest.ready(n)
    return buf[:n]


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


def rank_shards(
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
    verified: VerifiedShards | None = None,
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
    mine = rank_shards(shards, epoch=epoch, rank=rank, world=world, seed=seed, shuffle=shuffle)
    if mine is None:  # evaluation, or fewer shards than ranks: strided over every shard

        def make() -> Iterator[RawSample]:
            for i, sample in enumerate(
                s for shard in shards for s in _read(ds, shard, verify, on_bad, verified)
            ):
                if i % world == rank:
                    yield sample

    else:

        def make() -> Iterator[RawSample]:
            return (s for shard in mine for s in _read(ds, shard, verify, on_bad, verified))

    def shuffled() -> Iterator[RawSample]:
        if not shuffle:
            return make()
        return shuffle_samples(make(), shuffle_buffer, random.Random(f"{seed}/{epoch}/{rank}"))

    yield from _take_cycled(shuffled, n)


def _read(
    ds: OpenedDataset,
    shard: ShardInfo,
    verify: bool,
    on_bad: BadSampleHook | None,
    verified: VerifiedShards | None = None,
) -> Iterator[RawSample]:
    """One shard's samples; with `on_bad`, decoded, the bad ones reported and left out."""
    samples = iter_shard(ds, shard, verify, on_bad, verified)
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
