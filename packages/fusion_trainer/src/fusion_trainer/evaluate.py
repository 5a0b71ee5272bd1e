"""Evaluation: caption loss and perplexity of the fused model against the frozen base alone on the same captions.

`evaluate_run` composes independent sections (one function each) into the JSON that `fusion-eval` prints; add a
section (e.g. grounding metrics) by writing another `section(ctx) -> dict` and listing it in `SECTIONS`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import TrainConfig
from .eval_sections import interventions_section, ladder_section, same_place_gain_section, science_goals
from .runs import PROMPT_FILE, FusionRun, load_run

__all__ = [
    "SECTIONS",
    "EvalContext",
    "LossResult",
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
                    input_ids=ids, attention_mask=mask, climate=batch["climate_x"].to(device), labels=labels,
                    logits="none",
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


def _token_losses(
    model: Any, batch: dict[str, Any], climate: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """Per-token caption loss `(B, L-1)` (0 where the label is ignored) of the fused model with `climate`."""
    ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
    if hasattr(model, "token_losses"):  # a FusionModel: without logits off the targets (lm_pass)
        return torch.as_tensor(model.token_losses(ids, mask, climate.to(device), labels)).float()
    # labels place a prefix after the prompt, exactly as in training (without them it would go after the caption)
    out = model(input_ids=ids, attention_mask=mask, climate=climate.to(device), labels=labels)
    logits = out.logits[:, :-1].float()
    target = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="none"
    )
    return loss.view(target.shape)


def _derangement(groups: list[list[int]], seed: int) -> dict[int, int]:
    """Map every sample index to another one of its group (same climate shape), seeded; singletons map to self."""
    import random

    rng = random.Random(seed)
    out: dict[int, int] = {}
    for members in groups:
        if len(members) < 2:
            out.update({m: m for m in members})
            continue
        order = list(members)
        rng.shuffle(order)
        out.update({order[i]: order[(i + 1) % len(order)] for i in range(len(order))})
    return out


def grounding_gain(
    model: Any,
    batches: Iterable[dict[str, Any]],
    device: torch.device,
    max_batches: int | None = None,
    seed: int = 0,
    group_of: Callable[[str], str] | None = None,
    cluster_of: Callable[[str], str] | None = None,
) -> dict[str, Any]:
    """How much the model's caption loss depends on the climate it is given.

    `group_of(key)` restricts the swap to samples of one group (e.g. the same location at other times: the gain then
    measures "which numbers", not "which place"); `cluster_of(key)` makes `stderr` clustered (e.g. by time window:
    the standard error of the cluster means of the paired differences).

    Each sample is scored twice: with its own climate and with the climate of another sample of the split (a seeded
    derangement, so no sample keeps its own). The gain is the shuffled loss minus the own loss, token-weighted, over
    all caption tokens and over the number tokens only (tokens holding a digit). A model that ignores the climate
    scores 0; one that reads it scores > 0. `stderr` is the standard error of the per-sample paired differences;
    `uses_climate` is true when the caption gain exceeds two of them.

    Returns:
        {"caption": {"own", "shuffled", "gain", "stderr", "tokens"}, "numbers": {...}, "samples", "uses_climate"}
    """
    from .grounding import number_token_mask

    held = [b for i, b in enumerate(batches) if max_batches is None or i < max_batches]
    climates = [x for b in held for x in b["climate_x"]]
    keys = [k for b in held for k in b["keys"]]
    by_shape: dict[tuple[Any, ...], list[int]] = {}
    for i, x in enumerate(climates):
        by_shape.setdefault((*x.shape, group_of(keys[i]) if group_of else None), []).append(i)
    other = _derangement(list(by_shape.values()), seed)
    digits = torch.from_numpy(number_token_mask(model.tokenizer))
    sums = {
        k: torch.zeros(2, dtype=torch.float64) for k in ("caption", "numbers")
    }  # (own, shuffled) loss sums
    counts = {"caption": 0, "numbers": 0}
    diffs: dict[str, list[float]] = {"caption": [], "numbers": []}
    diff_keys: dict[str, list[str]] = {"caption": [], "numbers": []}
    start = 0
    with torch.no_grad():
        for batch in held:
            n = len(batch["keys"])
            swapped = torch.stack([climates[other[start + j]] for j in range(n)])
            own = _token_losses(model, batch, batch["climate_x"], device).cpu().double()
            shuf = _token_losses(model, batch, swapped, device).cpu().double()
            target = batch["labels"][:, 1:]
            valid = target != -100
            is_num = valid & digits[target.clamp(min=0, max=len(digits) - 1)]
            for name, sel in (("caption", valid), ("numbers", is_num)):
                sums[name] += torch.stack([(own * sel).sum(), (shuf * sel).sum()])
                counts[name] += int(sel.sum())
                per = sel.sum(dim=1)
                for j in range(n):
                    if per[j] > 0:
                        diffs[name].append(float(((shuf[j] - own[j]) * sel[j]).sum() / per[j]))
                        diff_keys[name].append(batch["keys"][j])
            start += n
    result: dict[str, Any] = {"samples": start, "swapped_within": "same location" if group_of else "same shape",
                              "stderr_clusters": len({cluster_of(k) for k in keys}) if cluster_of else None}  # fmt: skip
    for name in ("caption", "numbers"):
        tokens = counts[name]
        own_loss = float(sums[name][0]) / tokens if tokens else None  # None, not NaN: the JSON stays valid
        shuf_loss = float(sums[name][1]) / tokens if tokens else None
        d = torch.tensor(diffs[name], dtype=torch.float64)
        if cluster_of is not None and len(d) > 1:  # one mean per cluster, then their standard error
            groups: dict[str, list[float]] = {}
            for key, value in zip(diff_keys[name], diffs[name], strict=True):
                groups.setdefault(cluster_of(key), []).append(value)
            d = torch.tensor([sum(v) / len(v) for v in groups.values()], dtype=torch.float64)
        stderr = float(d.std() / math.sqrt(len(d))) if len(d) > 1 else None
        gain = shuf_loss - own_loss if own_loss is not None and shuf_loss is not None else None
        result[name] = {
            "own": own_loss,
            "shuffled": shuf_loss,
            "gain": gain,
            "stderr": stderr,
            "tokens": tokens,
        }
    cap = result["caption"]
    result["uses_climate"] = bool(
        cap["stderr"] is not None and cap["gain"] is not None and cap["gain"] > 2 * cap["stderr"]
    )
    return result


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
    generations: list[dict[str, Any]] | None = None
    generate_limit: int | None = 64
    max_new_tokens: int = 96
    seed: int = 0
    interventions: tuple[str, ...] = ()
    intervene_limit: int = 64

    def generated(self) -> list[dict[str, Any]]:
        """The generations scored (given with --generations, or made here once and kept for every section)."""
        if self.generations is None:
            from .generate import iter_generations

            self.generations = list(
                iter_generations(
                    self.model, self.dataset, self.prompt, self.split, self.generate_limit, self.batch_size,
                    self.max_new_tokens, self.config.caption,
                )
            )  # fmt: skip
        return self.generations

    def batches(self) -> Any:
        """A fresh pass over the split's batches (one process, manifest order)."""
        from .data import ClimateTextStream

        return ClimateTextStream(
            self.dataset, self.split, self.model.tokenizer, prompt=self.prompt, micro_batch=self.batch_size,
            max_length=self.config.max_length, train=False, verify=self.config.verify_shards,
            caption=self.config.caption,
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


def grounding_gain_section(ctx: EvalContext) -> dict[str, Any]:
    """Loss with another sample's climate minus loss with the sample's own climate (see `grounding_gain`)."""
    return {"grounding_gain": grounding_gain(ctx.model, ctx.batches(), ctx.device, ctx.max_batches, ctx.seed)}


def faithfulness_section(ctx: EvalContext) -> dict[str, Any]:
    """Numbers parsed from generated captions vs the index statistics, and the train-mean baseline's error."""
    from .grounding import baseline_values, consistency, faithfulness, truth_from_index

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


def load_run_for(run_dir: Path, data: Any) -> FusionRun:
    """`runs.load_run`, with the prompt rendered from the dataset for a run that kept no prompt.txt (older runs)."""
    from .data import render_prompt

    if (Path(run_dir) / PROMPT_FILE).exists():
        return load_run(run_dir)
    config = TrainConfig.from_yaml(Path(run_dir) / "config.yaml")
    return load_run(run_dir, prompt=render_prompt(config.prompt_template, data, config.caption))


def read_generations(path: Path) -> list[dict[str, Any]]:
    """Read a `fusion-generate --out` JSONL file (one {"key", "reference", "generated"} per line).

    Raises:
        DataError: the file is missing or a line is not such an object.
    """
    import json

    from .errors import DataError

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

    Returns:
        {"run", "dataset", "version", "split", "caption", "fused": {loss, perplexity, ...}, "base": {...},
        "loss_delta" (base loss - fused loss: positive when the climate helps), "grounding_gain": {...},
        "faithfulness": {...}, "grounded": {...}} (see `grounding_gain` and `grounding.faithfulness`). The result is
        also kept as `RUN_DIR/final/evaluation-<split>.json`, and the model card `final/README.md` shows it.

    Raises:
        DataError: the dataset cannot be read, or has no samples in `split`.
    """
    from .data import open_shards
    from .errors import DataError

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
                      interventions=tuple(interventions), intervene_limit=intervene_limit)  # fmt: skip
    result: dict[str, Any] = {
        "run": str(run_dir),
        "dataset": data.reference,
        "version": data.version,
        "split": split,
        "caption": config.caption,
        "fusion": model.config.fusion,
    }
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
        logger.warning("could not refresh the model card in %s (%s); the evaluation is printed only", final, exc)
