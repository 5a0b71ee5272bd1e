"""Resume: 2N steps straight equal N steps, stop, resume, N more (bitwise weights, same sample order, same losses)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from fusion_trainer.config import TrainConfig
from fusion_trainer.errors import CheckpointError, ConfigError
from fusion_trainer.metrics import read_metrics
from fusion_trainer.training.train import train
from safetensors.torch import load_file

from .conftest import TINY_FUSION


def _keys(run: Path) -> list[tuple[int, list[str]]]:
    lines = (run / "samples" / "rank0.jsonl").read_text().splitlines()
    return [(r["step"], r["keys"]) for r in map(json.loads, lines)]


@pytest.mark.parametrize("fusion", ["xattn", "gated-xattn"])
def test_stop_and_resume_matches_a_straight_run(make_config: Callable[..., TrainConfig], fusion: str) -> None:
    # 20 train samples, micro-batch 2 x accumulation 2: 5 steps per epoch, so the cut (7) is mid-epoch
    common = dict(steps=14, micro_batch=2, grad_accum=2, warmup_steps=3, save_every=5, eval_every=0,
                  fusion={**TINY_FUSION, "fusion": fusion, "every_n_layers": 1})  # fmt: skip
    straight = train(make_config("straight", **common))

    first = train(make_config("resumed", stop_at_step=7, **common))
    assert first.step == 7 and first.adapter_dir is None, "a stopped run has not finished: no final adapter"
    assert first.checkpoint is not None and first.checkpoint.name == "step7"
    second = train(make_config("resumed", resume=True, **common))
    assert second.step == 14 and second.adapter_dir is not None

    a = load_file(str(straight.adapter_dir / "adapter.safetensors"))  # type: ignore[operator]
    b = load_file(str(second.adapter_dir / "adapter.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resume"

    run_a, run_b = Path(straight.run_dir), Path(second.run_dir)
    assert _keys(run_a) == _keys(run_b), "the resumed run must see the same samples in the same order"
    assert [s for s, _ in _keys(run_b)] == list(range(1, 15))
    losses_a = [r["loss"] for r in read_metrics(run_a) if "split" not in r]
    losses_b = [r["loss"] for r in read_metrics(run_b) if "split" not in r]
    assert losses_a == losses_b
    assert [r["step"] for r in read_metrics(run_b) if "split" not in r] == list(range(1, 15))


def test_a_resumed_run_draws_the_same_random_numbers_as_a_straight_run(make_config: Callable[..., TrainConfig]) -> None:
    """With encoder dropout on CPU, N steps + resume + N steps give the straight run's adapter: the DataLoader drew its
    base seed from the global generator after the checkpoint's RNG states were restored, shifting every later mask."""
    common = dict(steps=4, micro_batch=2, eval_every=0, fusion={**TINY_FUSION, "encoder_dropout": 0.5})
    straight = train(make_config("straight", **common))
    train(make_config("resumed", stop_at_step=2, **common))
    second = train(make_config("resumed", resume=True, **common))
    a = load_file(str(straight.adapter_dir / "adapter.safetensors"))  # type: ignore[operator]
    b = load_file(str(second.adapter_dir / "adapter.safetensors"))  # type: ignore[operator]
    assert [name for name in a if not torch.equal(a[name], b[name])] == []
    assert straight.losses[2:] == second.losses


def test_resume_picks_the_newest_complete_checkpoint(make_config: Callable[..., TrainConfig]) -> None:
    config = make_config(steps=6, save_every=2, stop_at_step=4)
    train(config)
    run = Path(config.out)
    assert sorted(p.name for p in (run / "checkpoints").glob("step*")) == ["step2", "step4"]
    (run / "checkpoints" / "step4" / "COMPLETE").unlink()  # as if the job died while writing step 4
    result = train(make_config(steps=6, save_every=2, resume=True))
    assert result.step == 6
    steps = [s for s, _ in _keys(run)]
    assert steps == [1, 2, 3, 4, 3, 4, 5, 6], "steps 3-4 are redone from the step-2 checkpoint"


def test_an_existing_run_needs_resume_and_resume_needs_a_checkpoint(
    make_config: Callable[..., TrainConfig], make_dataset: Callable[..., str]
) -> None:
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        train(make_config("empty", steps=2, resume=True))
    torn = Path(make_config("torn").out) / "checkpoints" / "step2"  # a first save killed before its COMPLETE
    torn.mkdir(parents=True)
    (torn / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    with pytest.raises(CheckpointError, match=r"no complete checkpoint \(a run interrupted during its first save "
                                              r"leaves checkpoints/ without one.*start without --resume"):
        train(make_config("torn", steps=2, resume=True))
    assert train(make_config("torn", steps=2)).step == 2, "it starts without --resume, as the error says"
    train(make_config("once", steps=2))
    with pytest.raises(ConfigError, match="--resume"):
        train(make_config("once", steps=2))
    other = make_dataset(name="other", seed=1)
    with pytest.raises(CheckpointError, match="same --seed and --shards"):
        train(make_config("once", steps=4, resume=True, shards=other))
    with pytest.raises(CheckpointError, match="seed 0"):
        train(make_config("once", steps=4, resume=True, seed=5))
    with pytest.raises(ConfigError, match=r"micro_batch 4 x grad_accum 1, this run has micro_batch 2 x grad_accum 1"
                                          r".*--micro-batch 4 --grad-accum 1"):
        train(make_config("once", steps=4, resume=True, micro_batch=2))
    assert "micro_batch: 4" in (Path(make_config("once").out) / "config.yaml").read_text(), "a refused resume keeps it"
    with pytest.raises(ConfigError, match="micro_batch 4 x grad_accum 1, this run has micro_batch 4 x grad_accum 2"):
        train(make_config("once", steps=4, resume=True, grad_accum=2))


def test_resume_refuses_another_shuffle_buffer_or_skip_bad_samples(make_config: Callable[..., TrainConfig]) -> None:
    """The epoch's order depends on both: a resume with others replayed another order, repeating and skipping samples."""
    train(make_config("once", steps=2, shuffle_buffer=16))
    with pytest.raises(ConfigError, match=r"shuffle_buffer 16, this run has shuffle_buffer 64.*--set shuffle_buffer=16"):
        train(make_config("once", steps=4, resume=True, shuffle_buffer=64))
    with pytest.raises(ConfigError, match=r"skip_bad_samples false, this run has skip_bad_samples true"
                                          r".*--set skip_bad_samples=false"):
        train(make_config("once", steps=4, resume=True, shuffle_buffer=16, skip_bad_samples=True))
    assert "shuffle_buffer: 16" in (Path(make_config("once").out) / "config.yaml").read_text(), "a refused resume keeps it"
    train(make_config("skipping", steps=2, skip_bad_samples=True))
    with pytest.raises(ConfigError, match=r"skip_bad_samples true, this run has skip_bad_samples false"
                                          r".*--skip-bad-samples"):
        train(make_config("skipping", steps=4, resume=True))
    assert train(make_config("once", steps=4, resume=True, shuffle_buffer=16)).step == 4
