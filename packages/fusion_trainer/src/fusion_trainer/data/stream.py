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

Speed (docs/performance.md, "Streaming"): tar members are read by a lean ustar/GNU/pax reader over the
whole shard, read into memory and checked (size, sha256, sample count) before any of its samples is handed out;
`.npy` members in np.save's own float32 layout skip np.load's header parser,
one min/max pair clears the contract's NaN/fill check, a micro-batch's captions are tokenised in one call and their
ids kept for later epochs (`token_cache_mb`), and ids, labels and masks are built as numpy arrays.

Bad input: a shard that is truncated or fails its checksum always stops the run (`DataError` naming the shard). A bad
sample (a member named like a path, an array that is not a plain numeric .npy, a .json that is not the contract's
metadata, a missing member) stops it too, naming the shard and the sample, unless `skip_bad_samples`: then it is
logged, counted (`batch["skipped"]`) and left out before the epoch is cut, so every rank still sees its full epoch.

This module holds the stream (`ClimateTextStream`); the prompt is `prompt.py` (`render_prompt`); its stages live in
`shard_reader.py` (reading and checking a shard), `shards.py` (dealing shards to ranks, the shuffle buffer, one rank's
epoch), `tar_reader.py` (the tar member reader), `lanes.py` (the lane cut), `decode.py` (contract checks,
normalisation, window statistics), `collate.py` (caption token ids, label masking, stacking) and `samples.py` (the
records passed along, `DataPosition`). Every name of `__all__` is importable from here, as before the split.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from climate_text_schema import TEXT_MEMBER, OpenedDataset

from fusion_trainer.errors import ConfigError, DataError

from .collate import as_built, batch_dict, collate, encode_sample, encode_texts
from .decode import decode_batch, decode_sample, norm_arrays
from .lanes import lane_samples
from .prompt import DEFAULT_PROMPT, render_prompt
from .samples import BadSampleHook, DataPosition, RawSample, Sample
from .shards import (
    VerifiedShards,
    assign_shards,
    epoch_samples,
    iter_shard,
    open_shards,
    per_rank_samples,
    shuffle_samples,
)
from .token_cache import TokenCache, batch_encoder

__all__ = [
    "DEFAULT_PROMPT", "ClimateTextStream", "as_built", "DataPosition", "RawSample", "Sample", "assign_shards",
    "collate", "decode_sample", "encode_sample", "encode_texts", "epoch_samples", "iter_shard", "lane_samples",
    "open_shards", "per_rank_samples", "render_prompt", "shuffle_samples",
]  # fmt: skip

logger = logging.getLogger(__name__)

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

    `stats`: batches also carry `stats` `(B, V, 3)`, each sample's window mean/min/max from its `.json`, normalised
    like the climate (for `TrainConfig.stats_loss_weight`); off, they are not computed.

    `verify`: each shard's size, sample count and sha256 are checked before any of its samples is used; a local
    shard file is hashed once per stream and not again while its identity (device, inode, size, mtime, ctime) is
    what it was when it passed (`shards.VerifiedShards`); `rehash=True` hashes it on every read.

    `token_cache_mb`: the token ids of captions already tokenised are kept (int32, up to this many MiB per stream,
    about 35,000 captions of 300 tokens at the default; 0 turns it off), so epochs after the first skip tokenisation.
    The batches are the same either way. `token_cache_dir`: the ids are also kept on disk, in one file per dataset
    version, split, caption form and tokenizer (`token_cache.TokenCache`), so the first epoch of a later run (or of
    another DataLoader worker) reads them instead of tokenising again. Captions are tokenised with the fast
    tokenizer's backend in one batch call where that is the same as the wrapper's call (`token_cache.batch_encoder`).

    `length_groups=G` (training, `lanes=1`): no padding waste from mixing short and long captions. The shuffled epoch
    is cut into pools of G micro-batches; each pool is sorted by caption length in tokens (stable: ties keep the
    shuffled order) and cut into G batches, and the G batches are yielded in an order shuffled with a seed of
    (seed, epoch, rank, pool). Every sample is still seen once per epoch, the order is as deterministic, and a resume
    continues it exactly (the position records `length_groups`; a resume with another value is refused). Each batch
    is padded only to its own longest row, so rows of similar length waste little. A batch's loss is the same as
    with any padding (`tests/fusion_trainer/test_length_groups.py`); what changes is which samples share a batch.
    1 (the default) keeps the order of earlier releases.
    """

    def __init__(
        self, ds: OpenedDataset, split: str, tokenizer: Any, *, prompt: str, micro_batch: int, max_length: int,
        rank: int = 0, world: int = 1, seed: int = 0, start: DataPosition | None = None, train: bool = True,
        shuffle_buffer: int = 256, verify: bool = True, caption: str = "full", skip_bad_samples: bool = False,
        lanes: int = 1, token_cache_mb: float = 64.0, stats: bool = False, length_groups: int = 1,
        token_cache_dir: str | os.PathLike[str] | None = None, rehash: bool = False,
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
        if length_groups < 1:
            raise ConfigError(f"length_groups {length_groups} must be at least 1 (1: no length grouping)")
        if length_groups > 1 and lanes > 1 and train:
            raise ConfigError(
                f"length_groups {length_groups} cannot be combined with lanes {lanes}: use lanes 1 or length_groups 1"
            )
        self.length_groups = length_groups if train else 1
        self.caption = caption
        self.ds, self.split, self.tokenizer = ds, split, tokenizer
        self.micro_batch, self.max_length = micro_batch, max_length
        self._warned_cut = False
        self.rank, self.world, self.seed, self.train = rank, world, seed, train
        self.shuffle_buffer, self.verify, self.skip_bad_samples = shuffle_buffer, verify, skip_bad_samples
        self.lanes = lanes if train else 1
        self.stats = stats
        self.start = start or DataPosition(seed=seed, lanes=self.lanes, length_groups=self.length_groups)
        if (self.start.epoch, self.start.consumed) != (0, 0) and self.start.lanes != self.lanes:
            raise ConfigError(
                f"the data position {self.start.to_dict()} was taken with lanes {self.start.lanes}, this stream has "
                f"lanes {self.lanes}: resume with the same lanes"
            )
        if (self.start.epoch, self.start.consumed) != (
            0,
            0,
        ) and self.start.length_groups != self.length_groups:
            raise ConfigError(
                f"the data position {self.start.to_dict()} was taken with length_groups {self.start.length_groups}, "
                f"this stream has length_groups {self.length_groups}: resume with the same length_groups"
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
        # local shards this stream hashed: not hashed again while their file is unchanged (unless `rehash`)
        self._verified = None if rehash else VerifiedShards()
        self._tokens: dict[str, np.ndarray] = {}  # target text -> caption ids + EOS, int32 (`_caption_ids`)
        self._token_room = int(token_cache_mb * (1 << 20))
        self._encode = batch_encoder(tokenizer)
        self._disk: TokenCache | None = None
        if token_cache_dir is not None and self._token_room > 0:
            self._disk = TokenCache(token_cache_dir, ds.version, split, caption, tokenizer)
            self._token_room = self._disk.load_into(self._tokens, self._token_room)

    def target_text(self, text: str) -> str:
        """The text the model learns to write: the caption, or a compact form of it (`grounding.caption_target`)."""
        from fusion_trainer.grounding import caption_target

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
            verified=self._verified,
        )  # fmt: skip
        # training drops the last partial batch (every step has micro_batch samples); evaluation keeps it
        limit = self.batches_per_epoch * self.micro_batch if self.train else self.per_rank
        if self.length_groups > 1:
            yield from self._grouped_batches(itertools.islice(samples, limit), epoch, skip)
            return
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

    def _grouped_batches(
        self, samples: Iterator[RawSample], epoch: int, skip: int
    ) -> Iterator[tuple[int, list[RawSample]]]:
        """(consumed, raw samples) of each training batch k >= skip / micro_batch, length-grouped (see the class)."""
        mb, per_pool = self.micro_batch, self.micro_batch * self.length_groups
        if skip % mb:
            raise ConfigError(
                f"the data position consumed {skip} samples, not a multiple of micro_batch {mb}: resume with the "
                "micro_batch the checkpoint was trained with"
            )
        done = skip // mb  # batches of this epoch already consumed
        k = 0  # the epoch's index of the pool's first batch
        for pool_index in itertools.count():
            pool = list(itertools.islice(samples, per_pool))
            n = len(pool) // mb  # the epoch is cut to whole batches, so every pool holds whole batches
            if n == 0:
                return
            if k + n > done:  # a pool wholly consumed before a resume needs no tokenisation
                lengths = [len(ids) for ids in self._caption_ids([self._raw_target(r) for r in pool])]
                order = sorted(range(len(pool)), key=lengths.__getitem__)
                rng = np.random.default_rng([self.seed, epoch, self.rank, pool_index])
                for j, b in enumerate(rng.permutation(n).tolist()):
                    if k + j >= done:
                        yield (k + j + 1) * mb, [pool[i] for i in order[b * mb : (b + 1) * mb]]
            k += n

    def _raw_target(self, raw: RawSample) -> str:
        """The target text of a raw sample, for its length only ("" when it cannot be read: the batch's decoding then
        raises the usual error)."""
        try:
            text = (
                raw.decoded.text
                if raw.decoded is not None
                else bytes(raw.members[TEXT_MEMBER]).decode("utf-8").strip()
            )
        except (KeyError, UnicodeDecodeError):
            return ""
        return text if self.caption == "full" else self.target_text(text)

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
                    verified=self._verified,
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
            self._norm = norm_arrays(self.ds)
        decoded, climate = decode_batch(raws, self.ds, self._norm, self.stats)
        texts = (
            [s.text for s in decoded]
            if self.caption == "full"
            else [self.target_text(s.text) for s in decoded]
        )
        captions = self._caption_ids(texts)
        n_prompt = len(self.prompt_ids)
        lengths = [min(n_prompt + len(c), self.max_length) for c in captions]
        longest = n_prompt + max(len(c) for c in captions)
        if longest > self.max_length and not self._warned_cut:
            self._warned_cut = True  # once per stream: a silent cut trained only the caption's first sentences
            cut = sum(n_prompt + len(c) > self.max_length for c in captions)
            logger.warning(
                "%d of %d captions in a %s batch are cut at max_length %d: the longest needs %d tokens (prompt %d + "
                "caption and EOS %d), so their end is never trained or scored; raise max_length to at least %d",
                cut, len(captions), self.split, self.max_length, longest, n_prompt, longest - n_prompt, longest,
            )  # fmt: skip
        input_ids = np.full((len(captions), max(lengths)), self.pad_id, dtype=np.int64)  # (B, L)
        labels = np.full_like(input_ids, -100)  # (B, L)
        input_ids[:, :n_prompt] = self.prompt_ids
        for i, (caption, length) in enumerate(zip(captions, lengths, strict=True)):
            input_ids[i, n_prompt:length] = labels[i, n_prompt:length] = caption[: length - n_prompt]
        mask = (np.arange(input_ids.shape[1]) < np.array(lengths)[:, None]).astype(np.int64)  # (B, L)
        return batch_dict(decoded, climate, input_ids, labels, mask)

    def _caption_ids(self, texts: list[str]) -> list[np.ndarray]:
        """Caption ids + EOS of each text: tokenised in one call, and kept (up to `token_cache_mb`) for later epochs,
        so an epoch whose captions were all seen before costs no tokenisation."""
        cache = self._tokens
        todo = list(dict.fromkeys(t for t in texts if t not in cache))
        fresh: dict[str, np.ndarray] = {}
        if todo:
            eos = [] if self.tokenizer.eos_token_id is None else [int(self.tokenizer.eos_token_id)]
            for text, ids in zip(todo, self._encode(todo), strict=True):
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
                        epoch=epoch,
                        consumed=consumed,
                        seed=self.seed,
                        lanes=self.lanes,
                        length_groups=self.length_groups,
                    ).to_dict()
                    batch["skipped"] = len(bad)  # distinct bad samples this rank's stream has left out so far
                    yield batch
                j += 1
            if self._disk is not None:
                self._disk.save(self._tokens)  # after each epoch, when it tokenised anything new (atomically)
            if not self.train:
                return
            epoch, skip = epoch + 1, 0
