"""`fusion-eval --base-loss-from FILE`: the frozen base's loss never sees the climate or the adapter, so another seed
of the same recipe scores it identically; an earlier evaluation's is reused when its recorded inputs are this
evaluation's; on other inputs the base is scored here, with a warning that names what differs."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from fusion_trainer.config import TrainConfig
from fusion_trainer.data.stream import open_shards
from fusion_trainer.errors import ConfigError
from fusion_trainer.evaluation.core import EvalContext
from fusion_trainer.evaluation.evaluate import base_loss_section
from fusion_trainer.runs import load_run_for
from fusion_trainer.training.train import train


def _context(config: TrainConfig, ref: str, **kw: Any) -> EvalContext:
    data = open_shards(ref)
    run = load_run_for(Path(config.out), data)
    values: dict[str, Any] = dict(run_dir=Path(config.out), config=run.config, model=run.model, dataset=data,
                                  split="val", prompt=run.prompt, device=torch.device("cpu"), batch_size=2,
                                  max_batches=None, loss_samples=3)  # fmt: skip
    values.update(kw)
    return EvalContext(**values)


def test_another_seed_reuses_the_base_loss_and_other_inputs_score_it_here(
    make_config: Callable[..., TrainConfig], dataset_ref: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    seed0, seed1 = make_config("run0", steps=1, seed=0), make_config("run1", steps=1, seed=1)
    train(seed0)
    train(seed1)
    first = base_loss_section(_context(seed0, dataset_ref))["base"]
    assert first["samples"] == 3 and first["inputs"]["base"].startswith("sha256:")
    fresh = base_loss_section(_context(seed1, dataset_ref))["base"]
    assert fresh["loss"] == first["loss"] and fresh["inputs"] == first["inputs"]  # the seed does not reach the base
    earlier = tmp_path / "metrics-seed0.json"
    earlier.write_text(json.dumps({"base": first, "fused": {"loss": 9.0}}))

    from fusion_trainer.model import base as base_module

    def no_load(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the base was loaded although its loss was reused")

    monkeypatch.setattr(base_module, "load_base", no_load)
    reused = base_loss_section(_context(seed1, dataset_ref, base_loss_from=earlier))["base"]
    assert reused["loss"] == first["loss"] and reused["tokens"] == first["tokens"]
    assert reused["reused_from"] == str(earlier)

    # other inputs: scored here (the base is loaded), with a warning that names what differs
    monkeypatch.undo()
    with caplog.at_level(logging.WARNING, logger="fusion_trainer.evaluation.evaluate"):
        other = base_loss_section(_context(seed1, dataset_ref, base_loss_from=earlier, loss_samples=4))["base"]
    assert "reused_from" not in other and other["samples"] == 4 and other["inputs"]["loss_samples"] == 4
    assert "not reused, the base is scored here: batches_sha256 " in caplog.text
    assert "; loss_samples 3 there, 4 here" in caplog.text
    # captions cut shorter: the batches differ, so the loss is not reused even with the samples unchanged
    shorter = _context(seed1, dataset_ref, base_loss_from=earlier)
    cut = len(shorter.model.tokenizer(shorter.prompt)["input_ids"]) + 4  # four caption tokens a row
    shorter.config = shorter.config.model_copy(update={"max_length": cut})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fusion_trainer.evaluation.evaluate"):
        assert "reused_from" not in base_loss_section(shorter)["base"]
    assert "batches_sha256" in caplog.text and f"max_length 160 there, {cut} here" in caplog.text
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"base": {"loss": 1.0}}))
    assert "reused_from" not in base_loss_section(_context(seed1, dataset_ref, base_loss_from=old))["base"]
    assert "it records no inputs" in caplog.text
    with pytest.raises(ConfigError, match="missing.json: cannot read a fusion-eval JSON"):
        base_loss_section(_context(seed1, dataset_ref, base_loss_from=tmp_path / "missing.json"))
