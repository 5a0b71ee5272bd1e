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

from .errors import DataError
from .samples import Sample

__all__ = ["collate", "encode_sample", "encode_texts"]

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

    Tiles of one dataset may differ in grid size (the builder keeps partial edge tiles of at least half a tile): the
    climate of a batch is padded to its largest H and W with 0, which in normalised units is the train mean. Samples
    whose time steps or variables differ cannot share a batch.
    """
    id_rows = [ids for ids, _ in encoded]
    input_ids = _rows(id_rows, pad_id)  # (B, L)
    lengths = np.fromiter(map(len, id_rows), dtype=np.int64, count=len(id_rows))
    mask = (np.arange(input_ids.shape[1]) < lengths[:, None]).astype(np.int64)  # (B, L)
    labels = np.full_like(input_ids, -100)  # (B, L)
    label_rows = _rows([lab for _, lab in encoded], -100)
    n_labels = min(label_rows.shape[1], input_ids.shape[1])
    labels[:, :n_labels] = label_rows[:, :n_labels]
    return _batch(samples, _stack_climate(samples), input_ids, labels, mask)


def _stack_climate(samples: list[Sample]) -> np.ndarray:
    """`(B, T, V, H, W)`, smaller grids padded with 0; refuses samples whose (time, variable) shapes differ."""
    shapes = {s.climate_x.shape for s in samples}
    if len({shape[:2] for shape in shapes}) > 1:
        keys = ", ".join(s.key for s in samples)
        raise DataError(
            f"samples {keys} have different (time, variable) shapes {sorted(shapes)}; one batch needs one "
            "window, time step and variable list"
        )
    if len(shapes) == 1:
        return np.stack([s.climate_x for s in samples])
    height, width = max(shape[2] for shape in shapes), max(shape[3] for shape in shapes)
    stacked = np.zeros((len(samples), *samples[0].climate_x.shape[:2], height, width), dtype=np.float32)
    for i, s in enumerate(samples):
        stacked[i, :, :, : s.climate_x.shape[2], : s.climate_x.shape[3]] = s.climate_x
    return stacked


def _batch(
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
