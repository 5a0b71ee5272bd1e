"""The four fusion variants: how climate tokens `(B, N, D_enc)` reach a frozen causal LM of width H.

- `add` (AddFusion): climate tokens pooled per time step, projected to H, averaged over time and added to every
  text embedding through a tanh gate (one climate vector broadcast over all text positions).
- `xattn` (GatedCrossAttention): one multi-head cross-attention at the input, text embeddings as queries and climate
  tokens as keys/values, added back through a tanh gate.
- `prefix` (PrefixFusion): an attention pooler turns the climate tokens into `n_prefix_tokens` soft tokens, an MLP
  projects them into the LM embedding space and they are inserted before the first real text token (LLaVA).
- `gated-xattn` (GatedCrossAttentionBlock inside FusionLayer): Flamingo-style gated cross-attention + gated FFN blocks
  before every k-th decoder layer. Layers are wrapped explicitly, `FusionLayer(layer, fusion_block)`, and the wrapper
  keeps the layer's state-dict keys as they were, so pretrained weights still load.

All gates start at `gate_init` (0): tanh(0) = 0, so the fused model starts exactly as the frozen LM.

How the wrapped layers see the climate: no module holds conditioning state. `FusionModel` encodes the climate and runs
the LM inside `with climate_context(tokens):`, a context variable set for the duration of that one call (each forward,
each generation step) and reset on exit, also on error. `FusionLayer` reads it and raises if it is missing. Threads
and asyncio tasks each see their own value.

Every module computes in its own parameter dtype and hands back the LM's dtype, so fp32 fusion weights work with a
bf16 base.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from typing import Any

import torch
from torch import Tensor, nn

from fusion_trainer.errors import ModelError
from fusion_trainer.fusion_config import FusionConfig
from fusion_trainer.model.encoder import Attention, ClimateTokens
from fusion_trainer.model.prefix import insert_prefix, prefix_at

__all__ = [
    "AddFusion",
    "build_fusion",
    "climate_scope",
    "fuse_inputs",
    "fuse_new_tokens",
    "FusionLayer",
    "GatedCrossAttention",
    "GatedCrossAttentionBlock",
    "PrefixFusion",
    "climate_context",
    "unwrapped_layers",
    "wrap_decoder_layers",
]

logger = logging.getLogger(__name__)

_CLIMATE_TOKENS: ContextVar[Tensor | None] = ContextVar("fusion_trainer_climate_tokens", default=None)


@contextmanager
def climate_context(tokens: Tensor) -> Iterator[None]:
    """Make climate tokens `(B, N, D_enc)` visible to every FusionLayer for the duration of one LM call.

    Args:
        tokens: the encoder's climate tokens for the batch being run.

    Yields:
        Nothing; the previous value is restored on exit.
    """
    handle = _CLIMATE_TOKENS.set(tokens)
    try:
        yield
    finally:
        _CLIMATE_TOKENS.reset(handle)


def _gate(init: float) -> nn.Parameter:
    return nn.Parameter(torch.tensor(float(init)))


class AddFusion(nn.Module):
    """`add`: text_embeds + tanh(gate) * mean_t(proj(pool_patches(climate_t))) at every text position.

    Args:
        d_encoder: climate token width.
        d_model: LM hidden size H.
        gate_init: initial gate value (0: identity at start).
    """

    def __init__(self, d_encoder: int, d_model: int, gate_init: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_encoder)
        self.proj = nn.Linear(d_encoder, d_model)
        self.gate = _gate(gate_init)

    def forward(self, text_embeds: Tensor, per_step: Tensor) -> Tensor:
        """Add the gated climate vector to `(B, L, H)` text embeddings; returns `(B, L, H)` in their dtype.

        Args:
            text_embeds: `(B, L, H)`.
            per_step: climate tokens pooled per time step `(B, T, D)` (`ClimateTokens.per_time_step()`).
        """
        per_step = per_step.to(self.proj.weight.dtype)  # (B, T, D)
        vec = self.proj(self.norm(per_step)).mean(dim=1, keepdim=True)  # (B, 1, H)
        return text_embeds + (torch.tanh(self.gate) * vec).to(text_embeds.dtype)  # (B, L, H)


class GatedCrossAttention(nn.Module):
    """`xattn` (and the first half of a gated-xattn block): x + tanh(gate) * MHA(norm(x), climate, climate).

    Args:
        d_encoder: climate token width (keys/values).
        d_model: LM hidden size H (queries); `n_heads` must divide it.
        n_heads: attention heads.
        gate_init: initial gate value (0: identity at start).
    """

    def __init__(self, d_encoder: int, d_model: int, n_heads: int, gate_init: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.kv_norm = nn.LayerNorm(d_encoder)
        self.attn = Attention(d_model, d_encoder, n_heads)
        self.gate = _gate(gate_init)

    def forward(self, x: Tensor, climate_tokens: Tensor) -> Tensor:
        """`x` `(B, L, H)` attends to `climate_tokens` `(B, N, D_enc)`; returns `(B, L, H)` in x's dtype."""
        dtype = self.norm.weight.dtype
        q = self.norm(x.to(dtype))  # (B, L, H)
        kv = self.kv_norm(climate_tokens.to(dtype))  # (B, N, D)
        y = self.attn(q, kv)  # (B, L, H)
        return x + (torch.tanh(self.gate) * y).to(x.dtype)


class GatedCrossAttentionBlock(nn.Module):
    """`gated-xattn` block (Flamingo): gated cross-attention, then a gated FFN, both residual.

    Args:
        d_encoder: climate token width.
        d_model: LM hidden size H.
        n_heads: cross-attention heads (divides H).
        ffn_mult: FFN hidden width as a multiple of H.
        gate_init: initial value of both gates.
    """

    def __init__(
        self, d_encoder: int, d_model: int, n_heads: int, ffn_mult: int = 2, gate_init: float = 0.0
    ) -> None:
        super().__init__()
        self.xattn = GatedCrossAttention(d_encoder, d_model, n_heads, gate_init)
        self.ffn = nn.Sequential(
            nn.LayerNorm(d_model),
            nn.Linear(d_model, ffn_mult * d_model),
            nn.GELU(),
            nn.Linear(ffn_mult * d_model, d_model),
        )
        self.ffn_gate = _gate(gate_init)

    def forward(self, x: Tensor, climate_tokens: Tensor) -> Tensor:
        """`(B, L, H)` -> `(B, L, H)` in x's dtype."""
        x = self.xattn(x, climate_tokens)  # (B, L, H)
        first = self.ffn[1]
        assert isinstance(first, nn.Linear)
        y = self.ffn(x.to(first.weight.dtype))  # (B, L, H)
        return x + (torch.tanh(self.ffn_gate) * y).to(x.dtype)


class PrefixFusion(nn.Module):
    """`prefix` (LLaVA-style): learned queries pool the climate tokens into soft tokens in the LM embedding space.

    Args:
        d_encoder: climate token width.
        d_model: LM hidden size H.
        n_prefix_tokens: number of soft tokens.
        n_heads: pooler heads (divides d_encoder).
        position: where the soft tokens go: "after_prompt" or "start" (see `prefix_at`).
    """

    def __init__(
        self, d_encoder: int, d_model: int, n_prefix_tokens: int, n_heads: int, position: str = "after_prompt"
    ) -> None:
        super().__init__()
        self.position = position
        self.queries = nn.Parameter(torch.randn(1, n_prefix_tokens, d_encoder) * 0.02)
        self.norm = nn.LayerNorm(d_encoder)
        self.pool = Attention(d_encoder, d_encoder, n_heads)
        self.proj = nn.Sequential(nn.Linear(d_encoder, d_model), nn.GELU(), nn.Linear(d_model, d_model))

    def forward(self, climate_tokens: Tensor) -> Tensor:
        """Climate tokens `(B, N, D)` -> soft prefix tokens `(B, P, H)` in the module's dtype."""
        kv = self.norm(climate_tokens.to(self.queries.dtype))  # (B, N, D)
        q = self.queries.expand(kv.shape[0], -1, -1)  # (B, P, D)
        pooled = self.pool(q, kv)  # (B, P, D)
        return self.proj(pooled)  # (B, P, H)


class FusionLayer(nn.Module):
    """A decoder layer with a fusion block run before it: `layer(fusion_block(hidden, climate), ...)`.

    The wrapped layer's state-dict keys stay as they were (`...layers.3.self_attn.q_proj.weight`, not
    `...layers.3.layer.self_attn...`), so the base model's pretrained state dict still loads; the block adds
    `...layers.3.fusion_block.*` keys. The climate tokens come from `climate_context` (see the module docstring).

    Args:
        layer: the original decoder layer.
        fusion_block: a module `(hidden (B, L, H), climate_tokens (B, N, D)) -> (B, L, H)`.
    """

    def __init__(self, layer: nn.Module, fusion_block: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.fusion_block = fusion_block
        self.register_state_dict_post_hook(_strip_layer_prefix)
        self.register_load_state_dict_pre_hook(_add_layer_prefix)

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Any:
        """Run the fusion block on `hidden_states` `(B, L, H)`, then the wrapped layer with every other argument."""
        climate_tokens = _CLIMATE_TOKENS.get()
        if climate_tokens is None:
            raise ModelError(
                "a gated-xattn FusionLayer ran without climate tokens: call FusionModel.forward/generate, or run the "
                "LM inside `with fusion_trainer.model.fusion.climate_context(tokens):`"
            )
        hidden_states = self.fusion_block(hidden_states, climate_tokens)
        return self.layer(hidden_states, *args, **kwargs)


def _strip_layer_prefix(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    inner = prefix + "layer."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner) :]] = state_dict.pop(key)


def _add_layer_prefix(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    own = (prefix + "layer.", prefix + "fusion_block.")
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(own)]:
        state_dict[prefix + "layer." + key[len(prefix) :]] = state_dict.pop(key)


def compile_base_layers(layers: nn.ModuleList) -> int:
    """`torch.compile` each frozen decoder layer in place (`nn.Module.compile`); returns how many.

    The compiler fuses a Llama layer's elementwise work (RMSNorm in fp32, SiLU, rotary) that otherwise runs as
    separate kernels around the matrix products: 1.27x on an H200 for the 8B base (docs/performance.md, "GPU"). For a
    gated-xattn `FusionLayer` the wrapped layer is compiled and the wrapper with its fusion block stays eager (the
    wrapper reads the climate tokens from a context variable, which the compiler does not trace; compiling the block
    as well measured no faster on the H200). State-dict keys do not change. The result is the same to floating-point
    rounding; the first steps of each new input shape wait for the compiler.
    """
    for layer in layers:
        (layer.layer if isinstance(layer, FusionLayer) else layer).compile()
    return len(layers)


def wrap_decoder_layers(
    layers: nn.ModuleList, make_block: Callable[[], nn.Module], every_n_layers: int
) -> list[int]:
    """Wrap layers 0, k, 2k, ... in place as `FusionLayer(layer, make_block())`.

    Args:
        layers: the base model's decoder layers (see fusion_trainer.model.registry).
        make_block: builds one fresh fusion block.
        every_n_layers: k.

    Returns:
        The indices of the wrapped layers.
    """
    wrapped = list(range(0, len(layers), every_n_layers))
    for index in wrapped:
        layer = layers[index]
        if isinstance(layer, FusionLayer):
            raise ModelError(f"decoder layer {index} is already a FusionLayer; wrap a fresh base model")
        layers[index] = FusionLayer(layer, make_block())
    logger.info("gated-xattn blocks before decoder layers %s of %d", wrapped, len(layers))
    return wrapped


def unwrapped_layers(layers: nn.ModuleList) -> Iterator[nn.Module]:
    """The original decoder layers, looking through FusionLayer wrappers."""
    for layer in layers:
        yield layer.layer if isinstance(layer, FusionLayer) else layer


def build_fusion(config: FusionConfig, hidden: int, layers: nn.ModuleList) -> nn.Module | None:
    """Create the fusion module of `config.fusion` for an LM of width `hidden`.

    For gated-xattn the blocks are placed into `layers` (wrapped in place) and None is returned.
    """
    if config.fusion == "add":
        return AddFusion(config.d_encoder, hidden, config.gate_init)
    if config.fusion == "xattn":
        return GatedCrossAttention(config.d_encoder, hidden, config.n_heads, config.gate_init)
    if config.fusion == "prefix":
        return PrefixFusion(
            config.d_encoder, hidden, config.n_prefix_tokens, config.encoder_heads, config.prefix_position
        )
    wrap_decoder_layers(
        layers,
        lambda: GatedCrossAttentionBlock(
            config.d_encoder, hidden, config.n_heads, config.xattn_ffn_mult, config.gate_init
        ),
        config.every_n_layers,
    )
    return None


def fuse_inputs(
    fusion: nn.Module | None,
    text_embeds: Tensor,
    climate: ClimateTokens,
    attention_mask: Tensor,
    labels: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Apply the input-side fusion to text embeddings `(B, L, H)`.

    Returns:
        `(inputs_embeds, attention_mask, labels, text_positions)`; text_positions is None unless a prefix was inserted
        (see `insert_prefix`). gated-xattn (fusion None) leaves the embeddings as they are.
    """
    if isinstance(fusion, AddFusion):
        return fusion(text_embeds, climate.per_time_step()), attention_mask, labels, None
    if isinstance(fusion, GatedCrossAttention):
        return fusion(text_embeds, climate.tokens), attention_mask, labels, None
    if isinstance(fusion, PrefixFusion):
        at = prefix_at(attention_mask, labels, fusion.position)
        return insert_prefix(text_embeds, fusion(climate.tokens), attention_mask, labels, at)
    return text_embeds, attention_mask, labels, None


def fuse_new_tokens(fusion: nn.Module | None, text_embeds: Tensor, climate: ClimateTokens) -> Tensor:
    """Fusion for tokens generated after the prompt `(B, k, H)`: add and xattn apply per position, as in training."""
    if isinstance(fusion, AddFusion):
        return fusion(text_embeds, climate.per_time_step())
    if isinstance(fusion, GatedCrossAttention):
        return fusion(text_embeds, climate.tokens)
    return text_embeds


def climate_scope(kind: str, climate: ClimateTokens) -> AbstractContextManager[None]:
    """The context an LM call runs in: `climate_context` for gated-xattn, nothing for the input-side variants."""
    return climate_context(climate.tokens) if kind == "gated-xattn" else nullcontext()
