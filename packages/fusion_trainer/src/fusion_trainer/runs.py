"""A finished training run as a Python object: `load_run(RUN_DIR)` -> `FusionRun`, whose `describe` turns climate
windows in physical units into text.

    from fusion_trainer import load_run
    run = load_run("demo-output/run")      # the config, the model, the variables and their normalisation
    texts = run.describe(climate)          # float32 (B, T, V, lat, lon) or (T, V, lat, lon), PHYSICAL units

The run's prompt (the one-shot example it was trained after) is kept in `RUN_DIR/prompt.txt` by `fusion-train`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .config import TrainConfig
from .errors import CheckpointError, ConfigError, DataError

if TYPE_CHECKING:
    from .model.fusion_model import FusionModel

__all__ = ["PROMPT_FILE", "FusionRun", "load_run", "load_run_for", "local_run_dir"]

logger = logging.getLogger(__name__)

PROMPT_FILE = "prompt.txt"
"""The rendered prompt a run trained with, written by `fusion-train` beside config.yaml."""


def local_run_dir(out: str) -> Path:
    """A training config's `out` as a local folder: `file://` stripped, another scheme refused (what `fusion-train`
    checks before it writes anything there).

    Raises:
        ConfigError: `out` is a URL of another scheme (s3://, gs://, ...).
    """
    if "://" in out and not out.startswith("file://"):
        raise ConfigError(f"out: {out!r} must be a local folder (DeepSpeed checkpoints are written locally)")
    return Path(out.removeprefix("file://"))


@dataclass
class FusionRun:
    """A trained run: its config, its fused model (eval mode), and the prompt it was trained with."""

    run_dir: Path
    config: TrainConfig
    model: FusionModel
    prompt: str

    @property
    def variables(self) -> list[str]:
        """The variable names in the order of the climate array's variable axis."""
        names = self.model.config.variables
        if names is None:
            raise CheckpointError(f"{self.run_dir}: the adapter records no variable names")
        return list(names)

    @property
    def normalization(self) -> dict[str, dict[str, float]]:
        """{variable: {"mean", "std"}} in physical units: what `describe` normalises with."""
        norm = self.model.config.normalization
        if norm is None:
            raise CheckpointError(f"{self.run_dir}: the adapter records no normalization")
        return {v: {"mean": float(norm[v].mean), "std": float(norm[v].std)} for v in self.variables}

    def normalise(self, climate: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Physical units `(B, T, V, H, W)` or `(T, V, H, W)` -> the normalised float32 batch the model reads.

        Raises:
            DataError: the array is not 4-D/5-D, its variable axis does not match, or it holds NaN/inf.
        """
        x = torch.as_tensor(np.asarray(climate, dtype=np.float32))
        x = x[None] if x.ndim == 4 else x
        if x.ndim != 5 or x.shape[2] != len(self.variables):
            raise DataError(
                f"climate must be (B, T, V, lat, lon) or (T, V, lat, lon) with V = {len(self.variables)} variables "
                f"{self.variables}; got shape {tuple(np.shape(climate))}"
            )
        if not bool(torch.isfinite(x).all()):
            raise DataError("climate holds NaN or inf values; fill or drop them before describing the window")
        norm = self.normalization
        mean = torch.tensor([norm[v]["mean"] for v in self.variables])[None, None, :, None, None]
        std = torch.tensor([norm[v]["std"] for v in self.variables])[None, None, :, None, None]
        return (x - mean) / std

    def describe(
        self,
        climate: np.ndarray | torch.Tensor,
        max_new_tokens: int = 128,
        batch_size: int = 16,
        no_repeat_ngram: int = 0,
    ) -> list[str]:
        """Captions for climate windows given in PHYSICAL units (the contract's: K, Pa, m s-1, kg m-2 s-1, ...).

        Args:
            climate: `(B, T, V, lat, lon)` or one window `(T, V, lat, lon)`, variables in `variables` order.
            max_new_tokens: tokens per caption.
            batch_size: windows per generate call.
            no_repeat_ngram: n > 0: a caption never repeats an n-gram of its own tokens; 0: off.

        Returns:
            One greedy caption per window.
        """
        x = self.normalise(climate)
        device = next(self.model.parameters()).device
        out: list[str] = []
        for i in range(0, x.shape[0], batch_size):
            chunk = x[i : i + batch_size].to(device)
            out += self.model.generate(chunk, self.prompt, max_new_tokens=max_new_tokens, do_sample=False,
                                       one_line=True, no_repeat_ngram=no_repeat_ngram,
                                       draft_caption=self.config.caption)  # fmt: skip
        return out


def load_run(run_dir: str | Path, prompt: str | None = None) -> FusionRun:
    """Load a finished run: RUN_DIR/config.yaml, the adapter in RUN_DIR/final on the base it names, the prompt.

    Args:
        run_dir: the `fusion-train --out` folder.
        prompt: the prompt to generate after; default RUN_DIR/prompt.txt.

    Raises:
        CheckpointError: RUN_DIR has no config.yaml, no final/ adapter (the run did not finish) or no prompt.
        ModelError: the adapter does not fit the base model.
    """
    from .model.fusion_model import FusionModel
    from .precision import resolve_precision

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise CheckpointError(f"--run {run_dir}: no config.yaml; is this a fusion-train RUN_DIR?")
    if not (run_dir / "final").is_dir():
        raise CheckpointError(
            f"--run {run_dir}: no final/ adapter; the run has not finished (continue it with fusion-train --resume)"
        )
    try:
        config = TrainConfig.from_yaml(run_dir / "config.yaml")
    except ConfigError as exc:
        raise CheckpointError(f"--run {run_dir}: config.yaml is not a valid training config ({exc})") from exc
    if prompt is None:
        path = run_dir / PROMPT_FILE
        if not path.exists():
            raise CheckpointError(f"--run {run_dir}: no {PROMPT_FILE} (a run from before it was kept); pass prompt=")
        prompt = path.read_text(encoding="utf-8")
    precision = resolve_precision(config.bf16)  # "auto" is decided on this machine, which may not be the training one
    logger.info("precision: %s (%s)", precision.name, precision.reason)
    model: Any = FusionModel.load_adapter(run_dir / "final", base=config.model, dtype=precision.dtype)
    if torch.cuda.is_available():
        model.to("cuda")
    model.eval()
    return FusionRun(run_dir=run_dir, config=config, model=model, prompt=prompt)


def load_run_for(run_dir: Path, data: Any) -> FusionRun:
    """`load_run`, with the prompt rendered from the dataset for a run that kept no prompt.txt (older runs)."""
    from .data.prompt import render_prompt

    if (Path(run_dir) / PROMPT_FILE).exists():
        return load_run(run_dir)
    config = TrainConfig.from_yaml(Path(run_dir) / "config.yaml")
    return load_run(run_dir, prompt=render_prompt(config.prompt_template, data, config.caption))
