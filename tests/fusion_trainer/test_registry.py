"""The architecture registry, presets and the meta-device memory estimate."""

from __future__ import annotations

import pytest
import torch
from fusion_trainer import FusionConfig, FusionModel, UnsupportedArchitectureError
from fusion_trainer.errors import ConfigError
from fusion_trainer.model.registry import (
    ARCHITECTURES,
    architecture_for,
    estimate_memory,
    preset_config,
    supported_architectures,
)
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PretrainedConfig,
    Qwen2Config,
)

TINY: dict[str, PretrainedConfig] = {
    "llama": LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2),
    "mistral": MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2),
    "qwen2": Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2),
    "gpt2": GPT2Config(vocab_size=64, n_embd=32, n_layer=3, n_head=4, n_positions=64),
    "gpt_neo": GPTNeoConfig(vocab_size=64, hidden_size=32, num_layers=3, num_heads=4, max_position_embeddings=64,
                            attention_types=[[["global", "local"], 1], [["global"], 1]], window_size=16),
}  # fmt: skip


def test_every_registered_architecture_has_a_tiny_case() -> None:
    assert set(TINY) == set(ARCHITECTURES) == set(supported_architectures())


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_registry_paths_resolve_on_real_models(model_type: str) -> None:
    model = AutoModelForCausalLM.from_config(TINY[model_type])
    spec = architecture_for(model)
    assert spec is architecture_for(model.config) and spec.model_type == model_type
    layers = spec.decoder_layers(model)
    assert isinstance(layers, nn.ModuleList) and len(layers) == 3 == spec.n_layers(model.config)
    assert spec.input_embeddings(model) is model.get_input_embeddings()
    assert spec.output_head(model) is model.get_output_embeddings()
    assert spec.hidden_size(model.config) == 32
    norm = spec.norm(model)
    assert sum(p.numel() for p in norm.parameters()) in (32, 64)  # RMSNorm weight or LayerNorm weight + bias


def test_unknown_architecture_lists_the_supported_ones() -> None:
    with pytest.raises(UnsupportedArchitectureError) as info:
        architecture_for(OPTConfig())
    message = str(info.value)
    assert "'opt'" in message
    for name in supported_architectures():
        assert name in message
    assert isinstance(info.value, ConfigError)


def test_from_base_rejects_an_unknown_architecture_before_wrapping() -> None:
    opt = AutoModelForCausalLM.from_config(
        OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, ffn_dim=64,
                  word_embed_proj_dim=32, max_position_embeddings=32)
    )  # fmt: skip
    with pytest.raises(UnsupportedArchitectureError, match="supported: gpt2, gpt_neo, llama, mistral, qwen2"):
        FusionModel.from_base(opt, FusionConfig(n_variables=2))


def test_the_llama_3_8b_estimate_runs_on_the_meta_device() -> None:
    config = preset_config("llama-3-8b")
    assert (config.hidden_size, config.num_hidden_layers, config.num_key_value_heads) == (4096, 32, 8)
    assert config.rope_parameters["rope_theta"] == 500000.0
    model = FusionModel.from_config(config, FusionConfig(fusion="gated-xattn", n_variables=8))
    assert all(p.is_meta for p in model.parameters())
    assert model.base_fingerprint is None
    counts = model.num_parameters()
    assert 8.0e9 < counts["frozen"] < 8.1e9  # Llama-3-8B: 8.03 B parameters
    single = model.memory_estimate(world_size=1, zero_stage=0)
    assert 15.9e9 < single.frozen_bytes < 16.2e9  # bf16
    assert single.optimizer_bytes == counts["trainable"] * 8  # fp32 trainable weights: two fp32 moments
    sharded = model.memory_estimate(world_size=8, zero_stage=2)
    assert sharded.frozen_bytes == single.frozen_bytes and sharded.trainable_bytes == single.trainable_bytes
    assert sharded.gradient_bytes == -(-single.gradient_bytes // 8)
    assert sharded.optimizer_bytes == -(-single.optimizer_bytes // 8)
    zero3 = model.memory_estimate(world_size=8, zero_stage=3)
    assert zero3.frozen_bytes == -(-single.frozen_bytes // 8)
    assert zero3.total_bytes < sharded.total_bytes < single.total_bytes


def test_memory_arithmetic_per_zero_stage() -> None:
    # bf16 trainable weights: fp32 master + two moments = 12 bytes per parameter in the optimizer
    est = [estimate_memory(1000, 100, 200, world_size=4, zero_stage=s) for s in range(4)]
    assert [e.optimizer_bytes for e in est] == [1200, 300, 300, 300]
    assert [e.gradient_bytes for e in est] == [200, 200, 50, 50]
    assert [e.trainable_bytes for e in est] == [200, 200, 200, 50]
    assert [e.frozen_bytes for e in est] == [1000, 1000, 1000, 250]
    assert est[0].as_dict()["total_bytes"] == 1000 + 200 + 200 + 1200
    with pytest.raises(ConfigError, match="zero_stage"):
        estimate_memory(1, 1, 4, world_size=1, zero_stage=4)


def test_unknown_preset_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="llama-3-8b"):
        preset_config("gpt-5")


def test_smollm2_preset_matches_its_size() -> None:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(preset_config("smollm2-135m"))
    unique = {id(p): p.numel() for p in model.parameters()}
    assert 134e6 < sum(unique.values()) < 136e6
