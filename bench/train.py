"""Training benchmark: our step (`fusion_trainer.training.train`) vs the Hugging Face `Trainer`, same DeepSpeed config.

Both sides train the same `FusionModel` (same base, fusion config, dtype and seed) on the same dataset (built as in
`bench/stream.py`: synthetic MERRA-2, 24 x 11 x 8 x 8 windows with captions) with the same micro-batch and the same
DeepSpeed config (`TrainConfig.deepspeed_config`: ZeRO-2, AdamW with torch_adam, clipping 1.0, bf16 as configured), on
one rank. Each run is a fresh child process (`bench/_child.py`: its own peak RSS, VmHWM from /proc, else `os.wait4`):

- `ours`: `fusion_trainer.training.train.train(TrainConfig(...))`; steady-state samples/s from the wall-clock times of its
  `metrics.jsonl` records (the first interval, with warm-up, dropped);
- `hf`: `transformers.Trainer` with `TrainingArguments(deepspeed=<the same dict>)` on a map-style dataset of the same
  samples, decoded, normalised and tokenised once up front by our own functions (so its data loading is cheaper than
  ours, which streams), collated by our `collate`; samples/s from a callback's step-end times over the same steps.

Also measured in the `ours` child, after training: the data pipeline's time per batch (`ClimateTextStream`, same
tokenizer, micro-batch and max_length, 0 workers) over the step time (target <= 0.05), and the peak RSS over a model
of memory: frozen bytes + trainable bytes x 16 / world + activations (Korthikanti et al.: per layer 34 s b h + 5 a s^2 b
bytes at 16 bits, scaled by the dtype, plus the logits in the dtype and twice in fp32), with the RSS the process had
before the model was loaded (imports, dataset) taken off first (target <= 1.3).

Kinds: `tiny` (a 2-layer Llama, xattn), `smollm2` (SmolLM2-135M, gated-xattn, micro-batch 2) and `demo` (the demo's
training as configured in pipelines/demo-train.yaml, on a synthetic dataset of the demo's 5 variables and hourly
windows; fp32 on both sides). Each kind runs `--rounds` ours/HF pairs, alternating, and the ratio is the median pair.
The memory model has two measured runtime terms besides: the fixed runtime (`_child_runtime`: gloo, a DeepSpeed
engine, tokenizer and data stream with a one-parameter model) and the base checkpoint's mapped bytes. The `ours`
child also reports the padding waste of its batches with and without the run's `length_groups`.

Usage:
    python bench/train.py                    # tiny, SmolLM2-135M and the demo (the base fetched into the work folder)
    python bench/train.py --quick            # tiny (20 steps) and the demo (4 steps), one round
    python bench/train.py --quick --models demo --smollm2 DIR
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _child import dispatch_child, own_peak_rss_mib, run_child

MODELS: dict[str, dict[str, Any]] = {
    "tiny": {
        "fusion": {"fusion": "xattn", "d_encoder": 32, "encoder_heads": 4, "encoder_depth": 1, "n_heads": 4},
        "micro_batch": 8, "bf16": False, "max_length": 512, "steps": 40, "log_every": 5,
    },
    # pipelines/train-smollm2.yaml's model and fusion; micro-batch 2, fp32 and 6 steps keep a CPU run short (bf16
    # matmuls are several times slower than fp32 on a CPU without AMX: 42 s a step at micro-batch 4 here)
    "smollm2": {
        "fusion": {"fusion": "gated-xattn", "d_encoder": 256, "encoder_depth": 2, "encoder_heads": 8, "n_heads": 9,
                   "every_n_layers": 6},
        "micro_batch": 2, "bf16": False, "max_length": 256, "steps": 6, "log_every": 2,
    },
    # the demo's training run as it is: pipelines/demo-train.yaml (SmolLM2-135M, prefix after the prompt + readout,
    # the demo's micro-batch and max_length, caption "numbers", number and stats losses, bf16 auto), fewer steps
    # bf16 false on both sides: HF Trainer's bf16 on a CPU (autocast, use_cpu) stopped in backward with "Found dtype
    # BFloat16 but expected Float" on this model; fp32 is what `bf16: auto` gives on a CPU without fast bf16
    "demo": {"yaml": "pipelines/demo-train.yaml", "steps": 10, "log_every": 2, "bf16": False},
}  # fmt: skip
ROOT = Path(__file__).resolve().parent.parent
DEMO_DATASET: dict[str, Any] = {
    "variables": "T2M,U10M,V10M,SLP,PRECTOT",
    "window": "1h",
    "tile": "8x8",
    "days": 4,
}
"""The demo's dataset shape on synthetic granules: its 5 variables (pipelines/demo-build.yaml) and hourly windows
(24 x 12 samples a day), so that its prompt and captions have the demo's lengths (with the 11 variables of the other
kinds the demo prompt alone is 390 SmolLM2 tokens, near the demo's max_length)."""


def _env() -> None:
    from fusion_trainer.training.launch import free_port

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    os.environ.update(MASTER_PORT=str(free_port()), DS_ACCELERATOR="cpu")


def _steady_rate(times: list[tuple[int, float]], micro_batch: int) -> float:
    """Samples/s between the first and last (step, time) marks (warm-up before the first mark is excluded)."""
    (s0, t0), (s1, t1) = times[0], times[-1]
    return (s1 - s0) * micro_batch / (t1 - t0)


def _memory_model(
    model: Any, micro_batch: int, seq: int, bf16: bool, run: int | None = None, targets: int | None = None
) -> dict[str, float]:
    """Bytes: frozen + trainable x 16 / world + activations (see the module docstring).

    `run`: tokens the LM runs over with a gradient (default `seq`; less when a constant prompt's pass is cached),
    each attending to `seq` keys; `targets`: logits rows per sample (default `seq`; the lean pass computes them at
    the labelled positions only)."""
    lm_config = model.lm.config
    counts = model.num_parameters()
    frozen = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not p.requires_grad)
    h, layers = int(lm_config.hidden_size), int(lm_config.num_hidden_layers)
    heads, vocab = int(lm_config.num_attention_heads), int(lm_config.vocab_size)
    scale = (2 if bf16 else 4) / 2
    run = seq if run is None else run
    per_layer = (34 * run * micro_batch * h + 5 * heads * run * seq * micro_batch) * scale
    logits = micro_batch * (seq if targets is None else targets) * vocab * ((2 if bf16 else 4) + 8)
    activations = layers * per_layer + logits
    trainable = counts["trainable"] * 16
    return {"frozen": frozen, "trainable_x16": trainable, "activations": activations,
            "total": frozen + trainable + activations}  # fmt: skip


def _config(args: dict[str, Any], side: str) -> Any:
    """The run's TrainConfig: the pipeline file's (with the bench's data, model, out, steps) or the spec's."""
    from fusion_trainer.config import TrainConfig

    spec = MODELS[args["kind"]]
    steps = int(args.get("steps") or spec["steps"])
    if "yaml" in spec:
        extra: dict[str, Any] = (
            {} if side == "ours" else {"length_groups": 1}
        )  # HF batches in the order given
        if "bf16" in spec:
            extra["bf16"] = spec["bf16"]
        return TrainConfig.from_yaml(ROOT / spec["yaml"], shards=args["ref"], model=args["model"], out=args["out"],
                                     steps=steps, log_every=spec["log_every"], warmup_steps=0, eval_every=0,
                                     save_every=0, log_keys=False, verify_frozen=False, **extra)  # fmt: skip
    return TrainConfig(
        shards=args["ref"], model=args["model"], out=args["out"], fusion=spec["fusion"], zero=2,
        steps=steps, micro_batch=spec["micro_batch"], lr=1e-3, bf16=spec["bf16"], max_length=spec["max_length"],
        log_every=spec["log_every"], warmup_steps=0, num_workers=0, log_keys=False,
    )  # fmt: skip


def _tokenizer(model: str) -> Any:
    """The base's tokenizer, padding with EOS where it has no pad token (as the trainer does)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _train_stream(ds: Any, tok: Any, cfg: Any, **extra: Any) -> Any:
    """The train split streamed with a run config's prompt, micro-batch, max_length and caption (+ `extra`)."""
    from fusion_trainer.data.stream import ClimateTextStream, render_prompt

    return ClimateTextStream(ds, "train", tok, prompt=render_prompt(cfg.prompt_template, ds, cfg.caption),
                             micro_batch=cfg.micro_batch, max_length=cfg.max_length, caption=cfg.caption,
                             **extra)  # fmt: skip


def _padding_waste(stream: Any, epochs: int = 3) -> dict[str, float]:
    """Padded share of the token slots of `epochs` epochs of batches: over the whole (B, L) input, and over the part
    after the shared prompt (what the LM runs over when the prompt's pass is cached: caption + padding)."""
    it = iter(stream)
    pad = slots = pad_tail = slots_tail = 0
    n_prompt = len(stream.prompt_ids)
    for _ in range(epochs * stream.batches_per_epoch):
        mask = next(it)["attention_mask"]
        pad, slots = pad + int((mask == 0).sum()), slots + mask.numel()
        tail = mask[:, n_prompt:]
        pad_tail, slots_tail = pad_tail + int((tail == 0).sum()), slots_tail + tail.numel()
    return {"whole": pad / slots, "after_prompt": pad_tail / max(slots_tail, 1)}


def _child_runtime(args: dict[str, Any]) -> None:
    """The memory model's fixed runtime term, measured: everything a training process holds besides the model
    (gloo process group, a DeepSpeed ZeRO-2 engine and optimizer, the tokenizer, the data stream and its batches),
    with a one-parameter model in place of the fusion model."""
    import deepspeed
    import torch
    from fusion_trainer.data.stream import as_built, open_shards

    _env()
    base_rss = own_peak_rss_mib()
    cfg = _config(args, "ours")
    deepspeed.init_distributed(dist_backend="gloo")
    tiny = torch.nn.Linear(1, 1)
    engine, *_ = deepspeed.initialize(model=tiny, model_parameters=tiny.parameters(),
                                      config=cfg.deepspeed_config(1, bf16=False))  # fmt: skip
    tok = _tokenizer(args["model"])
    ds = open_shards(args["ref"])
    stream = _train_stream(ds, tok, cfg, stats=cfg.stats_loss_weight > 0, length_groups=cfg.length_groups)
    batches = iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=cfg.num_workers, collate_fn=as_built))
    for _ in range(2 * stream.batches_per_epoch):
        batch = next(batches)
        loss = engine(batch["climate_x"].float().mean(dim=(1, 2, 3, 4))[:, None]).mean()
        engine.backward(loss)
        engine.step()
    print(json.dumps({"runtime_mib": own_peak_rss_mib() - base_rss, "base_rss_mib": base_rss,
                      "peak_rss_mib": own_peak_rss_mib()}))  # fmt: skip


def _checkpoint_bytes(model: str) -> int:
    """Bytes of the base's weight files: from_pretrained maps them (safetensors), so their pages count in the peak."""
    folder = Path(model)
    return sum(f.stat().st_size for pattern in ("*.safetensors", "*.bin") for f in folder.glob(pattern))


def _child_ours(args: dict[str, Any]) -> None:
    import torch
    from fusion_trainer.data.stream import as_built, open_shards
    from fusion_trainer.metrics import read_metrics
    from fusion_trainer.precision import resolve_precision
    from fusion_trainer.training.train import train

    base_rss = own_peak_rss_mib()
    cfg = _config(args, "ours")
    bf16 = resolve_precision(cfg.bf16).bf16
    t_start = time.time()
    train(cfg)
    records = [r for r in read_metrics(Path(args["out"])) if r.get("split") != "val" and "samples_per_s" in r]
    marks = [(int(r["step"]), float(r["time"])) for r in records]
    rate = _steady_rate(marks, cfg.micro_batch)
    first_mark_s = marks[0][1] - t_start  # start-up + the first log_every steps

    # the data pipeline alone, same settings, per batch
    from fusion_trainer.model.fusion_model import FusionModel
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = _tokenizer(args["model"])
    ds = open_shards(args["ref"])
    stream = _train_stream(ds, tok, cfg, stats=cfg.stats_loss_weight > 0, length_groups=cfg.length_groups)
    batches = iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=0, collate_fn=as_built))
    seq_lens, labelled = [], []
    next(batches)
    n = 30
    t0 = time.perf_counter()
    for _ in range(n):
        b = next(batches)
        seq_lens.append(int(b["input_ids"].shape[1]))
        labelled.append(float((b["labels"] != -100).sum(dim=1).float().mean()))
    data_s = (time.perf_counter() - t0) / n
    padding = {str(g): _padding_waste(_train_stream(ds, tok, cfg, length_groups=g))
               for g in sorted({1, cfg.length_groups})}  # fmt: skip

    # the memory model, from the same model built on the meta device
    norm = {v: s.model_dump() for v, s in ds.manifest.normalization.items()}
    fusion = cfg.fusion_config(ds.manifest.variable_names, norm, ds.manifest.window)  # the model training builds
    dtype = torch.bfloat16 if bf16 else torch.float32
    with torch.device("meta"):
        meta_model = FusionModel(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args["model"]),
                                                                  dtype=dtype), fusion)  # fmt: skip
    seq = round(sum(seq_lens) / len(seq_lens))
    cached = len(stream.prompt_ids) if meta_model._prompt_cache is not None else 0
    soft = int(meta_model.config.n_prefix_tokens) if meta_model.config.fusion == "prefix" else 0
    mem = _memory_model(meta_model, cfg.micro_batch, seq + soft, bf16, run=seq + soft - cached,
                        targets=round(sum(labelled) / len(labelled)))  # fmt: skip
    print(json.dumps({"samples_per_s": rate, "step_s": cfg.micro_batch / rate, "data_s_per_batch": data_s,
                      "base_rss_mib": base_rss, "seq": seq, "memory_model": mem, "peak_rss_mib": own_peak_rss_mib(),
                      "metrics_peak_mb": max(float(r["peak_memory_mb"]) for r in records), "bf16": bf16,
                      "first_mark_s": first_mark_s, "marks": marks, "padding_waste": padding,
                      "length_groups": cfg.length_groups}))  # fmt: skip


def _child_hf(args: dict[str, Any]) -> None:
    import torch
    from fusion_trainer.data.stream import (
        collate,
        decode_sample,
        encode_sample,
        epoch_samples,
        open_shards,
    )
    from fusion_trainer.model.fusion_model import FusionModel
    from fusion_trainer.precision import resolve_precision
    from fusion_trainer.training.steps import number_weights
    from fusion_trainer.training.train import _load_model, _promote_scalar_params
    from transformers import Trainer, TrainerCallback, TrainingArguments

    _env()
    base_rss = own_peak_rss_mib()
    cfg = _config(args, "hf")
    bf16 = resolve_precision(cfg.bf16).bf16
    ds_config = cfg.deepspeed_config(1, bf16=bf16)
    ds = open_shards(args["ref"])
    manifest = ds.manifest
    norm = {v: s.model_dump() for v, s in manifest.normalization.items()}
    torch.manual_seed(cfg.seed)
    model = _load_model(
        cfg, manifest.variable_names, norm, torch.bfloat16 if bf16 else torch.float32, manifest.window
    )
    tok: Any = model.tokenizer
    stream = _train_stream(ds, tok, cfg)
    raws = list(epoch_samples(ds, "train", epoch=0, rank=0, world=1, seed=0, shuffle=True))
    decoded = [decode_sample(r, ds) for r in raws]
    items = [
        (s, encode_sample(stream.target_text(s.text), stream.prompt_ids, tok, cfg.max_length))
        for s in decoded
    ]
    pad = int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    weights = None
    if cfg.number_loss_weight != 1.0:  # the trainer's own weights (`number_weights`)
        weights = number_weights(cfg, tok, torch.device("cpu"))

    def collator(batch: list[Any]) -> dict[str, Any]:
        out = collate([s for s, _ in batch], [e for _, e in batch], pad)
        keys = {"input_ids": "input_ids", "attention_mask": "attention_mask", "labels": "labels",
                "climate_x": "climate", "stats": "stats"}  # fmt: skip
        return {new: out[old] for old, new in keys.items() if old in out}

    marks: list[tuple[int, float]] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step % cfg.log_every == 0:
                marks.append((state.global_step, time.time()))

    targs = TrainingArguments(
        output_dir=args["out"], max_steps=cfg.steps, per_device_train_batch_size=cfg.micro_batch,
        gradient_accumulation_steps=1, learning_rate=cfg.lr, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8,
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.grad_clip, bf16=bf16, lr_scheduler_type="cosine",
        warmup_steps=0, logging_steps=cfg.log_every, save_strategy="no", report_to=[], deepspeed=ds_config,
        use_cpu=not torch.cuda.is_available(),  # bf16 on a CPU (bf16: auto chose it): Trainer asks for use_cpu
        dataloader_num_workers=0, remove_unused_columns=False, seed=cfg.seed, disable_tqdm=True,
    )  # fmt: skip

    # Trainer writes `model.config.use_cache`; FusionModel.config is the (strict) FusionConfig, so the model goes in
    # behind a pass-through wrapper whose `config` is the base's HF config.
    class ForTrainer(torch.nn.Module):
        def __init__(self, inner: FusionModel) -> None:
            super().__init__()
            self.inner, self.config = inner, inner.lm.config

        def forward(self, **batch: Any) -> Any:
            batch.pop(
                "num_items_in_batch", None
            )  # Trainer's loss normalisation hint; one micro-batch per step here
            stats = batch.pop("stats", None)
            # the same loss as ours (number tokens weighted, the stats loss added), through the plain forward
            out = self.inner(
                **batch, token_weights=None if weights is None else weights.to(batch["labels"].device),
                readout_stats=stats if cfg.readout_truth else None,
            )
            loss = out.loss
            if cfg.stats_loss_weight > 0 and stats is not None:
                stats_loss = torch.nn.functional.huber_loss(out.climate_stats.float(), stats, delta=1.0)
                loss = loss + cfg.stats_loss_weight * stats_loss
            return {"loss": loss}

    _promote_scalar_params(
        model
    )  # DeepSpeed's model broadcast cannot view 0-dim gates as bytes (as in train())
    trainer = Trainer(
        model=ForTrainer(model), args=targs, train_dataset=items, data_collator=collator, callbacks=[Clock()]
    )
    trainer.train()
    print(json.dumps({"samples_per_s": _steady_rate(marks, cfg.micro_batch), "base_rss_mib": base_rss,
                      "peak_rss_mib": own_peak_rss_mib(), "bf16": bf16, "marks": marks}))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--days", type=int, default=8, help="days of synthetic data (12 samples a day)")
    parser.add_argument(
        "--smollm2", default=None, help="SmolLM2-135M folder (default: fetched into the work folder)"
    )
    parser.add_argument("--work", default=None, help="work folder (kept; default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument(
        "--rounds", type=int, default=None, help="ours/hf pairs per model (default 2; --quick 1)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny model (20 steps) and the demo's (4 steps), one round"
    )
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=None, help="which models")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.child:
        dispatch_child({"ours": _child_ours, "hf": _child_hf, "runtime": _child_runtime}, opts.child)
        return
    from fusion_trainer.model.base import fetch_smollm2
    from fusion_trainer.model.tiny import make_tiny_model
    from stream import build_dataset

    work = Path(opts.work or tempfile.mkdtemp(prefix="merra2-train-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    ref, _ = build_dataset(work, opts.days)
    demo_ref = ""
    kinds = opts.models or (["tiny", "demo"] if opts.quick else ["tiny", "smollm2", "demo"])
    rounds = opts.rounds or (1 if opts.quick else 2)
    steps = {"tiny": 20, "demo": 4} if opts.quick else {}
    models: dict[str, str] = {}
    for kind in kinds:
        if kind == "tiny":
            models[kind] = str(make_tiny_model("llama", work / "tiny-llama"))
        else:
            models[kind] = opts.smollm2 or str(fetch_smollm2(work / "smollm2"))
        if kind == "demo":
            shape = {k: v for k, v in DEMO_DATASET.items() if k != "days"}
            demo_ref, _ = build_dataset(work, int(DEMO_DATASET["days"]), **shape)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    rows: dict[str, Any] = {}
    pairs: dict[str, list[float]] = {kind: [] for kind in models}
    for kind, path in models.items():
        for r in range(rounds):  # ours and HF alternate, so a change of the machine's load hits both
            rates = {}
            for side in ("ours", "hf"):
                out = work / f"run-{kind}-{side}-{r}"
                shutil.rmtree(out, ignore_errors=True)
                load = os.getloadavg()[0]
                data = demo_ref if kind == "demo" else ref
                run = run_child(__file__, side, {"kind": kind, "model": path, "ref": data, "out": str(out),
                                                 "steps": steps.get(kind)}, env=env,
                                stderr_log=Path(f"{out}.log"))  # fmt: skip
                result, wall = run.result, run.wall_s
                rows[f"{kind} {side} {r}"] = {"peak_rss_mib": run.peak_rss_mib, **result, "wall_s": wall,
                                              "loadavg_before": load, "loadavg_after": os.getloadavg()[0]}  # fmt: skip
                rates[side] = result["samples_per_s"]
                print(f"{kind:<8} {side:<5} round {r}: {result['samples_per_s']:8.2f} samples/s   peak RSS "
                      f"{result['peak_rss_mib']:8.1f} MiB   wall {wall:6.1f} s   load {load:.2f} -> "
                      f"{os.getloadavg()[0]:.2f}", flush=True)  # fmt: skip
            pairs[kind].append(rates["ours"] / rates["hf"])
        data = demo_ref if kind == "demo" else ref
        run = run_child(__file__, "runtime", {"kind": kind, "model": path, "ref": data, "out": str(work / "rt")},
                        env=env, stderr_log=work / f"runtime-{kind}.log")  # fmt: skip
        rows[f"{kind} runtime"] = run.result
        print(f"{kind:<8} fixed runtime term {run.result['runtime_mib']:.0f} MiB", flush=True)
    figures: list[tuple[str, float, str, bool]] = []
    summary: dict[str, Any] = {}
    for kind in models:
        ratio = statistics.median(pairs[kind])
        figures.append((f"{kind}: ours / HF Trainer (samples/s)", ratio, ">= 2.0" if kind == "demo" else ">= 1.0",
                        ratio >= (2.0 if kind == "demo" else 1.0)))  # fmt: skip
        ours = rows[f"{kind} ours 0"]
        data = ours["data_s_per_batch"] / ours["step_s"]
        figures.append((f"{kind}: data time / step time", data, "<= 0.05", data <= 0.05))
        runtime = rows[f"{kind} runtime"]["runtime_mib"]
        ckpt = _checkpoint_bytes(models[kind]) / 2**20
        model_mib = ours["memory_model"]["total"] / 2**20
        grown = ours["peak_rss_mib"] - ours["base_rss_mib"]
        over_old = grown / model_mib
        over = grown / (model_mib + runtime + ckpt)
        figures.append((f"{kind}: (peak RSS - base) / memory model", over, "<= 1.3", over <= 1.3))
        figures.append((f"{kind}: the same without the runtime terms", over_old, "(before)", over_old <= 1.3))
        print(f"{kind}: step {ours['step_s'] * 1000:.0f} ms, data {ours['data_s_per_batch'] * 1000:.1f} ms/batch, "
              f"seq {ours['seq']}, peak RSS {ours['peak_rss_mib']:.0f} MiB, base {ours['base_rss_mib']:.0f} MiB, "
              f"memory model {model_mib:.0f} MiB + runtime {runtime:.0f} + checkpoint {ckpt:.0f} MiB "
              f"({ {k: round(v / 2**20, 1) for k, v in ours['memory_model'].items()} }); padding waste "
              f"{ours['padding_waste']}; pairs {[round(x, 3) for x in pairs[kind]]}")  # fmt: skip
        if kind == "demo":
            summary = {"train ours/hf": ratio, "memory ours/model": over, "memory ours/model (no runtime term)": over_old,
                       "padding waste": ours["padding_waste"], "length_groups": ours["length_groups"],
                       "train pairs": pairs[kind]}  # fmt: skip
    for name, value, target, ok in figures:
        print(f"{name:<48} {value:8.3f}  target {target:<8} {'PASS' if ok else 'MISS'}")
    end = os.getloadavg()
    print(f"load average {end[0]:.2f} {end[1]:.2f} {end[2]:.2f} (1, 5, 15 min) at the end")
    if opts.json is not None:
        record = {
            "runs": rows,
            "figures": figures,
            "pairs": pairs,
            "summary": summary,
            "loadavg_at_end": list(end),
        }
        opts.json.write_text(json.dumps(record, indent=2, default=str))
    if opts.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
