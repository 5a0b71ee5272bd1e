"""`data_lanes`: training with DataLoader workers that read disjoint lanes of the rank's shards, and its resume."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from fusion_trainer.config import TrainConfig
from fusion_trainer.data.stream import DEFAULT_PROMPT, ClimateTextStream, open_shards, render_prompt
from fusion_trainer.errors import ConfigError
from fusion_trainer.metrics import read_metrics
from fusion_trainer.training.train import train
from safetensors.torch import load_file


def _keys(run: Path) -> list[list[str]]:
    lines = (run / "samples" / "rank0.jsonl").read_text().splitlines()
    return [r["keys"] for r in map(json.loads, lines)]


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run) if "split" not in r]


def _stream_keys(ref: str, tokenizer: Any, lanes: int, n: int) -> list[list[str]]:
    ds = open_shards(ref)
    stream = ClimateTextStream(
        ds,
        "train",
        tokenizer,
        prompt=render_prompt(DEFAULT_PROMPT, ds),
        micro_batch=2,
        max_length=160,
        lanes=lanes,
    )
    batches = iter(stream)
    return [next(batches)["keys"] for _ in range(n)]


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_two_lanes_train_and_resume_exactly(
    make_config: Callable[..., TrainConfig], dataset_ref: str, tokenizer: Any
) -> None:
    common: dict[str, Any] = dict(steps=4, micro_batch=2, num_workers=2, data_lanes=2)
    straight = train(make_config("straight", **common))
    run_a = Path(straight.run_dir)
    assert straight.step == 4
    assert _keys(run_a) == _stream_keys(dataset_ref, tokenizer, lanes=2, n=4), (
        "the run reads the 2-lane order"
    )
    assert _keys(run_a) != _stream_keys(dataset_ref, tokenizer, lanes=1, n=4), "which is not the 1-lane order"

    first = train(make_config("resumed", stop_at_step=2, **common))
    assert first.step == 2 and first.checkpoint is not None and first.checkpoint.name == "step2"
    second = train(make_config("resumed", resume=True, **common))
    run_b = Path(second.run_dir)
    assert second.step == 4 and second.adapter_dir is not None

    assert _keys(run_b) == _keys(run_a), "the resumed run sees the same samples in the same order"
    losses = _losses(run_b)
    assert len(losses) == 4 and losses == _losses(run_a)
    assert straight.adapter_dir is not None
    a = load_file(str(straight.adapter_dir / "adapter.safetensors"))
    b = load_file(str(second.adapter_dir / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    with pytest.raises(ConfigError, match=r"data_lanes 2, this run has data_lanes 1.*data_lanes=2"):
        train(make_config("resumed", resume=True, **{**common, "steps": 6, "data_lanes": 1}))


def test_data_lanes_config_refusals(dataset_ref: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    base: dict[str, Any] = dict(shards=dataset_ref, model=str(tiny_model_dir), out=str(tmp_path / "run"))
    assert TrainConfig.load(base).data_lanes == 1, "one lane (today's order) unless asked"
    assert TrainConfig.load({**base, "data_lanes": 3, "num_workers": 3}).data_lanes == 3
    with pytest.raises(ConfigError, match=r"data_lanes: 2 cannot be combined with skip_bad_samples: true"):
        TrainConfig.load({**base, "data_lanes": 2, "skip_bad_samples": True})
    with pytest.raises(ConfigError, match=r"data_lanes: .*greater than or equal to 1"):
        TrainConfig.load({**base, "data_lanes": 0})
    TrainConfig.load({**base, "data_lanes": 1, "skip_bad_samples": True})  # one lane keeps skip_bad_samples
