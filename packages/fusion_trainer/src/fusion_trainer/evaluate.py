"""Evaluation: caption loss and perplexity of the fused model against the frozen base alone on the same captions.

`evaluate_run` composes independent sections (one function each) into the JSON that `fusion-eval` prints; add a
section (e.g. grounding metrics) by writing another `section(ctx) -> dict` and listing it in `SECTIONS`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import TrainConfig
from .errors import CheckpointError, ConfigError

__all__ = [
    "SECTIONS",
    "EvalContext",
    "LossResult",
    "base_loss_section",
    "evaluate_loss",
    "evaluate_run",
    "fused_loss_section",
    "load_run",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LossResult:
    """Token-weighted mean caption loss (nats per token) over every rank, its perplexity, and the counts."""

    loss: float
    perplexity: float
    tokens: int
    samples: int


def _label_tokens(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != -100).sum())  # the LM predicts token t+1 from t


def evaluate_loss(
    model: Callable[..., Any],
    batches: Iterable[dict[str, Any]],
    device: torch.device,
    max_batches: int | None = None,
    use_climate: bool = True,
    all_ranks: bool = False,
) -> LossResult:
    """Mean caption loss of `model` over `batches` (token-weighted; over every rank with `all_ranks`).

    Args:
        model: a FusionModel or DeepSpeed engine (`model(input_ids, attention_mask, climate, labels)`), or with
            `use_climate=False` a plain causal LM (`model(input_ids, attention_mask, labels)`).
        batches: collated batches (`ClimateTextStream`); every rank must pass the same number.
        device: where the model lives.
        max_batches: evaluate at most this many batches per rank.
        use_climate: pass the climate tensor to the model.
        all_ranks: sum over every rank of the process group (training's evaluation); False: this process only.
    """
    total = torch.zeros(3, dtype=torch.float64, device=device)  # (loss x tokens, tokens, samples)
    with torch.no_grad():
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
            if use_climate:
                out = model(
                    input_ids=ids, attention_mask=mask, climate=batch["climate_x"].to(device), labels=labels
                )
            else:
                out = model(input_ids=ids, attention_mask=mask, labels=labels)
            n = _label_tokens(labels)
            total += torch.tensor(
                [float(out.loss) * n, n, len(batch["keys"])], dtype=torch.float64, device=device
            )
    if all_ranks and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
    loss_sum, tokens, samples = (float(x) for x in total.tolist())
    loss = loss_sum / tokens if tokens else float("nan")
    return LossResult(
        loss=loss, perplexity=math.exp(min(loss, 50.0)), tokens=int(tokens), samples=int(samples)
    )


@dataclass
class EvalContext:
    """What every evaluation section may use: the run's config, the loaded fused model, the data and the split."""

    run_dir: Path
    config: TrainConfig
    model: Any
    dataset: Any
    split: str
    prompt: str
    device: torch.device
    batch_size: int
    max_batches: int | None

    def batches(self) -> Any:
        """A fresh pass over the split's batches (one process, manifest order)."""
        from .data import ClimateTextStream

        return ClimateTextStream(
            self.dataset, self.split, self.model.tokenizer, prompt=self.prompt, micro_batch=self.batch_size,
            max_length=self.config.max_length, train=False, verify=self.config.verify_shards,
        )  # fmt: skip


def fused_loss_section(ctx: EvalContext) -> dict[str, Any]:
    """Caption loss and perplexity of the fused model (climate in)."""
    res = evaluate_loss(ctx.model, ctx.batches(), ctx.device, ctx.max_batches)
    if res.tokens == 0:
        from .errors import DataError

        raise DataError(
            f"split {ctx.split!r} gave no caption tokens to score ({res.samples} samples): the prompt fills "
            f"max_length {ctx.config.max_length}; train with a larger max_length or a shorter prompt_template"
        )
    return {
        "fused": {
            "loss": res.loss,
            "perplexity": res.perplexity,
            "tokens": res.tokens,
            "samples": res.samples,
        }
    }


def base_loss_section(ctx: EvalContext) -> dict[str, Any]:
    """The frozen base alone (no climate) on the same prompts and captions, loaded fresh from the base path."""
    from .base import load_base

    dtype = next(ctx.model.parameters()).dtype
    base: Any = load_base(ctx.config.model, dtype=dtype)[0]
    base.to(ctx.device)
    base.eval()
    res = evaluate_loss(base, ctx.batches(), ctx.device, ctx.max_batches, use_climate=False)
    return {
        "base": {"loss": res.loss, "perplexity": res.perplexity, "tokens": res.tokens, "samples": res.samples}
    }


SECTIONS: list[Callable[[EvalContext], dict[str, Any]]] = [fused_loss_section, base_loss_section]
"""The sections of `fusion-eval`'s JSON, in order."""


def load_run(run_dir: Path) -> tuple[TrainConfig, Any]:
    """Read RUN_DIR/config.yaml and load the fused model from RUN_DIR/final (base from the adapter's record).

    Raises:
        CheckpointError: RUN_DIR has no config.yaml or no final/ adapter (the run did not finish).
        ModelError: the adapter does not fit the base model.
    """
    from .model import FusionModel

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
    dtype = torch.bfloat16 if config.bf16 else torch.float32
    model = FusionModel.load_adapter(run_dir / "final", base=config.model, dtype=dtype)
    if torch.cuda.is_available():
        model.to("cuda")
    model.eval()
    return config, model


def evaluate_run(
    run_dir: Path, shards: str, split: str = "test", batch_size: int = 4, max_batches: int | None = None
) -> dict[str, Any]:
    """Evaluate a finished run on one split; the dict `fusion-eval` prints as JSON.

    Returns:
        {"run", "dataset", "version", "split", "fused": {loss, perplexity, ...}, "base": {...}, "loss_delta"}
        (loss_delta = base loss - fused loss: positive when the climate helps).

    Raises:
        DataError: the dataset cannot be read, or has no samples in `split`.
    """
    from .data import open_shards, render_prompt
    from .errors import DataError

    config, model = load_run(run_dir)
    data = open_shards(shards)
    if not data.shards(split):
        raise DataError(
            f"--split {split}: dataset {data.version_url} has no {split!r} shards ({data.manifest.splits})"
        )
    device = next(model.parameters()).device
    ctx = EvalContext(run_dir=run_dir, config=config, model=model, dataset=data, split=split,
                      prompt=render_prompt(config.prompt_template, data), device=device, batch_size=batch_size,
                      max_batches=max_batches)  # fmt: skip
    result: dict[str, Any] = {
        "run": str(run_dir),
        "dataset": data.reference,
        "version": data.version,
        "split": split,
    }
    for section in SECTIONS:
        result.update(section(ctx))
    if "fused" in result and "base" in result:
        result["loss_delta"] = result["base"]["loss"] - result["fused"]["loss"]
    return result
