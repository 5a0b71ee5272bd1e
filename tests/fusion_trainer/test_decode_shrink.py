"""`decode(..., select=...)`: finished rows leave the batch (cache, inputs and the caller's per-row climate), and
every row's tokens stay what they are when the whole batch steps to the end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from fusion_trainer import FusionConfig, FusionModel
from fusion_trainer.model import generation
from fusion_trainer.model.base import load_base
from fusion_trainer.model.decoding import decode

STOP, PAD, VOCAB = 1, 0, 16


class _Cache:
    """Stands for a transformers cache: one value per row, narrowed by `batch_select_indices`."""

    def __init__(self, rows: int) -> None:
        self.rows = list(range(rows))

    def batch_select_indices(self, keep: torch.Tensor) -> None:
        self.rows = [self.rows[i] for i in keep.tolist()]


def _scripted(script: list[list[int]], seen: list[list[int]]) -> Any:
    """A step whose row r picks `script[r][its step]`; `seen` records which batch rows each call was given."""

    def step(embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: _Cache) -> tuple[torch.Tensor, Any]:
        assert embeds.shape[0] == mask.shape[0] == positions.shape[0] == len(cache.rows)
        seen.append(list(cache.rows))
        logits = torch.zeros(len(cache.rows), VOCAB)
        for i, row in enumerate(cache.rows):
            logits[i, script[row][len(seen) - 1]] = 1.0
        return logits, cache

    return step


def test_finished_rows_leave_the_batch() -> None:
    script = [[5, STOP, 9, 9, 9, 9], [6, 7, 8, STOP, 9, 9], [5, 5, STOP, 9, 9, 9], [4, 4, 4, 4, 4, STOP]]
    embeds, mask = torch.zeros(4, 2, 3), torch.ones(4, 2, dtype=torch.long)
    kept: list[list[int]] = []
    runs = {}
    for shrink in (False, True):
        seen: list[list[int]] = []
        select = (lambda keep: kept.append(keep.tolist())) if shrink else None
        runs[shrink] = decode(embeds, mask, _scripted(script, seen), lambda nxt: torch.zeros(nxt.shape[0], 1, 3),
                              {STOP}, PAD, 6, cache=_Cache(4), select=select)  # fmt: skip
        if shrink:
            # row 0 stops at step 2 (a quarter of 4 rows): 3 rows go on; row 2 stops at step 3 (1 of 3): 2 go on;
            # row 1 at step 4 (1 of 2): row 3 alone to the end
            assert seen == [[0, 1, 2, 3], [0, 1, 2, 3], [1, 2, 3], [1, 3], [3], [3]]
            assert kept == [[1, 2, 3], [0, 2], [1]]
        else:
            assert all(rows == [0, 1, 2, 3] for rows in seen)
    assert runs[True] == runs[False] == [
        [5, STOP, PAD, PAD, PAD, PAD], [6, 7, 8, STOP, PAD, PAD], [5, 5, STOP, PAD, PAD, PAD], [4, 4, 4, 4, 4, STOP],
    ]  # fmt: skip


def test_no_repeat_ngram_keeps_each_rows_history_when_rows_leave() -> None:
    """Row 1 would repeat the bigram (4, 4) after row 0 has left the batch; it is ruled out in its own history."""
    ranked = torch.tensor([0.0, 0.0, 0.0, 0.0, 3.0, 2.0, 1.0] + [0.0] * (VOCAB - 7))  # 4 > 5 > 6

    def step(embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: _Cache) -> tuple[torch.Tensor, Any]:
        logits = ranked.repeat(len(cache.rows), 1)
        logits[[i for i, row in enumerate(cache.rows) if row == 0], STOP] = 9.0  # row 0 stops at once
        return logits, cache

    embeds, mask = torch.zeros(2, 2, 3), torch.ones(2, 2, dtype=torch.long)
    runs = [decode(embeds, mask, step, lambda nxt: torch.zeros(nxt.shape[0], 1, 3), {STOP}, PAD, 5,
                   cache=_Cache(2), no_repeat_ngram=2, select=select)  # fmt: skip
            for select in (None, lambda keep: None)]  # fmt: skip
    assert runs[0] == runs[1]
    assert runs[1][1][:3] == [4, 4, 5] and runs[1][0] == [STOP] + [PAD] * 4


@pytest.mark.parametrize("kind", ["add", "xattn", "prefix", "gated-xattn"])
def test_generate_drops_finished_rows_with_the_same_text(
    tiny_model_dir: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a fused model whose climate matters to every row (gates opened), rows that stop at different steps leave
    the batch, and each row's text is the one the whole batch would give (the climate follows its rows)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = FusionConfig(n_variables=2, d_encoder=32, encoder_heads=4, n_heads=4, encoder_depth=1, fusion=kind,
                          n_prefix_tokens=4, every_n_layers=1)  # fmt: skip
    torch.manual_seed(0)
    model = FusionModel.from_base(load_base(tiny_model_dir, dtype=torch.float32)[0], config, tokenizer=tok).eval()
    with torch.no_grad():
        for p in model.fusion_params():
            p.add_(torch.randn_like(p) * 0.5)
    climate = torch.randn(6, 2, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    prompts = "The wind" if kind == "prefix" else ["Wind", "The temperature over the plains is", "Snow", "a", "b", "c"]
    real, calls, shrink = generation.decode, [], [True]

    def spy(*args: Any, select: Any = None, **kw: Any) -> list[list[int]]:
        def counted(keep: torch.Tensor) -> None:
            calls.append(len(keep))
            select(keep)

        rows = real(*args, select=counted if shrink[0] else None, **kw)
        spy.rows = rows  # type: ignore[attr-defined]
        return rows

    monkeypatch.setattr(generation, "decode", spy)
    monkeypatch.setattr(generation, "stop_ids", lambda tok, config: set())
    model.generate(climate, prompts, max_new_tokens=12)
    rows = spy.rows  # type: ignore[attr-defined]
    # a stop token the rows meet at different steps (or never)
    first = [{t: row.index(t) for t in reversed(row)} for row in rows]
    stop = next(t for row in rows for t in row if len({f.get(t, 99) for f in first}) > 1)
    monkeypatch.setattr(generation, "stop_ids", lambda tok, config: {stop})
    shrunk = model.generate(climate, prompts, max_new_tokens=12)
    assert calls, "no row left the batch"
    sampled = model.generate(climate, prompts, max_new_tokens=12, do_sample=True, seed=3)
    assert model.generate(climate, prompts, max_new_tokens=12, do_sample=True, seed=3) == sampled  # reproducible
    shrink[0] = False
    assert model.generate(climate, prompts, max_new_tokens=12) == shrunk
    assert len(set(shrunk)) > 1
