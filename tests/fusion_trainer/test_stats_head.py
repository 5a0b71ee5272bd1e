"""The stats head: an auxiliary probe on the climate tokens (TrainConfig.stats_loss_weight)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from climate_text_schema import META_MEMBER
from fusion_trainer import FusionConfig, FusionModel
from fusion_trainer.config import TrainConfig
from fusion_trainer.data.stream import ClimateTextStream, epoch_samples, open_shards
from fusion_trainer.metrics import read_metrics
from fusion_trainer.model.tiny import make_tiny_model
from fusion_trainer.training.train import train

SMALL = {"n_variables": 3, "d_encoder": 32, "encoder_heads": 4, "encoder_depth": 1, "n_prefix_tokens": 4}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("tiny") / "llama")


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 500, (2, 6), generator=g)
    return ids, torch.ones_like(ids), torch.randn(2, 4, 3, 5, 6, generator=g)


def test_stats_head_predicts_mean_min_max_per_variable_and_trains(tiny_llama: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = FusionModel.from_base(tiny_llama, FusionConfig(fusion="prefix", stats_head=True, **SMALL))
    ids, mask, climate = _inputs()
    out = model(ids, mask, climate, labels=ids)
    assert out.climate_stats is not None and out.climate_stats.shape == (2, 3, 3)
    names = [n for n, _ in model.fusion_named_parameters()]
    assert "encoder.stats_head.proj.weight" in names  # trainable, so saved in adapters and checkpoints
    # a few steps on the probe alone fit a target that depends on the climate: the encoder can carry statistics
    target = climate.mean(dim=(1, 3, 4))[..., None].expand(-1, -1, 3)  # (B, V, 3)
    opt = torch.optim.Adam(model.fusion_params(), lr=1e-2)
    first = None
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(model(ids, mask, climate).climate_stats, target)
        first = float(loss) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < 0.1 * first
    model.save_adapter(tmp_path / "adapter")
    loaded = FusionModel.load_adapter(tmp_path / "adapter")
    assert loaded.config.stats_head
    assert torch.allclose(loaded(ids, mask, climate).climate_stats, model(ids, mask, climate).climate_stats)


def test_without_stats_head_there_is_no_prediction(tiny_llama: Path) -> None:
    model = FusionModel.from_base(tiny_llama, FusionConfig(fusion="xattn", n_heads=4, **SMALL))
    ids, mask, climate = _inputs()
    assert model(ids, mask, climate).climate_stats is None
    assert not any("stats_head" in n for n, _ in model.named_parameters())


def test_batches_carry_each_samples_normalised_stats(dataset_ref: str, tokenizer: Any) -> None:
    ds = open_shards(dataset_ref)
    plain = ClimateTextStream(ds, "train", tokenizer, prompt="Climate:", micro_batch=4, max_length=160)
    assert "stats" not in next(iter(plain))  # computed only when asked for
    stream = ClimateTextStream(
        ds, "train", tokenizer, prompt="Climate:", micro_batch=4, max_length=160, stats=True
    )
    batch = next(iter(stream))
    names = ds.manifest.variable_names
    assert batch["stats"].shape == (4, len(names), 3)
    raw = {r.key: r for r in epoch_samples(ds, "train", epoch=0, rank=0, world=1, seed=0, shuffle=False)}
    for row, key in enumerate(batch["keys"]):
        meta = json.loads(raw[key].members[META_MEMBER])
        for v, name in enumerate(names):
            norm = ds.manifest.normalization[name]
            for s, stat in enumerate(("mean", "min", "max")):
                expected = (meta["stats"][name][stat] - norm.mean) / norm.std
                assert batch["stats"][row, v, s].item() == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_training_with_the_stats_loss_logs_it_and_it_falls(make_config: Callable[..., TrainConfig]) -> None:
    config = make_config("stats", steps=30, stats_loss_weight=1.0, log_every=5)
    result = train(config)
    records = [r for r in read_metrics(Path(config.out)) if "split" not in r]
    assert all("stats_loss" in r for r in records)
    assert records[-1]["stats_loss"] < 0.5 * records[0]["stats_loss"]
    record = json.loads((result.adapter_dir / "fusion_config.json").read_text())  # type: ignore[operator]
    assert record["stats_head"] is True
