"""Soft tokens inside a token sequence: where they go (`prefix_at`) and the gather that puts them there
(`insert_prefix`), with the attention mask, labels and text positions shifted to match. Pure tensor functions."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["insert_prefix", "prefix_at"]


def insert_prefix(
    text_embeds: Tensor,
    prefix: Tensor,
    attention_mask: Tensor,
    labels: Tensor | None = None,
    at: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """Insert soft tokens into every row at text index `at` (default: before the first real token).

    With the default, right-padded rows (training) become `[prefix, text, pad]`, left-padded rows (generation)
    `[pad, prefix, text]`; `prefix_at(..., "after_prompt")` gives `[prompt, prefix, caption, pad]` and
    `[pad, prompt, prefix]`.

    Args:
        text_embeds: `(B, L, H)`.
        prefix: `(B, P, H)`.
        attention_mask: `(B, L)`, 1 for real tokens.
        labels: `(B, L)` or None; prefix positions get -100.
        at: `(B, 1)` text index before which the prefix goes (0..L); None: after any left padding.

    Returns:
        `(embeds (B, L+P, H), attention_mask (B, L+P), labels (B, L+P) | None, text_positions (B, L))`, where
        `text_positions[b, i]` is the index of text token i in the new sequence.
    """
    b, length, h = text_embeds.shape
    n_prefix = prefix.shape[1]
    device = text_embeds.device
    if at is None:
        at = (attention_mask.cumsum(dim=1) == 0).sum(dim=1, keepdim=True)  # (B, 1): leading padding
    j = torch.arange(length + n_prefix, device=device)[None, :]  # (1, L+P)
    is_prefix = (j >= at) & (j < at + n_prefix)  # (B, L+P)
    text_src = torch.where(j < at, j, j - n_prefix).clamp(0, max(length - 1, 0))  # (B, L+P)
    prefix_src = (j - at).clamp(0, n_prefix - 1)  # (B, L+P)
    from_text = text_embeds.gather(1, text_src[..., None].expand(b, -1, h))  # (B, L+P, H)
    from_prefix = prefix.to(text_embeds.dtype).gather(
        1, prefix_src[..., None].expand(b, -1, h)
    )  # (B, L+P, H)
    embeds = torch.where(is_prefix[..., None], from_prefix, from_text)
    mask = torch.where(is_prefix, torch.ones_like(text_src), attention_mask.gather(1, text_src))
    new_labels = None
    if labels is not None:
        new_labels = torch.where(is_prefix, torch.full_like(text_src, -100), labels.gather(1, text_src))
    i = torch.arange(length, device=device)[None, :]  # (1, L)
    text_positions = i + n_prefix * (i >= at)  # (B, L)
    return embeds, mask.to(attention_mask.dtype), new_labels, text_positions


def prefix_at(attention_mask: Tensor, labels: Tensor | None, position: str) -> Tensor | None:
    """Where the soft tokens go (`insert_prefix`'s `at`) for `FusionConfig.prefix_position`.

    "start": None (before the first real token). "after_prompt": before the first labelled token (training and
    evaluation: prompt, prefix, caption); without labels, or in a row with none, after the last real token
    (generation: the input is the prompt).
    """
    if position == "start":
        return None
    positions = torch.arange(1, attention_mask.shape[1] + 1, device=attention_mask.device)[None, :]  # (1, L)
    end = (attention_mask * positions).amax(dim=1, keepdim=True)  # (B, 1): after the last real token
    if labels is None:
        return end
    labelled = labels != -100  # (B, L)
    first = labelled.int().argmax(dim=1, keepdim=True)  # (B, 1)
    return torch.where(labelled.any(dim=1, keepdim=True), first, end)
