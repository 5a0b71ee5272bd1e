"""Evaluation: caption loss and perplexity of the fused model against the frozen base alone on the same captions.

`evaluate_run` composes independent sections (one function each) into the JSON that `fusion-eval` prints; add a
section (e.g. grounding metrics) by writing another `section(ctx) -> dict` and listing it in `SECTIONS`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fusion_trainer.runs import load_run_for

from .core import EvalContext, LossResult, evaluate_loss, grounding_gain
from .sections import interventions_section, ladder_section, same_place_gain_section, science_goals

__all__ = [
    "SECTIONS",
    "EvalContext",
    "LossResult",
    "base_loss_inputs",
    "base_loss_section",
    "evaluate_loss",
    "evaluate_run",
    "faithfulness_section",
    "fused_loss_section",
    "grounding_gain",
    "grounding_gain_section",
    "read_generations",
]

logger = logging.getLogger(__name__)


def fused_loss_section(ctx: EvalContext) -> dict[str, Any]:
    """Caption loss and perplexity of the fused model (climate in): the token-weighted mean of the token losses both
    grounding gains compare their shuffled passes with (`EvalContext.own_loss`, one pass for the three)."""
    res = ctx.own_loss()
    if res.tokens == 0:
        from fusion_trainer.errors import DataError

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


def base_loss_inputs(ctx: EvalContext) -> dict[str, Any]:
    """What the frozen base's loss depends on (it never sees the climate or the trained adapter): the base's weights,
    the precision and device, the token ids, masks and labels of every batch it scores (which cover the dataset
    version, the samples, the tokenizer, the prompt, the caption form and `max_length`; those are listed too, to say
    what differs), and the versions of the code that computes it. Equal inputs give the same loss (to the rounding of
    the libraries named)."""
    import hashlib

    import climate_text_schema
    import torch
    import transformers

    from fusion_trainer.version import __version__

    digest = hashlib.sha256()
    for i, batch in enumerate(ctx.batches()):
        if ctx.max_batches is not None and i >= ctx.max_batches:
            break
        for key in ("input_ids", "attention_mask", "labels"):
            digest.update(f"{key}{tuple(batch[key].shape)}".encode())
            digest.update(batch[key].contiguous().numpy().tobytes())
    prompt_ids = list(ctx.model.tokenizer(ctx.prompt)["input_ids"])
    return {
        "base": ctx.model.base_fingerprint,
        "dtype": str(next(ctx.model.parameters()).dtype).removeprefix("torch."),
        "device": ctx.device.type,
        "batches_sha256": digest.hexdigest(),
        "dataset_version": ctx.dataset.version,
        "split": ctx.split,
        "loss_samples": ctx.loss_samples,
        "max_batches": ctx.max_batches,
        "batch_size": ctx.batch_size,
        "prompt_ids_sha256": hashlib.sha256(json.dumps(prompt_ids).encode()).hexdigest(),
        "caption": ctx.config.caption,
        "max_length": ctx.config.max_length,
        "versions": {"fusion_trainer": __version__, "climate_text_schema": climate_text_schema.__version__,
                     "torch": torch.__version__, "transformers": transformers.__version__},  # fmt: skip
    }


def _reused_base_loss(path: Path, inputs: dict[str, Any]) -> dict[str, Any] | None:
    """The base section of an earlier evaluation JSON scored on `inputs`, or None (with a warning naming what differs)
    when it was scored on others; an unreadable file is a ConfigError."""
    from fusion_trainer.errors import ConfigError

    try:
        earlier = json.loads(path.read_text(encoding="utf-8")).get("base")
    except (OSError, ValueError, AttributeError) as exc:
        raise ConfigError(f"--base-loss-from {path}: cannot read a fusion-eval JSON ({exc}); give the metrics JSON "
                          "of an earlier fusion-eval, or leave the option out") from exc  # fmt: skip
    recorded = earlier.get("inputs") if isinstance(earlier, dict) else None
    if not isinstance(recorded, dict):
        differ = ["it records no inputs (a fusion-eval of this version does)"]
    elif inputs["base"] is None:
        differ = ["this run's base has no fingerprint"]
    else:
        differ = [f"{k} {recorded.get(k)!r} there, {v!r} here" for k, v in inputs.items() if recorded.get(k) != v]
    if differ:
        logger.warning("--base-loss-from %s: not reused, the base is scored here: %s", path, "; ".join(differ))
        return None
    logger.info("base loss reused from %s (same base, samples, prompt and precision)", path)
    return {**earlier, "reused_from": str(path)}


def base_loss_section(ctx: EvalContext) -> dict[str, Any]:
    """The frozen base alone (no climate) on the same prompts and captions, loaded fresh from the base path, or the
    one of an earlier evaluation on the same inputs (`base_loss_from`: another seed's, the base being the same)."""
    from fusion_trainer.model.attention import use_grouped_sdpa
    from fusion_trainer.model.base import load_base
    from fusion_trainer.model.lm_pass import LeanCausalLM

    inputs = base_loss_inputs(ctx)
    reused = None if ctx.base_loss_from is None else _reused_base_loss(ctx.base_loss_from, inputs)
    if reused is not None:
        return {"base": reused}
    dtype = next(ctx.model.parameters()).dtype
    base: Any = load_base(ctx.config.model, dtype=dtype)[0]
    base.to(ctx.device)
    base.eval()
    use_grouped_sdpa(base)  # the same attention as the fused model's LM (`model.attention`)
    # the lean pass (the shared prompt cached, logits at the targets only): the same loss as `base(...)`, to rounding
    res = evaluate_loss(LeanCausalLM(base), ctx.batches(), ctx.device, ctx.max_batches, use_climate=False)
    return {
        "base": {"loss": res.loss, "perplexity": res.perplexity, "tokens": res.tokens, "samples": res.samples,
                 "inputs": inputs}
    }


def grounding_gain_section(ctx: EvalContext) -> dict[str, Any]:
    """Loss with another sample's climate minus loss with the sample's own climate (see `grounding_gain`)."""
    gain = grounding_gain(ctx.model, ctx.batches(), ctx.device, ctx.max_batches, ctx.seed,
                          own_losses=ctx.own_token_losses)  # fmt: skip
    return {"grounding_gain": gain}


def faithfulness_section(ctx: EvalContext) -> dict[str, Any]:
    """Numbers parsed from generated captions vs the index statistics, and the train-mean baseline's error."""
    from fusion_trainer.grounding import baseline_values, consistency, faithfulness, truth_from_index

    rows = ctx.generated()
    truth = truth_from_index(ctx.dataset.read_index())
    baseline = baseline_values(truth, "train")
    generated = {r["key"]: r["generated"] for r in rows}
    per_quantity = faithfulness(generated, truth, baseline)
    return {
        "faithfulness": {
            "samples": len(rows),
            "baseline": "train-split mean of each quantity (circular mean of directions, log-space mean of "
            "precipitation)",
            "baseline_values": baseline,
            "quantities": per_quantity,
            "consistency": consistency(generated),
            "grounded": {q: m["grounded"] for q, m in per_quantity.items()},
        }
    }


SECTIONS: list[Callable[[EvalContext], dict[str, Any]]] = [
    fused_loss_section,
    base_loss_section,
    grounding_gain_section,
    faithfulness_section,
    same_place_gain_section,
    ladder_section,
    interventions_section,
]
"""The sections of `fusion-eval`'s JSON, in order."""


def read_generations(path: Path) -> list[dict[str, Any]]:
    """Read a `fusion-generate --out` JSONL file (one {"key", "reference", "generated"} per line).

    Raises:
        DataError: the file is missing or a line is not such an object.
    """
    import json

    from fusion_trainer.errors import DataError

    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DataError(
            f"--generations {path}: cannot read it ({exc}); write it with fusion-generate --out"
        ) from exc
    rows: list[dict[str, Any]] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise DataError(f"--generations {path}: line {n} is not JSON ({exc})") from exc
        if not isinstance(row, dict) or not {"key", "generated"} <= row.keys():
            raise DataError(f"--generations {path}: line {n} lacks 'key' and 'generated'")
        rows.append(row)
    return rows


def evaluate_run(
    run_dir: Path,
    shards: str,
    split: str = "test",
    batch_size: int = 4,
    max_batches: int | None = None,
    generations: Path | None = None,
    generate_limit: int | None = 64,
    max_new_tokens: int = 96,
    interventions: Sequence[str] = (),
    intervene_limit: int = 64,
    loss_samples: int | None = None,
    generate_batch_size: int | None = None,
    no_repeat_ngram: int = 0,
    base_loss_from: Path | None = None,
) -> dict[str, Any]:
    """Evaluate a finished run on one split; the dict `fusion-eval` prints as JSON.

    Args:
        run_dir: a finished fusion-train RUN_DIR.
        shards: the dataset REF.
        split: the split to score.
        batch_size: samples per forward pass.
        max_batches: cap on batches for the losses and the grounding gain.
        generations: a `fusion-generate` JSONL to score for faithfulness; None: generate `generate_limit` here.
        generate_limit: samples to generate when `generations` is None (None: the whole split).
        max_new_tokens: tokens per generated caption.
        interventions: shifts such as "T2M=+3" (see `interventions`); a grid permutation runs with them.
        intervene_limit: windows (spread over the split) the interventions use.
        loss_samples: samples spread evenly over the split for the losses and the gains (None: every sample); the
            four passes cost about 0.8 s per sample for SmolLM2 in bf16 on 2 CPU cores, so a big split is scored on
            a spread.
        generate_batch_size: windows per generate call (the captions made here, the interventions); None: `batch_size`.
        no_repeat_ngram: n > 0: no caption made here (faithfulness, interventions) repeats an n-gram of its own
            tokens; 0: off. Captions given with `generations` are scored as they are.
        base_loss_from: an earlier evaluation's JSON whose frozen-base loss is reused when it was scored on the same
            inputs (`base_loss_inputs`: another seed of the same recipe); on other inputs the base is scored here,
            with a warning that names what differs.

    Returns:
        {"run", "dataset", "version", "split", "caption", "fused": {loss, perplexity, ...}, "base": {...},
        "loss_delta" (base loss - fused loss: positive when the climate helps), "grounding_gain": {...},
        "faithfulness": {...}, "grounded": {...}} (see `grounding_gain` and `grounding.faithfulness`). The result is
        also kept as `RUN_DIR/final/evaluation-<split>.json`, and the model card `final/README.md` shows it.

    Raises:
        ConfigError: a batch size below 1.
        DataError: the dataset cannot be read, or has no samples in `split`.
    """
    from fusion_trainer.data.stream import open_shards
    from fusion_trainer.errors import ConfigError, DataError

    generate_batch_size = batch_size if generate_batch_size is None else generate_batch_size
    for flag, size in (("--batch-size", batch_size), ("--generate-batch-size", generate_batch_size)):
        if size < 1:
            raise ConfigError(f"{flag} {size}: give 1 or more (samples per batch)")

    data = open_shards(shards)
    run = load_run_for(run_dir, data)
    config, model = run.config, run.model
    if not data.shards(split):
        raise DataError(
            f"--split {split}: dataset {data.version_url} has no {split!r} shards ({data.manifest.splits})"
        )
    device = next(model.parameters()).device
    ctx = EvalContext(run_dir=run_dir, config=config, model=model, dataset=data, split=split,
                      prompt=run.prompt, device=device, batch_size=batch_size,
                      max_batches=max_batches, generate_limit=generate_limit, max_new_tokens=max_new_tokens,
                      seed=config.seed,
                      generations=read_generations(generations) if generations is not None else None,
                      interventions=tuple(interventions), intervene_limit=intervene_limit,
                      loss_samples=loss_samples, generate_batch_size=generate_batch_size,
                      no_repeat_ngram=no_repeat_ngram, base_loss_from=base_loss_from)  # fmt: skip
    result: dict[str, Any] = {
        "run": str(run_dir),
        "dataset": data.reference,
        "version": data.version,
        "split": split,
        "caption": config.caption,
        "fusion": model.config.fusion,
    }
    if no_repeat_ngram:  # captions made here were not plain greedy ones
        result["no_repeat_ngram"] = no_repeat_ngram
    for section in SECTIONS:
        logger.info("fusion-eval: %s", section.__name__.removesuffix("_section"))
        result.update(section(ctx))
    if "fused" in result and "base" in result:
        result["loss_delta"] = result["base"]["loss"] - result["fused"]["loss"]
    result["goals"] = science_goals(result)
    if "grounding_gain" in result and "faithfulness" in result:
        result["grounded"] = {
            "uses_climate": result["grounding_gain"]["uses_climate"],
            "beats_mean_baseline": {
                q: m["beats_baseline"] for q, m in result["faithfulness"]["quantities"].items()
            },
            "numbers": result["faithfulness"]["grounded"],
        }
    _refresh_model_card(run_dir, result, data)
    return result


def _refresh_model_card(run_dir: Path, result: dict[str, Any], data: Any) -> None:
    """Keep the result as final/evaluation-<split>.json and rewrite final/README.md with the evaluation table.

    A run folder that cannot be written (read-only storage) only costs the card: the result is still returned.
    """
    from .model_card import save_evaluation, write_model_card

    final = run_dir / "final"
    try:
        save_evaluation(final, result)
        write_model_card(final, run_dir, data.manifest, data.reference)
    except OSError as exc:
        logger.warning(
            "could not refresh the model card in %s (%s); the evaluation is printed only", final, exc
        )
