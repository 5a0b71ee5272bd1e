"""DeepSpeed training on one process, ZeRO 0-3: the loss falls, the frozen base is untouched, artifacts are written."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from fusion_trainer.config import FusionConfig, TrainConfig
from fusion_trainer.data.stream import open_shards
from fusion_trainer.metrics import read_metrics
from fusion_trainer.model.fusion_model import FusionModel
from fusion_trainer.training.checkpoint import checkpoint_tensor_names, frozen_digest
from fusion_trainer.training.train import lr_lambda, train
from safetensors.torch import load_file


def _fresh_model(config: TrainConfig) -> FusionModel:
    manifest = open_shards(config.shards).manifest
    fusion = FusionConfig(
        **config.fusion.model_dump(),
        variables=manifest.variable_names,
        normalization={v: s.model_dump() for v, s in manifest.normalization.items()},
    )
    return FusionModel.from_base(config.model, fusion, dtype=torch.float32)


def _assert_no_frozen_weights(ckpt: Path, model: FusionModel) -> None:
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    stored = checkpoint_tensor_names(ckpt)
    leaked = [s for s in stored if any(s.endswith(f) for f in frozen)]
    assert not leaked, f"frozen base weights inside the checkpoint: {leaked[:5]}"
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen_numel = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    # weights + fp32 master + two Adam moments of the trainable part only (+ small bookkeeping)
    assert sum(stored.values()) <= 4 * trainable + 1000
    assert sum(stored.values()) < 4 * trainable + frozen_numel


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_zero_stage_trains_and_leaves_the_base_alone(
    make_config: Callable[..., TrainConfig], zero: int
) -> None:
    config = make_config(f"zero{zero}", zero=zero, steps=20)
    result = train(config)

    assert result.step == 20 and len(result.losses) == 20
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert last < first - 0.1, f"loss did not fall: {first:.3f} -> {last:.3f}"

    model = _fresh_model(config)
    assert result.frozen_digest_start == result.frozen_digest_end == frozen_digest(model)

    assert result.checkpoint is not None and result.checkpoint.name == "step20"
    _assert_no_frozen_weights(result.checkpoint, model)

    assert result.adapter_dir is not None
    weights = load_file(str(result.adapter_dir / "adapter.safetensors"))
    assert set(weights) == {n for n, _ in model.fusion_named_parameters()}
    record = json.loads((result.adapter_dir / "fusion_config.json").read_text())
    assert record["variables"] == ["T2M", "U10M", "V10M"] and set(record["normalization"]) == set(
        record["variables"]
    )
    assert record["base_fingerprint"] == model.base_fingerprint
    loaded = FusionModel.load_adapter(result.adapter_dir, base=config.model, dtype=torch.float32)
    for name, param in loaded.fusion_named_parameters():
        assert torch.equal(param, weights[name])
    assert any(
        not torch.equal(p, dict(model.fusion_named_parameters())[n])
        for n, p in loaded.fusion_named_parameters()
    )


def test_run_dir_holds_config_metrics_and_val_records(make_config: Callable[..., TrainConfig]) -> None:
    config = make_config(steps=6, log_every=2, eval_every=3, grad_accum=2, micro_batch=2)
    result = train(config)
    run = Path(config.out)
    assert TrainConfig(**yaml.safe_load((run / "config.yaml").read_text())) == config
    records = read_metrics(run)
    train_records = [r for r in records if "split" not in r]
    assert [r["step"] for r in train_records] == [2, 4, 6]
    for r in train_records:
        assert r["loss"] > 0 and r["samples_per_s"] > 0 and r["tokens_per_s"] > 0 and r["peak_memory_mb"] > 0
        assert r["mfu"] is None  # CPU: no known peak
        assert set(r) >= {"step", "loss", "lr", "samples_per_s", "tokens_per_s"}
    val = [r for r in records if r.get("split") == "val"]
    assert [r["step"] for r in val] == [3, 6] and all(r["val_loss"] > 0 for r in val)
    assert result.val_loss == val[-1]["val_loss"]
    keys = [json.loads(line) for line in (run / "samples" / "rank0.jsonl").read_text().splitlines()]
    assert [k["step"] for k in keys] == list(range(1, 7)) and all(len(k["keys"]) == 4 for k in keys)


def test_schedule_warms_up_then_decays_to_the_floor(make_config: Callable[..., TrainConfig]) -> None:
    fn = lr_lambda(make_config(steps=100, warmup_steps=10, min_lr_ratio=0.1))
    assert fn(0) == pytest.approx(0.1) and fn(9) == pytest.approx(1.0)
    assert fn(10) == pytest.approx(1.0) and fn(55) == pytest.approx(0.55) and fn(100) == pytest.approx(0.1)
    constant = lr_lambda(make_config(steps=100, schedule="constant"))
    assert constant(0) == constant(99) == 1.0


def test_deepspeed_config_is_generated_and_user_file_merged(
    make_config: Callable[..., TrainConfig], tmp_path: Path
) -> None:
    config = make_config(zero=3, micro_batch=2, grad_accum=3, grad_clip=0.5)
    ds = config.deepspeed_config(world=2)
    assert ds["train_batch_size"] == 12 and ds["gradient_accumulation_steps"] == 3
    assert ds["zero_optimization"] == {"stage": 3} and ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["params"]["torch_adam"] is True and ds["bf16"] == {"enabled": False}
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"overlap_comm": True}, "train_batch_size": "auto"}))
    merged = make_config(deepspeed=str(user), zero=2).deepspeed_config(world=1)
    assert (
        merged["zero_optimization"] == {"stage": 2, "overlap_comm": True} and merged["train_batch_size"] == 4
    )


def test_trainable_parameter_groups(make_config: Callable[..., TrainConfig]) -> Any:
    from fusion_trainer.training.train import _param_groups

    model = _fresh_model(make_config())
    groups = _param_groups(model, 0.1)
    ids = {id(p) for g in groups for p in g["params"]}
    assert ids == {id(p) for p in model.fusion_params()}
    assert all(p.ndim < 2 for p in groups[1]["params"]) and groups[1]["weight_decay"] == 0.0


def test_dataloader_workers_keep_the_order_and_the_result(make_config: Callable[..., TrainConfig]) -> None:
    runs = [train(make_config(f"workers{n}", steps=6, num_workers=n)) for n in (0, 2)]
    keys = [(Path(r.run_dir) / "samples" / "rank0.jsonl").read_text() for r in runs]
    assert keys[0] == keys[1]
    assert runs[0].losses == runs[1].losses
