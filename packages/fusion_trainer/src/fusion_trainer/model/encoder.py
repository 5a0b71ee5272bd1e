"""The climate encoder (ClimaX-style): a climate window `[B, time, variable, lat, lon]` -> climate tokens `[B, N, D]`.

1. Every variable is cut into `patch_size` x `patch_size` patches by one shared patch embedding; a learned variable
   embedding says which variable a patch token belongs to. The grid is zero-padded to a multiple of the patch size and
   a validity channel goes with the values, so padding is masked and any grid size works.
2. At every (time step, patch) a learned query cross-attends over the variable tokens (variable aggregation).
3. Fixed 2-D sine-cosine patch positions and 1-D sine-cosine time positions are added (any grid, any number of steps).
4. Unless `per_patch_tokens`, a learned query attends over the patches of each time step (spatial pooling): one
   token per time step. Otherwise every (time step, patch) is a token.
5. A small pre-norm transformer runs over the tokens; a final LayerNorm.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusion_trainer.errors import ConfigError, DataError

__all__ = [
    "STATS",
    "Attention",
    "ClimateEncoder",
    "ClimateTokens",
    "StatsHead",
    "TransformerBlock",
    "sincos_embedding",
]

STATS = ("mean", "min", "max")
"""The per-variable window statistics `StatsHead` predicts, in this order (the `stats` of every sample's `.json`)."""

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClimateTokens:
    """The encoder's output.

    Attributes:
        tokens: `(B, N, D)` with `N = n_time * n_patches`, time-major.
        n_time: time steps T of the input window.
        n_patches: tokens per time step (1 when spatially pooled).
    """

    tokens: Tensor
    n_time: int
    n_patches: int

    def per_time_step(self) -> Tensor:
        """Mean over the patches of each time step: `(B, T, D)`."""
        b, _, d = self.tokens.shape
        return self.tokens.view(b, self.n_time, self.n_patches, d).mean(dim=2)


def sincos_embedding(positions: Tensor, dim: int) -> Tensor:
    """Fixed sine-cosine embedding of (possibly fractional) positions.

    Args:
        positions: `(n,)` positions.
        dim: embedding width (odd widths get a zero last column).

    Returns:
        `(n, dim)` float32 embedding.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=positions.device) / max(half, 1)
    )
    angles = positions.float()[:, None] * freqs[None, :]  # (n, half)
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)  # (n, 2*half)
    if emb.shape[-1] < dim:
        emb = F.pad(emb, (0, dim - emb.shape[-1]))
    return emb


class Attention(nn.Module):
    """Multi-head attention of queries `(B, L, Dq)` over a context `(B, N, Dkv)`, returning `(B, L, Dq)`.

    Plain Linear projections + scaled_dot_product_attention: every weight belongs to a module that is called, which
    DeepSpeed ZeRO-3 needs to gather it (torch's MultiheadAttention reads out_proj's weight without calling it).

    Args:
        d_query: query (and output) width; `n_heads` must divide it.
        d_context: key/value input width.
        n_heads: heads.
    """

    def __init__(self, d_query: int, d_context: int, n_heads: int) -> None:
        super().__init__()
        if d_query % n_heads:
            raise ConfigError(
                f"{n_heads} attention heads do not divide the width {d_query}; pick a divisor of it"
            )
        self.n_heads = n_heads
        self.q_proj = nn.Linear(d_query, d_query)
        self.k_proj = nn.Linear(d_context, d_query, bias=False)  # a key bias cancels in the softmax
        self.v_proj = nn.Linear(d_context, d_query)
        self.o_proj = nn.Linear(d_query, d_query)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        """`x` `(B, L, Dq)` attends over `context` `(B, N, Dkv)` -> `(B, L, Dq)`."""
        b, length, d = x.shape
        n = context.shape[1]
        h = self.n_heads
        q = self.q_proj(x).view(b, length, h, d // h).transpose(1, 2)  # (B, h, L, d/h)
        k = self.k_proj(context).view(b, n, h, d // h).transpose(1, 2)  # (B, h, N, d/h)
        v = self.v_proj(context).view(b, n, h, d // h).transpose(1, 2)  # (B, h, N, d/h)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, h, L, d/h)
        return self.o_proj(y.transpose(1, 2).reshape(b, length, d))  # (B, L, Dq)


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)); `(B, N, D)` -> `(B, N, D)`."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, d_model, n_heads)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model), nn.Dropout(dropout)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """`(B, N, D)` -> `(B, N, D)`."""
        y = self.norm1(x)
        x = x + self.drop(self.attn(y, y))
        return x + self.mlp(self.norm2(x))


class ClimateEncoder(nn.Module):
    """Climate window -> climate tokens; accepts any grid size and any number of time steps at run time.

    Args:
        n_variables: size V of the variable axis (fixed: one learned embedding per variable).
        d_model: token width D.
        depth: transformer layers over the tokens (0: none).
        n_heads: attention heads (divides d_model).
        patch_size: spatial patch edge in grid cells.
        per_patch_tokens: one token per (time step, patch) instead of one per time step.
        dropout: dropout in the transformer.
        stats_head: add `stats_head` (a `StatsHead`): predicted window statistics for an auxiliary loss.
        stats_direct: the stats head also reads the window's own per-variable mean, minimum and maximum.

    Examples:
        >>> enc = ClimateEncoder(n_variables=3, d_model=32, depth=1, n_heads=4, patch_size=4)
        >>> enc(torch.zeros(2, 5, 3, 7, 9)).shape
        torch.Size([2, 5, 32])
    """

    def __init__(
        self,
        n_variables: int,
        d_model: int = 256,
        depth: int = 2,
        n_heads: int = 8,
        patch_size: int = 4,
        per_patch_tokens: bool = False,
        dropout: float = 0.0,
        stats_head: bool = False,
        stats_direct: bool = False,
    ) -> None:
        super().__init__()
        self.n_variables = n_variables
        self.d_model = d_model
        self.patch_size = patch_size
        self.per_patch_tokens = per_patch_tokens
        # channel 0: the values (zero where padded), channel 1: 1 where the grid cell is real, 0 where padded
        self.patch_embed = nn.Conv2d(2, d_model, kernel_size=patch_size, stride=patch_size)
        self.var_embed = nn.Parameter(torch.randn(n_variables, d_model) * 0.02)
        self.var_query = nn.Parameter(torch.randn(1, 1, d_model) * 0.02)
        self.var_attn = Attention(d_model, d_model, n_heads)
        self.var_norm = nn.LayerNorm(d_model)
        self.space_query: nn.Parameter | None = None
        self.space_attn: Attention | None = None
        if not per_patch_tokens:
            self.space_query = nn.Parameter(torch.randn(1, 1, d_model) * 0.02)
            self.space_attn = Attention(d_model, d_model, n_heads)
        self.blocks = nn.ModuleList(TransformerBlock(d_model, n_heads, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(d_model)
        self.stats_head = StatsHead(d_model, n_variables, direct=stats_direct) if stats_head else None

    def tokens_per_step(self, height: int, width: int) -> int:
        """Climate tokens per time step for a `height` x `width` grid (1 unless `per_patch_tokens`)."""
        p = self.patch_size
        return -(-height // p) * -(-width // p) if self.per_patch_tokens else 1

    def encode(self, climate: Tensor) -> ClimateTokens:
        """`forward` plus the token layout: what the fusion modules consume."""
        tokens = self(climate)  # through __call__, so module hooks (DeepSpeed ZeRO-3) run
        return ClimateTokens(
            tokens, climate.shape[1], self.tokens_per_step(climate.shape[-2], climate.shape[-1])
        )

    def forward(self, climate: Tensor) -> Tensor:
        """Encode a batch of climate windows (already normalised).

        Args:
            climate: `(B, T, V, H, W)` float.

        Returns:
            Climate tokens `(B, T, D)`, or `(B, T * P, D)` with `per_patch_tokens` (P patches per step). A plain
            tensor, so DeepSpeed ZeRO-3 can hook the backward pass; `encode` adds the layout.

        Raises:
            DataError: the array is not 5-D or its variable axis is not `n_variables`.
        """
        if climate.ndim != 5 or climate.shape[2] != self.n_variables:
            raise DataError(
                f"climate must be (batch, time, variable={self.n_variables}, lat, lon); got shape "
                f"{tuple(climate.shape)}. Stack samples to (B, T, V, H, W) with the dataset's variables"
            )
        b, t, v, h, w = climate.shape
        p = self.patch_size
        dtype = self.patch_embed.weight.dtype
        pad_h, pad_w = (-h) % p, (-w) % p
        x = climate.to(dtype)  # (B, T, V, H, W)
        valid = torch.ones(h, w, dtype=dtype, device=x.device)  # (H, W)
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))  # (B, T, V, Hp, Wp), zeros in the padding
            valid = F.pad(valid, (0, pad_w, 0, pad_h))  # (Hp, Wp)
        hp, wp = h + pad_h, w + pad_w
        gh, gw = hp // p, wp // p
        n_patch = gh * gw
        x = x.reshape(b * t * v, 1, hp, wp)
        mask = valid.expand(b * t * v, 1, hp, wp)
        z = self.patch_embed(torch.cat([x, mask], dim=1))  # (B*T*V, D, gh, gw)
        z = z.flatten(2).transpose(1, 2)  # (B*T*V, P, D)
        z = (
            z.reshape(b, t, v, n_patch, self.d_model) + self.var_embed[None, None, :, None, :]
        )  # (B, T, V, P, D)

        # variable aggregation: one learned query per (time, patch) over the V variable tokens
        z = z.permute(0, 1, 3, 2, 4).reshape(b * t * n_patch, v, self.d_model)  # (B*T*P, V, D)
        z = self.var_norm(z)
        query = self.var_query.expand(b * t * n_patch, 1, self.d_model)  # (B*T*P, 1, D)
        z = self.var_attn(query, z)  # (B*T*P, 1, D)
        z = z.reshape(b, t, n_patch, self.d_model)  # (B, T, P, D)

        rows = torch.arange(gh, device=z.device).repeat_interleave(gw)  # (P,)
        cols = torch.arange(gw, device=z.device).repeat(gh)  # (P,)
        half = self.d_model // 2
        pos = torch.cat(
            [sincos_embedding(rows, half), sincos_embedding(cols, self.d_model - half)], dim=-1
        )  # (P, D)
        time = sincos_embedding(torch.arange(t, device=z.device), self.d_model)  # (T, D)
        z = z + pos.to(z.dtype)[None, None] + time.to(z.dtype)[None, :, None]  # (B, T, P, D)

        if self.space_attn is not None and self.space_query is not None:
            z = z.reshape(b * t, n_patch, self.d_model)  # (B*T, P, D)
            query = self.space_query.expand(b * t, 1, self.d_model)  # (B*T, 1, D)
            z = self.space_attn(query, z)  # (B*T, 1, D)
            z = z.reshape(b, t, self.d_model) + time.to(z.dtype)[None]  # (B, T, D)
        else:
            z = z.reshape(b, t * n_patch, self.d_model)  # (B, T*P, D)
        for block in self.blocks:
            z = block(z)  # (B, N, D)
        return self.norm(z)  # (B, N, D)


class StatsHead(nn.Module):
    """A linear probe: the mean of the climate tokens -> every variable's window mean, min and max (normalised).

    Trained as an auxiliary loss (`TrainConfig.stats_loss_weight`), it makes the encoder carry the statistics that
    captions state from the first steps, instead of waiting for the frozen LM's caption loss to teach it. Generation
    does not use it.

    Examples:
        >>> StatsHead(d_model=32, n_variables=3)(torch.zeros(2, 5, 32)).shape
        torch.Size([2, 3, 3])
    """

    def __init__(self, d_model: int, n_variables: int, direct: bool = False) -> None:
        super().__init__()
        self.n_variables = n_variables
        self.direct = direct
        self.proj = nn.Linear(d_model, n_variables * len(STATS))
        if direct:  # the correction starts at zero: the head starts as the window's own mean, min and max
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)

    def forward(self, tokens: Tensor, climate: Tensor | None = None) -> Tensor:
        """Climate tokens `(B, N, D)` -> predicted statistics `(B, V, 3)` (mean, min, max in normalised units).

        With `direct`, the window itself `climate` `(B, T, V, H, W)` (normalised) gives each variable's plain mean,
        minimum and maximum over its time steps and grid points, and the linear map of the tokens is a correction on
        top (e.g. for the area weighting of the mean).
        """
        pooled = tokens.to(self.proj.weight.dtype).mean(dim=1)  # (B, D)
        out = self.proj(pooled).view(tokens.shape[0], self.n_variables, len(STATS))  # (B, V, 3)
        if not self.direct:
            return out
        if climate is None:
            raise DataError("a direct StatsHead needs the climate window: head(tokens, climate)")
        x = climate.to(out.dtype).transpose(1, 2).flatten(2)  # (B, V, T*H*W)
        return out + torch.stack([x.mean(dim=-1), x.amin(dim=-1), x.amax(dim=-1)], dim=-1)  # (B, V, 3)
