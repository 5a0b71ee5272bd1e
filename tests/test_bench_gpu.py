"""bench/gpu.py's FLOP count (`required_flops`, the MFU's numerator) against torch's own FLOP counter on a tiny
Llama: the frozen LM's forward matrix products, on the lean and the full path of each fusion variant, and the
backward of a frozen layer costing one forward (input gradients only)."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tests.script_module import load_script

BENCH = Path(__file__).resolve().parents[1] / "bench"
MATMULS = {"aten.mm", "aten.addmm", "aten.bmm"}


@pytest.fixture(scope="module")
def gpu_mod() -> ModuleType:
    return load_script(BENCH / "gpu.py", "_bench_gpu")


@pytest.mark.parametrize("fusion", ["xattn", "gated-xattn", "prefix"])
@pytest.mark.parametrize("path", ["lean", "full"])
def test_the_formula_counts_the_lm_forward_the_step_runs(gpu_mod: ModuleType, fusion: str, path: str) -> None:
    cpu = torch.device("cpu")
    model = gpu_mod.build_model(True, cpu, 0, fusion)
    model.lm.to(torch.float32)
    seq, batch = 128, 2
    inputs = gpu_mod.make_batch(batch, seq, model.lm.config.vocab_size, cpu, torch.Generator().manual_seed(0))
    logits = "none" if path == "lean" else "all"
    with torch.no_grad():
        model(**inputs, logits=logits)  # the prompt cache is filled once (prefix, lean), not in every step
    with FlopCounterMode(display=False, depth=None) as counter:
        model(**inputs, logits=logits)
    counts = counter.get_flop_counts()

    def matmuls(name: str) -> int:
        return sum(flops for op, flops in counts.get(name, {}).items() if str(op) in MATMULS)

    blocks = [name for name in counts if name.endswith(".fusion_block")]  # gated-xattn's, trainable, not the base
    assert bool(blocks) == (fusion == "gated-xattn")
    counted = matmuls("FusionModel.lm") - sum(matmuls(name) for name in blocks)
    n_soft = model.config.n_prefix_tokens if fusion == "prefix" else 0
    formula = gpu_mod.required_flops(model.lm.config, fusion, path, seq, gpu_mod.prompt_length(seq), n_soft, 0)
    assert counted == batch * formula["lm_forward_matmuls"]
    assert formula["done"] >= formula["required"] and (formula["done"] > formula["required"]) == (path == "full")


def test_a_frozen_layer_backward_is_one_forward() -> None:
    """The formula's backward counts input gradients only: autograd computes no weight gradient for a frozen base."""
    layer = torch.nn.Linear(64, 96, bias=False).requires_grad_(False)
    x = torch.randn(10, 64, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        layer(x).sum().backward()
    assert counter.get_total_flops() == 2 * (2 * 10 * 64 * 96)
