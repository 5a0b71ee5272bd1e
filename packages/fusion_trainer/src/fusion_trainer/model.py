"""FusionModel: a frozen pretrained causal LM + a trainable climate encoder + one fusion variant.

The base is frozen by construction ("freeze all, assert zero trainable, then unfreeze by name"), stays in eval mode
(no dropout) even when the model trains, and its state-dict keys are untouched. Only `fusion_params()` train: the
encoder, the fusion modules, and LoRA / the LM head when the config asks. `save_adapter` writes just those weights plus
`fusion_config.json` naming the base and its fingerprint; `load_adapter` puts them back onto that same base.

Generation (`generate`) lives in `generation.py` and the adapter files in `adapter.py`; the methods here delegate.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_outputs import CausalLMOutputWithPast

from .adapter import ADAPTER_FILE, CONFIG_FILE, read_adapter_config, read_adapter_weights, write_adapter
from .base import fingerprint_base, load_base
from .encoder import ClimateEncoder, ClimateTokens
from .errors import ConfigError, DataError, ModelError
from .fusion import (
    FusionLayer,
    build_fusion,
    climate_scope,
    fuse_inputs,
    fuse_new_tokens,
    prefix_at,
    unwrapped_layers,
)
from .fusion_config import FusionConfig
from .generation import batch_windows, decode, decode_texts, encode_prompts, stop_ids
from .lm_pass import PromptCache, shared_prompt_length, target_loss
from .readout import insert_tokens, readout_values, render_readout
from .registry import MemoryEstimate, architecture_for, estimate_memory

__all__ = ["ADAPTER_FILE", "CONFIG_FILE", "FusionModel", "FusionOutput", "caption_loss"]

logger = logging.getLogger(__name__)


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


class FusionModel(nn.Module):
    """A frozen causal LM that reads climate windows through a trainable encoder and fusion module.

    Build it with `FusionModel.from_base(base, config)` (or `FusionModel(lm, config)` on a loaded model).

    Args:
        lm: the base causal LM (a registered architecture); it is frozen in place.
        config: the fusion config.
        tokenizer: the base's tokenizer (needed by `generate`).
        base_fingerprint: `fingerprint_base(lm)` taken before wrapping; computed here when None and the weights are
            materialised.

    Raises:
        UnsupportedArchitectureError: the base's architecture is not in the registry.
        ConfigError: the config does not fit the base (e.g. `n_heads` does not divide the hidden size).

    Examples:
        >>> model = FusionModel.from_base("runs/tiny-llama", FusionConfig(fusion="xattn", n_variables=4))
        >>> out = model(input_ids, attention_mask, climate, labels=labels)  # climate: (B, T, 4, lat, lon)
        >>> out.loss.backward()
        >>> model.generate(climate, "Summary:", max_new_tokens=32, seed=0)
    """

    def __init__(
        self,
        lm: PreTrainedModel,
        config: FusionConfig,
        tokenizer: PreTrainedTokenizerBase | None = None,
        base_fingerprint: str | None = None,
    ) -> None:
        super().__init__()
        self.arch = architecture_for(lm)
        materialised = not any(p.is_meta for p in lm.parameters())
        if base_fingerprint is None and materialised:
            base_fingerprint = fingerprint_base(lm)
        self.base_fingerprint = base_fingerprint
        self.config = config
        self.tokenizer = tokenizer
        hidden = self.arch.hidden_size(lm.config)
        if config.fusion in ("xattn", "gated-xattn") and hidden % config.n_heads:
            raise ConfigError(
                f"FusionConfig.n_heads={config.n_heads} does not divide the base's hidden size {hidden}; "
                f"pick a divisor of {hidden}"
            )
        lm.eval()
        for param in lm.parameters():
            param.requires_grad_(False)
        assert not any(p.requires_grad for p in lm.parameters()), (
            "base parameters still trainable after freezing"
        )
        if config.lora is not None:
            _inject_lora(lm, config.lora)
        if config.train_lm_head:
            _untie_lm_head(lm, self.arch.output_head(lm), self.arch.input_embeddings(lm))

        self.lm = lm
        self.encoder = ClimateEncoder(
            n_variables=int(config.n_variables or 0),
            d_model=config.d_encoder,
            depth=config.encoder_depth,
            n_heads=config.encoder_heads,
            patch_size=config.patch_size,
            per_patch_tokens=config.per_patch_tokens,
            dropout=config.encoder_dropout,
            stats_head=config.stats_head,
            stats_direct=config.readout,
        )
        self.fusion = build_fusion(config, hidden, self.arch.decoder_layers(lm))
        self._cache_kwarg = (
            "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
        )
        # the constant prompt's pass is cached where nothing in it can change (lm_pass.PromptCache)
        cacheable = config.fusion == "prefix" and config.prefix_position == "after_prompt"
        self._prompt_cache = (
            PromptCache() if cacheable and config.lora is None and not config.gradient_checkpointing else None
        )

        # freeze all, assert zero trainable, then unfreeze by name
        for param in self.parameters():
            param.requires_grad_(False)
        assert not any(p.requires_grad for p in self.parameters())
        for name, param in self.named_parameters():
            if self._is_fusion_name(name):
                param.requires_grad_(True)
        if config.gradient_checkpointing:
            enable = getattr(lm, "activation_checkpointing_enable", None) or lm.gradient_checkpointing_enable
            enable({"use_reentrant": False})
            lm.enable_input_require_grads()
        self.train()
        logger.info(
            "FusionModel(%s) on %s: %s",
            config.fusion,
            config.base or lm.config.model_type,
            self.num_parameters(),
        )

    # ----- construction -----

    @classmethod
    def from_base(
        cls,
        base: str | os.PathLike[str] | PreTrainedModel,
        config: FusionConfig,
        dtype: torch.dtype | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> FusionModel:
        """Load (or take) a base causal LM, freeze it and attach a fresh encoder + fusion module.

        Args:
            base: a local folder, a hub id (loaded with `from_pretrained`) or a loaded `PreTrainedModel`.
            config: the fusion config; its `base` is set to the folder (resolved) or id.
            dtype: the base's dtype; None: bf16 where supported (see `base.default_dtype`), a loaded model unchanged.
                The trainable modules are created in fp32.
            tokenizer: overrides the tokenizer loaded with the base (a loaded model comes without one).

        Returns:
            The model, in training mode (the base itself stays in eval mode).

        Raises:
            ModelError: the base cannot be loaded.
            UnsupportedArchitectureError: the base's architecture is not in the registry.
        """
        lm, loaded_tokenizer, name = load_base(base, dtype)
        config = config.model_copy(update={"base": name or config.base})
        return cls(lm, config, tokenizer=tokenizer or loaded_tokenizer)

    @classmethod
    def from_config(
        cls, hf_config: PretrainedConfig, config: FusionConfig, dtype: torch.dtype = torch.bfloat16
    ) -> FusionModel:
        """Build the model on the meta device from an HF config: shapes only, no memory, for sizing.

        Examples:
            >>> from fusion_trainer.base import preset_config
            >>> m = FusionModel.from_config(preset_config("llama-3-8b"), FusionConfig(n_variables=8))
            >>> m.memory_estimate(world_size=8, zero_stage=2).frozen_bytes  # about 16e9
        """
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
            return cls(lm, config)

    # ----- parameters -----

    def _is_fusion_name(self, name: str) -> bool:
        if name.startswith(("encoder.", "fusion.")) or ".fusion_block." in name or "lora_" in name:
            return True
        head = f"lm.{self.arch.lm_head}."
        return self.config.train_lm_head and name.startswith(head)

    def fusion_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The trainable set by name: encoder + fusion (+ LoRA, + LM head when configured)."""
        return [(n, p) for n, p in self.named_parameters() if self._is_fusion_name(n)]

    def fusion_params(self) -> list[nn.Parameter]:
        """The trainable parameters (give these to the optimizer)."""
        return [p for _, p in self.fusion_named_parameters()]

    def fusion_state_dict(self) -> dict[str, Tensor]:
        """The trainable weights by name (detached, on their device)."""
        return {n: p.detach() for n, p in self.fusion_named_parameters()}

    def load_fusion_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Copy trainable weights in place; the names must match `fusion_named_parameters()` exactly.

        Raises:
            ModelError: missing, unexpected or mis-shaped entries (all listed).
        """
        own = dict(self.fusion_named_parameters())
        problems = [f"missing {k}" for k in sorted(own.keys() - state.keys())]
        problems += [f"unexpected {k}" for k in sorted(state.keys() - own.keys())]
        problems += [
            f"{k}: shape {tuple(state[k].shape)} != {tuple(p.shape)}"
            for k, p in own.items()
            if k in state and tuple(state[k].shape) != tuple(p.shape)
        ]
        if problems:
            raise ModelError(
                "adapter weights do not fit this FusionModel (same fusion config?): "
                + "; ".join(problems[:20])
            )
        with torch.no_grad():
            for name, param in own.items():
                param.copy_(state[name].to(device=param.device, dtype=param.dtype))

    def num_parameters(self) -> dict[str, int]:
        """Parameter counts: total, frozen, trainable, and the trainable parts (encoder, fusion, lora, lm_head)."""
        counts = {"total": 0, "frozen": 0, "trainable": 0, "encoder": 0, "fusion": 0, "lora": 0, "lm_head": 0}
        for name, param in self.named_parameters():
            n = param.numel()
            counts["total"] += n
            if not self._is_fusion_name(name):
                counts["frozen"] += n
                continue
            counts["trainable"] += n
            part = "encoder" if name.startswith("encoder.") else "lora" if "lora_" in name else "fusion"
            part = "lm_head" if name.startswith(f"lm.{self.arch.lm_head}.") else part
            counts[part] += n
        return counts

    def memory_estimate(self, world_size: int = 1, zero_stage: int = 2) -> MemoryEstimate:
        """Per-rank bytes for the weights, gradients and AdamW state under DeepSpeed ZeRO (activations excluded).

        Works on a meta-device model (`from_config`): nothing is allocated.
        """
        frozen = sum(
            p.numel() * p.element_size() for n, p in self.named_parameters() if not self._is_fusion_name(n)
        )
        trainable = [p for _, p in self.fusion_named_parameters()]
        return estimate_memory(
            frozen_bytes=frozen,
            trainable_params=sum(p.numel() for p in trainable),
            trainable_bytes=sum(p.numel() * p.element_size() for p in trainable),
            world_size=world_size,
            zero_stage=zero_stage,
        )

    # ----- modes -----

    def train(self, mode: bool = True) -> FusionModel:
        """Set training mode for the trainable modules; the base stays in eval mode (no dropout).

        With gradient checkpointing, the decoder layers' own `training` flag follows `mode` (only the flag, not their
        submodules) because transformers checkpoints a layer only when it is training.
        """
        super().train(mode)
        self.lm.eval()
        for name, module in self.lm.named_modules():
            if name.endswith(".fusion_block") or "lora_" in name.rsplit(".", 1)[-1]:
                module.train(mode)
        if self.config.gradient_checkpointing:
            for layer in unwrapped_layers(self.arch.decoder_layers(self.lm)):
                layer.training = mode
        return self

    # ----- forward -----

    @property
    def device(self) -> torch.device:
        """The device of the base's input embeddings (where inputs go)."""
        weight = self.arch.input_embeddings(self.lm).weight
        assert isinstance(weight, Tensor)
        return weight.device

    def _embed(self, input_ids: Tensor) -> Tensor:
        return self.arch.input_embeddings(self.lm)(input_ids)

    def _fuse(
        self, input_ids: Tensor, attention_mask: Tensor, climate: ClimateTokens, labels: Tensor | None,
        stats: Tensor | None = None, insert_readout: bool = True,
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:  # fmt: skip
        """Input embeddings with the climate fused in; with `readout`, its text line goes in first (before the first
        labelled token, or after the last real one of a right-padded row; generation, whose rows are left-padded,
        writes it into the prompt itself and passes `insert_readout=False`). The returned text positions map every
        ORIGINAL token to its place in the fused sequence (None when nothing was inserted)."""
        moved = None
        if self.config.readout and insert_readout:
            if stats is None:
                raise ModelError("readout: true needs the stats head's predictions")
            at = prefix_at(attention_mask, labels, "after_prompt")
            assert at is not None
            input_ids, attention_mask, labels, moved = insert_tokens(
                input_ids, attention_mask, labels, at[:, 0], self.readout_ids(stats), self._pad_id()
            )  # fmt: skip
        embeds, mask, new_labels, positions = fuse_inputs(
            self.fusion, self._embed(input_ids), climate, attention_mask, labels
        )  # fmt: skip
        if moved is not None:
            positions = moved if positions is None else positions.gather(1, moved)
        return embeds, mask, new_labels, positions

    def readout_ids(self, stats: Tensor) -> list[list[int]]:
        """Token ids of each window's readout line (`readout.render_readout`) from the stats head's predictions."""
        if self.tokenizer is None:
            raise ModelError("readout: true needs the tokenizer; pass tokenizer=... to FusionModel.from_base")
        texts = self.readout_texts(stats)
        return [list(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def readout_texts(self, stats: Tensor) -> list[str]:
        """Each window's readout line (`readout.render_readout`) from the stats head's predictions `(B, V, 3)`."""
        cfg = self.config
        if cfg.variables is None or cfg.normalization is None:
            raise ModelError("readout: true needs the dataset's variables and normalization in the FusionConfig")
        seconds = pd.Timedelta(cfg.window).total_seconds() if cfg.window else 3600.0
        values = readout_values(stats, cfg.variables, cfg.normalization, seconds)
        return [render_readout(v) for v in values]

    def _pad_id(self) -> int:
        tok = self.tokenizer
        pad = None if tok is None else (tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        return int(pad or 0)

    def _climate_scope(self, climate: ClimateTokens) -> contextlib.AbstractContextManager[None]:
        return climate_scope(self.config.fusion, climate)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        climate: Tensor,
        labels: Tensor | None = None,
        token_weights: Tensor | None = None,
        logits: str = "all",
    ) -> FusionOutput:
        """Run the fused model.

        Args:
            input_ids: `(B, L)` token ids.
            attention_mask: `(B, L)`, 1 for real tokens (None: all real).
            climate: `(B, T, V, lat, lon)` float, already normalised; any grid size and T.
            labels: `(B, L)` targets, -100 where ignored (shifted inside, as in transformers).
            token_weights: `(vocab,)` weight of each target token id in the loss (`caption_loss`); None: the plain
                mean over the labelled tokens, as transformers computes it.
            logits: "all" (the default): logits for every position; "none": the loss only (needs labels), computed
                without the work a frozen base leaves undone (`lm_pass`: logits only where a labelled token is
                predicted, and a cached pass of a constant prompt where the variant allows it); `.logits` is None.

        Returns:
            A `FusionOutput` (transformers' CausalLMOutputWithPast) with `.loss` (when labels are given) and `.logits`
            `(B, L, vocab)`, aligned with `input_ids` for every variant (`logits[:, i]` predicts token i + 1; for the
            prefix variant it is read where the LM predicts that token, so the soft tokens' own outputs are dropped
            except the last one's, which predicts the first token after them), plus `.climate_stats` `(B, V, 3)` when the config has `stats_head` (else None).

        Raises:
            DataError: climate and input_ids disagree on the batch size, or climate has the wrong shape.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if climate.shape[0] != input_ids.shape[0]:
            raise DataError(
                f"climate has batch size {climate.shape[0]} but input_ids {input_ids.shape[0]}; "
                "give one climate window per text"
            )
        tokens = self.encoder.encode(climate)
        head = self.encoder.stats_head
        stats = head(tokens.tokens, climate) if head is not None else None
        if logits == "none":
            if labels is None:
                raise ModelError("forward(logits='none') computes the loss only: give labels")
            return FusionOutput(loss=self._loss_only(input_ids, attention_mask, tokens, labels, token_weights, stats),
                                logits=None, climate_stats=stats)  # fmt: skip
        if logits != "all":
            raise ModelError(f"forward(logits={logits!r}): use 'all' or 'none'")
        embeds, mask, _, text_positions = self._fuse(input_ids, attention_mask, tokens, labels, stats)
        with self._climate_scope(tokens):
            out = self.lm(inputs_embeds=embeds, attention_mask=mask, use_cache=False)
        scores = out.logits
        if text_positions is not None:
            # logits[:, i] predicts text token i + 1 (as transformers aligns them): it is read where the LM predicts
            # that token, which is the last soft token when the prefix sits between tokens i and i + 1
            last = torch.full_like(text_positions[:, :1], scores.shape[1] - 1)  # (B, 1)
            source = torch.cat([text_positions[:, 1:] - 1, last], dim=1)  # (B, L)
            scores = scores.gather(1, source[..., None].expand(-1, -1, scores.shape[-1]))  # (B, L, vocab)
        return FusionOutput(
            loss=caption_loss(scores, labels, token_weights) if labels is not None else None,
            logits=scores,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            climate_stats=stats,
        )

    def _loss_only(
        self, input_ids: Tensor, attention_mask: Tensor, tokens: ClimateTokens, labels: Tensor, weights: Tensor | None,
        stats: Tensor | None, per_token: bool = False,
    ) -> Tensor:  # fmt: skip
        """The caption loss without logits off the targets, over a cached prompt where it is exact (`lm_pass`); with
        `per_token`, every target's loss `(B, L-1)` aligned with `labels[:, 1:]` (0 where no target)."""
        full_shape = (input_ids.shape[0], input_ids.shape[1] - 1)
        shared = shared_prompt_length(input_ids, attention_mask, labels) if self._prompt_cache is not None else 0
        cache: dict[str, Any] = {}
        if shared:
            cache = {self._cache_kwarg: self._prompt_cache.batch(self.lm, input_ids[:1, :shared],  # type: ignore[union-attr]
                                                                 self.arch.input_embeddings(self.lm), input_ids.shape[0])}  # fmt: skip
            input_ids, attention_mask, labels = input_ids[:, shared:], attention_mask[:, shared:], labels[:, shared:]
        embeds, mask, fused_labels, text_positions = self._fuse(input_ids, attention_mask, tokens, labels, stats)
        if shared:
            assert text_positions is not None and bool((text_positions[:, 0] > 0).all()), "soft tokens lead the rest"
            positions = shared + torch.arange(mask.shape[1], device=mask.device)[None].expand(mask.shape[0], -1)
            cache.update(position_ids=positions, use_cache=True)
            mask = torch.cat([torch.ones_like(mask[:, :1]).expand(-1, shared), mask], dim=1)
        else:
            cache["use_cache"] = False
        with self._climate_scope(tokens):
            out = target_loss(self.lm, {"inputs_embeds": embeds, "attention_mask": mask, **cache}, labels,
                              text_positions, weights, offset_ok=bool(shared), per_token=per_token)  # fmt: skip
        if not per_token:
            assert isinstance(out, Tensor)
            return out
        assert isinstance(out, tuple)
        ce, idx = out
        losses = torch.zeros(full_shape, dtype=ce.dtype, device=ce.device)
        losses[idx[:, 0], shared + idx[:, 1] - 1] = ce
        return losses

    @torch.no_grad()
    def token_losses(self, input_ids: Tensor, attention_mask: Tensor | None, climate: Tensor, labels: Tensor) -> Tensor:
        """Every caption token's cross-entropy `(B, L-1)`, aligned with `labels[:, 1:]` (0 where ignored), computed the
        lean way (`lm_pass`); what `fusion-eval`'s grounding gains compare."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        tokens = self.encoder.encode(climate)
        head = self.encoder.stats_head
        stats = head(tokens.tokens, climate) if head is not None else None
        return self._loss_only(input_ids, attention_mask, tokens, labels, None, stats, per_token=True)

    # ----- generation -----

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
        tok = self.tokenizer
        x, prompts = batch_windows(climate, prompt, self.device)
        tokens = self.encoder.encode(x)
        head = self.encoder.stats_head
        stats = head(tokens.tokens, x) if head is not None and self.config.readout else None
        ids, mask = encode_prompts(tok, prompts, self.device, self.readout_ids(stats) if stats is not None else None)
        embeds, mask, _, _ = self._fuse(ids, mask, tokens, None, stats, insert_readout=False)  # (B, L', H)

        def step(embeds: Tensor, mask: Tensor, positions: Tensor, cache: Any) -> tuple[Tensor, Any]:
            with self._climate_scope(tokens):
                out = self.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True,
                              **{self._cache_kwarg: cache})  # fmt: skip
            return out.logits[:, -1, :], getattr(out, "cache", None) or getattr(out, "past_key_values", None)

        stops = stop_ids(tok, self.lm.generation_config)
        pad = int(tok.pad_token_id if tok.pad_token_id is not None else next(iter(stops), 0))
        rows = decode(embeds, mask, step, lambda nxt: self.step_embeddings(nxt, tokens), stops, pad, max_new_tokens,
                      do_sample, temperature, top_p, seed)  # fmt: skip
        return decode_texts(tok, rows, stops)

    def step_embeddings(self, input_ids: Tensor, climate: ClimateTokens) -> Tensor:
        """Embeddings of newly generated tokens `(B, 1)` -> `(B, 1, H)`, fused as in training (add / xattn)."""
        return fuse_new_tokens(self.fusion, self._embed(input_ids), climate)

    # ----- adapter I/O -----

    def save_adapter(
        self, directory: str | os.PathLike[str], state_dict: Mapping[str, Tensor] | None = None
    ) -> Path:
        """Write the trainable weights (`adapter.safetensors`) and `fusion_config.json` (config, base, fingerprint).

        Args:
            directory: created if missing; both files are written atomically, the config last.
            state_dict: the trainable weights to write when they are gathered elsewhere (e.g. under ZeRO-3);
                default: this model's own.

        Returns:
            The directory.
        """
        state = dict(state_dict) if state_dict is not None else self.fusion_state_dict()
        unknown = sorted(set(state) - {n for n, _ in self.fusion_named_parameters()})
        if unknown:
            raise ModelError(f"save_adapter: {unknown[:5]} are not trainable parameters of this model")
        return write_adapter(directory, state, self.config, self.base_fingerprint)

    @classmethod
    def load_adapter(
        cls,
        directory: str | os.PathLike[str],
        base: str | os.PathLike[str] | PreTrainedModel | None = None,
        dtype: torch.dtype | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> FusionModel:
        """Rebuild a FusionModel from `save_adapter` output, on the base it names (or the one given).

        Raises:
            ModelError: files missing, no base named, or the base's fingerprint differs from the recorded one.
            ConfigError: fusion_config.json is not a valid FusionConfig.
        """
        config, expected = read_adapter_config(directory)
        chosen = base if base is not None else config.base
        if chosen is None:
            raise ModelError(f"{Path(directory) / CONFIG_FILE} names no base model; pass base=PATH_OR_ID")
        model = cls.from_base(chosen, config, dtype=dtype, tokenizer=tokenizer)
        if expected is not None and model.base_fingerprint != expected:
            raise ModelError(
                f"the adapter in {directory} was trained on base {config.base!r} ({expected}), but "
                f"{model.config.base!r} has fingerprint {model.base_fingerprint}; load it onto the original base"
            )
        model.load_fusion_state_dict(read_adapter_weights(directory))
        logger.info("adapter %s loaded onto %s", directory, model.config.base)
        return model

    def fusion_layers(self) -> Iterator[FusionLayer]:
        """The gated-xattn wrappers (empty for the other variants)."""
        return (m for m in self.arch.decoder_layers(self.lm) if isinstance(m, FusionLayer))


def _inject_lora(lm: PreTrainedModel, settings: Mapping[str, Any]) -> None:
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as exc:
        raise ConfigError("FusionConfig.lora needs peft: pip install 'fusion-trainer[lora]'") from exc
    inject_adapter_in_model(LoraConfig(**settings), lm)


def _untie_lm_head(lm: PreTrainedModel, head: nn.Module, embeddings: nn.Module) -> None:
    weight = head.weight
    if isinstance(weight, Tensor) and weight is getattr(embeddings, "weight", None):
        head.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        lm.config.tie_word_embeddings = False
        logger.info("train_lm_head: the LM head was tied to the input embeddings; it now has its own copy")
