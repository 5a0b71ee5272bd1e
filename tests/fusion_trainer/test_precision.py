"""`bf16: auto`: the precision follows the hardware (fusion_trainer.precision), and training says what it chose."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fusion_trainer import precision as prec
from fusion_trainer.config import TrainConfig
from fusion_trainer.errors import ConfigError
from fusion_trainer.precision import Precision, probe_cpu, resolve_precision


@pytest.fixture(autouse=True)
def _fresh_probe(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No CUDA, no forced answer, and a probe that is not cached from another test."""
    monkeypatch.delenv(prec.ENV_CPU_BF16, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    probe_cpu.cache_clear()
    yield
    probe_cpu.cache_clear()


def _cpu(monkeypatch: pytest.MonkeyPatch, onednn: bool, fp32: float = 60.0, bf16: float = 60.0) -> list[str]:
    """Pretend to be a CPU: oneDNN's bf16 flag and the matmul rates the timed probe measures."""
    timed: list[str] = []

    def rate(dtype: torch.dtype, *args: Any, **kwargs: Any) -> float:
        timed.append(str(dtype))
        return bf16 if dtype == torch.bfloat16 else fp32

    monkeypatch.setattr(prec, "_onednn_bf16", lambda: onednn)
    monkeypatch.setattr(prec, "_matmul_gflops", rate)
    return timed


def test_a_cpu_without_bf16_instructions_trains_in_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    timed = _cpu(monkeypatch, onednn=False)
    choice = resolve_precision("auto", "cpu")
    assert choice == Precision(False, choice.reason) and choice.dtype == torch.float32
    assert "no bf16 instructions" in choice.reason and prec.cpu_model() in choice.reason
    assert timed == []  # no timing needed: oneDNN has no bf16 kernels there


def test_a_cpu_that_emulates_bf16_slowly_trains_in_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    _cpu(monkeypatch, onednn=True, fp32=60.0, bf16=1.2)  # the AMD EPYC (AVX2) figures of the first-run issue
    choice = resolve_precision("auto", "cpu")
    assert not choice.bf16 and "1 GFLOP/s in bf16 vs 60 in fp32" in choice.reason


def test_a_cpu_with_fast_bf16_trains_in_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    timed = _cpu(monkeypatch, onednn=True, fp32=180.0, bf16=1070.0)
    assert resolve_precision("auto", "cpu").bf16
    assert resolve_precision("auto", "cpu").bf16
    assert len(timed) == 2  # probed once per process, then cached


def test_the_threshold_is_a_ratio_of_the_fp32_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    _cpu(monkeypatch, onednn=True, fp32=100.0, bf16=100.0 * prec.CPU_BF16_MIN_RATIO - 1)
    assert not resolve_precision("auto", "cpu").bf16


@pytest.mark.parametrize(("forced", "bf16"), [("no", False), ("yes", True), ("NO", False)])
def test_the_environment_forces_the_cpu_answer(monkeypatch: pytest.MonkeyPatch, forced: str, bf16: bool) -> None:
    timed = _cpu(monkeypatch, onednn=not bf16, fp32=1.0, bf16=100.0)
    monkeypatch.setenv(prec.ENV_CPU_BF16, forced)
    choice = resolve_precision("auto", "cpu")
    assert choice.bf16 is bf16 and f"{prec.ENV_CPU_BF16}={forced.lower()}" in choice.reason and timed == []


def test_a_bad_forced_answer_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(prec.ENV_CPU_BF16, "maybe")
    with pytest.raises(ConfigError, match="FUSION_CPU_BF16='maybe'.*yes or no"):
        resolve_precision("auto", "cpu")


def test_explicit_settings_are_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    timed = _cpu(monkeypatch, onednn=False)
    assert resolve_precision(True, "cpu").bf16 and not resolve_precision(False, "cpu").bf16
    assert timed == []
    with pytest.raises(ConfigError, match="bf16: 'fast'"):
        resolve_precision("fast", "cpu")


def test_auto_is_the_default_and_reaches_deepspeed(monkeypatch: pytest.MonkeyPatch) -> None:
    _cpu(monkeypatch, onednn=False)
    cfg = TrainConfig(shards="d", model="m", out="o")
    assert cfg.bf16 == "auto"
    assert cfg.deepspeed_config(1)["bf16"] == {"enabled": False}
    assert cfg.deepspeed_config(1, bf16=True)["bf16"] == {"enabled": True}
    assert TrainConfig.from_yaml(None, ["bf16=auto"], shards="d", model="m", out="o").bf16 == "auto"
    with pytest.raises(ConfigError, match="bf16"):
        TrainConfig.from_yaml(None, ["bf16=maybe"], shards="d", model="m", out="o")


def test_training_prints_the_choice_and_the_time_left(
    monkeypatch: pytest.MonkeyPatch, make_config: Callable[..., TrainConfig], caplog: pytest.LogCaptureFixture
) -> None:
    from fusion_trainer.training.train import train

    _cpu(monkeypatch, onednn=False)
    config = make_config(bf16="auto", steps=4, log_every=2, eval_every=0)
    with caplog.at_level(logging.INFO, logger="fusion_trainer"):
        result = train(config)
    text = caplog.text
    assert "precision: fp32 (bf16: auto on CPU" in text and "no bf16 instructions" in text
    assert "s/step (fp32): about" in text and "to step 4" in text
    records = [json.loads(x) for x in (Path(config.out) / "metrics.jsonl").read_text().splitlines()]
    etas = [r["eta_s"] for r in records if "loss" in r]
    assert etas[0] > 0 and etas[-1] == 0.0
    assert result.step == 4
