"""`fusion-eval --loss-samples N`: the losses and gains are scored on N samples spread evenly over the split (the
same ones in every pass), not on its first batches in manifest order."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from fusion_trainer.config import TrainConfig
from fusion_trainer.data.stream import epoch_samples, open_shards
from fusion_trainer.evaluation.core import EvalContext
from fusion_trainer.evaluation.evaluate import evaluate_run
from fusion_trainer.runs import load_run_for
from fusion_trainer.training.train import train


def test_loss_samples_spread_over_the_split(make_config: Callable[..., TrainConfig], dataset_ref: str) -> None:
    config = make_config(steps=1)
    train(config)
    data = open_shards(dataset_ref)
    run = load_run_for(Path(config.out), data)
    order = [raw.key for raw in epoch_samples(data, "val", epoch=0, rank=0, world=1, seed=0, shuffle=False)]
    assert len(order) == 8

    def keys(loss_samples: int | None) -> list[str]:
        ctx = EvalContext(run_dir=Path(config.out), config=run.config, model=run.model, dataset=data, split="val",
                          prompt=run.prompt, device=torch.device("cpu"), batch_size=2, max_batches=None,
                          loss_samples=loss_samples)  # fmt: skip
        return [k for batch in ctx.batches() for k in batch["keys"]]

    spread = [order[int(i)] for i in np.linspace(0, 7, 3).round()]
    assert keys(3) == spread == [order[0], order[4], order[7]]
    assert keys(3) == spread  # the same samples on every pass (the gains compare passes)
    assert keys(None) == keys(50) == order

    result = evaluate_run(Path(config.out), dataset_ref, "val", batch_size=2, generate_limit=2, max_new_tokens=4,
                          loss_samples=3)  # fmt: skip
    assert result["fused"]["samples"] == result["base"]["samples"] == 3


def test_the_own_climate_pass_runs_once_for_the_loss_and_both_gains(
    make_config: Callable[..., TrainConfig], dataset_ref: str
) -> None:
    """The fused loss and both grounding gains share one pass with each sample's own climate: the fused loss is the
    same as `evaluate_loss`'s, and through the three sections `token_losses` runs once per batch for it plus once per
    batch for each swap; the gains are what they are without the shared pass."""
    from fusion_trainer.errors import ConfigError
    from fusion_trainer.evaluation.core import evaluate_loss, grounding_gain
    from fusion_trainer.evaluation.evaluate import fused_loss_section, grounding_gain_section
    from fusion_trainer.evaluation.sections import same_place_gain_section

    config = make_config(steps=1)
    train(config)
    data = open_shards(dataset_ref)
    run = load_run_for(Path(config.out), data)
    ctx = EvalContext(run_dir=Path(config.out), config=run.config, model=run.model, dataset=data, split="val",
                      prompt=run.prompt, device=torch.device("cpu"), batch_size=3, max_batches=None)  # fmt: skip
    batches = len(list(ctx.batches()))  # 8 samples: 3 batches
    calls = 0
    inner = run.model.token_losses

    def counted(*args: object, **kwargs: object) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return inner(*args, **kwargs)

    run.model.token_losses = counted  # type: ignore[method-assign]
    fused = fused_loss_section(ctx)["fused"]
    gain = grounding_gain_section(ctx)["grounding_gain"]
    same_place = same_place_gain_section(ctx)["same_place_gain"]
    assert calls == 3 * batches  # the own pass once, then each swap
    reference = evaluate_loss(run.model, ctx.batches(), torch.device("cpu"))
    assert fused["loss"] == pytest.approx(reference.loss, rel=1e-5)
    assert (fused["tokens"], fused["samples"]) == (reference.tokens, reference.samples) == (fused["tokens"], 8)
    assert gain == grounding_gain(run.model, ctx.batches(), ctx.device)  # computed alone, own pass included
    assert gain["caption"]["own"] == pytest.approx(fused["loss"], rel=1e-9)
    assert same_place["caption"]["own"] == gain["caption"]["own"]
    for flags in ({"batch_size": 0}, {"generate_batch_size": -1}):
        with pytest.raises(ConfigError, match="give 1 or more"):
            evaluate_run(Path(config.out), dataset_ref, "val", **flags)  # type: ignore[arg-type]
