"""`generate(..., one_line=True)`: a caption is one line, so a row stops at its first line break as at EOS and the
text is what came before it (the demo's SmolLM2 ran on past 76% of its captions to max_new_tokens without it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from fusion_trainer.model.decoding import break_ids, decode, decode_texts


def test_break_ids_are_the_tokens_with_a_line_break(tokenizer: Any) -> None:
    breaks = break_ids(tokenizer)
    [newline] = tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert newline in breaks
    assert not {t for t in tokenizer("a mild day.", add_special_tokens=False)["input_ids"]} & breaks
    assert break_ids(tokenizer) is breaks  # scanned once


def test_decode_texts_keeps_the_first_line(tokenizer: Any) -> None:
    row = tokenizer("Mean 2 m temperature 3.1 C.\nWhat is the climate?", add_special_tokens=False)["input_ids"]
    stops = {int(tokenizer.eos_token_id)}
    assert decode_texts(tokenizer, [row], stops) == ["Mean 2 m temperature 3.1 C.\nWhat is the climate?"]
    assert decode_texts(tokenizer, [row], stops, break_ids(tokenizer)) == ["Mean 2 m temperature 3.1 C."]


def test_a_row_stops_at_its_line_break(tokenizer: Any, tiny_model_dir: Path) -> None:
    """The loop ends when every row has met a stop or a break: rows of different lengths, later ones padded."""
    [newline] = tokenizer("\n", add_special_tokens=False)["input_ids"]
    script = [[5, 6, newline, 7, 8], [5, newline, 9, 9, 9]]  # what each row would pick, step by step
    vocab = len(tokenizer)
    calls = [0]

    def step(embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        logits = torch.zeros(2, vocab)
        for r, picks in enumerate(script):
            logits[r, picks[calls[0]]] = 1.0
        calls[0] += 1
        return logits, cache

    embeds, mask = torch.zeros(2, 3, 4), torch.ones(2, 3, dtype=torch.long)
    pad = 0
    plain = decode(embeds, mask, step, lambda nxt: torch.zeros(2, 1, 4), set(), pad, 5)
    assert plain == script and calls[0] == 5
    calls[0] = 0
    rows = decode(embeds, mask, step, lambda nxt: torch.zeros(2, 1, 4), set(break_ids(tokenizer)), pad, 5)
    assert calls[0] == 3  # both rows have broken their line after 3 steps
    assert rows == [[5, 6, newline], [5, newline, pad]]
