"""The evaluation's building blocks: the caption loss over a split, the grounding gain (own climate against another
sample's), and `EvalContext`, what every section of `evaluate.evaluate_run` may use."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fusion_trainer.config import TrainConfig

__all__ = ["EvalContext", "LossResult", "evaluate_loss", "grounding_gain"]

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


def _loss_result(loss_sum: float, tokens: float, samples: float) -> LossResult:
    """The token-weighted mean of a loss summed over `tokens` tokens (NaN without any), with its perplexity."""
    loss = loss_sum / tokens if tokens else float("nan")
    return LossResult(loss=loss, perplexity=math.exp(min(loss, 50.0)), tokens=int(tokens), samples=int(samples))


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
                    input_ids=ids,
                    attention_mask=mask,
                    climate=batch["climate_x"].to(device),
                    labels=labels,
                    logits="none",
                )
            else:
                out = model(input_ids=ids, attention_mask=mask, labels=labels)
            n = _label_tokens(labels)
            loss_sum = float(out.loss) * n if n else 0.0  # a batch without labelled tokens has a NaN loss: skip it
            total += torch.tensor([loss_sum, n, len(batch["keys"])], dtype=torch.float64, device=device)
    if all_ranks and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
    return _loss_result(*(float(x) for x in total.tolist()))


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
    own_losses: Callable[[dict[str, Any]], torch.Tensor] | None = None,
    partners: Callable[[list[str]], dict[str, torch.Tensor | None]] | None = None,
) -> dict[str, Any]:
    """How much the model's caption loss depends on the climate it is given.

    Each sample is scored twice: with its own climate and with another window's. By default the other window is
    another scored sample's (a seeded derangement within samples of one shape and, with `group_of(key)`, one group);
    `partners(keys)` instead gives each key the window to swap in, or None (e.g. the same location at another time
    of the whole split: the gain then measures "which numbers", not "which place"). A sample left without another
    window (the only one of its group) is left out of every figure and counted in `unswapped`: scored against its
    own window it would add a difference of exactly 0. `cluster_of(key)` makes `stderr` clustered (e.g. by time
    window: the standard error of the cluster means of the paired differences). `own_losses(batch)` gives the
    batch's token losses with its own climate when another pass has them already (`EvalContext.own_token_losses`).

    The gain is the swapped loss minus the own loss, token-weighted, over all caption tokens and over the number
    tokens only (tokens holding a digit). A model that ignores the climate scores 0; one that reads it scores > 0.
    `stderr` is the standard error of the per-sample paired differences; `uses_climate` is true when the caption
    gain exceeds two of them.

    Returns:
        {"caption": {"own", "shuffled", "gain", "stderr", "tokens"}, "numbers": {...}, "samples" (those swapped),
        "unswapped", "uses_climate", ...}
    """
    from fusion_trainer.grounding import number_token_mask

    held = [b for i, b in enumerate(batches) if max_batches is None or i < max_batches]
    climates = [x for b in held for x in b["climate_x"]]
    keys = [k for b in held for k in b["keys"]]
    if partners is not None:
        given = partners(keys)
        swaps: list[torch.Tensor | None] = [given.get(k) for k in keys]
    else:
        by_shape: dict[tuple[Any, ...], list[int]] = {}
        for i, x in enumerate(climates):
            by_shape.setdefault((*x.shape, group_of(keys[i]) if group_of else None), []).append(i)
        other = _derangement(list(by_shape.values()), seed)
        swaps = [climates[other[i]] if other[i] != i else None for i in range(len(keys))]
    for key, own_x, swap in zip(keys, climates, swaps, strict=True):
        if swap is not None and tuple(swap.shape) != tuple(own_x.shape):
            from fusion_trainer.errors import DataError

            raise DataError(f"the window swapped in for {key} has shape {tuple(swap.shape)}, its own "
                            f"{tuple(own_x.shape)}: swap windows of one shape")  # fmt: skip
    digits = torch.from_numpy(number_token_mask(model.tokenizer))
    sums = {
        k: torch.zeros(2, dtype=torch.float64) for k in ("caption", "numbers")
    }  # (own, shuffled) loss sums
    counts = {"caption": 0, "numbers": 0}
    diffs: dict[str, list[float]] = {"caption": [], "numbers": []}
    diff_keys: dict[str, list[str]] = {"caption": [], "numbers": []}
    start, scored = 0, 0
    with torch.no_grad():
        for batch in held:
            n = len(batch["keys"])
            has = torch.tensor([swaps[start + j] is not None for j in range(n)])
            if not bool(has.any()):
                start += n
                continue
            swapped = torch.stack([s if s is not None else climates[start + j]
                                   for j, s in enumerate(swaps[start : start + n])])  # fmt: skip
            if own_losses is not None:
                own = own_losses(batch).double()
            else:
                own = _token_losses(model, batch, batch["climate_x"], device).cpu().double()
            shuf = _token_losses(model, batch, swapped, device).cpu().double()
            target = batch["labels"][:, 1:]
            valid = (target != -100) & has[:, None]  # a sample without another window counts nowhere
            scored += int(has.sum())
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
    kept = [k for k, s in zip(keys, swaps, strict=True) if s is not None]
    result: dict[str, Any] = {"samples": scored, "unswapped": start - scored,
                              "swapped_within": "same location" if group_of else "given" if partners else "same shape",
                              "stderr_clusters": len({cluster_of(k) for k in kept}) if cluster_of else None}  # fmt: skip
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
    loss_samples: int | None = None
    """Samples spread evenly over the split for the losses and the gains (None: every sample)."""
    no_repeat_ngram: int = 0
    """n > 0: no caption made here repeats an n-gram of its own tokens (`FusionModel.generate`); 0: off."""
    generate_batch_size: int = 64
    """Windows per generate call (the faithfulness captions made here, the interventions); `evaluate_run` passes
    `--generate-batch-size`, or `--batch-size` without it."""
    base_loss_from: Path | None = None
    """An earlier evaluation JSON whose frozen-base loss is reused when scored on the same inputs (`fusion-eval
    --base-loss-from`)."""
    _own: dict[tuple[str, ...], torch.Tensor] = field(default_factory=dict, repr=False)

    def own_token_losses(self, batch: dict[str, Any]) -> torch.Tensor:
        """The batch's token losses `(B, L-1)` with its own climate (`_token_losses`), computed once per batch and kept:
        the fused loss and both grounding gains score the same batches (`batches` gives the same ones every pass)."""
        key = tuple(batch["keys"])
        if key not in self._own:
            with torch.no_grad():
                self._own[key] = _token_losses(self.model, batch, batch["climate_x"], self.device).cpu()
        return self._own[key]

    def own_loss(self) -> LossResult:
        """The fused model's caption loss over `batches` (up to `max_batches`): the token-weighted mean of
        `own_token_losses`, the pass both grounding gains compare their swapped ones with."""
        loss_sum, tokens, samples = 0.0, 0, 0
        for i, batch in enumerate(self.batches()):
            if self.max_batches is not None and i >= self.max_batches:
                break
            loss_sum += float(self.own_token_losses(batch).double().sum())
            tokens += _label_tokens(batch["labels"])
            samples += len(batch["keys"])
        return _loss_result(loss_sum, tokens, samples)

    def generated(self) -> list[dict[str, Any]]:
        """The generations scored (given with --generations, or made here once and kept for every section)."""
        if self.generations is None:
            from .generate import iter_generations

            self.generations = list(
                iter_generations(
                    self.model, self.dataset, self.prompt, self.split, self.generate_limit, self.generate_batch_size,
                    self.max_new_tokens, self.config.caption, self.no_repeat_ngram,
                )
            )  # fmt: skip
        return self.generations

    def batches(self) -> Any:
        """A fresh pass over the split's batches (one process, manifest order); with `loss_samples`, only that many
        samples, spread evenly over the split (the same ones every pass), batched alike."""
        from fusion_trainer.data.stream import ClimateTextStream

        stream = ClimateTextStream(
            self.dataset, self.split, self.model.tokenizer, prompt=self.prompt, micro_batch=self.batch_size,
            max_length=self.config.max_length, train=False, verify=self.config.verify_shards,
            caption=self.config.caption,
        )  # fmt: skip
        total = sum(s.samples for s in self.dataset.shards(self.split))
        if self.loss_samples is None or self.loss_samples >= total:
            return stream
        return self._spread(stream, total, self.loss_samples)

    def _spread(self, stream: Any, total: int, count: int) -> Iterator[dict[str, Any]]:
        """Batches of `count` samples at evenly spaced positions of the split's manifest order."""
        from fusion_trainer.data.stream import epoch_samples

        wanted = {int(i) for i in np.linspace(0, total - 1, count).round()}
        raws = epoch_samples(self.dataset, self.split, epoch=0, rank=0, world=1, seed=0, shuffle=False)
        chunk: list[Any] = []
        for position, raw in enumerate(raws):
            if position in wanted:
                chunk.append(raw)
                if len(chunk) == self.batch_size:
                    yield stream._collate_raw(chunk)
                    chunk = []
        if chunk:
            yield stream._collate_raw(chunk)
