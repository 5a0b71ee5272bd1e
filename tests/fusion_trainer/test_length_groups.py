"""Length-grouped batching (`ClimateTextStream(length_groups=G)`): the same samples once per epoch with no more padding,
a deterministic order that resumes exactly, and losses and gradients that do not depend on the padding (so the
saving is exact: only which samples share a batch changes)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fusion_trainer import FusionConfig, FusionModel
from fusion_trainer.config import TrainConfig
from fusion_trainer.data.stream import ClimateTextStream, DataPosition
from fusion_trainer.errors import ConfigError
from fusion_trainer.model.tiny import make_tiny_model

from .conftest import open_stream

SIZES = {"d_encoder": 32, "encoder_heads": 4, "n_heads": 4, "encoder_depth": 1, "gate_init": 0.5}


def _stream(ref: str, tokenizer: Any, **kw: Any) -> ClimateTextStream:
    stream: ClimateTextStream = open_stream(ref, tokenizer, **{"seed": 5, **kw})
    return stream


def _batches(stream: ClimateTextStream, n: int) -> list[dict[str, Any]]:
    it: Iterator[dict[str, Any]] = iter(stream)
    return [next(it) for _ in range(n)]


def _caption_lengths(batch: dict[str, Any]) -> list[int]:
    return [int(n) for n in (batch["labels"] != -100).sum(dim=1)]


def _padding(batch: dict[str, Any]) -> int:
    return int((batch["attention_mask"] == 0).sum())


@pytest.mark.parametrize("groups", [2, 3, 5])
def test_an_epoch_holds_the_same_samples_with_no_more_padding(
    dataset_ref: str, tokenizer: Any, groups: int
) -> None:
    plain, grouped = _stream(dataset_ref, tokenizer), _stream(dataset_ref, tokenizer, length_groups=groups)
    per_epoch = plain.batches_per_epoch
    assert grouped.batches_per_epoch == per_epoch == 10
    for epoch in range(2):
        a = _batches(_stream(dataset_ref, tokenizer, start=DataPosition(epoch=epoch, seed=5)), per_epoch)
        b = _batches(
            _stream(dataset_ref, tokenizer, length_groups=groups,
                    start=DataPosition(epoch=epoch, seed=5, length_groups=groups)),
            per_epoch,
        )  # fmt: skip
        keys_a = [k for x in a for k in x["keys"]]
        keys_b = [k for x in b for k in x["keys"]]
        assert len(set(keys_b)) == len(keys_b) and sorted(keys_a) == sorted(keys_b), (
            "each sample once per epoch"
        )
        lengths = [n for x in a for n in _caption_lengths(x)]
        assert len(set(lengths)) > 1, "the captions differ in length (else this test proves nothing)"
        pool = groups * 2  # micro_batch 2
        for start in range(0, len(keys_a), pool):  # each pool: the plain order's samples, sorted into batches
            assert sorted(keys_a[start : start + pool]) == sorted(keys_b[start : start + pool])
            spans = sorted(
                (min(_caption_lengths(x)), max(_caption_lengths(x)))
                for x in b[start // 2 : (start + pool) // 2]
            )
            assert all(hi <= lo for (_, hi), (lo, _) in zip(spans, spans[1:], strict=False)), spans
        assert sum(map(_padding, b)) <= sum(map(_padding, a))


def test_the_order_is_deterministic_and_resumes_exactly(dataset_ref: str, tokenizer: Any) -> None:
    full = _batches(_stream(dataset_ref, tokenizer, length_groups=3), 23)
    again = _batches(_stream(dataset_ref, tokenizer, length_groups=3), 23)
    assert [b["keys"] for b in full] == [b["keys"] for b in again]
    assert [b["keys"] for b in full[:10]] != [
        b["keys"] for b in _batches(_stream(dataset_ref, tokenizer), 10)
    ]
    for cut in (1, 4, 6, 9, 10, 13):  # inside a pool, at a pool's end, the epoch's last batch, into epoch 1
        pos = DataPosition.from_dict(full[cut - 1]["position"])
        assert pos.length_groups == 3
        resumed = iter(_stream(dataset_ref, tokenizer, length_groups=3, start=pos))
        for want in full[cut:]:
            got = next(resumed)
            assert got["keys"] == want["keys"] and got["position"] == want["position"]
            assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(
                got["climate_x"], want["climate_x"]
            )


def test_refusals(dataset_ref: str, tokenizer: Any) -> None:
    with pytest.raises(ConfigError, match="length_groups 0"):
        _stream(dataset_ref, tokenizer, length_groups=0)
    with pytest.raises(ConfigError, match="lanes 2"):
        _stream(dataset_ref, tokenizer, length_groups=2, lanes=2)
    with pytest.raises(ConfigError, match="resume with the same length_groups"):
        _stream(dataset_ref, tokenizer, length_groups=2, start=DataPosition(epoch=0, consumed=4, seed=5))
    odd = _stream(dataset_ref, tokenizer, length_groups=2,
                  start=DataPosition(epoch=0, consumed=3, seed=5, length_groups=2))  # fmt: skip
    with pytest.raises(ConfigError, match="not a multiple of micro_batch 2"):
        next(iter(odd))
    assert DataPosition.from_dict({"epoch": 1, "consumed": 4, "seed": 5}).length_groups == 1, (
        "older checkpoints"
    )
    assert _stream(dataset_ref, tokenizer, length_groups=4, train=False, split="val").length_groups == 1
    with pytest.raises(ValueError, match="length_groups: 2 cannot be combined with data_lanes: 2"):
        TrainConfig(shards="s", model="m", out="o", length_groups=2, data_lanes=2)


def _model(tmp_path: Path, fusion: str) -> FusionModel:
    folder = make_tiny_model("llama", tmp_path / "tiny")
    extra: dict[str, Any] = (
        {"n_prefix_tokens": 3, "prefix_position": "after_prompt"} if fusion == "prefix" else {}
    )
    torch.manual_seed(0)
    return FusionModel.from_base(folder, FusionConfig(fusion=fusion, n_variables=3, **SIZES, **extra),
                                 dtype=torch.float32)  # fmt: skip


def _widen(batch: dict[str, Any], extra: int, pad: int) -> dict[str, Any]:
    """The same batch padded `extra` columns wider (what a batch with a longer row would carry)."""
    b = batch["input_ids"].shape[0]
    return {
        "input_ids": torch.cat([batch["input_ids"], torch.full((b, extra), pad)], dim=1),
        "attention_mask": torch.cat(
            [batch["attention_mask"], torch.zeros(b, extra, dtype=torch.long)], dim=1
        ),
        "labels": torch.cat([batch["labels"], torch.full((b, extra), -100)], dim=1),
        "climate": batch["climate_x"],
    }


@pytest.mark.parametrize("fusion", ["prefix", "gated-xattn"])
@pytest.mark.parametrize("lean", [True, False])
def test_the_loss_and_gradients_do_not_depend_on_the_padding(
    dataset_ref: str, tokenizer: Any, tmp_path: Path, fusion: str, lean: bool
) -> None:
    model = _model(tmp_path, fusion)
    batch = _batches(_stream(dataset_ref, tokenizer, length_groups=3), 1)[0]
    losses, grads = [], []
    for extra in (0, 7):
        model.zero_grad()
        inputs = _widen(batch, extra, tokenizer.pad_token_id or 0)
        loss = model(**inputs, logits="none" if lean else "all").loss
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in model.fusion_named_parameters() if p.grad is not None})
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert grads[0] and set(grads[0]) == set(grads[1])
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_an_epochs_summed_token_loss_is_the_same_grouped_or_not(
    dataset_ref: str, tokenizer: Any, tmp_path: Path
) -> None:
    model = _model(tmp_path, "prefix")
    totals = []
    for groups in (1, 5):
        stream = _stream(dataset_ref, tokenizer, length_groups=groups)
        total = torch.zeros((), dtype=torch.float64)
        with torch.no_grad():
            for batch in _batches(stream, stream.batches_per_epoch):
                total += model.token_losses(batch["input_ids"], batch["attention_mask"], batch["climate_x"],
                                            batch["labels"]).double().sum()  # fmt: skip
        totals.append(float(total))
    assert totals[0] == pytest.approx(totals[1], rel=1e-6)


def test_training_with_length_groups_resumes_exactly(
    make_config: Any, dataset_ref: str, tokenizer: Any
) -> None:
    import json

    from fusion_trainer.training.train import train

    def keys(run: Path) -> list[list[str]]:
        return [
            r["keys"] for r in map(json.loads, (run / "samples" / "rank0.jsonl").read_text().splitlines())
        ]

    common: dict[str, Any] = dict(steps=4, micro_batch=2, length_groups=3)
    straight = train(make_config("straight", **common))
    ds_stream = open_stream(dataset_ref, tokenizer, seed=0, micro_batch=2, max_length=160, length_groups=3)
    assert keys(Path(straight.run_dir)) == [b["keys"] for b in _batches(ds_stream, 4)], "the grouped order"
    train(make_config("resumed", stop_at_step=2, **common))
    second = train(make_config("resumed", resume=True, **common))
    assert keys(Path(second.run_dir)) == keys(Path(straight.run_dir))
    with pytest.raises(ConfigError, match=r"length_groups 3, this run has length_groups 1.*length_groups=3"):
        train(make_config("resumed", resume=True, **{**common, "steps": 6, "length_groups": 1}))
