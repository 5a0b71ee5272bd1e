"""Lanes: one rank's training epoch cut into disjoint runs of its shards, so DataLoader workers split the reading.

`ClimateTextStream(lanes=L)` takes batch k of the epoch from lane k % L; a worker reads only the lanes of the
batches it builds (see `lane_samples`).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator

from climate_text_schema import OpenedDataset, ShardInfo

from fusion_trainer.errors import DataError

from .samples import RawSample
from .shards import VerifiedShards, iter_shard, per_rank_samples, rank_shards, shuffle_samples

__all__ = ["lane_samples"]

logger = logging.getLogger(__name__)


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
    verified: VerifiedShards | None = None,
) -> Iterator[RawSample]:
    """The training samples of one lane of one rank's epoch, shuffled; batch `k` of the epoch is lane `k % lanes`'s.

    The rank's epoch is its shards as `epoch_samples` reads them (shuffled with `seed + epoch`, dealt to ranks,
    cycled when short), cut to whole micro-batches, then into `lanes` consecutive runs: lane `l` gets `micro_batch`
    samples for each batch `k < batches_per_epoch` with `k % lanes == l`, and shuffles them in its own seeded buffer.
    So the lanes are disjoint, their union is the epoch, and a lane reads only the shards its run touches: DataLoader
    workers that each serve their own lanes split the shards between them. A shard split between two lanes is read
    by both, and each checks it whole (sample count, size, sha256: `iter_shard`) before using any of its samples.

    Raises:
        DataError: a shard is missing, damaged or fails its checks, a bad sample, or the rank's shards are empty.
    """
    shards = ds.shards(split)
    batches = per_rank_samples(ds, split, world) // micro_batch
    mine = rank_shards(shards, epoch=epoch, rank=rank, world=world, seed=seed, shuffle=True)
    sizes = [len(range(lane_, batches, lanes)) * micro_batch for lane_ in range(lanes)]
    pieces = _lane_pieces(_segments(shards, mine, rank, world), sizes)[lane]
    rng = random.Random(f"{seed}/{epoch}/{rank}/lane{lane}of{lanes}")
    yield from shuffle_samples(_read_pieces(ds, pieces, verify, verified), shuffle_buffer, rng)


_Piece = tuple[ShardInfo, range, bool]
"""(shard, indices of its samples to keep, whether this piece holds the shard's last sample of the pass)."""


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


def _read_pieces(
    ds: OpenedDataset, pieces: list[_Piece], verify: bool, verified: VerifiedShards | None
) -> Iterator[RawSample]:
    """The samples of each piece, in order; a piece that is not its shard's end stops reading after its part."""
    for shard, indices, to_end in pieces:
        samples = iter_shard(ds, shard, verify, verified=verified)
        try:
            for i, raw in enumerate(samples):
                if i in indices:
                    yield raw
                if not to_end and i >= indices[-1]:
                    break
        finally:
            samples.close()
