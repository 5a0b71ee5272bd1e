"""DataLoader workers split the shards through lanes: disjoint lanes whose union is the epoch, equal counts, the same
batches with any number of workers, exact resume, and the refusals that keep positions and counts honest."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fusion_trainer.data import lanes as lanes_module
from fusion_trainer.data import stream as data_module
from fusion_trainer.data.stream import (
    ClimateTextStream,
    DataPosition,
    epoch_samples,
    lane_samples,
    open_shards,
    per_rank_samples,
)
from fusion_trainer.errors import ConfigError

from .conftest import open_stream

FOUR_SHARDS = {"train": [4, 4, 4, 4], "val": [2], "test": [2]}


def _stream(ref: str, tokenizer: Any, **kw: Any) -> ClimateTextStream:
    stream: ClimateTextStream = open_stream(ref, tokenizer, **{"seed": 5, **kw})
    return stream


def _loader(stream: ClimateTextStream, workers: int) -> Iterator[dict[str, Any]]:
    return iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers))


def _lane_keys(
    ref: str, *, lane: int, lanes: int, epoch: int = 0, rank: int = 0, world: int = 1
) -> list[str]:
    ds = open_shards(ref)
    return [
        s.key
        for s in lane_samples(ds, "train", epoch=epoch, rank=rank, world=world, seed=5, lane=lane, lanes=lanes,
                              micro_batch=2)
    ]  # fmt: skip


@pytest.mark.parametrize(
    "shards", [FOUR_SHARDS, None]
)  # None: the default 8, 6, 6 (a shard split between lanes)
@pytest.mark.parametrize("lanes", [2, 3])
def test_lanes_are_disjoint_equal_and_make_up_the_epoch(
    make_dataset: Callable[..., str], shards: dict[str, list[int]] | None, lanes: int
) -> None:
    ref = make_dataset(**({"shards": shards} if shards else {}))
    ds = open_shards(ref)
    n = per_rank_samples(ds, "train", 1)
    batches = n // 2
    for epoch in range(2):
        keys = [_lane_keys(ref, lane=lane, lanes=lanes, epoch=epoch) for lane in range(lanes)]
        assert [len(k) for k in keys] == [2 * len(range(lane, batches, lanes)) for lane in range(lanes)]
        flat = [k for lane in keys for k in lane]
        assert len(flat) == len(set(flat)) == batches * 2, "disjoint lanes, no sample twice"
        epoch_keys = {
            s.key for s in epoch_samples(ds, "train", epoch=epoch, rank=0, world=1, seed=5, shuffle=True)
        }
        assert set(flat) <= epoch_keys and len(epoch_keys) == n


def test_two_lanes_read_disjoint_shards(
    make_dataset: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = make_dataset(shards=FOUR_SHARDS)
    real = lanes_module.iter_shard
    reads: list[str] = []

    def spy(ds: Any, shard: Any, *args: Any, **kw: Any) -> Any:
        reads.append(shard.path)
        return real(ds, shard, *args, **kw)

    monkeypatch.setattr(lanes_module, "iter_shard", spy)  # lanes read their shards through it
    per_lane = []
    for lane in range(2):
        reads.clear()
        _lane_keys(ref, lane=lane, lanes=2)
        per_lane.append(list(reads))
    assert [len(r) for r in per_lane] == [2, 2], per_lane
    assert not set(per_lane[0]) & set(per_lane[1]), "each lane reads only its own shards"
    assert len(set(per_lane[0]) | set(per_lane[1])) == 4


def test_a_shard_split_between_lanes_is_checked_once(
    dataset_ref: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shards 8, 6, 6 and two lanes of 10: one shard is split; the lane with its first part stops reading there,
    the lane with its end reads it to the end (and checks its count, size and sha256)."""
    real = lanes_module.iter_shard
    pulled: dict[str, list[int]] = {}

    def spy(ds: Any, shard: Any, verify: bool = True, *args: Any, **kwargs: Any) -> Any:
        count = pulled.setdefault(shard.path, [])
        count.append(0)
        for raw in real(ds, shard, verify, *args, **kwargs):
            count[-1] += 1
            yield raw

    monkeypatch.setattr(lanes_module, "iter_shard", spy)  # lanes read their shards through it
    keys = [_lane_keys(dataset_ref, lane=lane, lanes=2) for lane in range(2)]
    assert len(keys[0]) == len(keys[1]) == 10 and not set(keys[0]) & set(keys[1])
    split = [path for path, reads in pulled.items() if len(reads) == 2]
    assert len(split) == 1, pulled
    sizes = {s.path: s.samples for s in open_shards(dataset_ref).shards("train")}
    first, second = pulled[split[0]]
    assert first < sizes[split[0]] == second, "the first part stops early, the end is read whole"
    assert all(reads == [sizes[p]] for p, reads in pulled.items() if p not in split)


def test_two_workers_build_disjoint_halves_of_every_epoch(
    make_dataset: Callable[..., str], tokenizer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = make_dataset(shards=FOUR_SHARDS)
    log = tmp_path / "lanes.log"
    real = data_module.lane_samples

    def spy(*args: Any, **kw: Any) -> Any:
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(f"{os.getpid()} {kw['epoch']} {kw['lane']}\n")
        return real(*args, **kw)

    monkeypatch.setattr(data_module, "lane_samples", spy)
    stream = _stream(ref, tokenizer, lanes=2)
    assert stream.batches_per_epoch == 8
    loader = _loader(stream, 2)
    batches = [next(loader) for _ in range(16)]
    for epoch in range(2):
        part = batches[8 * epoch : 8 * epoch + 8]
        keys = [k for b in part for k in b["keys"]]
        assert sorted(keys) == sorted(f"synth-train-{i:05d}" for i in range(16)), (
            "every sample once per epoch"
        )
        by_worker = [{k for b in part[w::2] for k in b["keys"]} for w in range(2)]
        assert len(by_worker[0]) == len(by_worker[1]) == 8 and not by_worker[0] & by_worker[1]
    del loader
    opened: dict[tuple[str, str], set[str]] = {}
    for line in log.read_text(encoding="utf-8").splitlines():
        pid, ep, lane = line.split()
        opened.setdefault((pid, ep), set()).add(lane)
    assert len({pid for pid, _ in opened}) == 2, "two worker processes"
    assert all(len(lanes) == 1 for lanes in opened.values()), f"a worker read one lane per epoch: {opened}"


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("workers", [0, 2, 3])
def test_the_order_depends_on_lanes_not_on_workers(dataset_ref: str, tokenizer: Any, workers: int) -> None:
    plain = _loader(_stream(dataset_ref, tokenizer, lanes=2), 0)
    want = [next(plain)["keys"] for _ in range(24)]
    loader = _loader(_stream(dataset_ref, tokenizer, lanes=2), workers)
    assert [next(loader)["keys"] for _ in range(24)] == want
    one_lane = _loader(_stream(dataset_ref, tokenizer), 0)
    assert [next(one_lane)["keys"] for _ in range(10)] != want[:10], "lanes give another (documented) order"


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_with_lanes_is_exact(dataset_ref: str, tokenizer: Any, workers: int) -> None:
    full = _loader(_stream(dataset_ref, tokenizer, lanes=2), 0)
    batches = [next(full) for _ in range(23)]
    for cut in (
        1,
        4,
        9,
        10,
        13,
    ):  # inside epoch 0, at the epoch's last batch, across the boundary, inside epoch 1
        pos = DataPosition.from_dict(batches[cut - 1]["position"])
        assert pos.lanes == 2
        resumed = _loader(_stream(dataset_ref, tokenizer, lanes=2, start=pos), workers)
        for want in batches[cut:]:
            got = next(resumed)
            assert got["keys"] == want["keys"] and got["position"] == want["position"]
            assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(
                got["labels"], want["labels"]
            )
            assert torch.equal(got["climate_x"], want["climate_x"])


def test_two_ranks_with_lanes_stay_disjoint_and_equal(
    make_dataset: Callable[..., str], tokenizer: Any
) -> None:
    ref = make_dataset(shards={"train": [5, 4, 4, 3, 3], "val": [2], "test": [2]})
    keys = []
    for rank in range(2):
        stream = _stream(ref, tokenizer, lanes=2, rank=rank, world=2)
        loader = _loader(stream, 2)
        keys.append([k for _ in range(stream.batches_per_epoch) for k in next(loader)["keys"]])
    assert len(keys[0]) == len(keys[1]) == 8  # floor(19 / 2) = 9 per rank, 4 whole micro-batches
    assert not set(keys[0]) & set(keys[1])
    assert all(len(set(k)) == len(k) for k in keys)


def test_refusals(dataset_ref: str, tokenizer: Any) -> None:
    with pytest.raises(ConfigError, match="lanes 0"):
        _stream(dataset_ref, tokenizer, lanes=0)
    with pytest.raises(ConfigError, match="skip_bad_samples"):
        _stream(dataset_ref, tokenizer, lanes=2, skip_bad_samples=True)
    with pytest.raises(ConfigError, match="resume with the same lanes"):
        _stream(dataset_ref, tokenizer, lanes=2, start=DataPosition(epoch=0, consumed=4, seed=5, lanes=1))
    odd = _stream(dataset_ref, tokenizer, lanes=2, start=DataPosition(epoch=0, consumed=3, seed=5, lanes=2))
    with pytest.raises(ConfigError, match="not a multiple of micro_batch 2"):
        next(iter(odd))
    old = DataPosition.from_dict(
        {"epoch": 1, "consumed": 4, "seed": 5}
    )  # a checkpoint from before lanes existed
    assert (
        old.lanes == 1 and next(iter(_stream(dataset_ref, tokenizer, start=old)))["position"]["consumed"] == 6
    )
    evaluation = _stream(dataset_ref, tokenizer, lanes=2, train=False, split="val")
    assert evaluation.lanes == 1, "evaluation is one pass in manifest order"
