"""The text side of a batch and collation: prompt + caption token ids with the prompt masked in the labels, and
climate windows stacked (smaller grids padded) into one batch of tensors.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fusion_trainer.errors import DataError

from .samples import Sample

__all__ = ["as_built", "collate", "encode_sample", "encode_texts"]

logger = logging.getLogger(__name__)


def encode_sample(
    text: str, prompt_ids: list[int], tokenizer: Any, max_length: int
) -> tuple[list[int], list[int]]:
    """Token ids of prompt + caption + EOS and labels with the prompt masked (-100), truncated to `max_length`."""
    return encode_texts([text], prompt_ids, tokenizer, max_length)[0]


def encode_texts(
    texts: Sequence[str], prompt_ids: list[int], tokenizer: Any, max_length: int
) -> list[tuple[list[int], list[int]]]:
    """`encode_sample` for several captions with one tokenizer call (a fast tokenizer encodes them as one batch)."""
    if not texts:
        return []
    captions = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    eos = [int(tokenizer.eos_token_id)] if tokenizer.eos_token_id is not None else []
    masked = [-100] * len(prompt_ids)
    out = []
    for caption in captions:
        tail = [*caption, *eos]
        out.append(((prompt_ids + tail)[:max_length], (masked + tail)[:max_length]))
    return out


def _rows(rows: list[list[int]], fill: int) -> np.ndarray:
    """Right-pad int rows with `fill` into one `(B, L)` int64 array (filled through one boolean mask)."""
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    out = np.full((len(rows), int(lengths.max(initial=0))), fill, dtype=np.int64)
    out[np.arange(out.shape[1]) < lengths[:, None]] = np.fromiter(
        itertools.chain.from_iterable(rows), dtype=np.int64, count=int(lengths.sum())
    )
    return out


def collate(samples: list[Sample], encoded: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, Any]:
    """Stack climate `(B, T, V, H, W)`, right-pad ids (mask 0, labels -100), keep keys and texts.

    Every sample of a batch must have the same climate shape (the builder's default: one array shape per dataset);
    samples of different shapes (a dataset built with `sample.edge_tiles: keep`) are refused with a DataError.
    """
    id_rows = [ids for ids, _ in encoded]
    input_ids = _rows(id_rows, pad_id)  # (B, L)
    lengths = np.fromiter(map(len, id_rows), dtype=np.int64, count=len(id_rows))
    mask = (np.arange(input_ids.shape[1]) < lengths[:, None]).astype(np.int64)  # (B, L)
    labels = np.full_like(input_ids, -100)  # (B, L)
    label_rows = _rows([lab for _, lab in encoded], -100)
    n_labels = min(label_rows.shape[1], input_ids.shape[1])
    labels[:, :n_labels] = label_rows[:, :n_labels]
    return batch_dict(samples, stack_climate(samples), input_ids, labels, mask)


def stack_climate(samples: list[Sample]) -> np.ndarray:
    """`(B, T, V, H, W)`; refuses samples whose array shapes differ (naming them and the way out)."""
    shapes = {s.climate_x.shape for s in samples}
    if len(shapes) > 1:
        keys = ", ".join(f"{s.key} {s.climate_x.shape}" for s in samples[:8])
        raise DataError(
            f"one batch needs one climate shape, but its samples have {len(shapes)} ({keys}): the dataset mixes "
            "array shapes (built with sample.edge_tiles: keep, or by a builder before schema 1.1). Rebuild it with "
            "a tile that divides the region or sample.edge_tiles: drop (the default), or train with micro_batch 1"
        )
    return np.stack([s.climate_x for s in samples])


def batch_dict(
    samples: list[Sample], climate: np.ndarray, input_ids: np.ndarray, labels: np.ndarray, mask: np.ndarray
) -> dict[str, Any]:
    batch: dict[str, Any] = {
        "climate_x": torch.from_numpy(climate),  # (B, T, V, H, W)
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(mask),
        "labels": torch.from_numpy(labels),
        "keys": [s.key for s in samples],
        "texts": [s.text for s in samples],
    }
    if all(s.stats is not None for s in samples):
        batch["stats"] = torch.from_numpy(np.stack([s.stats for s in samples]))  # type: ignore[misc]  # (B, V, 3)
    return batch


def as_built(batch: Any) -> Any:
    """A DataLoader's `collate_fn` for `ClimateTextStream`, whose batches are already tensors: hands each on as it
    is (the default, `default_convert`, walks every key, text and position of every batch again to find nothing to
    convert: 5 % of a warm epoch's time, docs/performance.md "Streaming")."""
    return batch
