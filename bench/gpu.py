"""GPU profile: a fusion variant on a Llama-3-8B-shaped frozen base, DeepSpeed ZeRO-2, bf16, one GPU.

The base is built on the meta device from `fusion_trainer.preset_config("llama-3-8b")` (no download: random weights),
then materialised on the GPU (`to_empty` + normal(0, initializer_range) weights, unit norms, rotary tables rebuilt),
wrapped in a `FusionModel` (`--fusion`: xattn, one gated cross-attention at the input; gated-xattn, Flamingo blocks
before every 4th layer from layer 0; prefix, 32 soft tokens after the prompt, whose pass is cached) and trained with
the step of `fusion_trainer.training.train`: `deepspeed.initialize` with the DeepSpeed config of
`TrainConfig.deepspeed_config` (ZeRO-2, bf16, AdamW over the trainable parameters only), forward, finite check,
`engine.backward`, `engine.step`. `--path lean` (the default) is the trainer's forward (`logits="none"`: logits only
where a labelled token is predicted, the constant prompt's pass cached where the variant allows it); `--path full`
is the plain forward (logits everywhere, no cache), the path before those savings, for a side-by-side figure.
Batches: random token ids (sequence length 512) whose first 64 positions are one constant prompt shared by every row
and masked out of the loss, and random normalised climate windows (24 hourly steps x 11 variables x 16 x 16).

It prints, and writes as JSON with `--json`:
- tokens/s over the timed steps (after warm-up), each step ending in `torch.cuda.synchronize()`; a token is one of
  the sample's 512 text tokens (the prompt included, soft tokens not), so variants compare per sample;
- MFU over the work a frozen-base step must do (`required_flops`: the formula is in its docstring), against the
  device's dense bf16 peak (`fusion_trainer.metrics`: 989 TFLOP/s for H100/H200) and a measured bf16 matmul rate;
  also the older per-token figure (4 x frozen + 6 x trainable parameters) for continuity;
- peak GPU memory (allocated and reserved) against the model-state estimate of `FusionModel.memory_estimate`.

`--compile` compiles each decoder layer of the frozen base with `torch.compile`, as the trainer's `compile_base:
true` does (`fusion_trainer.model.fusion.compile_base_layers`). `--tiny` runs the same code path on a small Llama (CPU
or GPU) in seconds, and checks that the lean and the full path give the same loss: the check to run before the GPU.
`--engine torch` (or `auto` when DeepSpeed is not importable) replaces DeepSpeed with torch AdamW on the trainable
parameters (fp32 trainable, bf16 base); the output says which engine ran.

Usage:
    python bench/gpu.py --tiny                               # CPU smoke run of the whole path
    python bench/gpu.py --json gpu.json --profile prof.txt   # on one H100/H200 (about a minute)
    bash bench/gpu_suite.sh OUTDIR                           # every variant and path, one process each (~6 min)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("bench.gpu")

PROMPT_TOKENS = 64
CLIMATE_SHAPE = (24, 11, 16, 16)  # (T, V, lat, lon): one day of hourly steps, 11 variables, a 16x16 tile


def prompt_length(seq: int) -> int:
    """Tokens of the constant prompt at sequence length `seq`: PROMPT_TOKENS, at most half the sequence."""
    return min(PROMPT_TOKENS, seq // 2)


def required_flops(
    lm_config: Any, fusion: str, path: str, seq: int, prompt: int, n_soft: int, trainable: int
) -> dict[str, float]:
    """FLOPs one sample's training step must do on a frozen base, by the formula below (multiply-add = 2 FLOPs).

    With d the hidden size, n the decoder layers, P_layer one layer's parameters, P_head the LM head's (d x vocab),
    T the tokens the LM runs over, C the sum over those tokens of the keys each attends to (causal), Y the positions
    that predict a labelled token and W the trainable parameters:
        forward   2 n P_layer T  +  4 n d C  +  2 P_head Y
        backward  2 n P_layer T  +  8 n d C  +  2 P_head Y     (input gradients only: the base is frozen; attention's
                                                                backward is two matmuls per forward matmul)
        trainable 6 W T                                        (an approximation: the encoder's parameters run over
                                                                the window's patches, not the text; the whole term
                                                                is 0.75 % of the 8B xattn total, 0.4 % of prefix's)
    Every variant here feeds the climate in at or below layer 0, so the backward runs through all n layers for all T
    tokens. The embedding lookup, the elementwise work (norms, activations, rotary) and the fusion's own attention over
    the climate tokens are not counted. `lm_forward_matmuls` is the forward's first and last terms for the path run
    (what tests/test_bench_gpu.py checks against torch's FLOP counter on a tiny model).

    The lean path: for `prefix` (after the prompt, cached) T = seq - prompt + n_soft and each token also attends to
    the prompt's cached keys; for the others T = seq. Y = seq - prompt (every caption token is labelled). The full
    path computes logits at every position (Y = T) and, for `prefix`, runs the prompt too (T = seq + n_soft): work a
    frozen-base step need not do, so for it `required` keeps the lean path's count and `done` counts what it does.
    """
    d, n = int(lm_config.hidden_size), int(lm_config.num_hidden_layers)
    heads, kv = int(lm_config.num_attention_heads), int(lm_config.num_key_value_heads)
    head_dim = int(getattr(lm_config, "head_dim", None) or d // heads)
    inter, vocab = int(lm_config.intermediate_size), int(lm_config.vocab_size)
    p_layer = d * heads * head_dim * 2 + d * kv * head_dim * 2 + 3 * d * inter  # q, o, k, v, gate/up/down
    p_head = d * vocab

    def count(tokens: int, cached: int, targets: int) -> tuple[float, float]:
        keys = sum(cached + i for i in range(1, tokens + 1))  # C: causal, after `cached` keys
        matmuls = 2 * n * p_layer * tokens + 2 * p_head * targets
        fwd = matmuls + 4 * n * d * keys
        bwd = 2 * n * p_layer * tokens + 8 * n * d * keys + 2 * p_head * targets
        return float(fwd + bwd + 6 * trainable * tokens), float(matmuls)

    targets = seq - prompt
    if fusion == "prefix":
        lean = count(seq - prompt + n_soft, prompt, targets)
        run = lean if path == "lean" else count(seq + n_soft, 0, seq + n_soft)
    else:
        lean = count(seq, 0, targets)
        run = lean if path == "lean" else count(seq, 0, seq)
    return {"required": lean[0], "done": run[0], "lm_forward_matmuls": run[1]}


def tiny_config() -> Any:
    """A small Llama config with the 8B's layout (GQA, RMSNorm, SwiGLU, rope theta)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=2048, hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        tie_word_embeddings=False,
    )  # fmt: skip


def materialise(lm: torch.nn.Module, device: torch.device, seed: int) -> None:
    """Turn a meta-device causal LM into random bf16 weights on `device`, in place.

    Matrices get normal(0, initializer_range), 1-d weights (RMSNorm) ones, biases zeros. Rotary embedding modules hold
    non-persistent buffers computed in their constructor (`to_empty` leaves them as garbage), so they are rebuilt.
    """
    config: Any = lm.config
    std = float(getattr(config, "initializer_range", 0.02))
    lm.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in lm.named_parameters():
            if param.ndim >= 2:
                param.normal_(0.0, std, generator=gen)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.fill_(1.0)
    for parent in list(lm.modules()):
        for child_name, child in list(parent.named_children()):
            if hasattr(child, "inv_freq"):
                with torch.device(device):
                    setattr(parent, child_name, type(child)(config=config))
    bad = [n for n, b in lm.named_buffers() if b.is_floating_point() and not bool(torch.isfinite(b).all())]
    if bad:
        raise RuntimeError(f"buffers left uninitialised after materialising: {bad}")


def check_materialised(lm: torch.nn.Module, hf_config: Any, device: torch.device) -> None:
    """The materialised model gives the logits of one built the usual way with the same weights (rotary tables)."""
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        ref = AutoModelForCausalLM.from_config(hf_config, dtype=torch.bfloat16)
    ref.load_state_dict(lm.state_dict())
    ids = torch.arange(1, 65, device=device)[None]  # (1, 64)
    with torch.no_grad():
        same = torch.equal(lm(input_ids=ids).logits, ref(input_ids=ids).logits)
    if not same:
        raise RuntimeError("the materialised model differs from a normally built one with the same weights")
    print("materialised model checked against a normally built one: same logits", flush=True)


def build_model(tiny: bool, device: torch.device, seed: int, fusion: str = "xattn") -> Any:
    """The FusionModel (`fusion`) on a meta-built, materialised Llama base; trainable modules on `device`."""
    from fusion_trainer import FusionConfig, FusionModel, preset_config
    from transformers import AutoModelForCausalLM

    hf_config = tiny_config() if tiny else preset_config("llama-3-8b")
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(hf_config, dtype=torch.bfloat16)
    materialise(lm, device, seed)
    if tiny:
        check_materialised(lm, hf_config, device)
    heads = 8 if tiny else 32
    config = FusionConfig(fusion=fusion, n_variables=CLIMATE_SHAPE[1], n_heads=heads)
    torch.manual_seed(seed)
    model = FusionModel(lm, config)
    model.to(device)  # the encoder and fusion module (created in fp32 on the CPU); the base is already there
    return model


def make_batch(
    batch: int, seq: int, vocab: int, device: torch.device, gen: torch.Generator
) -> dict[str, Any]:
    """Random token ids after one constant prompt (the same in every row, masked from the loss) and random
    normalised climate windows."""
    prompt = prompt_length(seq)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen, device=device)  # (B, L)
    ids[:, :prompt] = ids[:1, :prompt]  # the prompt every sample shares, as in the trainer's batches
    labels = ids.clone()
    labels[:, :prompt] = -100
    climate = torch.randn((batch, *CLIMATE_SHAPE), generator=gen, device=device)  # (B, T, V, H, W)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "climate": climate}


class DeepSpeedStep:
    """The step of fusion_trainer.training.train on a DeepSpeed engine built from TrainConfig's DeepSpeed config."""

    name = "deepspeed"

    def __init__(self, model: Any, micro_batch: int, zero: int, logits: str = "none") -> None:
        import deepspeed
        from fusion_trainer.config import TrainConfig
        from fusion_trainer.training.launch import ensure_dist_env
        from fusion_trainer.training.train import _param_groups, _promote_scalar_params

        ensure_dist_env()
        if not torch.distributed.is_initialized():
            deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        cfg = TrainConfig(
            shards="-", model="-", out="-", zero=zero, micro_batch=micro_batch, bf16=True, lr=1e-4
        )
        self.ds_config = cfg.deepspeed_config(1)
        _promote_scalar_params(model)
        self.engine, *_ = deepspeed.initialize(
            model=model, model_parameters=_param_groups(model, 0.0), config=self.ds_config
        )
        self.engine.train()
        self.logits = logits

    def __call__(self, batch: dict[str, Any]) -> float:
        out = self.engine(**batch, logits=self.logits)
        loss = out.loss
        if not bool(torch.isfinite(loss.detach()).item()):
            raise RuntimeError(f"loss is {loss.item()}")
        self.engine.backward(loss)
        self.engine.step()
        return float(loss.detach())


class TorchStep:
    """Fallback without DeepSpeed: torch AdamW on the fusion parameters (fp32), bf16 frozen base."""

    name = "torch-adamw"

    def __init__(self, model: Any, micro_batch: int, zero: int, logits: str = "none") -> None:
        self.model = model
        self.logits = logits
        self.ds_config = None
        params = [p for p in model.parameters() if p.requires_grad]
        fused = bool(params) and params[0].is_cuda
        self.opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), fused=fused)
        model.train()

    def __call__(self, batch: dict[str, Any]) -> float:
        loss = self.model(**batch, logits=self.logits).loss
        if not bool(torch.isfinite(loss.detach()).item()):
            raise RuntimeError(f"loss is {loss.item()}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())


def check_paths(model: Any, batch: dict[str, Any]) -> dict[str, float]:
    """The lean path's loss (`logits="none"`) and the full path's on one batch, no gradient: they must agree."""
    with torch.no_grad():
        lean = float(model(**batch, logits="none").loss)
        full = float(model(**batch, logits="all").loss)
    diff = abs(lean - full)
    print(f"lean path loss {lean:.6f}, full path {full:.6f}: |difference| {diff:.2e}", flush=True)
    if not diff <= 1e-2 * max(1.0, abs(full)):
        raise RuntimeError(f"the lean and the full path disagree: {lean} vs {full}")
    return {"lean": lean, "full": full, "abs_diff": diff}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, n: int) -> float:
    """Measured dense bf16 matmul FLOP/s (n x n x n, mean of 10 after 3 warm-ups)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 10 * 2 * n**3 / (time.perf_counter() - t0)


def timed(
    step: Any, batches: list[dict[str, Any]], warmup: int, steps: int, device: torch.device
) -> dict[str, Any]:
    losses = []
    for i in range(warmup):
        losses.append(step(batches[i % len(batches)]))
    sync(device)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        losses.append(step(batches[(warmup + i) % len(batches)]))
        sync(device)
        times.append(time.perf_counter() - t0)
    return {"step_s": times, "losses": losses}


def profile_steps(step: Any, batch: dict[str, Any], device: torch.device, path: Path) -> None:
    """Two steps under the torch profiler; the top operators by device (or CPU) time into `path`."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(2):
            step(batch)
        sync(device)
    key = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    path.write_text(prof.key_averages().table(sort_by=key, row_limit=30), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="small Llama, same code path (CPU check)")
    parser.add_argument("--seq", type=int, default=512, help="sequence length")
    parser.add_argument(
        "--micro-batch", type=int, nargs="+", default=[8], help="one run per value (same engine)"
    )
    parser.add_argument("--zero", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--engine", choices=["auto", "deepspeed", "torch"], default="auto")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--profile", type=Path, default=None, help="write a torch profiler table here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fusion", choices=["xattn", "gated-xattn", "prefix"], default="xattn")
    parser.add_argument("--path", choices=["lean", "full"], default="lean",
                        help="lean: the trainer's forward (logits='none'); full: logits everywhere, no prompt cache")
    parser.add_argument("--compile", action="store_true", help="torch.compile each decoder layer of the base")
    opts = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "tiny": opts.tiny, "seq": opts.seq, "zero": opts.zero,
        "fusion": opts.fusion, "path": opts.path, "compile": opts.compile, "prompt_tokens": prompt_length(opts.seq),
    }  # fmt: skip
    import transformers

    result["transformers"] = transformers.__version__
    t0 = time.perf_counter()
    model = build_model(opts.tiny, device, opts.seed, opts.fusion)
    counts = model.num_parameters()
    est = model.memory_estimate(world_size=1, zero_stage=opts.zero)
    result.update(build_s=time.perf_counter() - t0, parameters=counts, model_state_estimate=est.as_dict())
    print(f"model built in {result['build_s']:.1f} s: {counts}", flush=True)
    vocab = int(model.lm.config.vocab_size)
    gen = torch.Generator(device=device).manual_seed(opts.seed)
    if opts.tiny:
        result["lean_vs_full_loss"] = check_paths(model, make_batch(4, opts.seq, vocab, device, gen))
    if opts.compile:  # what TrainConfig.compile_base does in training
        from fusion_trainer.model.fusion import compile_base_layers

        compile_base_layers(model.arch.decoder_layers(model.lm))

    engine_cls: Any = TorchStep
    if opts.engine in ("auto", "deepspeed"):
        try:
            import deepspeed

            result["deepspeed"] = deepspeed.__version__
            engine_cls = DeepSpeedStep
        except ImportError as exc:
            if opts.engine == "deepspeed":
                raise SystemExit(f"--engine deepspeed: cannot import deepspeed ({exc})") from exc
            print(f"deepspeed not importable ({exc}); falling back to torch AdamW", flush=True)
    t0 = time.perf_counter()
    step = engine_cls(model, opts.micro_batch[0], opts.zero, "none" if opts.path == "lean" else "all")
    result.update(engine=engine_cls.name, engine_init_s=time.perf_counter() - t0, ds_config=step.ds_config)
    print(f"engine {engine_cls.name} ready in {result['engine_init_s']:.1f} s", flush=True)

    from fusion_trainer.metrics import device_peak_flops, flops_per_token

    fpt = flops_per_token(counts["trainable"], counts["frozen"])
    n_soft = model.config.n_prefix_tokens if opts.fusion == "prefix" else 0
    flops = required_flops(model.lm.config, opts.fusion, opts.path, opts.seq, prompt_length(opts.seq),
                           n_soft, counts["trainable"])  # fmt: skip
    peak = device_peak_flops(device)
    measured_peak = matmul_rate(device, 8192 if device.type == "cuda" else 512)
    result.update(flops_per_token=fpt, flops_per_sample=flops, peak_bf16_flops=peak,
                  measured_matmul_flops=measured_peak)  # fmt: skip
    runs = []
    for mb in opts.micro_batch:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            batches = [make_batch(mb, opts.seq, vocab, device, gen) for _ in range(2)]
            t = timed(step, batches, opts.warmup, opts.steps, device)
        except torch.OutOfMemoryError as exc:
            runs.append({"micro_batch": mb, "error": f"out of memory: {str(exc)[:200]}"})
            print(f"micro-batch {mb}: out of memory", flush=True)
            continue
        mean_s = sum(t["step_s"]) / len(t["step_s"])
        tps = mb * opts.seq / mean_s
        sps = mb / mean_s
        run = {
            "micro_batch": mb, "step_s_mean": mean_s, "step_s_min": min(t["step_s"]), "tokens_per_s": tps,
            "samples_per_s": sps, "required_flop_s": sps * flops["required"], "done_flop_s": sps * flops["done"],
            "mfu": sps * flops["required"] / peak if peak else None,
            "mfu_vs_measured_matmul": sps * flops["required"] / measured_peak,
            "mfu_4n6w_per_token": tps * fpt / peak if peak else None, "losses": t["losses"],
        }  # fmt: skip
        if device.type == "cuda":
            run["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            run["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
        runs.append(run)
        mfu = f"{run['mfu']:.3f}" if run["mfu"] is not None else "n/a"
        print(f"{opts.fusion} {opts.path}{' compiled' if opts.compile else ''} micro-batch {mb} x seq {opts.seq}: "
              f"{mean_s * 1000:.1f} ms/step, {tps:,.0f} tokens/s, MFU {mfu} "
              f"(vs measured matmul {run['mfu_vs_measured_matmul']:.3f}), peak "
              f"{run.get('peak_allocated_gib', float('nan')):.1f} GiB allocated", flush=True)  # fmt: skip
    result["runs"] = runs
    if opts.json is not None:
        tmp = opts.json.with_name(f".{opts.json.name}.tmp")
        tmp.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
        tmp.replace(opts.json)
    if opts.profile is not None and any("error" not in r for r in runs):
        mb = next(r["micro_batch"] for r in runs if "error" not in r)
        try:
            profile_steps(step, make_batch(mb, opts.seq, vocab, device, gen), device, opts.profile)
            print(f"profile written to {opts.profile}", flush=True)
        # the figures are already written: a profiler failure must not lose them
        except Exception as exc:
            print(f"profiling failed: {type(exc).__name__}: {exc}", flush=True)
    print(
        json.dumps({k: v for k, v in result.items() if k not in ("ds_config", "runs")}, default=str),
        flush=True,
    )
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    os.environ.pop("MASTER_PORT", None)


if __name__ == "__main__":
    main()
