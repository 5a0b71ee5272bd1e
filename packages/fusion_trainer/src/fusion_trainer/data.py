"""Streaming the contract's WebDataset shards into training batches.

The sample order of an epoch is a pure function of (seed, epoch, rank, world): shards are shuffled with
`seed + epoch`, dealt to ranks so their sample counts balance, read as tar streams through fsspec (local, file://,
s3://, ...), shuffled in a buffer seeded per (seed, epoch, rank), and cut or cycled to exactly
`floor(total / world)` samples so every rank runs the same number of steps. Resuming at a `DataPosition` replays the
epoch's stream and skips the samples already consumed, so the order from that batch on is reproduced exactly.

Each stage is an `Iterator -> Iterator` generator; `ClimateTextStream` wires them into an `IterableDataset` that
yields collated batches (so DataLoader workers each build whole batches, round-robin, in the same order as 0 workers).

Bad input: a shard that is truncated or fails its checksum always stops the run (`DataError` naming the shard). A bad
sample (a member named like a path, an array that is not a plain numeric .npy, a .json that is not the contract's
metadata, a missing member) stops it too, naming the shard and the sample, unless `skip_bad_samples`: then it is
logged, counted (`batch["skipped"]`) and left out before the epoch is cut, so every rank still sees its full epoch.
"""

from __future__ import annotations

import hashlib
import io
import logging
import random
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
from climate_text_schema import (
    CLIMATE_MEMBER,
    META_MEMBER,
    TEXT_MEMBER,
    ContractError,
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
from webdataset.tariterators import group_by_keys, tar_file_iterator

from .config import DEFAULT_PROMPT_TEMPLATE
from .errors import ConfigError, DataError

__all__ = [
    "DEFAULT_PROMPT", "ClimateTextStream", "DataPosition", "RawSample", "Sample", "assign_shards",
    "collate", "decode_sample", "encode_sample", "epoch_samples", "iter_shard", "open_shards", "per_rank_samples",
    "render_prompt", "shuffle_samples",
]  # fmt: skip

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = DEFAULT_PROMPT_TEMPLATE
"""Prompt template: `{example}` is a one-shot caption built from the train means, `{variables}` the variable names."""


@dataclass(frozen=True)
class DataPosition:
    """Where a rank stands in the data: samples consumed in `epoch` (the same on every rank), and the data seed."""

    epoch: int = 0
    consumed: int = 0
    seed: int = 0

    def to_dict(self) -> dict[str, int]:
        """Plain dict for checkpoints."""
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DataPosition:
        """Inverse of `to_dict`."""
        return cls(epoch=int(raw["epoch"]), consumed=int(raw["consumed"]), seed=int(raw["seed"]))


@dataclass(frozen=True)
class Sample:
    """One decoded sample: normalised climate `(T, V, H, W)` and its text."""

    key: str
    shard: str
    climate_x: np.ndarray
    text: str


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


class _CheckedReader(io.RawIOBase):
    """A read-only stream that counts the bytes read and hashes them."""

    def __init__(self, raw: Any) -> None:
        super().__init__()
        self._raw = raw
        self.nbytes = 0
        self.sha256 = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._raw.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.nbytes += n
        self.sha256.update(data)
        return n

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


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
) -> Iterator[RawSample]:
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
            reader = _CheckedReader(fh)
            files = ({**f, "__url__": url} for f in tar_file_iterator(reader))
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
    if verify and reader.sha256.hexdigest() != shard.sha256:
        problems.append(f"sha256 {reader.sha256.hexdigest()} where the manifest lists {shard.sha256}")
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
    rng = random.Random(seed + epoch)
    assigned: list[list[ShardInfo]] | None = None
    if world == 1:
        assigned = [rng.sample(shards, len(shards)) if shuffle else list(shards)]
    elif shuffle:
        assigned = assign_shards(shards, world, rng)
    if assigned is None:  # evaluation, or fewer shards than ranks: strided over every shard

        def make() -> Iterator[RawSample]:
            for i, sample in enumerate(s for shard in shards for s in _read(ds, shard, verify, on_bad)):
                if i % world == rank:
                    yield sample

    else:
        mine = assigned[rank]

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


def decode_sample(raw: RawSample, ds: OpenedDataset) -> Sample:
    """Decode (allow_pickle=False), check against the contract and normalise `(x - mean) / std` per variable.

    The `.json` member, when present, must be the contract's metadata of this very key.

    Raises:
        DataError: the sample breaks the contract or the manifest lacks normalisation for a variable.
    """
    if raw.decoded is not None:
        return raw.decoded
    manifest = ds.manifest
    names = manifest.variable_names
    try:
        array = decode_climate(raw.members[CLIMATE_MEMBER], raw.key)
        text = decode_text(raw.members[TEXT_MEMBER], raw.key).strip()
        meta = decode_meta(raw.members[META_MEMBER], raw.key) if META_MEMBER in raw.members else None
    except ContractError as exc:
        raise DataError(f"shard {raw.shard}: {exc}") from exc
    if meta is not None and meta.key != raw.key:
        raise DataError(f"shard {raw.shard}: sample {raw.key!r} carries the metadata of {meta.key!r}")
    problems = check_climate_array(array, len(names))
    if problems:
        raise DataError(f"shard {raw.shard}: sample {raw.key!r} breaks the contract: {'; '.join(problems)}")
    missing = [v for v in names if v not in manifest.normalization]
    if missing:
        raise DataError(f"dataset {ds.version_url}: manifest has no normalization for {', '.join(missing)}")
    mean = np.array([manifest.normalization[v].mean for v in names], dtype=np.float32)[None, :, None, None]
    std = np.array([manifest.normalization[v].std for v in names], dtype=np.float32)[None, :, None, None]
    return Sample(
        key=raw.key, shard=raw.shard, climate_x=((array - mean) / std).astype(np.float32), text=text
    )


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
    caption = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        caption.append(int(tokenizer.eos_token_id))
    ids = (prompt_ids + caption)[:max_length]
    labels = ([-100] * len(prompt_ids) + caption)[:max_length]
    return ids, labels


def collate(samples: list[Sample], encoded: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, Any]:
    """Stack climate `(B, T, V, H, W)`, right-pad ids (mask 0, labels -100), keep keys and texts.

    Tiles of one dataset may differ in grid size (the builder keeps partial edge tiles of at least half a tile): the
    climate of a batch is padded to its largest H and W with 0, which in normalised units is the train mean. Samples
    whose time steps or variables differ cannot share a batch.
    """
    shapes = {s.climate_x.shape for s in samples}
    if len({shape[:2] for shape in shapes}) > 1:
        keys = ", ".join(s.key for s in samples)
        raise DataError(
            f"samples {keys} have different (time, variable) shapes {sorted(shapes)}; one batch needs one "
            "window, time step and variable list"
        )
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(encoded):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    height = max(shape[2] for shape in shapes)
    width_ll = max(shape[3] for shape in shapes)
    stacked = np.zeros((len(samples), *samples[0].climate_x.shape[:2], height, width_ll), dtype=np.float32)
    for i, s in enumerate(samples):
        stacked[i, :, :, : s.climate_x.shape[2], : s.climate_x.shape[3]] = s.climate_x
    climate = torch.from_numpy(stacked)  # (B, T, V, H, W)
    return {
        "climate_x": climate,
        "input_ids": input_ids,
        "attention_mask": mask,
        "labels": labels,
        "keys": [s.key for s in samples],
        "texts": [s.text for s in samples],
    }


class ClimateTextStream(torch.utils.data.IterableDataset):
    """Collated batches of one split for one rank; infinite over epochs (training) or one pass (evaluation).

    Each batch carries `position`: the `DataPosition` right after it, for checkpoints.
    """

    def __init__(
        self, ds: OpenedDataset, split: str, tokenizer: Any, *, prompt: str, micro_batch: int, max_length: int,
        rank: int = 0, world: int = 1, seed: int = 0, start: DataPosition | None = None, train: bool = True,
        shuffle_buffer: int = 256, verify: bool = True, caption: str = "full", skip_bad_samples: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        if caption not in ("full", "numbers", "temperature"):
            raise ConfigError(f"caption {caption!r} is unknown; use 'full', 'numbers' or 'temperature'")
        self.caption = caption
        self.ds, self.split, self.tokenizer = ds, split, tokenizer
        self.micro_batch, self.max_length = micro_batch, max_length
        self.rank, self.world, self.seed, self.train = rank, world, seed, train
        self.shuffle_buffer, self.verify, self.skip_bad_samples = shuffle_buffer, verify, skip_bad_samples
        self.start = start or DataPosition(seed=seed)
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

        j = 0
        while True:
            for consumed, raws in self._batches(epoch, skip, on_bad if self.skip_bad_samples else None):
                if j % workers == worker:
                    decoded = [decode_sample(r, self.ds) for r in raws]
                    encoded = [
                        encode_sample(
                            self.target_text(s.text), self.prompt_ids, self.tokenizer, self.max_length
                        )
                        for s in decoded
                    ]
                    batch = collate(decoded, encoded, self.pad_id)
                    batch["position"] = DataPosition(epoch=epoch, consumed=consumed, seed=self.seed).to_dict()
                    batch["skipped"] = len(bad)  # distinct bad samples this rank's stream has left out so far
                    yield batch
                j += 1
            if not self.train:
                return
            epoch, skip = epoch + 1, 0
