"""Generation for `FusionModel.generate`: left-padded prompts, a KV cache, and every new token fused with the climate
as in training (greedy, or seeded temperature / top-p sampling)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from .errors import DataError

if TYPE_CHECKING:
    from .model import FusionModel

__all__: list[str] = []  # package-internal: `FusionModel.generate` is the public entry point

logger = logging.getLogger(__name__)


def _encode_prompts(
    model: FusionModel, prompts: list[str], device: torch.device, suffixes: list[list[int]] | None = None
) -> tuple[Tensor, Tensor]:
    """Left-padded prompt ids `(B, L)` and mask; `suffixes` (the readout lines' ids) follow each prompt."""
    tok = model.tokenizer
    assert tok is not None
    fallback = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    rows = [list(tok(p)["input_ids"]) or [int(fallback)] for p in prompts]
    if suffixes is not None:
        rows = [r + list(extra) for r, extra in zip(rows, suffixes, strict=True)]
    width = max(len(r) for r in rows)
    pad = int(tok.pad_token_id if tok.pad_token_id is not None else fallback)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)  # (B, L), left padded
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)  # (B, L)
    return ids, mask


def _pick_next(
    logits: Tensor, do_sample: bool, temperature: float, top_p: float, gen: torch.Generator | None
) -> Tensor:
    if not do_sample:
        return logits.argmax(dim=-1)  # (B,)
    probs = torch.softmax(logits / temperature, dim=-1)  # (B, vocab)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p  # keep the smallest set reaching top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)  # (B,)


def _run_generation(
    model: FusionModel,
    climate: Tensor | np.ndarray,
    prompt: str | Sequence[str],
    max_new_tokens: int,
    do_sample: bool,
    temperature: float,
    top_p: float,
    seed: int | None,
) -> list[str]:
    tok = model.tokenizer
    assert tok is not None
    device = model.device
    x = torch.as_tensor(climate, dtype=torch.float32, device=device)
    x = x[None] if x.ndim == 4 else x  # (B, T, V, H, W)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if len(prompts) == 1 and x.shape[0] > 1:
        prompts = prompts * x.shape[0]
    elif x.shape[0] == 1 and len(prompts) > 1:
        x = x.expand(len(prompts), *x.shape[1:])
    if len(prompts) != x.shape[0]:
        raise DataError(
            f"{len(prompts)} prompts for {x.shape[0]} climate windows; give one prompt or one per window"
        )
    tokens = model.encoder.encode(x)
    head = model.encoder.stats_head
    stats = head(tokens.tokens, x) if head is not None and model.config.readout else None
    ids, mask = _encode_prompts(model, prompts, device, model.readout_ids(stats) if stats is not None else None)
    stops = {tok.eos_token_id, *np.atleast_1d(model.lm.generation_config.eos_token_id or []).tolist()} - {
        None
    }
    pad = tok.pad_token_id if tok.pad_token_id is not None else next(iter(stops), 0)
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None

    embeds, mask, _, _ = model._fuse(ids, mask, tokens, None, stats, insert_readout=False)  # (B, L', H), (B, L')
    positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)  # (B, L'), left padding aware
    cache: Any = None
    done = torch.zeros(x.shape[0], dtype=torch.bool, device=device)
    out_ids: list[Tensor] = []
    for _ in range(max_new_tokens):
        with model._climate_scope(tokens):
            out = model.lm(
                inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True,
                **{model._cache_kwarg: cache},
            )  # fmt: skip
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        nxt = _pick_next(out.logits[:, -1, :].float(), do_sample, temperature, top_p, gen)  # (B,)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        out_ids.append(nxt)
        done |= torch.isin(nxt, torch.tensor(sorted(stops), device=device))
        if bool(done.all()):
            break
        embeds = model.step_embeddings(nxt[:, None], tokens)  # (B, 1, H)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # (B, L'+k)
        positions = positions[:, -1:] + 1  # (B, 1)
    texts = []
    for row in torch.stack(out_ids, dim=1).tolist() if out_ids else [[] for _ in prompts]:
        cut = next((i for i, t in enumerate(row) if t in stops), len(row))
        texts.append(str(tok.decode(row[:cut], skip_special_tokens=True)))
    return texts
