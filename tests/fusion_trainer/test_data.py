"""Streaming: per-rank epochs (disjoint, equal counts), deterministic order and resume, normalisation, masking."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fusion_trainer.config import TrainConfig
from fusion_trainer.data.stream import (
    DEFAULT_PROMPT,
    ClimateTextStream,
    DataPosition,
    epoch_samples,
    iter_shard,
    open_shards,
    render_prompt,
)
from fusion_trainer.errors import ConfigError, DataError

from .conftest import open_stream


def _stream(ref: str, tokenizer: Any, **kw: Any) -> ClimateTextStream:
    stream: ClimateTextStream = open_stream(ref, tokenizer, **{"seed": 3, **kw})
    return stream


def _keys(stream: ClimateTextStream, n_batches: int) -> list[list[str]]:
    it = iter(stream)
    return [next(it)["keys"] for _ in range(n_batches)]


def test_one_rank_sees_every_train_sample_once_per_epoch(dataset_ref: str, tokenizer: Any) -> None:
    stream = _stream(dataset_ref, tokenizer)
    assert stream.batches_per_epoch == 10  # 20 train samples, micro-batch 2
    batches = _keys(stream, 20)
    epoch0 = [k for b in batches[:10] for k in b]
    epoch1 = [k for b in batches[10:] for k in b]
    expected = {f"synth-train-{i:05d}" for i in range(20)}
    assert set(epoch0) == expected and len(epoch0) == 20
    assert set(epoch1) == expected
    assert epoch0 != epoch1, "the order must be reshuffled every epoch"
    assert _keys(_stream(dataset_ref, tokenizer), 20) == batches, "same seed, same order"
    assert _keys(_stream(dataset_ref, tokenizer, seed=4), 10) != batches[:10]


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_see_disjoint_data_and_equal_counts_with_odd_shards(dataset_ref: str, world: int) -> None:
    ds = open_shards(dataset_ref)
    assert len(ds.shards("train")) == 3
    per_rank = []
    for epoch in range(2):
        seen: list[set[str]] = []
        for rank in range(world):
            keys = [
                s.key
                for s in epoch_samples(ds, "train", epoch=epoch, rank=rank, world=world, seed=0, shuffle=True)
            ]
            per_rank.append(len(keys))
            seen.append(set(keys))
        for a in range(world):
            for b in range(a + 1, world):
                assert not seen[a] & seen[b], f"ranks {a} and {b} share samples in epoch {epoch}"
    assert set(per_rank) == {20 // world}


def test_two_ranks_run_the_same_number_of_batches(dataset_ref: str, tokenizer: Any) -> None:
    counts = [
        _stream(dataset_ref, tokenizer, rank=r, world=2, micro_batch=3).batches_per_epoch for r in range(2)
    ]
    assert counts == [3, 3]  # floor(20 / 2) = 10 samples per rank -> 3 full micro-batches


@pytest.mark.parametrize("world", [1, 2])
def test_resume_reproduces_the_order_from_any_batch(dataset_ref: str, tokenizer: Any, world: int) -> None:
    for rank in range(world):
        full = iter(_stream(dataset_ref, tokenizer, rank=rank, world=world))
        batches = [next(full) for _ in range(12)]
        for cut in (3, 4, 7):  # inside epoch 0, and at or across the epoch boundary for world 2
            pos = DataPosition.from_dict(batches[cut - 1]["position"])
            resumed = iter(_stream(dataset_ref, tokenizer, rank=rank, world=world, start=pos))
            for want in batches[cut:]:
                got = next(resumed)
                assert got["keys"] == want["keys"]
                assert torch.equal(got["input_ids"], want["input_ids"])


def test_climate_is_normalised_with_the_manifest(dataset_ref: str, tokenizer: Any) -> None:
    ds = open_shards(dataset_ref)
    batch = next(iter(_stream(dataset_ref, tokenizer)))
    key = batch["keys"][0]
    raw = next(s for shard in ds.shards("train") for s in iter_shard(ds, shard) if s.key == key)
    array = np.load(io.BytesIO(raw.members["climate.npy"]), allow_pickle=False)
    for i, v in enumerate(ds.manifest.variable_names):
        stats = ds.manifest.normalization[v]
        expected = (array[:, i] - stats.mean) / stats.std
        np.testing.assert_allclose(batch["climate_x"][0, :, i].numpy(), expected, rtol=1e-5, atol=1e-5)
    assert batch["climate_x"].shape == (2, 2, 3, 4, 5)  # (B, T, V, H, W)


def test_loss_only_on_caption_tokens(dataset_ref: str, tokenizer: Any) -> None:
    stream = _stream(dataset_ref, tokenizer)
    batch = next(iter(stream))
    n_prompt = len(stream.prompt_ids)
    for i, text in enumerate(batch["texts"]):
        labels, mask = batch["labels"][i], batch["attention_mask"][i]
        assert (labels[:n_prompt] == -100).all()
        caption = labels[labels != -100].tolist()
        assert caption[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(caption[:-1]).strip() == text
        assert (labels[mask == 0] == -100).all(), "padding never carries a label"
        assert batch["input_ids"][i, mask.bool()].tolist()[:n_prompt] == stream.prompt_ids


def test_prompt_carries_the_train_means(dataset_ref: str) -> None:
    ds = open_shards(dataset_ref)
    prompt = render_prompt(DEFAULT_PROMPT, ds)
    t2m = ds.manifest.normalization["T2M"].mean
    assert f"{t2m:.4g} K" in prompt and "T2M, U10M, V10M" in prompt
    with pytest.raises(ConfigError, match=r"prompt_template .*\{thaw_readout_example\}"):
        render_prompt("{nope}", ds)
    with pytest.raises(ConfigError, match=r"prompt_template: KeyError\('nope'\); use only .*\{thaw_caption_example\}"):
        TrainConfig.from_yaml(None, shards="x", model="m", out="o", prompt_template="{nope}")


def test_workers_give_the_same_batches_as_no_workers(dataset_ref: str, tokenizer: Any) -> None:
    stream = _stream(dataset_ref, tokenizer, split="val", train=False)
    plain = [b["keys"] for b in torch.utils.data.DataLoader(stream, batch_size=None, num_workers=0)]
    with_workers = [b["keys"] for b in torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)]
    assert plain == with_workers and len(plain) == 4


def test_eval_split_is_one_pass_in_manifest_order(dataset_ref: str, tokenizer: Any) -> None:
    keys = [k for b in _stream(dataset_ref, tokenizer, split="val", train=False) for k in b["keys"]]
    assert keys == [f"synth-val-{i:05d}" for i in range(20, 28)]
    halves = [
        [
            k
            for b in _stream(dataset_ref, tokenizer, split="val", train=False, rank=r, world=2)
            for k in b["keys"]
        ]
        for r in range(2)
    ]
    assert len(halves[0]) == len(halves[1]) == 4 and not set(halves[0]) & set(halves[1])


@pytest.mark.parametrize(("world", "micro_batch"), [(1, 3), (2, 3), (1, 16)])
def test_evaluation_keeps_the_last_partial_batch(
    dataset_ref: str, tokenizer: Any, world: int, micro_batch: int
) -> None:
    sizes = [
        [len(b["keys"]) for b in _stream(dataset_ref, tokenizer, split="val", train=False, rank=r, world=world,
                                         micro_batch=micro_batch)]
        for r in range(world)
    ]  # fmt: skip
    per_rank = 8 // world
    assert all(sum(s) == per_rank for s in sizes), sizes
    assert len({len(s) for s in sizes}) == 1, "every rank runs the same number of evaluation batches"


def test_streams_from_s3(make_dataset: Callable[..., str], s3_bucket: str, tokenizer: Any) -> None:
    ref = make_dataset(root=f"{s3_bucket}/merra2-text")
    assert ref.startswith("s3://")
    keys = _keys(_stream(ref, tokenizer), 10)
    assert {k for b in keys for k in b} == {f"synth-train-{i:05d}" for i in range(20)}


def test_a_pickled_climate_member_is_refused(
    tmp_path: Any, make_dataset: Callable[..., str], tokenizer: Any
) -> None:
    ref = make_dataset(shards={"train": [2], "val": [2]})
    ds = open_shards(ref)
    shard = ds.shards("train")[0]
    path = ds.url_of(shard.path)
    import hashlib
    import tarfile

    buf = io.BytesIO()
    np.save(buf, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in members:
            if info.name.endswith(".climate.npy"):
                data = buf.getvalue()
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = out.getvalue()
    with open(path, "wb") as fh:
        fh.write(data)
    manifest_path = ds.url_of("manifest.json")
    with open(manifest_path) as fh:
        manifest = json.loads(fh.read())
    manifest["shards"][0].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    with open(manifest_path, "w") as fh:
        fh.write(json.dumps(manifest))
    with pytest.raises(DataError, match="not a plain numeric"):
        next(iter(_stream(ref, tokenizer, micro_batch=1)))


@pytest.mark.parametrize("change", [600, -600])
def test_a_shard_of_another_size_states_its_size(make_dataset: Callable[..., str], change: int) -> None:
    """A longer file is read to one byte past the listed size: the error said 'more than <listed + 1> bytes'."""
    ds = open_shards(make_dataset(name="resized"))
    shard = ds.shards("train")[0]
    path = Path(ds.url_of(shard.path).removeprefix("file://"))
    raw = path.read_bytes()
    path.write_bytes(raw + b"\0" * change if change > 0 else raw[:change])
    size = f"more than {shard.bytes}" if change > 0 else str(shard.bytes + change)
    with pytest.raises(DataError, match=rf"fails its checks \({size} bytes where the manifest lists {shard.bytes}\)"):
        list(iter_shard(ds, shard))


def test_collate_refuses_samples_of_different_shapes() -> None:
    """One batch, one climate shape: a dataset that mixes shapes (edge tiles kept) is refused with the way out."""
    from fusion_trainer.data.stream import Sample, collate

    full = Sample("a", "s", np.ones((2, 3, 4, 5), dtype=np.float32), "x")
    same = Sample("b", "s", np.full((2, 3, 4, 5), 2.0, dtype=np.float32), "y")
    batch = collate([full, same], [([1, 2], [1, 2]), ([3], [3])], pad_id=0)
    assert batch["climate_x"].shape == (2, 2, 3, 4, 5)  # (B, T, V, H, W)
    assert torch.equal(batch["climate_x"][1], torch.full((2, 3, 4, 5), 2.0))
    edge = Sample("c", "s", np.ones((2, 3, 4, 3), dtype=np.float32), "z")
    with pytest.raises(DataError, match=r"one climate shape.*c \(2, 3, 4, 3\).*edge_tiles: drop"):
        collate([full, edge], [([1], [1]), ([2], [2])], pad_id=0)


def test_thaw_example_puts_the_mean_just_above_freezing_and_the_minimum_below(dataset_ref: str) -> None:
    from climate_text_schema import parse_caption_numbers

    ds = open_shards(dataset_ref)
    prompt = render_prompt(
        "{thaw_readout_example}{thaw_caption_example}\n{caption_example}", ds, caption="numbers"
    )
    readout, thaw, plain = prompt.split("\n")
    numbers, means = parse_caption_numbers(thaw), parse_caption_numbers(plain)
    std = ds.manifest.normalization["T2M"].std
    assert numbers["t2m_mean_c"] == 1.0 and numbers["t2m_min_c"] == pytest.approx(1.0 - std, abs=0.06)
    assert numbers["t2m_min_c"] < 0 < numbers["t2m_mean_c"] < numbers["t2m_max_c"]
    assert readout.startswith("Readout: temperature 1.0 °C, ranging from -")
    moved = {k for k in means if k.startswith(("t2m", "dew", "td"))}
    assert {k: v for k, v in numbers.items() if k not in moved} == {
        k: v for k, v in means.items() if k not in moved
    }
    assert len(means) - len(moved) >= 2  # something besides the temperatures stays at the train means
