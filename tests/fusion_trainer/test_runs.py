"""`fusion_trainer.load_run(RUN_DIR).describe(climate)`: a trained run describes raw windows in physical units."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fusion_trainer import CheckpointError, DataError, load_run
from fusion_trainer.training.train import train


@pytest.mark.parametrize("fusion", [{"fusion": "xattn"}, {"fusion": "prefix", "readout": True, "n_prefix_tokens": 2}])
def test_describe_normalises_physical_units_like_training(make_config: Callable[..., Any], fusion: dict) -> None:
    from tests.tiny_model import TINY_FUSION

    extra = {"stats_loss_weight": 1.0} if fusion.get("readout") else {}
    config = make_config("run", steps=2, fusion={**TINY_FUSION, **fusion}, **extra)
    train(config)
    run = load_run(config.out)
    assert run.variables == ["T2M", "U10M", "V10M"]
    assert (Path(config.out) / "prompt.txt").read_text(encoding="utf-8") == run.prompt
    rng = np.random.default_rng(0)
    physical = np.stack([283 + 8 * rng.normal(size=(2, 4, 5)), 2 + 4 * rng.normal(size=(2, 4, 5)),
                         -1 + 4 * rng.normal(size=(2, 4, 5))], axis=1).astype(np.float32)  # (T, V, H, W)
    texts = run.describe(physical, max_new_tokens=6)
    assert len(texts) == 1
    norm = run.normalization
    scaled = torch.from_numpy(np.stack([(physical[:, i] - norm[v]["mean"]) / norm[v]["std"]
                                        for i, v in enumerate(run.variables)], axis=1))[None]  # fmt: skip
    assert run.model.generate(scaled, run.prompt, max_new_tokens=6) == texts
    assert len(run.describe(np.stack([physical, physical]), max_new_tokens=3)) == 2
    with pytest.raises(DataError, match="V = 3 variables"):
        run.describe(physical[:, :2])
    bad = physical.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(DataError, match="NaN"):
        run.describe(bad)


def test_an_unfinished_run_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no config.yaml"):
        load_run(tmp_path)
