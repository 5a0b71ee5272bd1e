"""What fusion_trainer knows about base models: the architecture registry, presets and memory sizing.

A FusionModel never guesses where a model's decoder layers live (no `'llama' in name` sniffing): the HF config's
`model_type` is looked up here, and an unknown one raises UnsupportedArchitectureError listing the supported ones.
Adding an architecture is one `_LAYOUTS` entry (and a tiny-config case in tests/fusion_trainer/test_registry.py).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn
from transformers import LlamaConfig, PretrainedConfig

from fusion_trainer.errors import ConfigError, ModelError, UnsupportedArchitectureError

__all__ = [
    "ARCHITECTURES",
    "PRESETS",
    "ArchitectureSpec",
    "MemoryEstimate",
    "architecture_for",
    "estimate_memory",
    "preset_config",
    "supported_architectures",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArchitectureSpec:
    """Where one causal-LM architecture keeps its parts, as dotted attribute paths from the `*ForCausalLM` model.

    Attributes:
        model_type: the HF `config.model_type` this entry serves.
        layers: the `nn.ModuleList` of decoder layers.
        embeddings: the input token embedding.
        final_norm: the norm after the last decoder layer.
        lm_head: the output projection to the vocabulary.
        hidden_size_attr: the config attribute holding the residual width.
        n_layers_attr: the config attribute holding the number of decoder layers.
    """

    model_type: str
    layers: str
    embeddings: str
    final_norm: str
    lm_head: str
    hidden_size_attr: str
    n_layers_attr: str

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers of `model` (the list FusionLayer wrappers are placed into)."""
        layers = _resolve(model, self.layers, self.model_type)
        if not isinstance(layers, nn.ModuleList):
            raise ModelError(
                f"{self.model_type}: {self.layers} is a {type(layers).__name__}, not an nn.ModuleList; "
                "the registry entry does not match this transformers version"
            )
        return layers

    def input_embeddings(self, model: nn.Module) -> nn.Module:
        """The input token embedding of `model`."""
        return _resolve(model, self.embeddings, self.model_type)

    def norm(self, model: nn.Module) -> nn.Module:
        """The final norm of `model`."""
        return _resolve(model, self.final_norm, self.model_type)

    def output_head(self, model: nn.Module) -> nn.Module:
        """The LM head of `model`."""
        return _resolve(model, self.lm_head, self.model_type)

    def hidden_size(self, config: Any) -> int:
        """The residual width read from an HF config."""
        return int(getattr(config, self.hidden_size_attr))

    def n_layers(self, config: Any) -> int:
        """The number of decoder layers read from an HF config."""
        return int(getattr(config, self.n_layers_attr))


def _resolve(model: nn.Module, path: str, model_type: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError as exc:
        raise ModelError(
            f"{model_type}: {type(model).__name__} has no submodule {path!r}; the registry entry for {model_type!r} "
            "does not match this model class (load it with AutoModelForCausalLM)"
        ) from exc


_LLAMA_LAYOUT = {
    "layers": "model.layers",
    "embeddings": "model.embed_tokens",
    "final_norm": "model.norm",
    "lm_head": "lm_head",
    "hidden_size_attr": "hidden_size",
    "n_layers_attr": "num_hidden_layers",
}
_GPT_LAYOUT = {"layers": "transformer.h", "embeddings": "transformer.wte", "final_norm": "transformer.ln_f",
               "lm_head": "lm_head"}  # fmt: skip
_LAYOUTS: dict[str, dict[str, str]] = {
    "llama": _LLAMA_LAYOUT,
    "mistral": _LLAMA_LAYOUT,
    "qwen2": _LLAMA_LAYOUT,
    "gpt2": {**_GPT_LAYOUT, "hidden_size_attr": "n_embd", "n_layers_attr": "n_layer"},
    "gpt_neo": {**_GPT_LAYOUT, "hidden_size_attr": "hidden_size", "n_layers_attr": "num_layers"},
}

ARCHITECTURES: dict[str, ArchitectureSpec] = {
    model_type: ArchitectureSpec(model_type=model_type, **layout) for model_type, layout in _LAYOUTS.items()
}
"""model_type -> layout. Llama, Mistral and Qwen2 share the same `*ForCausalLM` layout in transformers."""


def supported_architectures() -> list[str]:
    """The model types FusionModel supports, sorted."""
    return sorted(ARCHITECTURES)


def architecture_for(model_or_config: Any) -> ArchitectureSpec:
    """Look up the layout of a model (or of its HF config) by `config.model_type`.

    Args:
        model_or_config: a `PreTrainedModel` or a `PretrainedConfig`.

    Returns:
        The registry entry.

    Raises:
        UnsupportedArchitectureError: the model type is not registered; the message lists the supported ones.

    Examples:
        >>> from transformers import GPT2Config
        >>> architecture_for(GPT2Config()).layers
        'transformer.h'
    """
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    spec = ARCHITECTURES.get(str(model_type)) if model_type else None
    if spec is None:
        raise UnsupportedArchitectureError(
            f"unsupported base architecture model_type={model_type!r} ({type(model_or_config).__name__}); "
            f"supported: {', '.join(supported_architectures())}. Use one of those bases, or add a layout "
            "to fusion_trainer.model.registry._LAYOUTS"
        )
    return spec


_PRESET_FIELDS: dict[str, dict[str, Any]] = {
    "llama-3-8b": {
        "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 500000.0, "tie_word_embeddings": False,
        "bos_token_id": 128000, "eos_token_id": 128001,
    },
    "smollm2-135m": {
        "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "rope_theta": 100000.0, "tie_word_embeddings": True,
        "bos_token_id": 1, "eos_token_id": 2,
    },
}  # fmt: skip
"""preset name -> the fields in which it differs; every preset is a `LlamaConfig` (see `preset_config`)."""

PRESETS: tuple[str, ...] = tuple(_PRESET_FIELDS)


def preset_config(name: str) -> PretrainedConfig:
    """The HF config of a well-known base, built in code (for memory estimates without any download).

    Args:
        name: one of PRESETS.

    Raises:
        ConfigError: unknown preset.

    Examples:
        >>> preset_config("smollm2-135m").num_hidden_layers
        30
    """
    fields = _PRESET_FIELDS.get(name)
    if fields is None:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    rope_theta = fields["rope_theta"]
    settings = {key: value for key, value in fields.items() if key != "rope_theta"}
    return LlamaConfig(
        **settings,
        max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        rms_norm_eps=1e-5,
    )


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-rank bytes of model state under DeepSpeed ZeRO; activations, buffers and the KV cache are not included.

    Attributes:
        frozen_bytes: the frozen base weights held by one rank (partitioned only under ZeRO-3).
        trainable_bytes: the trainable weights held by one rank (partitioned under ZeRO-3).
        gradient_bytes: gradients of the trainable weights (partitioned from ZeRO-2).
        optimizer_bytes: AdamW state: fp32 master copy (when the weights are not fp32) + two fp32 moments
            (partitioned from ZeRO-1).
        trainable_params: number of trainable parameters.
        world_size: data-parallel ranks.
        zero_stage: ZeRO stage 0-3.
    """

    frozen_bytes: int
    trainable_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    trainable_params: int
    world_size: int
    zero_stage: int

    @property
    def total_bytes(self) -> int:
        """Sum of the four parts, per rank."""
        return self.frozen_bytes + self.trainable_bytes + self.gradient_bytes + self.optimizer_bytes

    def as_dict(self) -> dict[str, int]:
        """The fields and total as plain ints (for JSON)."""
        return {**asdict(self), "total_bytes": self.total_bytes}


def estimate_memory(
    frozen_bytes: int, trainable_params: int, trainable_bytes: int, world_size: int = 1, zero_stage: int = 2
) -> MemoryEstimate:
    """Split model-state bytes over ranks the way DeepSpeed ZeRO stages do.

    Args:
        frozen_bytes: all frozen weights, whole model.
        trainable_params: trainable parameter count.
        trainable_bytes: all trainable weights in their training dtype.
        world_size: data-parallel ranks (>= 1).
        zero_stage: 0 (replicated), 1 (optimizer partitioned), 2 (+ gradients), 3 (+ all weights).

    Raises:
        ConfigError: world_size < 1 or zero_stage outside 0-3.
    """
    if world_size < 1 or zero_stage not in (0, 1, 2, 3):
        raise ConfigError(
            f"need world_size >= 1 and zero_stage in 0-3; got world_size={world_size}, zero={zero_stage}"
        )
    per_param = trainable_bytes / trainable_params if trainable_params else 4.0
    optimizer = trainable_params * (8 if per_param >= 4 else 12)  # (fp32 master +) exp_avg + exp_avg_sq

    def share(n: float, from_stage: int) -> int:
        return int(-(-n // world_size)) if zero_stage >= from_stage else int(n)

    return MemoryEstimate(
        frozen_bytes=share(frozen_bytes, 3),
        trainable_bytes=share(trainable_bytes, 3),
        gradient_bytes=share(trainable_bytes, 2),
        optimizer_bytes=share(optimizer, 1),
        trainable_params=trainable_params,
        world_size=world_size,
        zero_stage=zero_stage,
    )
