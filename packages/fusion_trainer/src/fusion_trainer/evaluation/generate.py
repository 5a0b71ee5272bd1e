"""Generation for a finished run: one JSON line per sample with its key, the reference text and the generated text."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fusion_trainer.errors import DataError

__all__ = ["generate_run", "iter_generations"]

logger = logging.getLogger(__name__)


def iter_generations(
    model: Any,
    dataset: Any,
    prompt: str,
    split: str = "test",
    limit: int | None = None,
    batch_size: int = 4,
    max_new_tokens: int = 96,
    caption: str = "full",
    no_repeat_ngram: int = 0,
) -> Iterator[dict[str, Any]]:
    """Generate greedily for the samples of `split` in manifest order (with `limit`, for that many samples spread
    evenly over the split, so a partial evaluation still covers all its times and places).

    Args:
        model: a loaded FusionModel.
        dataset: the opened dataset.
        prompt: the rendered prompt (the run's template).
        split: which split.
        limit: at most this many samples (None: all).
        batch_size: samples per generate call.
        max_new_tokens: tokens per caption.
        caption: the run's caption form; the reference is the caption in that form (`grounding.caption_target`).
        no_repeat_ngram: n > 0: no caption repeats an n-gram of its own tokens (`FusionModel.generate`); 0: off.

    Yields:
        {"key", "reference", "generated"} per sample.
    """
    from fusion_trainer.data.stream import decode_sample, epoch_samples
    from fusion_trainer.grounding import caption_target

    device = next(model.parameters()).device
    raws = epoch_samples(dataset, split, epoch=0, rank=0, world=1, seed=0, shuffle=False)
    batch: list[Any] = []

    def flush(items: list[Any]) -> Iterator[dict[str, Any]]:
        climate = torch.from_numpy(np.stack([s.climate_x for s in items])).to(device)  # (B, T, V, H, W)
        texts = model.generate(
            climate, prompt=[prompt] * len(items), max_new_tokens=max_new_tokens, do_sample=False, one_line=True,
            no_repeat_ngram=no_repeat_ngram, draft_caption=caption,
        )
        for sample, text in zip(items, texts, strict=True):
            reference = caption_target(sample.text, caption)
            yield {"key": sample.key, "reference": reference, "generated": text}

    total = sum(s.samples for s in dataset.shards(split))
    wanted = None
    if limit is not None and limit < total:
        wanted = {int(i) for i in np.linspace(0, total - 1, limit).round()}
    todo = total if wanted is None else len(wanted)
    started, done, last_log = time.monotonic(), 0, 0.0

    def progress(n: int) -> None:
        nonlocal done, last_log
        done += n
        now = time.monotonic() - started
        if now - last_log >= 30 or done == todo:  # a line every 30 s: long splits show where they are
            last_log = now
            left = now / done * (todo - done)
            logger.info("generated %d/%d %s samples in %.0f s (about %.0f s left)", done, todo, split, now, left)

    for position, raw in enumerate(raws):
        if wanted is not None and position not in wanted:
            continue
        batch.append(decode_sample(raw, dataset))
        if len(batch) == batch_size:
            yield from flush(batch)
            progress(len(batch))
            batch = []
    if batch:
        yield from flush(batch)
        progress(len(batch))


def generate_run(
    run_dir: Path,
    shards: str,
    split: str = "test",
    limit: int | None = None,
    out: Path | None = None,
    batch_size: int = 4,
    max_new_tokens: int = 96,
    no_repeat_ngram: int = 0,
) -> list[dict[str, Any]]:
    """Generate texts for a split with a finished run's adapter; optionally write them as JSONL (atomically).

    Raises:
        CheckpointError: the run has no final adapter.
        DataError: the dataset cannot be read or has no samples in `split`.
    """
    from fusion_trainer.data.stream import open_shards
    from fusion_trainer.runs import load_run_for

    data = open_shards(shards)
    if not data.shards(split):
        raise DataError(
            f"--split {split}: dataset {data.version_url} has no {split!r} shards ({data.manifest.splits})"
        )
    run = load_run_for(run_dir, data)
    config, model, prompt = run.config, run.model, run.prompt
    rows = list(
        iter_generations(
            model, data, prompt, split, limit, batch_size, max_new_tokens, config.caption, no_repeat_ngram
        )
    )
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        tmp.replace(out)
        logger.info("wrote %d generations to %s", len(rows), out)
    return rows
