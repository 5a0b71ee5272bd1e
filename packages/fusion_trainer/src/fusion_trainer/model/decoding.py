"""Decoding for `FusionModel.generate`: left-padded prompts, a KV-cached loop over any fused step function, greedy or
seeded temperature / top-p sampling. It knows nothing of the model: the model hands it a step and an embedder."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from transformers import DynamicCache, GenerationConfig, PretrainedConfig, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer

from fusion_trainer.errors import DataError

__all__ = [
    "GrowingLayer", "batch_windows", "break_ids", "decode", "decode_texts", "encode_prompts", "growing_cache",
    "stop_ids",
]  # fmt: skip

logger = logging.getLogger(__name__)

Step = Callable[..., tuple[Tensor, Any]]
"""`(embeds (B, L, H), mask (B, C + L), positions (B, L), cache) -> (last logits (B, vocab), cache)`; with `keep=k`
(a step that checks drafts): the logits of the last k positions `(B, k, vocab)`."""


def batch_windows(
    climate: Tensor | np.ndarray, prompt: str | Sequence[str], device: torch.device
) -> tuple[Tensor, list[str]]:
    """The climate as `(B, T, V, H, W)` and one prompt per window (one prompt or one window is broadcast).

    Raises:
        DataError: the numbers of prompts and windows disagree.
    """
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
    return x, prompts


def stop_ids(tok: PreTrainedTokenizerBase, generation_config: GenerationConfig | None) -> set[int]:
    """The tokenizer's EOS and the model's generation-config EOS ids."""
    extra = generation_config.eos_token_id if generation_config is not None else None
    return {int(t) for t in {tok.eos_token_id, *np.atleast_1d(extra or []).tolist()} if t is not None}


_BREAKS: dict[tuple[int, int], frozenset[int]] = {}


def break_ids(tok: PreTrainedTokenizerBase) -> frozenset[int]:
    """Ids of the tokens whose text holds a line break (one scan of the vocabulary per tokenizer, kept)."""
    key = (id(tok), len(tok))
    if key not in _BREAKS:
        texts = tok.batch_decode([[i] for i in range(len(tok))])
        _BREAKS[key] = frozenset(i for i, t in enumerate(texts) if "\n" in t)
    return _BREAKS[key]


def encode_prompts(
    tok: PreTrainedTokenizerBase,
    prompts: list[str],
    device: torch.device,
    suffixes: list[list[int]] | None = None,
    skip: int = 0,
) -> tuple[Tensor, Tensor]:
    """Left-padded prompt ids `(B, L)` and mask; `suffixes` (the readout lines' ids) follow each prompt; `skip`
    leaves out each row's first tokens (a shared prompt whose keys and values are cached)."""
    fallback = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    rows = [(list(tok(p)["input_ids"]) or [int(fallback)])[skip:] for p in prompts]
    if suffixes is not None:
        rows = [r + list(extra) for r, extra in zip(rows, suffixes, strict=True)]
    width = max(len(r) for r in rows)
    pad = int(tok.pad_token_id if tok.pad_token_id is not None else fallback)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)  # (B, L), left padded
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)  # (B, L)
    return ids, mask


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values are views of buffers with room to spare (the capacity doubles when
    full), so a decode step writes its one new token in place. `DynamicLayer.update` concatenates, copying the whole
    cache of every layer at every step: a SmolLM2-135M decode step at 64 rows and about 300 cached tokens runs 1.23x
    faster without that copy (bench/decode.py, docs/performance.md). Same values, same shapes: generation is
    bit-identical (tested). A tensor replaced from outside (`batch_repeat_interleave`, `batch_select_indices`) is
    copied into fresh buffers at the next update."""

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        return self._grow(key_states, value_states, self.get_seq_length() if self.is_initialized else 0)

    def _grow(self, key_states: Tensor, value_states: Tensor, n: int) -> tuple[Tensor, Tensor]:
        """Append `(B, KV, new, D)` after the `n` tokens held; return all `n + new`."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        kbuf: Tensor | None = getattr(self, "_kbuf", None)
        stale = bool(n) and (kbuf is None or self.keys is None or self.keys.data_ptr() != kbuf.data_ptr())
        if kbuf is None or stale or n + new > kbuf.shape[-2] or kbuf.shape[:-2] != key_states.shape[:-2]:
            room = max(2 * (n + new), 64)
            kbuf = key_states.new_empty(*key_states.shape[:-2], room, key_states.shape[-1])
            vbuf = value_states.new_empty(*value_states.shape[:-2], room, value_states.shape[-1])
            if n:
                assert self.keys is not None and self.values is not None
                kbuf[..., :n, :].copy_(self.keys)
                vbuf[..., :n, :].copy_(self.values)
            self._kbuf, self._vbuf = kbuf, vbuf
        self._kbuf[..., n : n + new, :].copy_(key_states)
        self._vbuf[..., n : n + new, :].copy_(value_states)
        self.keys, self.values = self._kbuf[..., : n + new, :], self._vbuf[..., : n + new, :]
        return self.keys, self.values


def growing_cache(config: PretrainedConfig, cache: Any = None) -> Any:
    """A KV cache for `decode` whose full-attention layers are `GrowingLayer`s: a fresh one for the LM of `config`
    (None), or `cache` (a cached prompt's) with its plain `DynamicLayer`s swapped, their contents kept. Sliding-window
    and other layer kinds stay as they are. For inference only (a training pass keeps the plain cache)."""
    cache = DynamicCache(config=config) if cache is None else cache
    layers = getattr(cache, "layers", None)
    if layers is None:  # not a transformers Cache: leave it
        return cache
    for i, layer in enumerate(layers):
        if type(layer) is DynamicLayer:
            grown = GrowingLayer()
            grown.__dict__.update(layer.__dict__)
            layers[i] = grown
    if getattr(cache, "layer_class_to_replicate", None) is DynamicLayer:
        cache.layer_class_to_replicate = GrowingLayer
    return cache


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


class NoRepeat:
    """Each row's n-grams written so far, and the rule that no row writes one twice: before a step, the tokens that
    would complete an n-gram the row already wrote get -inf (`rule_out`); after it, the new token is recorded
    (`add`). The same rule as transformers' `no_repeat_ngram_size`, over the generated tokens only. Rows are named by
    their index in the whole batch (`rows`), so a batch that drops its finished rows keeps each row's history."""

    def __init__(self, n: int, rows: int) -> None:
        self.n = n
        self.history: list[list[int]] = [[] for _ in range(rows)]
        self.seen: list[dict[tuple[int, ...], set[int]]] = [{} for _ in range(rows)]

    def rule_out(self, logits: Tensor, rows: Sequence[int], done: Tensor) -> None:
        """Set to -inf, in place, the logits `(b, vocab)` of every token that would repeat an n-gram of its row;
        `rows[i]` is the batch row of logits row i, `done` `(b,)` marks the rows already finished."""
        k, finished = self.n - 1, done.tolist()
        for i, row in enumerate(rows):
            history = self.history[row]
            if len(history) < k or finished[i]:
                continue
            banned = self.seen[row].get(tuple(history[len(history) - k :]))
            if banned:
                logits[i, list(banned)] = float("-inf")

    def add(self, tokens: Tensor, rows: Sequence[int], done: Tensor) -> None:
        """Record each live row's new token `(b,)` (rows already done are skipped)."""
        for row, token, finished in zip(rows, tokens.tolist(), done.tolist(), strict=True):
            if finished:
                continue
            history = self.history[row]
            history.append(int(token))
            if len(history) >= self.n:
                self.seen[row].setdefault(tuple(history[len(history) - self.n : -1]), set()).add(int(token))


def decode(
    embeds: Tensor,
    mask: Tensor,
    step: Step,
    embed_next: Callable[[Tensor], Tensor],
    stops: set[int],
    pad: int,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    cache: Any = None,
    no_repeat_ngram: int = 0,
    select: Callable[[Tensor], None] | None = None,
    drafts: Sequence[Sequence[int]] | None = None,
    draft_window: int = 16,
) -> list[list[int]]:
    """New token ids per row, from the fused prompt embeddings `(B, L, H)` and their padded mask `(B, C + L)`.

    `step` runs the LM on new embeddings with the cache; `embed_next` fuses the tokens just picked `(b, k)` into
    `(b, k, H)`. A row stops at its first stop id (later positions hold `pad`); all stop, or `max_new_tokens`.
    `cache`: the keys and values of `C` tokens before `embeds` (a cached prompt; `mask` covers them too), or None.
    Padding may sit anywhere in the mask: positions count attended tokens only.
    `no_repeat_ngram=n` (> 0): a row never writes an n-gram of tokens it has already written (the prompt does not
    count): the token that would complete one is ruled out at that step (`NoRepeat`).
    `select`: given, finished rows leave the batch: once a quarter of the rows still in it have stopped, the cache
    (`batch_select_indices`) and the step's inputs keep only the others, and `select(keep)` tells the caller which
    rows of its per-row state to keep (indices into the rows still in the batch, `(b',)`). One long row then no
    longer costs a step of the whole batch. Greedy tokens are the same in exact arithmetic (each row's computation
    is its own; bf16 products may round a smaller batch differently); sampled ones are drawn for fewer rows, so a
    seed gives other (still reproducible) draws.
    `drafts` (greedy without `no_repeat_ngram` only; ignored otherwise): each row's guess of its tokens. While a
    row follows its draft (a row that leaves it picks it up again where its last two tokens occur in it, `_Drafts`),
    a step also feeds the draft's next `draft_window - 1` tokens and checks them all at once (`step(..., keep=k)`
    gives the logits of the last k positions): the guessed tokens that
    greedy decoding would have picked are kept, with the token greedy picks after the last of them, and the rest
    are masked out of the cache (speculative decoding with a given draft). The tokens are greedy decoding's in
    exact arithmetic whatever the drafts; a right draft turns a caption's dozens of steps into a few passes. Not for
    a base whose attention window counts cache slots (`lm_pass.local_attention`): the masked-out slots would shorten
    its windows; `FusedGeneration.generate` drafts nothing there.
    """
    device = embeds.device
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)[:, -embeds.shape[1] :]  # (B, L), padding aware
    stop_tensor = torch.tensor(sorted(stops), device=device, dtype=torch.long)
    total = embeds.shape[0]
    live = torch.arange(total, device=device)  # the batch rows still in the step's inputs
    done = torch.zeros(total, dtype=torch.bool, device=device)
    out = torch.full((total, max_new_tokens), pad, dtype=torch.long, device=device)
    length = torch.zeros(total, dtype=torch.long, device=device)  # tokens written per row
    repeats = NoRepeat(no_repeat_ngram, total) if no_repeat_ngram > 0 else None
    guess = _Drafts(drafts, total, device) if drafts is not None and not do_sample and repeats is None else None
    window = max(int(draft_window), 1) if guess is not None else 1
    logits, cache = step(embeds, mask, positions, cache)
    chunk: Tensor | None = None  # the ids fed at the last step when it checked drafts `(b, W)`
    fed_ok = torch.ones(total, 1, dtype=torch.long, device=device)  # which of them were a row's own (not padding)
    while True:
        stopped = done[live]  # (b,)
        if chunk is None:  # one new token a row
            logits = logits.float()
            rows = live.tolist() if repeats is not None else []
            if repeats is not None:
                repeats.rule_out(logits, rows, stopped)
            picks = _pick_next(logits, do_sample, temperature, top_p, gen)[:, None]  # (b, 1)
            if repeats is not None:
                repeats.add(picks[:, 0], rows, stopped)
            accepted = torch.ones_like(live)
        else:  # greedy's pick at every fed position; the fed draft tokens it agrees with are kept
            picks = logits.float().argmax(dim=-1)  # (b, W)
            agree = ((chunk[:, 1:] == picks[:, :-1]) & fed_ok[:, 1:].bool()).long()
            accepted = 1 + agree.cumprod(dim=1).sum(dim=1)  # (b,): the agreed tokens and greedy's next
        accepted = torch.minimum(accepted, max_new_tokens - length[live])
        fed_at = torch.arange(picks.shape[1], device=device)[None]  # (1, W)
        ends = (fed_at < accepted[:, None]) & torch.isin(picks, stop_tensor)
        first_end = torch.where(ends.any(dim=1), ends.int().argmax(dim=1) + 1, accepted)
        accepted = torch.where(stopped, torch.zeros_like(accepted), first_end)  # rows done write nothing more
        at = (fed_at < accepted[:, None]).nonzero(as_tuple=True)
        out[live[at[0]], (length[live][:, None] + fed_at)[at]] = picks[at]
        length[live] += accepted
        stopped = stopped | ends.any(dim=1) | (length[live] >= max_new_tokens)
        done[live] = stopped
        if guess is not None:
            guess.follow(live, picks, accepted, out, length, stopped)
        if bool(stopped.all()):
            break
        last = out[live, (length[live] - 1).clamp(min=0)]  # each row's newest token, fed next
        if chunk is not None:  # the fed positions greedy did not keep leave the attention
            fed = chunk.shape[1]
            mask[:, -fed:] &= (torch.arange(fed, device=device)[None] < accepted[:, None]).to(mask.dtype)
            positions = positions[:, :1] + accepted[:, None] - 1  # the last kept one (a row done: before them)
        if select is not None and hasattr(cache, "batch_select_indices") and 4 * int(stopped.sum()) >= len(live):
            keep = (~stopped).nonzero().squeeze(1)  # (b',)
            cache.batch_select_indices(keep)
            select(keep)
            live, last, mask, positions = live[keep], last[keep], mask[keep], positions[keep]
        extra, extra_ok = guess.offer(live, window - 1) if guess is not None else (None, None)
        if extra is None or extra_ok is None or not bool(extra_ok.any()):
            chunk, fed_ok = None, torch.ones_like(last[:, None])
            ids = last[:, None]
        else:
            width = 1 + int(extra_ok.sum(dim=1).max())
            ids = torch.cat([last[:, None], torch.where(extra_ok, extra, pad)], dim=1)[:, :width]  # (b, W)
            fed_ok = torch.cat([torch.ones_like(last[:, None]), extra_ok.long()], dim=1)[:, :width]
            chunk = ids
        embeds = embed_next(ids)  # (b, W, H)
        mask = torch.cat([mask, fed_ok.to(mask.dtype)], dim=1)  # (b, L + W)
        positions = positions[:, -1:] + 1 + torch.arange(ids.shape[1], device=device)[None]  # (b, W)
        logits, cache = step(embeds, mask, positions, cache) if chunk is None else step(
            embeds, mask, positions, cache, keep=ids.shape[1]
        )
    written = int(length.max())
    return [list(map(int, row)) for row in out[:, :written].tolist()]


class _Drafts:
    """Each row's draft `(B, D)` (-1 past its end), where in it the row's next token is expected (`at`), and whether
    the row follows it (`on`). A row whose token leaves its draft (a digit miscopied, a word changed) finds its place
    again: once its last two tokens occur in the draft, not far before where it left, the draft goes on from there."""

    RESYNC = 2
    """Tokens a row's last ones and the draft must share to pick the draft up again."""

    def __init__(self, drafts: Sequence[Sequence[int]], rows: int, device: torch.device) -> None:
        if len(drafts) != rows:
            raise DataError(f"{len(drafts)} drafts for {rows} rows; give one draft per row")
        width = max((len(d) for d in drafts), default=0) + 1
        self.ids = torch.full((rows, width), -1, dtype=torch.long, device=device)
        for r, d in enumerate(drafts):
            self.ids[r, : len(d)] = torch.tensor(list(d), dtype=torch.long, device=device)
        self.lists = [list(map(int, d)) for d in drafts]  # for the search, without a device read per token
        self.on = torch.tensor([len(d) > 0 for d in drafts], device=device)
        self.at = torch.zeros(rows, dtype=torch.long, device=device)

    def _tokens(self, live: Tensor, n: int) -> Tensor:
        cols = self.at[live][:, None] + torch.arange(n, device=self.ids.device)[None]
        return self.ids[live[:, None], cols.clamp(max=self.ids.shape[1] - 1)]

    def follow(
        self, live: Tensor, picks: Tensor, accepted: Tensor, out: Tensor, length: Tensor, done: Tensor
    ) -> None:
        """After a step that wrote `picks[:, :accepted]` (rows `live`; `out` `(B, N)` holds every row's `length`
        tokens so far; `done` `(b,)` the rows that have stopped, fed nothing more of their draft): a row follows on
        while what it wrote is its draft's next tokens; one that left it looks for its last tokens in the draft."""
        span = torch.arange(picks.shape[1], device=picks.device)[None] < accepted[:, None]
        same = (picks == self._tokens(live, picks.shape[1])) & span & self.on[live][:, None]
        agreed = same.long().cumprod(dim=1).sum(dim=1)  # the draft tokens written before any other
        ok = self.on[live] & (agreed == accepted) & ~done
        self.at[live] += agreed  # a row that leaves: where it left
        self.on[live] = ok
        k = self.RESYNC
        for i in (~ok & ~done & (accepted > 0)).nonzero().flatten().tolist():
            row = int(live[i])
            draft, n = self.lists[row], int(length[row])
            if n < k or len(draft) < k:
                continue
            tail = out[row, n - k : n].tolist()
            start = max(int(self.at[row]) - 8, 0)  # near where it left: the same words recur (" °C," after each)
            found = next((j for j in range(start, len(draft) - k + 1) if draft[j : j + k] == tail), None)
            if found is not None:
                self.at[row], self.on[row] = found + k, True

    def offer(self, live: Tensor, n: int) -> tuple[Tensor | None, Tensor | None]:
        """Each row's next `n` draft tokens `(b, n)` and which of them to feed."""
        if n <= 0 or not bool(self.on[live].any()):
            return None, None
        tokens = self._tokens(live, n)
        return tokens, (tokens >= 0) & self.on[live][:, None]


def decode_texts(
    tok: PreTrainedTokenizerBase, rows: list[list[int]], stops: set[int], breaks: frozenset[int] = frozenset()
) -> list[str]:
    """Each row's text up to its first stop id, special tokens removed; with `breaks` (`break_ids`), only its first
    line (the text before the first line break, which may sit inside a token)."""
    texts = []
    for row in rows:
        cut = next((i for i, t in enumerate(row) if t in stops or t in breaks), len(row))
        if cut < len(row) and row[cut] in breaks:
            cut += 1  # the break's token may carry text before the break
        text = str(tok.decode(row[:cut], skip_special_tokens=True))
        texts.append(text.split("\n", 1)[0] if breaks else text)
    return texts
