"""Dealing a dataset's shards out: the balanced assignment of shards to ranks, the seeded shuffle buffer, and one
rank's epoch (`epoch_samples`). Reading one shard, checked whole first, is `shard_reader.py` (`iter_shard`).

The sample order of an epoch is a pure function of (seed, epoch, rank, world): see `epoch_samples`. The lane cut of
a rank's epoch (DataLoader workers reading disjoint shards) is in `lanes.py`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

from climate_text_schema import CLIMATE_MEMBER, ContractError, OpenedDataset, ShardInfo, open_dataset
from climate_text_schema.captions import check_text_format

from fusion_trainer.errors import DataError

from .decode import decode_sample
from .samples import BadSampleHook, RawSample
from .shard_reader import VerifiedShards, iter_shard

__all__ = [
    "VerifiedShards", "assign_shards", "epoch_samples", "iter_shard", "open_shards", "per_rank_samples",
    "shuffle_samples",
]  # fmt: skip

logger = logging.getLogger(__name__)


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
    """A seeded shuffle buffer: fill `bufsize`, then emit a random element per incoming sample.

    A sample's climate member may be a view of its shard's bytes (`shard_reader.iter_shard`), which a sample kept
    here would keep alive whole (a simulated 256-sample buffer over shards of 24 to 1,000 samples held 3.5 to 43
    shards). So once the reader has moved on to another shard, the samples of an earlier shard left here get copies
    of their own (`_own`) as soon as they hold less than half of its bytes: the buffer keeps at most twice its own
    samples' bytes of earlier shards alive, and a shard whose samples mostly remain here is not copied (the copies
    cost a cold epoch 5-8 %). The order is the same either way."""
    if bufsize <= 1:
        yield from samples
        return
    buf: list[RawSample] = []
    pinned = _Pinned()
    for sample in samples:
        buf.append(sample)
        pinned.entered(sample, buf)
        if len(buf) >= bufsize:
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            out = buf.pop()
            pinned.left(out, buf)
            yield out
    rng.shuffle(buf)
    yield from buf  # the reader is done: nothing more is read while the buffer empties


class _Pinned:
    """The bytes a shuffle buffer's samples hold of each shard buffer their climate members are views of."""

    def __init__(self) -> None:
        self.reading: int | None = None  # the shard buffer the reader is in now
        self.held: dict[int, int] = {}  # id(shard buffer) -> bytes of it held by the buffer's samples

    def entered(self, sample: RawSample, buf: list[RawSample]) -> None:
        base = _base(sample)
        if base is None:
            return
        key = id(base)
        self.held[key] = self.held.get(key, 0) + len(sample.members[CLIMATE_MEMBER])
        if key != self.reading:  # the reader moved on: earlier shards mostly gone from here are copied out
            self.reading = key
            for other in [k for k in self.held if k != key]:
                self._check(other, buf)

    def left(self, sample: RawSample, buf: list[RawSample]) -> None:
        base = _base(sample)
        if base is None:
            return
        key = id(base)
        self.held[key] -= len(sample.members[CLIMATE_MEMBER])
        if key != self.reading:
            self._check(key, buf)

    def _check(self, key: int, buf: list[RawSample]) -> None:
        kept = [s for s in buf if (base := _base(s)) is not None and id(base) == key]
        if not kept:
            self.held.pop(key, None)
            return
        if 2 * self.held[key] < len(_base(kept[0]) or b""):
            for s in kept:
                _own(s)
            del self.held[key]


def _base(sample: RawSample) -> Any:
    """The shard buffer a sample's climate member is a view of, or None (its own bytes)."""
    value = sample.members.get(CLIMATE_MEMBER)
    return value.obj if isinstance(value, memoryview) else None


def _own(sample: RawSample) -> RawSample:
    """`sample`, each member that is a `memoryview` of its shard's bytes replaced by a copy (`bytes`)."""
    for name, value in list(sample.members.items()):
        if isinstance(value, memoryview):
            sample.members[name] = bytes(value)
    return sample


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
