"""FusionModel: a frozen pretrained causal LM + a trainable climate encoder + one fusion variant.

The base is frozen by construction ("freeze all, assert zero trainable, then unfreeze by name"), stays in eval mode
(no dropout) even when the model trains, and its state-dict keys are untouched. Only `fusion_params()` train: the
encoder, the fusion modules, and LoRA / the LM head when the config asks. `save_adapter` writes just those weights plus
`fusion_config.json` naming the base and its fingerprint; `load_adapter` puts them back onto that same base.

The parts live apart: `model_params.py` (the trainable set, its counts and memory, the base kept in eval mode),
`model_generation.py` (`generate` and the readout line, over the decoding loop of `generation.py`), `lm_pass.py` (the
loss and the cached prompt pass), `adapter.py` (the adapter files). FusionModel composes them.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from fusion_trainer.errors import ConfigError, DataError, ModelError
from fusion_trainer.fusion_config import FusionConfig

from . import lm_pass
from .adapter import ADAPTER_FILE, CONFIG_FILE, read_adapter_config, read_adapter_weights, write_adapter
from .attention import use_grouped_sdpa
from .base import fingerprint_base, load_base
from .encoder import ClimateEncoder, ClimateTokens
from .fusion import FusionLayer, build_fusion, climate_scope, fuse_inputs
from .generation import FusedGeneration
from .lm_pass import FusionOutput, PromptCache, caption_loss, shared_prompt_length, target_loss
from .params import TrainableParameters, inject_lora, untie_lm_head
from .prefix import prefix_at
from .readout import insert_tokens
from .registry import architecture_for

__all__ = ["ADAPTER_FILE", "CONFIG_FILE", "FusionModel", "FusionOutput", "caption_loss"]

logger = logging.getLogger(__name__)


class FusionModel(FusedGeneration, TrainableParameters):
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
        use_grouped_sdpa(lm)  # grouped-query heads without copies of the keys and values (`attention`)
        for param in lm.parameters():
            param.requires_grad_(False)
        assert not any(p.requires_grad for p in lm.parameters()), "base parameters still trainable after freezing"
        if config.lora is not None:
            inject_lora(lm, config.lora)
        if config.train_lm_head:
            untie_lm_head(lm, self.arch.output_head(lm), self.arch.input_embeddings(lm))

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
        self._cache_kwarg = lm_pass.cache_kwarg(lm)
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
            >>> from fusion_trainer.model.base import preset_config
            >>> m = FusionModel.from_config(preset_config("llama-3-8b"), FusionConfig(n_variables=8))
            >>> m.memory_estimate(world_size=8, zero_stage=2).frozen_bytes  # about 16e9
        """
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
            return cls(lm, config)

    # ----- parameters -----
    # ----- forward -----

    @property
    def device(self) -> torch.device:
        """The device of the base's input embeddings (where inputs go)."""
        weight = self.arch.input_embeddings(self.lm).weight
        assert isinstance(weight, Tensor)
        return weight.device

    def _embed_module(self) -> nn.Module:
        return self.arch.input_embeddings(self.lm)

    def _embed(self, input_ids: Tensor) -> Tensor:
        return self._embed_module()(input_ids)

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
        readout_stats: Tensor | None = None,
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
            readout_stats: `(B, V, 3)` normalised statistics to write the readout line from instead of the stats head's
                predictions (training with `TrainConfig.readout_truth` passes the windows' true ones).

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
        line = stats if readout_stats is None else readout_stats  # as given: a bf16 cast would move the line's digits
        if logits == "none":
            if labels is None:
                raise ModelError("forward(logits='none') computes the loss only: give labels")
            return FusionOutput(loss=self._loss_only(input_ids, attention_mask, tokens, labels, token_weights, line),
                                logits=None, climate_stats=stats)  # fmt: skip
        if logits != "all":
            raise ModelError(f"forward(logits={logits!r}): use 'all' or 'none'")
        embeds, mask, _, text_positions = self._fuse(input_ids, attention_mask, tokens, labels, line)
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
            positions, full_mask = lm_pass.after_cached_prompt(shared, mask)
            cache.update(position_ids=positions, use_cache=True, attention_mask=full_mask)
            split = lm_pass.constant_head_first(self.lm, embeds, mask, labels, text_positions, self.config.n_prefix_tokens,
                                                cache) if self.config.readout and torch.is_grad_enabled() else None  # fmt: skip
            embeds, text_positions, cache = split or (embeds, text_positions, cache)  # the readout line: no backward
        else:
            cache.update(use_cache=False, attention_mask=mask)
        with self._climate_scope(tokens):
            out = target_loss(self.lm, {"inputs_embeds": embeds, **cache}, labels, text_positions, weights,
                              offset_ok=bool(shared), per_token=per_token)  # fmt: skip
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
