"""Checkpoints: only the trainable part, complete-marker discipline, world-size guard, atomic adapter export."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fusion_trainer.config import FusionConfig, TrainConfig
from fusion_trainer.errors import CheckpointError
from fusion_trainer.model.fusion_model import FusionModel
from fusion_trainer.training.checkpoint import (
    checkpoint_tensor_names,
    export_adapter,
    find_latest_checkpoint,
    frozen_digest,
    load_checkpoint,
)
from fusion_trainer.training.train import train
from safetensors.torch import load_file


def _model(config: TrainConfig) -> FusionModel:
    fusion = FusionConfig(**config.fusion.model_dump(), n_variables=3)
    return FusionModel.from_base(config.model, fusion, dtype=torch.float32)


@pytest.mark.parametrize("fusion", ["xattn", "gated-xattn"])
def test_checkpoint_holds_exactly_the_trainable_weights(
    make_config: Callable[..., TrainConfig], fusion: str
) -> None:
    config = make_config(steps=2, fusion={"fusion": fusion, "d_encoder": 32, "encoder_heads": 4, "n_heads": 4,
                                          "encoder_depth": 1, "every_n_layers": 1})  # fmt: skip
    result = train(config)
    assert result.checkpoint is not None
    stored = checkpoint_tensor_names(result.checkpoint)
    prefix = "mp_rank_00_model_states.module."
    module_names = {n.removeprefix(prefix) for n in stored if n.startswith(prefix)}
    model = _model(config)
    trainable = {n for n, _ in model.fusion_named_parameters()}
    assert module_names == trainable
    if fusion == "gated-xattn":
        assert any(".fusion_block." in n for n in module_names), "fusion blocks inside the frozen LM are kept"


def test_newest_complete_checkpoint_wins(make_config: Callable[..., TrainConfig]) -> None:
    config = make_config(steps=3, save_every=1)
    train(config)
    run = Path(config.out)
    assert find_latest_checkpoint(run) == run / "checkpoints" / "step3"
    (run / "checkpoints" / "step3" / "COMPLETE").unlink()
    (run / "checkpoints" / "step9").mkdir()  # a save that never finished
    assert find_latest_checkpoint(run) == run / "checkpoints" / "step2"
    assert find_latest_checkpoint(run / "nothing-here") is None


def test_load_refuses_incomplete_or_other_world_size(tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoints" / "step4"
    ckpt.mkdir(parents=True)
    engine = SimpleNamespace(world_size=1)
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint(engine, ckpt, rank=0)
    (ckpt / "COMPLETE").write_text(json.dumps({"step": 4, "world": 2}))
    with pytest.raises(CheckpointError, match="--nproc 2"):
        load_checkpoint(engine, ckpt, rank=0)


def test_export_adapter_replaces_final_atomically(
    make_config: Callable[..., TrainConfig], tmp_path: Path
) -> None:
    config = make_config()
    model = _model(config)
    run = tmp_path / "run"
    run.mkdir()
    first = export_adapter(model, run, rank=0)
    with torch.no_grad():
        for p in model.fusion_params():
            p.add_(1.0)
    second = export_adapter(model, run, rank=0)
    assert first == second == run / "final"
    assert sorted(p.name for p in run.iterdir()) == ["final"], "no temporary folders are left behind"
    weights = load_file(str(run / "final" / "adapter.safetensors"))
    for name, param in model.fusion_named_parameters():
        assert torch.equal(weights[name], param.detach())
    stale = run / ".final.old"  # a run killed between replacing final/ and removing the old one
    (stale / "adapter").mkdir(parents=True)
    (stale / "adapter" / "adapter.safetensors").write_bytes(b"old")
    with torch.no_grad():
        for p in model.fusion_params():
            p.add_(1.0)
    assert export_adapter(model, run, rank=0) == run / "final", "it failed with Errno 39 (directory not empty)"
    assert sorted(p.name for p in run.iterdir()) == ["final"]
    weights = load_file(str(run / "final" / "adapter.safetensors"))
    for name, param in model.fusion_named_parameters():
        assert torch.equal(weights[name], param.detach())


def test_frozen_digest_sees_a_change_in_the_base(make_config: Callable[..., TrainConfig]) -> None:
    model = _model(make_config())
    before = frozen_digest(model)
    assert frozen_digest(model) == before
    with torch.no_grad():
        next(p for p in model.parameters() if not p.requires_grad).view(-1)[0] += 1e-3
    assert frozen_digest(model) != before
