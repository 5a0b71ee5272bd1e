"""The loss without the frozen base's wasted work (`forward(logits="none")`, fusion_trainer.model.lm_pass) equals the loss of
the plain pass, gradients included: logits only at target positions, and a constant prompt's cached pass."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from fusion_trainer import FusionConfig, FusionModel
from fusion_trainer.model.lm_pass import LeanCausalLM, shared_prompt_length
from fusion_trainer.model.tiny import make_tiny_model

SIZES = {"d_encoder": 32, "encoder_heads": 4, "n_heads": 4, "encoder_depth": 1, "gate_init": 0.5}


def _batch(vocab: int, prompt: int = 9, lengths: tuple[int, ...] = (7, 4, 6)) -> dict[str, torch.Tensor]:
    """A shared prompt, then captions of different lengths (right padded), like ClimateTextStream's batches."""
    g = torch.Generator().manual_seed(0)
    width = prompt + max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    head = torch.randint(3, vocab, (prompt,), generator=g)
    for i, n in enumerate(lengths):
        caption = torch.randint(3, vocab, (n,), generator=g)
        ids[i, :prompt], ids[i, prompt : prompt + n] = head, caption
        labels[i, prompt : prompt + n] = caption
        mask[i, : prompt + n] = 1
    climate = torch.randn(len(lengths), 2, 3, 5, 6, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "climate": climate}


def _grads(model: FusionModel) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.fusion_named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neo"])
@pytest.mark.parametrize(
    ("fusion", "position"),
    [("prefix", "after_prompt"), ("prefix", "start"), ("prefix", "readout"), ("add", None), ("xattn", None),
     ("gated-xattn", None)],
)  # fmt: skip
@pytest.mark.parametrize("weighted", [False, True])
def test_loss_only_equals_the_full_pass(
    tmp_path_factory: pytest.TempPathFactory, arch: str, fusion: str, position: str | None, weighted: bool
) -> None:
    folder = make_tiny_model(arch, tmp_path_factory.getbasetemp() / f"tiny-{arch}")  # type: ignore[arg-type]
    extra: dict[str, object] = {"prefix_position": position, "n_prefix_tokens": 3} if position else {}
    if position == "readout":
        extra.update(prefix_position="after_prompt", readout=True, variables=["T2M", "U10M", "V10M"],
                     normalization={v: {"mean": 280.0 if v == "T2M" else 0.0, "std": 5.0} for v in ["T2M", "U10M", "V10M"]},
                     window="1h")  # fmt: skip
    torch.manual_seed(0)
    model = FusionModel.from_base(folder, FusionConfig(fusion=fusion, n_variables=3, **SIZES, **extra),
                                  dtype=torch.float32)  # fmt: skip
    batch = _batch(model.lm.config.vocab_size)
    if position == "readout":  # readout lines of different lengths: the no-gradient pass over them is padded
        batch["climate"] = batch["climate"] * 3
        stats = model.encoder.stats_head(model.encoder.encode(batch["climate"]).tokens, batch["climate"])  # type: ignore[misc]
        assert len({len(ids) for ids in model.readout_ids(stats)}) > 1
    weights = None
    if weighted:
        weights = torch.ones(model.lm.config.vocab_size)
        weights[3::4] = 5.0
    full = model(**batch, token_weights=weights)
    full.loss.backward()
    want = _grads(model)
    model.zero_grad()
    for attempt in range(2):  # the second call reuses the cached prompt
        lean = model(**batch, token_weights=weights, logits="none")
        assert lean.logits is None
        assert lean.loss.item() == pytest.approx(full.loss.item(), rel=1e-5, abs=1e-6), attempt
        lean.loss.backward()
        got = _grads(model)
        assert set(got) == set(want)
        for name in want:
            torch.testing.assert_close(got[name], want[name] * (attempt + 1), rtol=1e-4, atol=1e-6, msg=name)
    cached = model._prompt_cache is not None and model._prompt_cache._key is not None
    assert cached == (fusion == "prefix" and position in ("after_prompt", "readout"))


def test_the_shared_prompt_is_what_every_row_attends_before_its_caption() -> None:
    batch = _batch(100)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert shared_prompt_length(ids, mask, labels) == 9
    other = ids.clone()
    other[1, 5] += 1  # a row whose prompt differs from the 6th token on
    assert shared_prompt_length(other, mask, labels) == 5
    assert shared_prompt_length(ids, mask, torch.full_like(labels, -100)) == 0


def test_the_prompt_cache_follows_the_prompt(tmp_path: Path) -> None:
    folder = make_tiny_model("llama", tmp_path / "tiny")
    model = FusionModel.from_base(folder, FusionConfig(fusion="prefix", n_variables=3, n_prefix_tokens=2, **SIZES),
                                  dtype=torch.float32)  # fmt: skip
    a = _batch(model.lm.config.vocab_size)
    b = {**a, "input_ids": a["input_ids"].clone()}
    b["input_ids"][:, 2] = 7  # another prompt: another cache, and still the plain pass's loss
    for batch in (a, b, a):
        lean, full = model(**batch, logits="none"), model(**batch)
        assert lean.loss.item() == pytest.approx(full.loss.item(), rel=1e-5)
    with pytest.raises(Exception, match="give labels"):
        model(a["input_ids"], a["attention_mask"], a["climate"], logits="none")


@pytest.mark.parametrize("fusion", ["prefix", "gated-xattn"])
def test_token_losses_equal_the_full_pass(tmp_path: Path, fusion: str) -> None:
    folder = make_tiny_model("llama", tmp_path / "tiny")
    model = FusionModel.from_base(folder, FusionConfig(fusion=fusion, n_variables=3, n_prefix_tokens=2, **SIZES),
                                  dtype=torch.float32)  # fmt: skip
    batch = _batch(model.lm.config.vocab_size)
    full = model(**batch).logits[:, :-1]
    target = batch["labels"][:, 1:]
    want = torch.nn.functional.cross_entropy(full.reshape(-1, full.shape[-1]), target.reshape(-1), ignore_index=-100,
                                             reduction="none").view(target.shape)  # fmt: skip
    got = model.token_losses(batch["input_ids"], batch["attention_mask"], batch["climate"], batch["labels"])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("readout", [False, True])
def test_generation_over_the_cached_prompt_equals_the_plain_pass(
    tmp_path_factory: pytest.TempPathFactory, arch: str, readout: bool
) -> None:
    """`generate` runs a shared prompt's keys and values from the cache (only its last token, the readout line and
    the soft tokens run per batch, padded between the two parts): the same tokens as each window alone, unpadded and
    uncached, and as the plain left-padded pass."""
    folder = make_tiny_model(arch, tmp_path_factory.getbasetemp() / f"tiny-{arch}")  # type: ignore[arg-type]
    extra: dict[str, object] = {"prefix_position": "after_prompt", "n_prefix_tokens": 3}
    if readout:  # readout lines of different lengths: the rows' padding differs
        extra.update(readout=True, variables=["T2M", "U10M", "V10M"], window="1h",
                     normalization={v: {"mean": 280.0 if v == "T2M" else 0.0, "std": 5.0} for v in ["T2M", "U10M", "V10M"]})  # fmt: skip
    torch.manual_seed(0)
    model = FusionModel.from_base(folder, FusionConfig(fusion="prefix", n_variables=3, **SIZES, **extra),
                                  dtype=torch.float32).eval()  # fmt: skip
    climate = torch.randn(4, 2, 3, 5, 6, generator=torch.Generator().manual_seed(1)) * 3
    prompt = "Example: a mild and calm day.\nDescribe this climate window:\n"
    cached = model.generate(climate, prompt, max_new_tokens=12)
    assert model._prompt_cache is not None and model._prompt_cache._key is not None, "the cache was not used"
    if readout:
        lengths = {len(ids) for ids in model.readout_ids(model.encoder.stats_head(model.encoder.encode(climate).tokens, climate))}  # type: ignore[misc]  # fmt: skip
        assert len(lengths) > 1, "the readout lines should differ in length for this test to mean anything"
    model._prompt_cache = None
    alone = [model.generate(climate[i : i + 1], prompt, max_new_tokens=12)[0] for i in range(4)]  # no padding at all
    assert cached == alone
    assert model.generate(climate, prompt, max_new_tokens=12) == alone  # the plain left-padded pass


@pytest.mark.parametrize("fusion", ["xattn", "gated-xattn"])
def test_compiled_base_layers_give_the_same_loss_and_gradients(
    tmp_path_factory: pytest.TempPathFactory, fusion: str
) -> None:
    """`compile_base: true` (compile_base_layers) changes the kernels, not the numbers: the lean loss and every
    trainable gradient match the eager model's (gated-xattn's fusion blocks stay eager); state-dict keys stay."""
    from fusion_trainer.model.fusion import FusionLayer, compile_base_layers

    folder = make_tiny_model("llama", tmp_path_factory.getbasetemp() / "tiny-llama")
    config = FusionConfig(fusion=fusion, n_variables=3, every_n_layers=1, **SIZES)
    losses, grads = [], []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = FusionModel.from_base(folder, config, dtype=torch.float32)
        layers = model.arch.decoder_layers(model.lm)
        if compiled:
            assert compile_base_layers(layers) == len(layers)
            inner = [layer.layer if isinstance(layer, FusionLayer) else layer for layer in layers]
            assert all(m._compiled_call_impl is not None for m in inner)
            keys = set(model.state_dict())
            torch._dynamo.reset()  # compile afresh (an earlier test may have compiled the same layer code)
            torch._dynamo.utils.counters.clear()
        loss = model(**_batch(model.lm.config.vocab_size), logits="none").loss
        if compiled:  # the layers really ran compiled (dynamo captured frames), the fusion blocks did not break them
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
        loss.backward()
        losses.append(loss.item())
        grads.append(_grads(model))
        if compiled:
            assert set(model.state_dict()) == keys and not any("_orig_mod" in k for k in keys), "keys unchanged"
    assert losses[1] == pytest.approx(losses[0], rel=1e-5, abs=1e-6)
    assert set(grads[1]) == set(grads[0]) and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)


def test_training_with_compile_base_follows_the_eager_run(
    make_config: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    """`compile_base: true` through the trainer (DeepSpeed, the lean loss): the same losses step by step as eager."""
    from fusion_trainer.training.train import train

    losses = []
    for compiled in (False, True):
        torch._dynamo.reset()
        config = make_config(f"run-{compiled}", steps=3, eval_every=0, compile_base=compiled)
        with caplog.at_level(logging.INFO, logger="fusion_trainer"):
            train(config)
        records = [json.loads(x) for x in (Path(config.out) / "metrics.jsonl").read_text().splitlines()]
        losses.append([r["loss"] for r in records if "loss" in r])
    assert "decoder layers of the base compiled" in caplog.text
    assert len(losses[0]) == 3 and losses[1] == pytest.approx(losses[0], rel=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neo"])
@pytest.mark.parametrize("prompt", [9, 0])
def test_the_lean_base_loss_equals_the_plain_models(tmp_path_factory: pytest.TempPathFactory, arch: str,
                                                    prompt: int) -> None:  # fmt: skip
    """fusion-eval's base loss: the shared prompt cached (all but its last token) and logits at the targets only give
    transformers' own loss; with no shared prompt (prompt 0: captions from the first token) the plain pass runs."""
    from transformers import AutoModelForCausalLM

    folder = make_tiny_model(arch, tmp_path_factory.getbasetemp() / f"tiny-{arch}")  # type: ignore[arg-type]
    lm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    b = _batch(lm.config.vocab_size, prompt=prompt)
    lean = LeanCausalLM(lm)
    with torch.no_grad():
        plain = lm(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
    for _ in range(2):  # the second batch reuses the cached prompt
        got = lean(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
        assert torch.allclose(got, plain, atol=1e-5), (float(got), float(plain))
    cached = lean._prompt._key
    assert (cached is not None and len(cached[0]) == prompt - 1) if prompt else cached is None


def test_the_readout_split_is_skipped_where_it_would_not_be_exact(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Windowed attention counts cache slots (GPT-Neo's local layers), and a mask with a hole is not the layout the
    split assumes: both keep the one pass."""
    from fusion_trainer.model.lm_pass import constant_head_first, local_attention
    from transformers import AutoConfig

    neo = AutoConfig.from_pretrained(make_tiny_model("gpt_neo", tmp_path_factory.getbasetemp() / "tiny-gpt_neo"))
    llama = AutoConfig.from_pretrained(make_tiny_model("llama", tmp_path_factory.getbasetemp() / "tiny-llama"))
    assert local_attention(neo) and not local_attention(llama)
    lm = type("LM", (), {"config": llama})()
    holed = torch.tensor([[1, 0, 1, 1]])
    args = (torch.zeros(1, 4, 8), holed, torch.tensor([[-100, 5, 6, 7]]), torch.arange(4)[None], 1, {})
    assert constant_head_first(lm, *args) is None  # type: ignore[arg-type]
    assert constant_head_first(type("LM", (), {"config": neo})(), *(args[:1] + (torch.ones(1, 4),) + args[2:])) is None  # type: ignore[arg-type]
