"""`model.attention.grouped_sdpa`: grouped-query attention with the query heads folded onto their key/value head is
transformers' SDPA attention (outputs and gradients), and it is what a FusionModel's LM runs."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import fusion_trainer.model.attention as attention
import pytest
import torch
from fusion_trainer import FusionConfig, FusionModel
from fusion_trainer.model.attention import GROUPED_SDPA, use_grouped_sdpa
from fusion_trainer.model.tiny import make_tiny_model
from transformers import AutoModelForCausalLM


def _inputs(vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (3, 14), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :5] = -100
    return ids, mask, labels


def test_folded_heads_give_the_plain_attention_and_gradients(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lm = AutoModelForCausalLM.from_pretrained(make_tiny_model("llama", tmp_path / "tiny"), dtype=torch.float32)
    assert lm.config.num_attention_heads > lm.config.num_key_value_heads  # grouped heads: what is folded
    plain = lm
    grouped = copy.deepcopy(lm)
    assert use_grouped_sdpa(grouped) and grouped.config._attn_implementation == GROUPED_SDPA
    ids, mask, labels = _inputs(lm.config.vocab_size)
    embeds = lm.get_input_embeddings()(ids).detach()
    results = []
    for model in (plain, grouped):
        x = embeds.clone().requires_grad_(True)
        out = model(inputs_embeds=x, attention_mask=mask, labels=labels)
        out.loss.backward()
        assert x.grad is not None
        results.append((out.logits.detach(), x.grad.clone()))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-5)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-6)

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the plain path ran for a masked batch of several tokens")

    monkeypatch.setattr(attention, "sdpa_attention_forward", refuse)
    again = grouped(input_ids=ids, attention_mask=mask).logits  # the fold runs alone here
    assert torch.allclose(again, results[0][0], atol=1e-5)


def test_a_fusion_models_lm_runs_grouped_sdpa_and_generates_the_same(tmp_path: Path) -> None:
    folder = make_tiny_model("llama", tmp_path / "tiny")
    cfg = FusionConfig(fusion="prefix", n_variables=3, d_encoder=32, encoder_heads=4, n_heads=4, encoder_depth=1,
                       n_prefix_tokens=3)  # fmt: skip
    torch.manual_seed(0)
    model = FusionModel.from_base(folder, cfg, dtype=torch.float32)
    assert model.lm.config._attn_implementation == GROUPED_SDPA
    reference = copy.deepcopy(model)
    reference.lm.set_attn_implementation("sdpa")
    climate = torch.randn(2, 2, 3, 5, 6, generator=torch.Generator().manual_seed(1))
    prompts = ["Describe this climate window:", "Describe it:"]
    assert model.generate(climate, prompts, max_new_tokens=8) == reference.generate(climate, prompts, max_new_tokens=8)


def test_models_without_sdpa_are_left_alone(tmp_path: Path) -> None:
    lm = AutoModelForCausalLM.from_pretrained(make_tiny_model("llama", tmp_path / "tiny"), dtype=torch.float32)
    lm.set_attn_implementation("eager")
    assert not use_grouped_sdpa(lm) and lm.config._attn_implementation == "eager"
