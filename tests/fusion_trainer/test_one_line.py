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


def _ranked_step(vocab: int, rows: int) -> Any:
    """A fake LM step whose logits always rank tokens 5 > 6 > 7 > ... (so greedy decoding repeats 5 for ever)."""

    def step(embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        logits = torch.full((rows, vocab), -100.0)
        logits[:, 5:] = -torch.arange(vocab - 5, dtype=torch.float32)
        return logits, cache

    return step


def test_no_repeat_ngram_rules_out_the_token_that_would_repeat_one() -> None:
    """n=2: no bigram twice (5 5 6 5 7 5 8 5); n=1: no token twice; 0: plain greedy."""
    vocab, rows, steps = 32, 2, 8
    embeds, mask = torch.zeros(rows, 3, 4), torch.ones(rows, 3, dtype=torch.long)
    step = _ranked_step(vocab, rows)

    def run(n: int) -> list[list[int]]:
        return decode(embeds, mask, step, lambda nxt: torch.zeros(rows, 1, 4), set(), 0, steps, no_repeat_ngram=n)

    assert run(0) == [[5] * steps] * rows
    assert run(1) == [list(range(5, 5 + steps))] * rows
    two = run(2)[0]
    assert two[:5] == [5, 5, 6, 5, 7]
    bigrams = list(zip(two, two[1:], strict=False))
    assert len(bigrams) == len(set(bigrams)), two
    three = run(3)[0]
    trigrams = list(zip(three, three[1:], three[2:], strict=False))
    assert len(trigrams) == len(set(trigrams)) and three[:3] == [5, 5, 5]


def test_no_repeat_ngram_must_not_be_negative(tiny_model_dir: Path) -> None:
    import pytest
    from fusion_trainer import FusionConfig, FusionModel
    from fusion_trainer.errors import ConfigError
    from fusion_trainer.model.base import load_base
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    lm = load_base(tiny_model_dir, dtype=torch.float32)[0]
    config = FusionConfig(n_variables=2, d_encoder=32, encoder_heads=4, n_heads=4)
    model = FusionModel.from_base(lm, config, tokenizer=tok)
    with pytest.raises(ConfigError, match="no_repeat_ngram"):
        model.generate(torch.randn(1, 2, 2, 4, 4), "Hi", max_new_tokens=2, no_repeat_ngram=-1)
    assert len(model.generate(torch.randn(1, 2, 2, 4, 4), "Hi", max_new_tokens=4, no_repeat_ngram=2)) == 1

