"""Generation over a prompt held once (`fusion_trainer.model.shared_prefix`): the attention over the prompt and each
row's own part equals the attention over the prompt copied to every row, and `generate` gives the same text."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from fusion_trainer import FusionConfig, FusionModel
from fusion_trainer.model import generation
from fusion_trainer.model.shared_prefix import SharedPrefixLayer, prefix_attention
from fusion_trainer.model.tiny import make_tiny_model


def _layer_and_inputs(b: int, q_len: int, own: int, seed: int = 0) -> tuple[SharedPrefixLayer, Any, Any, Any, Any]:
    g = torch.Generator().manual_seed(seed)
    heads, kv, dim, prompt = 6, 2, 8, 11
    layer = SharedPrefixLayer(torch.randn(1, kv, prompt, dim, generator=g), torch.randn(1, kv, prompt, dim, generator=g))
    query = torch.randn(b, heads, q_len, dim, generator=g)
    key, value = torch.randn(b, kv, own, dim, generator=g), torch.randn(b, kv, own, dim, generator=g)
    copied_k = torch.cat([layer.prefix_keys.expand(b, -1, -1, -1), key], dim=2)
    copied_v = torch.cat([layer.prefix_values.expand(b, -1, -1, -1), value], dim=2)
    return layer, query, (key, value), (copied_k, copied_v), prompt


def _reference(query: Any, keys: Any, values: Any, mask: Any) -> Any:
    groups = query.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
    return torch.nn.functional.scaled_dot_product_attention(query, keys, values, attn_mask=mask).transpose(1, 2)


@pytest.mark.parametrize("q_len", [1, 5, 9])
@pytest.mark.parametrize("padded", [False, True])
def test_prefix_attention_equals_the_copied_prompt(q_len: int, padded: bool) -> None:
    """Left padding between the prompt and a row's own part, and the causal part of a prefill; mask or none. At
    q_len 9 every own token is new, so the padding slots are queries that see nothing of their own part (only the
    prompt): their own part must weigh nothing."""
    b, own = 3, 9
    layer, query, (key, value), (ck, cv), prompt = _layer_and_inputs(b, q_len, own)
    total = prompt + own
    mask = torch.ones(b, 1, q_len, total, dtype=torch.bool)
    mask &= torch.arange(total)[None] <= torch.arange(total - q_len, total)[:, None]  # causal, last queries
    if padded:
        mask[0, ..., prompt : prompt + 3] = False  # row 0: three padding slots after the prompt
        mask[2, ..., prompt : prompt + 1] = False
    want = _reference(query, ck, cv, mask)
    got = prefix_attention(layer, query, key, value, mask, None)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    if not padded:  # no mask given: causal over the own part, everything of the prompt
        torch.testing.assert_close(prefix_attention(layer, query, key, value, None, None), want, rtol=1e-5, atol=1e-6)


def test_a_shared_prefix_layer_holds_the_prompt_once_and_rows_their_own() -> None:
    layer, _, _, _, prompt = _layer_and_inputs(2, 1, 1)
    assert layer.get_seq_length() == prompt and layer.own_length() == 0
    keys, _ = layer.update(torch.randn(4, 2, 5, 8), torch.randn(4, 2, 5, 8))
    assert keys.shape == (4, 2, 5, 8) and layer.get_seq_length() == prompt + 5
    layer.batch_select_indices(torch.tensor([0, 3]))
    keys, _ = layer.update(torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8))
    assert keys.shape == (2, 2, 6, 8) and layer.get_seq_length() == prompt + 6
    assert layer.prefix_keys.shape[0] == 1


@pytest.mark.parametrize("readout", [False, True])
def test_generation_with_the_prompt_held_once_equals_the_copied_prompt(
    tmp_path_factory: pytest.TempPathFactory, readout: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A grouped-query tiny Llama (4 heads on 2), prefix after the prompt: the same greedy text, and the held-once
    cache is what ran (the model's attention is `grouped_sdpa`, on a CPU)."""
    folder = make_tiny_model("llama", tmp_path_factory.getbasetemp() / "tiny-llama-shared")
    extra: dict[str, Any] = {}
    if readout:
        names = ["T2M", "U10M", "V10M"]
        extra = {"readout": True, "variables": names, "window": "1h",
                 "normalization": {v: {"mean": 280.0 if v == "T2M" else 0.0, "std": 5.0} for v in names}}  # fmt: skip
    torch.manual_seed(0)
    config = FusionConfig(fusion="prefix", prefix_position="after_prompt", n_prefix_tokens=3, n_variables=3,
                          d_encoder=32, encoder_heads=4, n_heads=4, encoder_depth=1, **extra)  # fmt: skip
    model = FusionModel.from_base(folder, config, dtype=torch.float32).eval()
    with torch.no_grad():  # the climate matters to every row
        for p in model.fusion_params():
            p.add_(torch.randn_like(p) * 0.5)
    climate = torch.randn(5, 2, 3, 5, 6, generator=torch.Generator().manual_seed(1)) * 3
    prompt = "Example: a mild and calm day.\nDescribe this climate window:\n"
    kinds: list[type] = []
    real = generation.decode

    def spy(*args: Any, cache: Any = None, **kw: Any) -> list[list[int]]:
        kinds.append(type(cache.layers[0]))
        return real(*args, cache=cache, **kw)

    monkeypatch.setattr(generation, "decode", spy)
    held = model.generate(climate, prompt, max_new_tokens=20)
    monkeypatch.setattr(generation, "shared_prefix_cache", lambda config, prompt: None)  # the copied prompt
    assert model.generate(climate, prompt, max_new_tokens=20) == held
    assert kinds[0] is SharedPrefixLayer and kinds[1] is not SharedPrefixLayer
    assert len(set(held)) > 1


def test_windowed_or_capped_attention_keeps_the_copied_prompt() -> None:
    from fusion_trainer.model.shared_prefix import shared_prefix_cache
    from transformers import DynamicCache, LlamaConfig

    config = LlamaConfig(hidden_size=16, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1)
    prompt = DynamicCache(config=config)
    prompt.update(torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8), 0)
    assert isinstance(shared_prefix_cache(config, prompt).layers[0], SharedPrefixLayer)  # type: ignore[union-attr]
    config.sliding_window = 2
    assert shared_prefix_cache(config, prompt) is None
