"""Text from a FusionModel: the readout line of the stats head's predictions, and batched generation through the same
fusion as in training (the decoding loop itself, which knows no model, is `generation.decode`). A mixin of
`FusionModel`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fusion_trainer.errors import ConfigError, ModelError
from fusion_trainer.fusion_config import FusionConfig

from .attention import GROUPED_SDPA
from .decoding import batch_windows, break_ids, decode, decode_texts, encode_prompts, growing_cache, stop_ids
from .encoder import ClimateEncoder, ClimateTokens
from .fusion import fuse_new_tokens
from .lm_pass import PromptCache, after_cached_prompt, local_attention
from .readout import readout_caption, readout_values, render_readout
from .shared_prefix import SharedPrefixLayer, shared_prefix_cache, shared_prefix_scope

__all__ = ["FusedGeneration"]


class FusedGeneration(nn.Module):
    """`generate` and the readout line of a FusionModel (its `lm`, `encoder`, `fusion`, `config`, `tokenizer`)."""

    lm: PreTrainedModel
    encoder: ClimateEncoder
    fusion: nn.Module | None
    config: FusionConfig
    tokenizer: PreTrainedTokenizerBase | None
    _cache_kwarg: str
    _prompt_cache: PromptCache | None

    if TYPE_CHECKING:

        @property
        def device(self) -> torch.device: ...

        def _embed(self, input_ids: Tensor) -> Tensor: ...

        def _embed_module(self) -> nn.Module: ...

        def _fuse(
            self, input_ids: Tensor, attention_mask: Tensor, climate: ClimateTokens, labels: Tensor | None,
            stats: Tensor | None = None, insert_readout: bool = True,
        ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]: ...  # fmt: skip

        def _climate_scope(self, climate: ClimateTokens) -> contextlib.AbstractContextManager[None]: ...

    def readout_ids(self, stats: Tensor) -> list[list[int]]:
        """Token ids of each window's readout line (`readout.render_readout`) from the stats head's predictions."""
        return self._ids(self.readout_texts(stats))

    def _ids(self, texts: Sequence[str]) -> list[list[int]]:
        if self.tokenizer is None:
            raise ModelError("readout: true needs the tokenizer; pass tokenizer=... to FusionModel.from_base")
        return [list(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    def readout_texts(self, stats: Tensor) -> list[str]:
        """Each window's readout line (`readout.render_readout`) from the stats head's predictions `(B, V, 3)`."""
        return [render_readout(v) for v in self._readout_values(stats)]

    def _readout_values(self, stats: Tensor) -> list[dict[str, float]]:
        cfg = self.config
        if cfg.variables is None or cfg.normalization is None:
            raise ModelError("readout: true needs the dataset's variables and normalization in the FusionConfig")
        seconds = pd.Timedelta(cfg.window).total_seconds() if cfg.window else 3600.0
        return readout_values(stats, cfg.variables, cfg.normalization, seconds)

    def _pad_id(self) -> int:
        tok = self.tokenizer
        pad = None if tok is None else (tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        return int(pad or 0)

    @torch.no_grad()
    def generate(
        self,
        climate: Tensor | np.ndarray,
        prompt: str | Sequence[str],
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        one_line: bool = False,
        no_repeat_ngram: int = 0,
        drafts: Sequence[str] | None = None,
        draft_caption: str | None = None,
    ) -> list[str]:
        """Generate text for climate windows, batched with left padding and a KV cache.

        Every new token goes through the same fusion as in training (add / xattn apply to it too; gated-xattn blocks
        see the climate at every step). Greedy unless `do_sample`; sampling is deterministic for a given `seed`.

        Args:
            climate: `(B, T, V, lat, lon)` or one window `(T, V, lat, lon)`, normalised like the training data.
            prompt: one prompt for all windows, or one per window.
            max_new_tokens: upper bound on generated tokens (generation stops at eos).
            do_sample: sample instead of greedy decoding.
            temperature: softmax temperature when sampling.
            top_p: nucleus sampling threshold (1.0: off).
            seed: seeds a private generator (the global RNG is untouched).
            one_line: stop a row at its first line break as at EOS and return the text before it (a caption is one
                line; without it a row the LM does not end runs on to `max_new_tokens`). Greedy, the text is the
                first line of what `one_line=False` returns.
            no_repeat_ngram: n > 0: never write an n-gram of tokens already written in the same text (as
                transformers' `no_repeat_ngram_size`, the prompt not counted); 0: off.
            drafts: a guess of each row's text (then EOS): greedy decoding checks the guessed tokens many at a time
                and keeps those it would have written (`decoding.decode`). The text is greedy decoding's whatever
                the guess; a right guess makes it several times fewer steps. Greedy without `no_repeat_ngram` only,
                and not on a base with windowed attention (ignored there).
            draft_caption: with the readout (`fusion.readout`) and no `drafts`: guess each row's caption as the one
                its readout line states, in this caption form ("numbers", "temperature": the run's `caption`;
                "full" guesses the number sentences only; `readout.readout_caption`). A LM trained to copy the line
                writes that caption.

        Returns:
            The generated continuations (prompt excluded, special tokens removed).

        Raises:
            ModelError: no tokenizer (pass `tokenizer=` to from_base).
            DataError: the number of prompts and climate windows disagree.
        """
        if self.tokenizer is None:
            raise ModelError("this FusionModel has no tokenizer; pass tokenizer=... to FusionModel.from_base")
        if temperature <= 0 or not 0 < top_p <= 1:
            raise ConfigError(
                f"temperature must be > 0 (got {temperature}) and top_p in (0, 1] (got {top_p})"
            )
        if no_repeat_ngram < 0:
            raise ConfigError(f"no_repeat_ngram must be 0 (off) or a number of tokens (got {no_repeat_ngram})")
        tok = self.tokenizer
        x, prompts = batch_windows(climate, prompt, self.device)
        tokens = self.encoder.encode(x)
        head = self.encoder.stats_head
        stats = head(tokens.tokens, x) if head is not None and self.config.readout else None
        values = self._readout_values(stats) if stats is not None else None
        suffixes = self._ids([render_readout(v) for v in values]) if values is not None else None
        if drafts is None and draft_caption is not None and values is not None:
            drafts = [readout_caption(v, draft_caption) for v in values]
        # a windowed base counts the masked-out slots of rejected guesses in its windows: no drafts there
        drafting = drafts is not None and not do_sample and not no_repeat_ngram and not local_attention(self.lm.config)
        guesses = self._ids(drafts) if drafting and drafts is not None else None
        if guesses is not None and tok.eos_token_id is not None:
            guesses = [[*g, int(tok.eos_token_id)] for g in guesses]
        cache: Any = None
        if self._prompt_cache is not None and len(set(prompts)) == 1:
            # one prompt, nothing in it sees the climate: its keys and values come from the cache (`lm_pass`), and
            # only its last token, the readout line and the soft tokens run here (padded between the two parts)
            shared = encode_prompts(tok, prompts[:1], self.device)[0][:, :-1]
            ids, mask = encode_prompts(tok, prompts, self.device, suffixes, skip=shared.shape[1])
            if shared.shape[1]:
                cache = self._shared_prompt_cache(shared, len(prompts))
        else:
            ids, mask = encode_prompts(tok, prompts, self.device, suffixes)
        embeds, mask, _, _ = self._fuse(ids, mask, tokens, None, stats, insert_readout=False)  # (B, L', H)
        if cache is not None:  # the mask covers the cached prompt too
            _, mask = after_cached_prompt(shared.shape[1], mask)  # positions: `decode` counts them from the mask

        held_once = cache is not None and isinstance(cache.layers[0], SharedPrefixLayer)
        live = [tokens]  # the climate tokens of the rows still being decoded (`decode` drops finished ones)

        def step(embeds: Tensor, mask: Tensor, positions: Tensor, cache: Any, keep: int = 1) -> tuple[Tensor, Any]:
            # logits at the last `keep` positions only: the prompt's other positions predict nothing here. Given as
            # an index, not as `logits_to_keep=1`: transformers slices that as `[:, -1:]`, a strided view of the
            # prompt's hidden states, and matmul turns a strided (B, 1, H) input into a batched product with the LM
            # head's weight copied once per row (at 64 rows of SmolLM2: 1.8e9 values, 6 s of a 26 s batch;
            # docs/performance.md)
            last = torch.arange(embeds.shape[1] - keep, embeds.shape[1], device=embeds.device)
            with self._climate_scope(live[0]), shared_prefix_scope(cache) if held_once else contextlib.nullcontext():
                out = self.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True,
                              logits_to_keep=last, **{self._cache_kwarg: cache})  # fmt: skip
            logits = out.logits if keep > 1 else out.logits[:, -1, :]
            return logits, getattr(out, "cache", None) or getattr(out, "past_key_values", None)

        def select(keep: Tensor) -> None:
            live[0] = replace(live[0], tokens=live[0].tokens[keep])

        stops = stop_ids(tok, self.lm.generation_config)
        breaks = break_ids(tok) if one_line else frozenset()
        pad = int(tok.pad_token_id if tok.pad_token_id is not None else next(iter(stops), 0))
        cache = growing_cache(self.lm.config, cache)  # each step writes its token in place (no copy of the cache)
        rows = decode(embeds, mask, step, lambda nxt: self.step_embeddings(nxt, live[0]), stops | breaks, pad,
                      max_new_tokens, do_sample, temperature, top_p, seed, cache=cache, no_repeat_ngram=no_repeat_ngram,
                      select=select, drafts=guesses)  # fmt: skip
        return decode_texts(tok, rows, stops, breaks)

    def _shared_prompt_cache(self, shared: Tensor, rows: int) -> Any:
        """The shared prompt's cache for `rows` rows: held once under `grouped_sdpa` where `shared_prefix_cache` can
        serve the base (CPU keys, full attention), else copied to every row."""
        assert self._prompt_cache is not None
        embed = self._embed_module()
        held = None
        if getattr(self.lm.config, "_attn_implementation", None) == GROUPED_SDPA:
            held = shared_prefix_cache(self.lm.config, self._prompt_cache.prompt(self.lm, shared, embed))
        return held if held is not None else self._prompt_cache.batch(self.lm, shared, embed, rows)

    def step_embeddings(self, input_ids: Tensor, climate: ClimateTokens) -> Tensor:
        """Embeddings of newly generated tokens `(B, 1)` -> `(B, 1, H)`, fused as in training (add / xattn)."""
        return fuse_new_tokens(self.fusion, self._embed(input_ids), climate)
