"""The climate encoder: any grid and number of time steps, masked padding, gradients everywhere; FusionConfig."""

from __future__ import annotations

import pytest
import torch
from fusion_trainer import ConfigError, FusionConfig
from fusion_trainer.errors import DataError
from fusion_trainer.model.encoder import Attention, ClimateEncoder, sincos_embedding


def _encoder(**kw: object) -> ClimateEncoder:
    torch.manual_seed(0)
    settings: dict[str, object] = {"n_variables": 3, "d_model": 32, "depth": 1, "n_heads": 4, "patch_size": 4}
    settings.update(kw)
    return ClimateEncoder(**settings)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("t", "h", "w", "patches"), [(3, 7, 9, 6), (24, 16, 16, 16), (1, 1, 1, 1), (5, 4, 13, 4)]
)
def test_any_grid_and_time_steps(t: int, h: int, w: int, patches: int) -> None:
    x = torch.randn(2, t, 3, h, w)
    pooled = _encoder().encode(x)
    assert pooled.tokens.shape == (2, t, 32) and (pooled.n_time, pooled.n_patches) == (t, 1)
    per_patch = _encoder(per_patch_tokens=True).encode(x)
    assert per_patch.tokens.shape == (2, t * patches, 32) and per_patch.n_patches == patches
    assert per_patch.per_time_step().shape == (2, t, 32)
    assert torch.isfinite(per_patch.tokens).all()


def test_padding_is_masked_not_mistaken_for_zeros() -> None:
    enc = _encoder(per_patch_tokens=True)
    x = torch.randn(1, 2, 3, 7, 9)
    padded_by_hand = torch.nn.functional.pad(x, (0, 3, 0, 1))  # (1, 2, 3, 8, 12): zeros as if they were data
    with torch.no_grad():
        masked, zeros = enc(x), enc(padded_by_hand)
    assert masked.shape == zeros.shape
    assert not torch.allclose(masked, zeros)  # the encoder knows which cells are padding


def test_time_order_and_variables_matter() -> None:
    enc = _encoder()
    x = torch.randn(1, 4, 3, 8, 8)
    with torch.no_grad():
        base = enc(x)
        swapped_vars = enc(x[:, :, [1, 0, 2]])
        reversed_time = enc(x.flip(1))
    assert not torch.allclose(base, swapped_vars)
    assert not torch.allclose(base, reversed_time.flip(1))


def test_every_encoder_parameter_gets_a_gradient() -> None:
    for per_patch in (False, True):
        enc = _encoder(per_patch_tokens=per_patch, depth=2)
        enc(torch.randn(2, 3, 3, 7, 9)).square().mean().backward()
        missing = [n for n, p in enc.named_parameters() if p.grad is None or not p.grad.any()]
        assert not missing, missing


def test_wrong_variable_axis_is_a_data_error() -> None:
    with pytest.raises(DataError, match=r"variable=3.*\(2, 3, 5, 7, 9\)"):
        _encoder()(torch.randn(2, 3, 5, 7, 9))
    with pytest.raises(DataError):
        _encoder()(torch.randn(3, 3, 7, 9))


def test_encoder_runs_in_bf16() -> None:
    enc = _encoder().to(torch.bfloat16)
    out = enc(torch.randn(1, 2, 3, 5, 6))  # float32 input is cast to the weights' dtype
    assert out.dtype == torch.bfloat16


def test_attention_heads_must_divide_the_width() -> None:
    with pytest.raises(ConfigError, match="3 attention heads"):
        Attention(32, 16, 3)


def test_sincos_embedding_shapes_and_distinct_rows() -> None:
    emb = sincos_embedding(torch.arange(5), 7)
    assert emb.shape == (5, 7) and torch.equal(emb[:, -1], torch.zeros(5))
    assert len({tuple(row.tolist()) for row in emb}) == 5


def test_fusion_config_minimal_and_defaults() -> None:
    config = FusionConfig(fusion="xattn", n_variables=4)
    assert (config.d_encoder, config.gate_init, config.lora, config.base) == (256, 0.0, None, None)
    assert FusionConfig(variables=["T2M", "U10M"]).n_variables == 2
    again = FusionConfig.model_validate(config.model_dump(mode="json"))
    assert again == config


def test_fusion_config_collects_every_problem_once() -> None:
    with pytest.raises(ConfigError) as info:
        FusionConfig(fusion="concat", n_variables=0, patch_size=0, typo=1)
    message = str(info.value)
    assert "3 problem" not in message and "4 problem(s)" in message
    for key in (
        "FusionConfig.fusion",
        "FusionConfig.n_variables",
        "FusionConfig.patch_size",
        "FusionConfig.typo",
    ):
        assert key in message
    with pytest.raises(ConfigError) as info:
        FusionConfig(d_encoder=30, encoder_heads=4, variables=["A", "A"], n_variables=3)
    message = str(info.value)
    assert "encoder_heads" in message and "duplicate" in message and "n_variables=3" in message
    with pytest.raises(ConfigError, match="normalization"):
        FusionConfig(variables=["T2M"], normalization={"U10M": {"mean": 0.0, "std": 1.0}})
    with pytest.raises(ConfigError, match="lora"):
        FusionConfig(n_variables=1, lora={"rank_typo": 4})
