"""Training benchmark: our step (`fusion_trainer.train`) vs the Hugging Face `Trainer`, same DeepSpeed config.

Both sides train the same `FusionModel` (same base, fusion config, dtype and seed) on the same dataset (built as in
`bench/stream.py`: synthetic MERRA-2, 24 x 11 x 8 x 8 windows with captions) with the same micro-batch and the same
DeepSpeed config (`TrainConfig.deepspeed_config`: ZeRO-2, AdamW with torch_adam, clipping 1.0, bf16 as configured), on
one rank. Each run is a fresh child process (`bench/_child.py`: its own peak RSS, VmHWM from /proc, else `os.wait4`):

- `ours`: `fusion_trainer.train.train(TrainConfig(...))`; steady-state samples/s from the wall-clock times of its
  `metrics.jsonl` records (the first interval, with warm-up, dropped);
- `hf`: `transformers.Trainer` with `TrainingArguments(deepspeed=<the same dict>)` on a map-style dataset of the same
  samples, decoded, normalised and tokenised once up front by our own functions (so its data loading is cheaper than
  ours, which streams), collated by our `collate`; samples/s from a callback's step-end times over the same steps.

Also measured in the `ours` child, after training: the data pipeline's time per batch (`ClimateTextStream`, same
tokenizer, micro-batch and max_length, 0 workers) over the step time (target <= 0.05), and the peak RSS over a model
of memory: frozen bytes + trainable bytes x 16 / world + activations (Korthikanti et al.: per layer 34 s b h + 5 a s^2 b
bytes at 16 bits, scaled by the dtype, plus the logits in the dtype and twice in fp32), with the RSS the process had
before the model was loaded (imports, dataset) taken off first (target <= 1.3).

Usage:
    python bench/train.py                    # tiny Llama and SmolLM2-135M (fetched offline into the work folder)
    python bench/train.py --quick            # tiny Llama only, fewer steps
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
}  # fmt: skip


def _env() -> None:
    from fusion_trainer.launch import free_port

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    os.environ.update(MASTER_PORT=str(free_port()), DS_ACCELERATOR="cpu")


def _steady_rate(times: list[tuple[int, float]], micro_batch: int) -> float:
    """Samples/s between the first and last (step, time) marks (warm-up before the first mark is excluded)."""
    (s0, t0), (s1, t1) = times[0], times[-1]
    return (s1 - s0) * micro_batch / (t1 - t0)


def _memory_model(model: Any, micro_batch: int, seq: int, bf16: bool) -> dict[str, float]:
    """Bytes: frozen + trainable x 16 / world + activations (see the module docstring)."""
    lm_config = model.lm.config
    counts = model.num_parameters()
    frozen = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not p.requires_grad)
    h, layers = int(lm_config.hidden_size), int(lm_config.num_hidden_layers)
    heads, vocab = int(lm_config.num_attention_heads), int(lm_config.vocab_size)
    scale = (2 if bf16 else 4) / 2
    per_layer = (34 * seq * micro_batch * h + 5 * heads * seq * seq * micro_batch) * scale
    logits = micro_batch * seq * vocab * ((2 if bf16 else 4) + 8)
    activations = layers * per_layer + logits
    trainable = counts["trainable"] * 16
    return {"frozen": frozen, "trainable_x16": trainable, "activations": activations,
            "total": frozen + trainable + activations}  # fmt: skip


def _child_ours(args: dict[str, Any]) -> None:
    import torch
    from fusion_trainer.config import TrainConfig
    from fusion_trainer.data import ClimateTextStream, open_shards, render_prompt
    from fusion_trainer.metrics import read_metrics
    from fusion_trainer.train import train

    spec = MODELS[args["kind"]]
    base_rss = own_peak_rss_mib()
    cfg = TrainConfig(
        shards=args["ref"], model=args["model"], out=args["out"], fusion=spec["fusion"], zero=2,
        steps=spec["steps"], micro_batch=spec["micro_batch"], lr=1e-3, bf16=spec["bf16"], max_length=spec["max_length"],
        log_every=spec["log_every"], warmup_steps=0, num_workers=0, log_keys=False,
    )  # fmt: skip
    train(cfg)
    records = [r for r in read_metrics(Path(args["out"])) if r.get("split") != "val" and "samples_per_s" in r]
    marks = [(int(r["step"]), float(r["time"])) for r in records]
    rate = _steady_rate(marks, spec["micro_batch"])

    # the data pipeline alone, same settings, per batch
    from fusion_trainer.config import FusionConfig
    from fusion_trainer.model import FusionModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args["model"])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    ds = open_shards(args["ref"])
    stream = ClimateTextStream(ds, "train", tok, prompt=render_prompt(cfg.prompt_template, ds),
                               micro_batch=spec["micro_batch"], max_length=spec["max_length"])  # fmt: skip
    batches = iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=0))
    seq_lens = []
    next(batches)
    n = 30
    t0 = time.perf_counter()
    for _ in range(n):
        seq_lens.append(int(next(batches)["input_ids"].shape[1]))
    data_s = (time.perf_counter() - t0) / n

    # the memory model, from the same model built on the meta device
    norm = {v: s.model_dump() for v, s in ds.manifest.normalization.items()}
    fusion = FusionConfig(
        **{**spec["fusion"], "variables": ds.manifest.variable_names, "normalization": norm}
    )
    dtype = torch.bfloat16 if spec["bf16"] else torch.float32
    with torch.device("meta"):
        meta_model = FusionModel(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args["model"]),
                                                                  dtype=dtype), fusion)  # fmt: skip
    seq = round(sum(seq_lens) / len(seq_lens))
    mem = _memory_model(meta_model, spec["micro_batch"], seq, spec["bf16"])
    print(json.dumps({"samples_per_s": rate, "step_s": spec["micro_batch"] / rate, "data_s_per_batch": data_s,
                      "base_rss_mib": base_rss, "seq": seq, "memory_model": mem, "peak_rss_mib": own_peak_rss_mib(),
                      "metrics_peak_mb": max(float(r["peak_memory_mb"]) for r in records)}))  # fmt: skip


def _child_hf(args: dict[str, Any]) -> None:
    import torch
    from fusion_trainer.config import FusionConfig, TrainConfig
    from fusion_trainer.data import (
        ClimateTextStream,
        collate,
        decode_sample,
        encode_sample,
        epoch_samples,
        open_shards,
        render_prompt,
    )
    from fusion_trainer.model import FusionModel
    from fusion_trainer.train import _promote_scalar_params
    from transformers import Trainer, TrainerCallback, TrainingArguments

    spec = MODELS[args["kind"]]
    _env()
    base_rss = own_peak_rss_mib()
    cfg = TrainConfig(shards=args["ref"], model=args["model"], out=args["out"], fusion=spec["fusion"], zero=2,
                      steps=spec["steps"], micro_batch=spec["micro_batch"], lr=1e-3, bf16=spec["bf16"],
                      max_length=spec["max_length"])  # fmt: skip
    ds_config = cfg.deepspeed_config(1)
    ds = open_shards(args["ref"])
    manifest = ds.manifest
    norm = {v: s.model_dump() for v, s in manifest.normalization.items()}
    fusion = FusionConfig(**{**spec["fusion"], "variables": manifest.variable_names, "normalization": norm})
    torch.manual_seed(cfg.seed)
    model = FusionModel.from_base(
        args["model"], fusion, dtype=torch.bfloat16 if spec["bf16"] else torch.float32
    )
    tok: Any = model.tokenizer
    prompt_ids = ClimateTextStream(ds, "train", tok, prompt=render_prompt(cfg.prompt_template, ds),
                                   micro_batch=spec["micro_batch"], max_length=spec["max_length"]).prompt_ids  # fmt: skip
    raws = list(epoch_samples(ds, "train", epoch=0, rank=0, world=1, seed=0, shuffle=True))
    decoded = [decode_sample(r, ds) for r in raws]
    items = [(s, encode_sample(s.text, prompt_ids, tok, spec["max_length"])) for s in decoded]
    pad = int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)

    def collator(batch: list[Any]) -> dict[str, Any]:
        out = collate([s for s, _ in batch], [e for _, e in batch], pad)
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"], "labels": out["labels"],
                "climate": out["climate_x"]}  # fmt: skip

    marks: list[tuple[int, float]] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step % spec["log_every"] == 0:
                marks.append((state.global_step, time.time()))

    targs = TrainingArguments(
        output_dir=args["out"], max_steps=spec["steps"], per_device_train_batch_size=spec["micro_batch"],
        gradient_accumulation_steps=1, learning_rate=1e-3, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8,
        weight_decay=0.0, max_grad_norm=1.0, bf16=spec["bf16"], lr_scheduler_type="cosine", warmup_steps=0,
        logging_steps=spec["log_every"], save_strategy="no", report_to=[], deepspeed=ds_config,
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
            return self.inner(**batch)

    _promote_scalar_params(
        model
    )  # DeepSpeed's model broadcast cannot view 0-dim gates as bytes (as in train())
    trainer = Trainer(
        model=ForTrainer(model), args=targs, train_dataset=items, data_collator=collator, callbacks=[Clock()]
    )
    trainer.train()
    print(json.dumps({"samples_per_s": _steady_rate(marks, spec["micro_batch"]), "base_rss_mib": base_rss,
                      "peak_rss_mib": own_peak_rss_mib()}))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--days", type=int, default=8, help="days of synthetic data (12 samples a day)")
    parser.add_argument(
        "--smollm2", default=None, help="SmolLM2-135M folder (default: fetched into the work folder)"
    )
    parser.add_argument("--work", default=None, help="work folder (kept; default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--quick", action="store_true", help="tiny model only, 20 steps")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.child:
        dispatch_child({"ours": _child_ours, "hf": _child_hf}, opts.child)
        return
    from fusion_trainer.base import fetch_smollm2, make_tiny_model
    from stream import build_dataset

    work = Path(opts.work or tempfile.mkdtemp(prefix="merra2-train-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    ref, _ = build_dataset(work, opts.days)
    models = {"tiny": str(make_tiny_model("llama", work / "tiny-llama"))}
    if opts.quick:
        MODELS["tiny"].update(steps=20)
    else:
        models["smollm2"] = opts.smollm2 or str(fetch_smollm2(work / "smollm2"))
    rows: dict[str, Any] = {}
    for kind, path in models.items():
        for side in ("ours", "hf"):
            out = work / f"run-{kind}-{side}"
            shutil.rmtree(out, ignore_errors=True)
            env = {**os.environ, "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
            run = run_child(__file__, side, {"kind": kind, "model": path, "ref": ref, "out": str(out)}, env=env,
                            stderr_log=Path(f"{out}.log"))  # fmt: skip
            result, wall = run.result, run.wall_s
            rows[f"{kind} {side}"] = {"peak_rss_mib": run.peak_rss_mib, **result, "wall_s": wall}
            print(f"{kind:<8} {side:<5} {result['samples_per_s']:8.2f} samples/s   peak RSS {result['peak_rss_mib']:8.1f} MiB   "
                  f"wall {wall:6.1f} s", flush=True)  # fmt: skip
    figures: list[tuple[str, float, str, bool]] = []
    for kind in models:
        ours, hf = rows[f"{kind} ours"], rows[f"{kind} hf"]
        ratio = ours["samples_per_s"] / hf["samples_per_s"]
        figures.append((f"{kind}: ours / HF Trainer (samples/s)", ratio, ">= 1.0", ratio >= 1.0))
        data = ours["data_s_per_batch"] / ours["step_s"]
        figures.append((f"{kind}: data time / step time", data, "<= 0.05", data <= 0.05))
        model_mib = ours["memory_model"]["total"] / 2**20
        over = (ours["peak_rss_mib"] - ours["base_rss_mib"]) / model_mib
        figures.append((f"{kind}: (peak RSS - base) / memory model", over, "<= 1.3", over <= 1.3))
        print(f"{kind}: step {ours['step_s'] * 1000:.0f} ms, data {ours['data_s_per_batch'] * 1000:.1f} ms/batch, "
              f"seq {ours['seq']}, peak RSS {ours['peak_rss_mib']:.0f} MiB, base {ours['base_rss_mib']:.0f} MiB, "
              f"memory model {model_mib:.0f} MiB "
              f"({ {k: round(v / 2**20, 1) for k, v in ours['memory_model'].items()} })")  # fmt: skip
    for name, value, target, ok in figures:
        print(f"{name:<44} {value:8.3f}  target {target:<8} {'PASS' if ok else 'MISS'}")
    if opts.json is not None:
        opts.json.write_text(json.dumps({"runs": rows, "figures": figures}, indent=2, default=str))
    if opts.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
