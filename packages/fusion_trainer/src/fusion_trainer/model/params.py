"""Which parameters of a FusionModel train, by name: the encoder and fusion modules, LoRA and the LM head when the
config asks; their counts, their weights in and out, and their memory under ZeRO. A mixin of `FusionModel`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Self

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from fusion_trainer.errors import ConfigError, ModelError
from fusion_trainer.fusion_config import FusionConfig

from .fusion import unwrapped_layers
from .registry import ArchitectureSpec, MemoryEstimate, estimate_memory

__all__ = ["TrainableParameters", "inject_lora", "untie_lm_head"]

logger = logging.getLogger(__name__)


class TrainableParameters(nn.Module):
    """The trainable set of a FusionModel (`arch` and `config` are the model's)."""

    arch: ArchitectureSpec
    config: FusionConfig
    lm: PreTrainedModel

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

    def train(self, mode: bool = True) -> Self:
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


def inject_lora(lm: PreTrainedModel, settings: Mapping[str, Any]) -> None:
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as exc:
        raise ConfigError("FusionConfig.lora needs peft: pip install 'fusion-trainer[lora]'") from exc
    inject_adapter_in_model(LoraConfig(**settings), lm)


def untie_lm_head(lm: PreTrainedModel, head: nn.Module, embeddings: nn.Module) -> None:
    weight = head.weight
    if isinstance(weight, Tensor) and weight is getattr(embeddings, "weight", None):
        head.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        lm.config.tie_word_embeddings = False
        logger.info("train_lm_head: the LM head was tied to the input embeddings; it now has its own copy")
