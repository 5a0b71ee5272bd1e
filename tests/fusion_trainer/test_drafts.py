"""Drafted greedy decoding (`decode(..., drafts=...)`, `FusionModel.generate(drafts=..., draft_caption=...)`): a
guess of each row's tokens is checked many tokens at a time, and the text is greedy decoding's whatever the guess."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from fusion_trainer import FusionConfig, FusionModel
from fusion_trainer.model import generation
from fusion_trainer.model.base import load_base
from fusion_trainer.model.decoding import decode
from fusion_trainer.model.readout import readout_caption

STOP, PAD, VOCAB, PROMPT = 1, 0, 16, 2


class _Cache:
    """Stands for a transformers cache: one value per row, narrowed by `batch_select_indices`."""

    def __init__(self, rows: int) -> None:
        self.rows = list(range(rows))

    def batch_select_indices(self, keep: torch.Tensor) -> None:
        self.rows = [self.rows[i] for i in keep.tolist()]


def _scripted(script: list[list[int]], calls: list[int]) -> Any:
    """A step whose row r at position p predicts `script[r][p - PROMPT + 1]` (the token after the one at p), so its
    greedy text is the script up to its stop; it checks that the positions count exactly the attended tokens (the
    draft tokens greedy did not keep are masked out) and records each call's width."""

    def step(
        embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: _Cache, keep: int = 1
    ) -> Any:
        width = embeds.shape[1]
        assert embeds.shape[0] == mask.shape[0] == positions.shape[0] == len(cache.rows)
        if calls:  # after the prompt: a row's first new position counts the tokens it attends before it
            for i in range(len(cache.rows)):
                assert int(mask[i, :-width].sum()) == int(positions[i, 0])
        calls.append(width)
        logits = torch.zeros(len(cache.rows), width, VOCAB)
        for i, row in enumerate(cache.rows):
            for j in range(width):
                index = int(positions[i, j]) - PROMPT + 1
                logits[i, j, script[row][min(index, len(script[row]) - 1)]] = 1.0
        return (logits if keep > 1 else logits[:, -1]), cache

    return step


SCRIPT = [
    [5, 6, 7, 8, 9, 10, 11, STOP],
    [4, 4, 5, 5, 6, 6, 7, 7, 8, 8, STOP],
    [3, STOP],
    [9, 8, 7, 6, 5, 4, 3, 2, 9, 8, 7, 6],  # never stops: max_new_tokens
]


def _run(
    drafts: list[list[int]] | None, window: int = 4, shrink: bool = True
) -> tuple[list[list[int]], list[int]]:
    calls: list[int] = []
    rows = len(SCRIPT)
    embeds, mask = torch.zeros(rows, PROMPT, 3), torch.ones(rows, PROMPT, dtype=torch.long)
    out = decode(embeds, mask, _scripted(SCRIPT, calls), lambda ids: torch.zeros(ids.shape[0], ids.shape[1], 3),
                 {STOP}, PAD, 12, cache=_Cache(rows), select=(lambda keep: None) if shrink else None, drafts=drafts,
                 draft_window=window)  # fmt: skip
    return out, calls


@pytest.mark.parametrize("shrink", [True, False])
def test_any_draft_gives_greedy_decodings_tokens(shrink: bool) -> None:
    plain, plain_calls = _run(None, shrink=shrink)
    expected = [row[: row.index(STOP) + 1] if STOP in row else row[:12] for row in SCRIPT]
    assert [[t for t in row if t != PAD] for row in plain] == expected
    right = [list(row) for row in expected]
    wrong_midway = [row[:3] + [15] + row[4:] for row in expected]
    nonsense = [[14] * 20 for _ in expected]
    mixed = [right[0], wrong_midway[1], [], nonsense[3]]
    for drafts in (right, wrong_midway, nonsense, mixed, [row + [7, 7, 7] for row in right]):
        for window in (2, 4, 16):
            out, calls = _run(drafts, window, shrink)
            assert out == plain, (drafts, window)
    _, right_calls = _run(right, 4, shrink)
    assert len(right_calls) < len(plain_calls) and max(right_calls) == 4
    _, nonsense_calls = _run(nonsense, 4, shrink)
    assert len(nonsense_calls) == len(plain_calls)  # a wrong first token: nothing is fed past it


def test_drafts_are_ignored_when_sampling() -> None:
    embeds, mask = torch.zeros(1, PROMPT, 3), torch.ones(1, PROMPT, dtype=torch.long)
    calls: list[int] = []
    decode(embeds, mask, _scripted(SCRIPT[:1], calls), lambda ids: torch.zeros(1, ids.shape[1], 3), {STOP}, PAD, 8,
           do_sample=True, seed=0, cache=_Cache(1), drafts=[SCRIPT[0]])  # fmt: skip
    assert set(calls[1:]) == {1}


@pytest.mark.parametrize("kind", ["add", "xattn", "prefix", "gated-xattn"])
def test_generate_with_drafts_writes_greedy_text(
    tiny_model_dir: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a fused model whose climate matters (gates opened): the greedy text is the same with a right draft, a draft
    wrong midway and a wrong one, and a right draft takes fewer LM calls."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = FusionConfig(n_variables=2, d_encoder=32, encoder_heads=4, n_heads=4, encoder_depth=1, fusion=kind,
                          n_prefix_tokens=4, every_n_layers=1)  # fmt: skip
    torch.manual_seed(0)
    model = FusionModel.from_base(
        load_base(tiny_model_dir, dtype=torch.float32)[0], config, tokenizer=tok
    ).eval()
    with torch.no_grad():
        for p in model.fusion_params():
            p.add_(torch.randn_like(p) * 0.5)
    climate = torch.randn(4, 2, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    prompts = "The wind" if kind == "prefix" else ["Wind", "The temperature over the plains is", "Snow", "a"]
    calls: list[int] = []
    hook = model.lm.register_forward_hook(lambda *a: calls.append(1))
    real, rows = generation.decode, []
    monkeypatch.setattr(generation, "decode", lambda *a, **k: rows.append(real(*a, **k)) or rows[-1])
    plain = model.generate(climate, prompts, max_new_tokens=24)
    plain_calls, calls[:] = len(calls), []
    # a random LM writes partial UTF-8 bytes, whose text does not give its tokens back: the draft of a text is taken
    # as the tokens that wrote it (the tokenizer's part is `test_draft_caption_...`)
    own = dict(zip(plain, [[t for t in r if t != tok.pad_token_id] for r in rows[0]], strict=True))
    tokenize = model._ids
    monkeypatch.setattr(
        model, "_ids", lambda texts: [own[t] if t in own else tokenize([t])[0] for t in texts]
    )
    assert model.generate(climate, prompts, max_new_tokens=24, drafts=plain) == plain
    assert len(calls) <= plain_calls / 3, (len(calls), plain_calls)
    words = [t.split(" ") for t in plain]
    midway = [" ".join(w[: len(w) // 2] + ["zebra"] + w[len(w) // 2 + 1 :]) for w in words]
    assert model.generate(climate, prompts, max_new_tokens=24, drafts=midway) == plain
    assert model.generate(climate, prompts, max_new_tokens=24, drafts=["zebra"] * 4) == plain
    sampled = model.generate(climate, prompts, max_new_tokens=24, do_sample=True, seed=3)
    assert (
        model.generate(climate, prompts, max_new_tokens=24, do_sample=True, seed=3, drafts=plain) == sampled
    )
    hook.remove()


VARIABLES = ["T2M", "U10M", "V10M", "SLP", "PRECTOT"]
NORM = {"T2M": {"mean": 285.0, "std": 10.0}, "U10M": {"mean": 0.0, "std": 5.0}, "V10M": {"mean": 0.0, "std": 5.0},
        "SLP": {"mean": 101300.0, "std": 900.0}, "PRECTOT": {"mean": 3e-5, "std": 1e-4}}  # fmt: skip


def test_draft_caption_guesses_the_caption_each_readout_line_states(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fusion_trainer.model.tiny import make_tiny_model

    cfg = FusionConfig(fusion="prefix", readout=True, n_prefix_tokens=2, d_encoder=32, encoder_heads=4,
                       encoder_depth=1, variables=VARIABLES, normalization=NORM, window="1h")  # fmt: skip
    model = FusionModel.from_base(
        make_tiny_model("llama", tmp_path / "tiny"), cfg, dtype=torch.float32
    ).eval()
    tok = model.tokenizer
    assert tok is not None
    climate = torch.randn(2, 1, 5, 11, 15, generator=torch.Generator().manual_seed(0))
    real, seen = generation.decode, []

    def spy(*args: Any, drafts: Any = None, **kw: Any) -> list[list[int]]:
        seen.append(drafts)
        return real(*args, drafts=drafts, **kw)

    monkeypatch.setattr(generation, "decode", spy)
    plain = model.generate(climate, "Describe:\n", max_new_tokens=6)
    drafted = model.generate(climate, "Describe:\n", max_new_tokens=6, draft_caption="numbers")
    assert drafted == plain and seen[0] is None
    with torch.no_grad():
        head = model.encoder.stats_head
        assert head is not None
        lines = model.readout_texts(head(model.encoder.encode(climate).tokens, climate))
    captions = [
        readout_caption(v, "numbers")
        for v in model._readout_values(head(model.encoder.encode(climate).tokens, climate))
    ]
    assert all(c.startswith("The area-weighted mean 2 m temperature was ") for c in captions)
    assert [c.split(" was ")[1].split(" °C")[0] for c in captions] == [
        line.split("temperature ")[1].split(" °C")[0] for line in lines
    ]  # the caption states the line's numbers
    eos = int(tok.eos_token_id)
    assert seen[1] == [[*ids, eos] for ids in tok(captions, add_special_tokens=False)["input_ids"]]


def test_a_row_done_is_fed_no_more_of_its_draft() -> None:
    """Row 0 follows its right draft to `max_new_tokens` in a few wide steps while row 1, whose draft is wrong, goes
    on one token a step: from then on every step is one token wide (no drafted tokens for a row that is done)."""
    script = [list(range(2, 16)) * 2, [4, 5] * 14]
    calls: list[int] = []
    embeds, mask = torch.zeros(2, PROMPT, 3), torch.ones(2, PROMPT, dtype=torch.long)
    out = decode(embeds, mask, _scripted(script, calls), lambda ids: torch.zeros(ids.shape[0], ids.shape[1], 3), {STOP},
                 PAD, 12, cache=_Cache(2), drafts=[script[0], [9] * 20], draft_window=4)  # fmt: skip
    assert out == [script[0][:12], script[1][:12]]
    assert calls[1:4] == [4, 4, 4] and set(calls[4:]) == {1}, calls  # row 0: 1 + 4 + 4 + 4 tokens, cut at 12


def test_a_windowed_base_drafts_nothing(tmp_path: Path) -> None:
    """GPT-Neo's local layers count cache slots: masked-out guesses would shorten their window, so no drafts."""
    from fusion_trainer.model.tiny import make_tiny_model

    cfg = FusionConfig(n_variables=2, d_encoder=32, encoder_heads=4, encoder_depth=1, fusion="add")
    model = FusionModel.from_base(
        make_tiny_model("gpt_neo", tmp_path / "neo"), cfg, dtype=torch.float32
    ).eval()
    climate = torch.randn(2, 2, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    widths: list[int] = []
    hook = model.lm.register_forward_hook(lambda module, args, kwargs, out: widths.append(kwargs["inputs_embeds"].shape[1]),
                                          with_kwargs=True)  # fmt: skip
    plain = model.generate(climate, "Wind", max_new_tokens=8)
    widths.clear()
    assert model.generate(climate, "Wind", max_new_tokens=8, drafts=plain) == plain
    hook.remove()
    assert len(widths) > 2 and set(widths[1:]) == {1}, widths


def test_a_row_that_leaves_its_draft_picks_it_up_again() -> None:
    """One miscopied token (the draft's 15 where greedy writes 7): the row goes on one token a step only until its
    last two tokens occur in the draft again, then its steps are wide again; the text is greedy's."""
    script = [[*range(2, 14), STOP]]
    draft = [[*range(2, 7), 15, *range(8, 14), STOP]]
    calls: list[int] = []
    embeds, mask = torch.zeros(1, PROMPT, 3), torch.ones(1, PROMPT, dtype=torch.long)
    out = decode(embeds, mask, _scripted(script, calls), lambda ids: torch.zeros(1, ids.shape[1], 3), {STOP}, PAD,
                 20, cache=_Cache(1), drafts=draft, draft_window=4)  # fmt: skip
    assert out == script
    # the prompt (2 picked); 3..6; 7 for the draft's 15 (then off the draft); 8 alone; 9 alone ([8, 9] is in the
    # draft: picked up again); 10..13 in one wide step; STOP
    assert calls == [PROMPT, 4, 4, 1, 1, 4, 2], calls
