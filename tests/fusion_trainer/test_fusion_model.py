"""FusionModel invariants: zero gates = the frozen LM, only fusion parameters train, any grid, adapters round-trip,
generation is batched, cached and deterministic."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from fusion_trainer import FusionConfig, FusionModel, ModelError
from fusion_trainer.errors import DataError
from fusion_trainer.model.base import load_base
from fusion_trainer.model.fusion import FusionLayer, climate_context
from fusion_trainer.model.prefix import insert_prefix, prefix_at
from fusion_trainer.model.tiny import make_tiny_model
from safetensors.torch import load_file

ARCHS = ("llama", "gpt2", "gpt_neo")
SMALL: dict[str, Any] = {
    "n_variables": 3,
    "d_encoder": 32,
    "encoder_heads": 4,
    "encoder_depth": 1,
    "n_heads": 4,
    "n_prefix_tokens": 4,
    "every_n_layers": 1,
}


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    dirs = {arch: make_tiny_model(arch, root / arch) for arch in ARCHS}  # type: ignore[arg-type]
    dirs["llama-seed1"] = make_tiny_model("llama", root / "llama-seed1", seed=1)
    return dirs


_BASES: dict[tuple[str, torch.dtype], Any] = {}


def _fresh(tiny_dirs: dict[str, Path], arch: str, dtype: torch.dtype, **overrides: Any) -> FusionModel:
    key = (arch, dtype)
    if key not in _BASES:
        _BASES[key] = load_base(tiny_dirs[arch], dtype=dtype)
    lm, tokenizer, name = _BASES[key]
    torch.manual_seed(0)
    config = FusionConfig(**{**SMALL, **overrides, "base": name})
    return FusionModel(copy.deepcopy(lm), config, tokenizer=tokenizer)


def _batch(b: int = 2, length: int = 7, grid: tuple[int, int, int] = (3, 7, 9)) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 500, (b, length), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, length - 2 :] = 0  # right padding on the last row
    t, h, w = grid
    climate = torch.randn(b, t, 3, h, w, generator=g)
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "climate": climate, "labels": labels}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["add", "xattn", "gated-xattn"])
def test_zero_gates_give_exactly_the_base_logits(
    tiny_dirs: dict[str, Path], kind: str, arch: str, dtype: torch.dtype
) -> None:
    model = _fresh(tiny_dirs, arch, dtype, fusion=kind)
    batch = _batch()
    base = _BASES[(arch, dtype)][0]
    with torch.no_grad():
        out = model(**batch)
        fused = out.logits
        ref_out = base(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
            use_cache=False,
        )  # fmt: skip
        ref = ref_out.logits
    assert fused.dtype == dtype
    assert torch.equal(fused, ref)
    # the model computes its loss itself (caption_loss): the same as transformers' for the same logits
    assert torch.allclose(out.loss.float(), ref_out.loss.float(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_text_logits_equal_the_base_given_the_same_prefix(
    tiny_dirs: dict[str, Path], arch: str
) -> None:
    model = _fresh(tiny_dirs, arch, torch.float32, fusion="prefix")
    batch = _batch()
    base = _BASES[(arch, torch.float32)][0]
    with torch.no_grad():
        fused = model(**batch).logits
        assert fused.shape == (*batch["input_ids"].shape, base.config.vocab_size)
        prefix = model.fusion(model.encoder(batch["climate"]))  # type: ignore[misc]
        text = base.get_input_embeddings()(batch["input_ids"])
        embeds = torch.cat([prefix, text], dim=1)  # right padding: the prefix goes first
        mask = torch.cat([torch.ones(2, prefix.shape[1], dtype=torch.long), batch["attention_mask"]], dim=1)
        ref = base(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits[:, prefix.shape[1] :]
    assert torch.equal(fused, ref)


def test_insert_prefix_follows_left_and_right_padding() -> None:
    text = torch.arange(1, 9, dtype=torch.float32).view(2, 4, 1)  # (B=2, L=4, H=1)
    prefix = torch.full((2, 2, 1), -1.0)
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1]])
    labels = torch.tensor([[1, 2, 3, -100], [-100, -100, 7, 8]])
    embeds, new_mask, new_labels, pos = insert_prefix(text, prefix, mask, labels)
    assert embeds[..., 0].tolist() == [[-1, -1, 1, 2, 3, 4], [5, 6, -1, -1, 7, 8]]
    assert new_mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert new_labels is not None
    assert new_labels.tolist() == [[-100, -100, 1, 2, 3, -100], [-100, -100, -100, -100, 7, 8]]
    assert pos.tolist() == [[2, 3, 4, 5], [0, 1, 4, 5]]


def test_prefix_after_prompt_goes_before_the_first_labelled_token() -> None:
    text = torch.arange(1, 9, dtype=torch.float32).view(2, 4, 1)  # (B=2, L=4, H=1)
    prefix = torch.full((2, 2, 1), -1.0)
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1]])
    labels = torch.tensor([[-100, 2, 3, -100], [-100, -100, -100, 8]])
    at = prefix_at(mask, labels, "after_prompt")
    embeds, new_mask, new_labels, pos = insert_prefix(text, prefix, mask, labels, at)
    assert embeds[..., 0].tolist() == [[1, -1, -1, 2, 3, 4], [5, 6, 7, -1, -1, 8]]
    assert new_mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert new_labels is not None
    assert new_labels.tolist() == [[-100, -100, -100, 2, 3, -100], [-100, -100, -100, -100, -100, 8]]
    assert pos.tolist() == [[0, 3, 4, 5], [0, 1, 2, 5]]
    # generation (no labels): after the last real token; a row without labels too
    assert prefix_at(mask, None, "after_prompt").tolist() == [[3], [4]]
    assert prefix_at(mask, torch.full_like(mask, -100), "after_prompt").tolist() == [[3], [4]]
    assert prefix_at(mask, labels, "start") is None


def test_prefix_position_changes_where_the_climate_enters(tiny_dirs: dict[str, Path]) -> None:
    batch = _batch()
    batch["labels"][:, :3] = -100  # a 3-token prompt
    after = _fresh(tiny_dirs, "llama", torch.float32, fusion="prefix")
    start = _fresh(tiny_dirs, "llama", torch.float32, fusion="prefix", prefix_position="start")
    with torch.no_grad():
        a, s = after(**batch).logits, start(**batch).logits
        base = _BASES[("llama", torch.float32)][0]
        plain = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # after the prompt, the predictions inside the prompt are the base's and the first caption token is predicted
    # from the last soft token (it sees the climate); at the start, every position sees it
    assert torch.allclose(a[:, :2], plain[:, :2], atol=1e-5)
    assert not torch.allclose(a[:, 2], plain[:, 2], atol=1e-3)
    assert not torch.allclose(s[:, :2], plain[:, :2], atol=1e-3)


def _base_snapshot(model: FusionModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.lm.state_dict().items() if ".fusion_block." not in k}


@pytest.mark.parametrize(
    ("kind", "arch", "dtype"),
    [
        ("add", "llama", torch.float32),
        ("xattn", "llama", torch.float32),
        ("prefix", "llama", torch.float32),
        ("gated-xattn", "llama", torch.float32),
        ("gated-xattn", "gpt_neo", torch.bfloat16),
        ("xattn", "gpt2", torch.bfloat16),
    ],
)
def test_training_moves_only_fusion_parameters(
    tiny_dirs: dict[str, Path], kind: str, arch: str, dtype: torch.dtype
) -> None:
    model = _fresh(tiny_dirs, arch, dtype, fusion=kind)
    model.train()
    before_base = _base_snapshot(model)
    named = model.fusion_named_parameters()
    before = {n: p.detach().clone() for n, p in named}
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for _, p in named}
    gates = [n for n, _ in named if n.endswith("gate")]
    assert (kind == "prefix") == (not gates)
    opt = torch.optim.AdamW(model.fusion_params(), lr=1e-2, weight_decay=0.0)
    batch = _batch()
    for step in range(3):
        opt.zero_grad()
        model(**batch).loss.backward()
        grads = {n: p.grad for n, p in named}
        if step == 0 and gates:  # tanh(0) = 0: only the gates (and what is not behind one) get a gradient
            assert all(grads[g] is not None and float(grads[g].abs()) > 0 for g in gates)
            behind = [
                n for n in grads if ("fusion" in n and not n.endswith("gate")) or n.startswith("encoder.")
            ]
            assert all(grads[n] is None or not grads[n].any() for n in behind)
        opt.step()
    assert not model.lm.training, "the base must stay in eval mode (no dropout)"
    unchanged = [n for n, p in named if torch.equal(p.detach(), before[n])]
    assert not unchanged, f"fusion parameters that never moved: {unchanged}"
    base_params = [p for n, p in model.named_parameters() if not model._is_fusion_name(n)]
    assert base_params and all(p.grad is None and not p.requires_grad for p in base_params)
    after_base = _base_snapshot(model)
    assert after_base.keys() == before_base.keys()
    assert all(torch.equal(after_base[k], before_base[k]) for k in before_base)


@pytest.mark.parametrize("kind", ["add", "xattn", "prefix", "gated-xattn"])
@pytest.mark.parametrize(("t", "h", "w"), [(3, 7, 9), (24, 16, 16), (1, 2, 3)])
def test_any_grid_and_number_of_time_steps(
    tiny_dirs: dict[str, Path], kind: str, t: int, h: int, w: int
) -> None:
    model = _fresh(tiny_dirs, "llama", torch.float32, fusion=kind, per_patch_tokens=(kind == "xattn"))
    out = model(**_batch(grid=(t, h, w)))
    assert out.logits.shape[:2] == (2, 7)
    assert torch.isfinite(out.loss)


def test_climate_shape_errors_name_the_shapes(tiny_dirs: dict[str, Path]) -> None:
    model = _fresh(tiny_dirs, "llama", torch.float32, fusion="xattn")
    batch = _batch()
    with pytest.raises(DataError, match="variable=3"):
        model(batch["input_ids"], batch["attention_mask"], torch.randn(2, 3, 4, 7, 9))
    with pytest.raises(DataError, match="batch size 1"):
        model(batch["input_ids"], batch["attention_mask"], batch["climate"][:1])


def test_gated_wrapping_keeps_the_base_state_dict_keys(tiny_dirs: dict[str, Path]) -> None:
    lm = load_base(tiny_dirs["gpt2"], dtype=torch.float32)[0]
    original = {k: v.clone() for k, v in lm.state_dict().items()}
    model = FusionModel(lm, FusionConfig(**{**SMALL, "fusion": "gated-xattn", "every_n_layers": 2}))
    assert sum(isinstance(m, FusionLayer) for m in model.lm.modules()) == 1  # 2 layers, k=2: layer 0 only
    after = model.lm.state_dict()
    assert set(original) <= set(after)
    assert all(".fusion_block." in k for k in set(after) - set(original))
    scrambled = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in original.items()}
    result = model.lm.load_state_dict(scrambled, strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys and all(".fusion_block." in k for k in result.missing_keys)
    assert torch.equal(
        model.lm.state_dict()["transformer.h.0.attn.c_attn.weight"],
        scrambled["transformer.h.0.attn.c_attn.weight"],
    )


def test_fusion_layer_without_climate_context_is_an_error(tiny_dirs: dict[str, Path]) -> None:
    model = _fresh(tiny_dirs, "llama", torch.float32, fusion="gated-xattn")
    ids = torch.randint(3, 500, (1, 4))
    with pytest.raises(ModelError, match="climate_context"):
        model.lm(input_ids=ids)
    tokens = model.encoder(torch.randn(1, 2, 3, 5, 5))
    with climate_context(tokens):
        assert model.lm(input_ids=ids).logits.shape[:2] == (1, 4)
    with pytest.raises(ModelError):  # the context is gone after the block
        model.lm(input_ids=ids)


@pytest.mark.parametrize("kind", ["xattn", "gated-xattn"])
def test_gradient_checkpointing_recomputes_layers_and_keeps_gradients(
    tiny_dirs: dict[str, Path], kind: str
) -> None:
    batch = _batch()
    grads = []
    calls = []
    for checkpointing in (False, True):
        model = _fresh(
            tiny_dirs,
            "llama",
            torch.float32,
            fusion=kind,
            gate_init=0.5,
            gradient_checkpointing=checkpointing,
        )
        model.train()
        layer = model.lm.model.layers[1]
        inner = layer.layer if isinstance(layer, FusionLayer) else layer
        counter = [0]  # the MLP runs inside the checkpointed forward (hooks on the layer itself stay outside)
        inner.mlp.register_forward_pre_hook(lambda *_, c=counter: c.__setitem__(0, c[0] + 1))
        model(**batch).loss.backward()
        calls.append(counter[0])
        grads.append({n: p.grad.clone() for n, p in model.fusion_named_parameters() if p.grad is not None})
    assert calls == [1, 2]  # checkpointed: the layer runs again in the backward pass
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)


def test_dropout_is_off_in_the_base_while_training(tiny_dirs: dict[str, Path]) -> None:
    model = _fresh(tiny_dirs, "gpt2", torch.float32, fusion="add")  # the tiny GPT-2 has dropout 0.1
    model.train()
    batch = _batch()
    first, second = model(**batch).logits, model(**batch).logits
    assert torch.equal(first, second)


def test_lora_is_trainable_saved_and_starts_as_the_base(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    model = _fresh(tiny_dirs, "llama", torch.float32, fusion="xattn", lora=lora)
    names = [n for n, _ in model.fusion_named_parameters() if "lora_" in n]
    assert len(names) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    assert model.num_parameters()["lora"] > 0
    batch = _batch()
    base = _BASES[("llama", torch.float32)][0]
    with torch.no_grad():
        ref = base(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).logits
        assert torch.equal(model(**batch).logits, ref)
    model.save_adapter(tmp_path / "a")
    assert set(names) <= set(load_file(str(tmp_path / "a" / "adapter.safetensors")))


def test_train_lm_head_unties_it_from_the_embeddings(tiny_dirs: dict[str, Path]) -> None:
    model = _fresh(tiny_dirs, "gpt2", torch.float32, fusion="add", train_lm_head=True)
    embed = model.lm.get_input_embeddings().weight
    head = model.lm.get_output_embeddings().weight
    assert head is not embed and head.requires_grad and not embed.requires_grad
    embed_before, head_before = embed.detach().clone(), head.detach().clone()
    opt = torch.optim.AdamW(model.fusion_params(), lr=1e-2)
    model(**_batch()).loss.backward()
    opt.step()
    assert torch.equal(embed, embed_before) and not torch.equal(head, head_before)


def _trained(tiny_dirs: dict[str, Path], kind: str) -> FusionModel:
    model = _fresh(tiny_dirs, "llama", torch.float32, fusion=kind)
    opt = torch.optim.AdamW(model.fusion_params(), lr=5e-2)
    for _ in range(2):
        opt.zero_grad()
        model(**_batch()).loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("kind", ["add", "prefix", "gated-xattn"])
def test_adapter_round_trip(tiny_dirs: dict[str, Path], tmp_path: Path, kind: str) -> None:
    model = _trained(tiny_dirs, kind)
    folder = model.save_adapter(tmp_path / "adapter")
    record = json.loads((folder / "fusion_config.json").read_text())
    assert record["fusion"] == kind and record["base"] == str(tiny_dirs["llama"])
    assert record["base_fingerprint"] == model.base_fingerprint and record["base_fingerprint"].startswith(
        "sha256:"
    )
    saved = load_file(str(folder / "adapter.safetensors"))
    assert set(saved) == {n for n, _ in model.fusion_named_parameters()}  # no frozen weights
    loaded = FusionModel.load_adapter(folder, dtype=torch.float32).eval()
    batch = _batch()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)
    climate = batch["climate"]
    assert loaded.generate(climate, "The wind", max_new_tokens=6) == model.generate(
        climate, "The wind", max_new_tokens=6
    )


def test_adapter_on_a_different_base_is_a_model_error(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    model = _fresh(tiny_dirs, "llama", torch.float32, fusion="xattn")
    folder = model.save_adapter(tmp_path / "adapter")
    with pytest.raises(ModelError, match="fingerprint"):
        FusionModel.load_adapter(folder, base=tiny_dirs["llama-seed1"])
    with pytest.raises(ModelError, match="adapter folder"):
        FusionModel.load_adapter(tmp_path / "missing")


@pytest.mark.parametrize("kind", ["add", "xattn", "prefix", "gated-xattn"])
def test_cached_generation_matches_full_recomputation(tiny_dirs: dict[str, Path], kind: str) -> None:
    model = _trained(tiny_dirs, kind)
    tok = model.tokenizer
    assert tok is not None
    climate = torch.randn(1, 3, 3, 7, 9)
    text = model.generate(climate, "The mean temperature", max_new_tokens=6)[0]
    ids = torch.tensor([tok("The mean temperature")["input_ids"]])
    n_prompt = ids.shape[1]
    expected = []
    with torch.no_grad():
        for _ in range(6):
            # the generated tokens are labelled, as in training, so a prefix goes after the prompt
            labels = ids.clone()
            labels[:, :n_prompt] = -100
            nxt = int(model(ids, torch.ones_like(ids), climate, labels=labels).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            expected.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    assert text == tok.decode(expected, skip_special_tokens=True)


def test_batched_left_padded_generation_matches_one_by_one(tiny_dirs: dict[str, Path]) -> None:
    model = _trained(tiny_dirs, "prefix")
    climate = torch.randn(3, 2, 3, 6, 6)
    prompts = ["Wind", "The temperature over the plains is", "Snow"]
    batched = model.generate(climate, prompts, max_new_tokens=5)
    single = [model.generate(climate[i], p, max_new_tokens=5)[0] for i, p in enumerate(prompts)]
    assert batched == single


def test_sampling_is_deterministic_under_a_seed(tiny_dirs: dict[str, Path]) -> None:
    model = _trained(tiny_dirs, "gated-xattn")
    climate = torch.randn(2, 2, 3, 5, 5)
    kw: dict[str, Any] = {"max_new_tokens": 12, "do_sample": True, "temperature": 1.5, "top_p": 0.95}
    first = model.generate(climate, "Rain", seed=7, **kw)
    assert model.generate(climate, "Rain", seed=7, **kw) == first
    others = [model.generate(climate, "Rain", seed=s, **kw) for s in (8, 9, 10)]
    assert any(o != first for o in others)
    with pytest.raises(DataError, match="2 prompts for 3"):
        model.generate(torch.randn(3, 2, 3, 5, 5), ["a", "b"])


def test_memory_estimate_does_not_allocate(tiny_dirs: dict[str, Path]) -> None:
    model = _fresh(tiny_dirs, "llama", torch.float32, fusion="xattn")
    counts = model.num_parameters()
    assert counts["trainable"] == sum(p.numel() for p in model.fusion_params())
    assert counts["frozen"] + counts["trainable"] == counts["total"]
    est = model.memory_estimate(world_size=1, zero_stage=0)
    assert est.frozen_bytes == counts["frozen"] * 4
    assert est.trainable_bytes == est.gradient_bytes == counts["trainable"] * 4
    assert est.optimizer_bytes == counts["trainable"] * 8  # fp32 weights: two fp32 moments


@pytest.mark.parametrize("kind", ["prefix", "xattn", "gated-xattn"])
def test_the_growing_cache_generates_exactly_what_the_plain_cache_does(
    tiny_dirs: dict[str, Path], kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GrowingLayer writes each new token in place instead of concatenating: the same tokens and the same logits as
    transformers' DynamicLayer, for the prompt-cached path (prefix) and the others, with left padding and a capacity
    that has to grow past its first 64 positions."""
    from fusion_trainer.model import decoding, generation

    model = _trained(tiny_dirs, kind)
    climate = torch.randn(3, 2, 3, 6, 6)
    prompts = ["Wind", "The temperature over the plains is", "Snow"] if kind != "prefix" else "The mean temperature"
    kw: dict[str, Any] = {"max_new_tokens": 80}
    grown = model.generate(climate, prompts, **kw)
    sampled = model.generate(climate, prompts, do_sample=True, seed=3, **kw)
    monkeypatch.setattr(generation, "growing_cache", lambda config, cache=None: cache)  # transformers' own cache
    assert model.generate(climate, prompts, **kw) == grown
    assert model.generate(climate, prompts, do_sample=True, seed=3, **kw) == sampled
    assert any(len(model.tokenizer(t)["input_ids"]) > 40 for t in grown), "long enough to grow the buffers"  # type: ignore[misc]
    assert decoding.growing_cache(model.lm.config).layer_class_to_replicate in (None, decoding.GrowingLayer)


def test_a_growing_layer_holds_what_a_dynamic_layer_holds() -> None:
    from fusion_trainer.model.decoding import GrowingLayer
    from transformers.cache_utils import DynamicLayer

    g = torch.Generator().manual_seed(0)
    plain, grown = DynamicLayer(), GrowingLayer()
    steps = [40, 1, 1, 30, 1]  # a prompt, then tokens; 40 + 1 + 1 + 30 > 64 forces a reallocation
    rows = 2
    for i, n in enumerate(steps):
        k, v = torch.randn(rows, 3, n, 4, generator=g), torch.randn(rows, 3, n, 4, generator=g)
        want, got = plain.update(k, v), grown.update(k, v)
        assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
        if i == 2:  # the batch operations of transformers' Cache replace the tensors: the buffer must follow
            plain.batch_repeat_interleave(2)
            grown.batch_repeat_interleave(2)
            rows *= 2
            plain.crop(-1)
            grown.crop(-1)
    assert grown.get_seq_length() == plain.get_seq_length() == 40 + 1 + 1 - 1 + 30 + 1
