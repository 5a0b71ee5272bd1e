"""The tiny random causal LM shared by the trainer and reliability suites: how it is built, its fusion settings and
the CPU DeepSpeed environment its training runs need.

`tests/conftest.py` turns these into the session fixture `tiny_model_dir` (built once per test session) and the
fixture `cpu_deepspeed`; `tests/fusion_trainer/conftest.py` and `tests/reliability/conftest.py` use them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

TINY_FUSION: dict[str, Any] = {
    "fusion": "xattn",
    "d_encoder": 32,
    "encoder_heads": 4,
    "n_heads": 4,
    "encoder_depth": 1,
}
"""A small fusion module for the tiny Llama (hidden 64), as `FusionConfig` fields."""

TINY_FUSION_FLAGS: list[str] = [
    arg for key, value in TINY_FUSION.items() if key != "fusion" for arg in ("--set", f"fusion.{key}={value}")
]
"""The same sizes as `fusion-train --set fusion.KEY=VALUE` flags (the fusion kind is left to `--fusion`)."""


def build_tiny_model(folder: Path, seed: int = 0) -> Path:
    """Write the tiny random Llama (2 layers, hidden 64) with its small BPE tokenizer into `folder`.

    Args:
        folder: where to write it (kept when it already holds the same model).
        seed: weight initialisation seed.

    Returns:
        The model folder, loadable with `FusionModel.from_base` or `--model`.
    """
    from fusion_trainer.model.tiny import make_tiny_model

    return make_tiny_model("llama", folder, seed=seed)


def use_cpu_deepspeed(monkeypatch: pytest.MonkeyPatch) -> None:
    """DeepSpeed on the CPU accelerator, one thread per process unless OMP_NUM_THREADS says otherwise (several
    processes share 2 cores)."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
