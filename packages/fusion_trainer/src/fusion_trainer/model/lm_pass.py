"""The frozen LM's pass in training, without the work a frozen base leaves undone (docs/performance.md, "Training").

Three exact savings, used only for the loss (`FusionModel.forward(..., logits="none")`, and `LeanCausalLM`, the
frozen base's caption loss that `fusion-eval` scores):

- **Logits at target positions only.** The LM head (576 x 49,152 for SmolLM2: about a fifth of a forward) runs only
  at the positions that predict a labelled token, through transformers' `logits_to_keep` (a tensor of positions,
  the union over the batch; with right padding one contiguous range). The prompt, the soft tokens and the padding
  get no logits.
- **The constant prompt runs once.** When every row starts with the same fully attended, unlabelled prompt and
  nothing in it depends on the climate (the `prefix` variant with `prefix_position: after_prompt`, no LoRA), the
  frozen LM's keys and values of that prompt are computed once per device and dtype, with no gradient, and every
  later batch starts from a copy (`PromptCache`): the LM then runs only over the soft tokens and the caption. The
  attention sees the same keys and values as in one pass over the whole sequence, so the loss is the same to
  floating-point rounding (tested to 1e-5, gradients too).
- **The readout line without a backward.** With `readout: true`, each row's readout line (text ids after the cached
  prompt, before the soft tokens) runs in a pass without gradient that extends the cache, and the pass with gradient
  covers only the soft tokens and the caption (`constant_head_first`; tested to 1e-5, gradients too).
"""

from __future__ import annotations

import copy
import inspect
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers.modeling_outputs import CausalLMOutputWithPast

__all__ = [
    "FusionOutput", "LeanCausalLM", "PromptCache", "after_cached_prompt", "cache_kwarg", "caption_loss",
    "constant_head_first", "local_attention",
    "predictor_positions", "shared_prompt_length", "target_loss",
]  # fmt: skip

logger = logging.getLogger(__name__)


def cache_kwarg(lm: nn.Module) -> str:
    """The name the LM's forward takes its KV cache under (`cache` in newer transformers models, else
    `past_key_values`)."""
    return "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"


def after_cached_prompt(shared: int, mask: Tensor) -> tuple[Tensor, Tensor]:
    """For a pass that continues `shared` cached prompt tokens: the position ids of its `(B, L)` tokens and the mask
    `(B, shared + L)` that covers the cached prompt too (fully attended)."""
    positions = shared + torch.arange(mask.shape[1], device=mask.device)[None].expand(mask.shape[0], -1)
    return positions, torch.cat([torch.ones_like(mask[:, :1]).expand(-1, shared), mask], dim=1)


def shared_prompt_length(input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> int:
    """Length of the prefix of tokens every row shares: identical ids, attended, before each row's first label.

    Returns 0 when the rows share nothing (or a row has no label at all).
    """
    labelled = labels != -100  # (B, L)
    if not bool(labelled.any(dim=1).all()):
        return 0
    first = int(labelled.int().argmax(dim=1).min())
    if first == 0:
        return 0
    same = (input_ids[:, :first] == input_ids[:1, :first]).all(dim=0) & attention_mask[:, :first].bool().all(dim=0)
    differ = (~same).nonzero()
    return int(differ[0, 0]) if differ.numel() else first


def local_attention(config: Any) -> bool:
    """Whether a transformers config has layers that attend within a window (GPT-Neo's local layers, sliding windows):
    their window counts cache slots, so a pass whose rows are padded in the middle would shift what they see."""
    return bool(getattr(config, "sliding_window", None)) or "local" in set(getattr(config, "attention_layers", ()) or ())


def constant_head_first(
    lm: nn.Module, embeds: Tensor, mask: Tensor, labels: Tensor, text_positions: Tensor, n_soft: int,
    lm_kwargs: dict[str, Any],
) -> tuple[Tensor, Tensor, dict[str, Any]] | None:  # fmt: skip
    """Run, without gradient, what each row holds before its soft tokens (the readout line: text ids, which nothing
    trainable reaches), so the pass with gradient and its backward cover only the soft tokens and the caption.

    For a pass that continues a cached prompt (`lm_kwargs`: the cache, `use_cache`, and the `after_cached_prompt`
    mask and positions, whose mask covers the cached `shared` tokens and then `mask`'s `(B, L)`, right padded). Row
    b's head is its first `h_b` fused tokens (before the `n_soft` soft tokens that precede its first labelled token);
    the heads run in one no-gradient pass `(B, max h)`, right padded, which extends the cache; the rest of each row,
    `(B, L2)` from its own `h_b`, runs after it with the positions it has in one pass, the heads' padding masked. The
    attention sees the same keys and values, so the loss and gradients equal the one-pass ones to rounding (tested).

    Returns:
        `(embeds, text_positions, lm_kwargs)` of the pass with gradient (text positions in its frame), or None where
        the split would not be exact (a base with windowed attention; a mask that is not right padded): run one pass.
    """
    if local_attention(getattr(lm, "config", None)) or bool((mask[:, 1:] > mask[:, :-1]).any()):
        return None
    first = (labels != -100).int().argmax(dim=1)  # (B,) the first labelled column of each row
    heads = text_positions.gather(1, first[:, None])[:, 0] - n_soft  # (B,) tokens before the soft tokens
    width = int(heads.max())
    shared = int(lm_kwargs["attention_mask"].shape[1]) - int(mask.shape[1])
    device, b = embeds.device, embeds.shape[0]
    head_mask = (torch.arange(width, device=device)[None] < heads[:, None]).to(mask.dtype)  # (B, R)
    prompt_mask = lm_kwargs["attention_mask"][:, :shared]
    with torch.no_grad():  # no logits wanted: the one kept is the last position's
        lm(**{**lm_kwargs, "inputs_embeds": embeds[:, :width], "attention_mask": torch.cat([prompt_mask, head_mask], 1),
              "position_ids": shared + torch.arange(width, device=device)[None].expand(b, -1),
              "logits_to_keep": torch.tensor([width - 1], device=device)})  # fmt: skip
    rest = mask.sum(dim=1) - heads  # (B,) real tokens after each head
    cols = torch.arange(int(rest.max()), device=device)[None]  # (1, L2)
    take = (heads[:, None] + cols).clamp(max=embeds.shape[1] - 1)  # (B, L2)
    tail = embeds.gather(1, take[..., None].expand(-1, -1, embeds.shape[-1]))  # (B, L2, H), keeps the graph
    tail_mask = (cols < rest[:, None]).to(mask.dtype)
    positions = torch.where(tail_mask.bool(), shared + heads[:, None] + cols, shared)  # padding: a position in range
    kwargs = {**lm_kwargs, "attention_mask": torch.cat([prompt_mask, head_mask, tail_mask], 1), "position_ids": positions}
    return tail, text_positions - heads[:, None], kwargs  # the cache in kwargs now holds the heads too


def predictor_positions(labels: Tensor, text_positions: Tensor | None, offset_ok: bool) -> tuple[Tensor, Tensor]:
    """Where each labelled token is predicted in the LM's (fused) sequence.

    Token j is predicted at fused position `text_positions[j] - 1` (the position before it; `j - 1` without
    inserted soft tokens). Token 0 is a target only when `offset_ok` (a cached prompt precedes the input, and soft
    tokens sit before token 0); otherwise, as in transformers, the first token is never predicted.

    Returns:
        `(rows, positions)`: for every labelled target, its batch row and its fused-sequence position, `(N,)` each;
        and the targets are `labels[rows, cols]` in the same order (see `target_loss`).
    """
    b, length = labels.shape
    cols = torch.arange(length, device=labels.device)[None].expand(b, -1)  # (B, L)
    pos = (text_positions if text_positions is not None else cols) - 1  # (B, L)
    valid = (labels != -100) & (pos >= 0)
    if not offset_ok:
        valid &= cols >= 1
    rows = valid.nonzero()  # (N, 2): row, column
    return rows, pos[rows[:, 0], rows[:, 1]]


def target_loss(
    lm: nn.Module,
    lm_kwargs: dict[str, Any],
    labels: Tensor,
    text_positions: Tensor | None,
    weights: Tensor | None,
    offset_ok: bool,
    per_token: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Run the LM with logits only where labelled tokens are predicted; return the (weighted) mean cross-entropy,
    or with `per_token` the cross-entropy of every target `(N,)` and its (row, column) in the input frame `(N, 2)`.

    Args:
        lm: the causal LM.
        lm_kwargs: its inputs (`inputs_embeds`, `attention_mask`, position ids, cache).
        labels: `(B, L)` targets in the input frame, -100 where ignored.
        text_positions: `(B, L)` fused position of each input token (None when nothing was inserted).
        weights: `(vocab,)` per-token-id weights (`caption_loss`), or None for the plain mean.
        offset_ok: token 0 may be a target (see `predictor_positions`).
    """
    idx, positions = predictor_positions(labels, text_positions, offset_ok)
    keep = torch.unique(positions)  # sorted fused positions with a target
    out = lm(**lm_kwargs, logits_to_keep=keep)
    logits = out.logits  # (B, K, vocab)
    slot = torch.searchsorted(keep, positions)  # (N,)
    rows = logits[idx[:, 0], slot].float()  # (N, vocab)
    target = labels[idx[:, 0], idx[:, 1]]  # (N,)
    if per_token:
        return torch.nn.functional.cross_entropy(rows, target, reduction="none"), idx
    if weights is None:
        return torch.nn.functional.cross_entropy(rows, target)
    ce = torch.nn.functional.cross_entropy(rows, target, reduction="none")
    w = weights[target.clamp(min=0, max=weights.shape[0] - 1)]
    return (ce * w).sum() / w.sum().clamp(min=1e-8)


class PromptCache:
    """The frozen LM's keys and values of a constant prompt, computed once (no gradient) and copied per batch.

    Keyed by the prompt's token ids, the device and the dtype, so a DeepSpeed cast or a move to another device
    recomputes it. Valid only while nothing in the prompt's pass can change: the base is frozen and the prompt sees
    no climate (FusionModel enables it for `prefix` after the prompt without LoRA or gradient checkpointing).
    """

    def __init__(self) -> None:
        self._key: tuple[Any, ...] | None = None
        self._cache: Any = None

    def batch(self, lm: nn.Module, prompt_ids: Tensor, embed: nn.Module, batch_size: int) -> Any:
        """A fresh cache of the prompt `prompt_ids` `(1, n)` for a batch of `batch_size` rows.

        Args:
            lm: the frozen causal LM.
            prompt_ids: the prompt's token ids (one row).
            embed: the LM's input embedding.
            batch_size: rows of the batch about to run.
        """
        fresh = copy.deepcopy(self.prompt(lm, prompt_ids, embed))
        if batch_size > 1:
            fresh.batch_repeat_interleave(batch_size)
        return fresh

    def prompt(self, lm: nn.Module, prompt_ids: Tensor, embed: nn.Module) -> Any:
        """The prompt's one-row cache itself (computed on first use); read it, never write to it."""
        weight = getattr(embed, "weight", None)
        key = (tuple(prompt_ids[0].tolist()), prompt_ids.device, None if weight is None else weight.dtype)
        if key != self._key:
            with torch.no_grad():
                out = lm(inputs_embeds=embed(prompt_ids), use_cache=True)
            self._cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
            self._key = key
            logger.debug("prompt cache: %d tokens on %s (%s)", prompt_ids.shape[1], prompt_ids.device, key[2])
        return self._cache


class LeanCausalLM:
    """A frozen causal LM's caption loss the lean way (what `fusion-eval` scores the base with): logits only where a
    labelled token is predicted, and the prompt every row shares from a `PromptCache`, all but its last token (which
    predicts the first caption token, so it runs with the rest). The loss is transformers' (the plain mean
    cross-entropy over the labelled tokens), to floating-point rounding (tested to 1e-5).

    Called as the plain model is for a loss: `lean(input_ids=..., attention_mask=..., labels=...)` -> `.loss`.
    """

    def __init__(self, lm: nn.Module) -> None:
        self.lm = lm
        self._prompt = PromptCache()
        self._cache_kwarg = cache_kwarg(lm)

    @torch.no_grad()
    def __call__(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> CausalLMOutputWithPast:
        embed = self.lm.get_input_embeddings()  # type: ignore[operator]
        shared = max(shared_prompt_length(input_ids, attention_mask, labels) - 1, 0)
        kwargs: dict[str, Any] = {"use_cache": False}
        if shared:
            cache = self._prompt.batch(self.lm, input_ids[:1, :shared], embed, input_ids.shape[0])
            input_ids, attention_mask, labels = input_ids[:, shared:], attention_mask[:, shared:], labels[:, shared:]
            positions, attention_mask = after_cached_prompt(shared, attention_mask)
            kwargs = {self._cache_kwarg: cache, "use_cache": True, "position_ids": positions}
        loss = target_loss(self.lm, {"inputs_embeds": embed(input_ids), "attention_mask": attention_mask, **kwargs},
                           labels, None, None, offset_ok=False)  # fmt: skip
        assert isinstance(loss, Tensor)
        return CausalLMOutputWithPast(loss=loss)


def caption_loss(logits: Tensor, labels: Tensor, weights: Tensor | None = None) -> Tensor:
    """Next-token cross-entropy of `logits` `(B, L, vocab)` against `labels` `(B, L)` (-100 ignored, shifted here).

    With `weights` `(vocab,)`, each target token counts `weights[token id]` times and the sum is normalised by the
    weights; without, it is the plain mean over the labelled tokens. Computed in fp32.
    """
    target = labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100,
        reduction="none" if weights is not None else "mean",
    )  # fmt: skip
    if weights is None:
        return ce
    w = weights[target.clamp(min=0, max=weights.shape[0] - 1)] * (target != -100)
    return (ce.view(target.shape) * w).sum() / w.sum().clamp(min=1e-8)


@dataclass
class FusionOutput(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus `climate_stats`: the stats head's predicted window mean/min/max `(B, V, 3)`."""

    climate_stats: Tensor | None = None
