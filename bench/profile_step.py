"""Profile of one training step of the demo (`pipelines/demo-train.yaml`: SmolLM2-135M, prefix after the prompt +
readout, the demo's micro-batch and max_length) on the CPU, with torch.profiler, and the step's parts timed side by side.

The step is FusionModel's forward (loss only) + backward over one batch of the demo-shaped synthetic dataset of
`bench/train.py` (`DEMO_DATASET`); the optimizer step is left out (13 M trainable parameters: small). Alternating,
`--repeats` times each (median kept), with the load average printed:

- `plain`: `forward(logits="all")` (every position's logits, the whole prompt through the LM): what a generic trainer
  runs;
- `lean`: `forward(logits="none")` (logits at target positions only, the prompt's pass cached);
- `lean, no length groups`: the same on a batch drawn without length grouping (more padding).

Usage:
    python bench/profile_step.py --smollm2 DIR [--work DIR] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--smollm2", required=True, help="SmolLM2-135M folder (fusion-base fetch smollm2-135m)"
    )
    parser.add_argument("--work", default=None, help="work folder (the dataset is kept there)")
    parser.add_argument("--repeats", type=int, default=3)
    opts = parser.parse_args()
    import torch
    from fusion_trainer.config import TrainConfig
    from fusion_trainer.data.stream import ClimateTextStream, open_shards, render_prompt
    from fusion_trainer.precision import resolve_precision
    from fusion_trainer.training.steps import number_weights
    from fusion_trainer.training.train import _load_model
    from stream import build_dataset
    from train import DEMO_DATASET, ROOT

    work = Path(opts.work or tempfile.mkdtemp(prefix="merra2-profile-"))
    shape = {k: v for k, v in DEMO_DATASET.items() if k != "days"}
    ref, _ = build_dataset(work, int(DEMO_DATASET["days"]), **shape)
    cfg = TrainConfig.from_yaml(
        ROOT / "pipelines/demo-train.yaml", shards=ref, model=opts.smollm2, out=str(work)
    )
    precision = resolve_precision(cfg.bf16)
    ds = open_shards(ref)
    norm = {v: s.model_dump() for v, s in ds.manifest.normalization.items()}
    torch.manual_seed(0)
    model = _load_model(cfg, ds.manifest.variable_names, norm, precision.dtype, ds.manifest.window)
    tok: Any = model.tokenizer
    weights = number_weights(cfg, tok, torch.device("cpu"))  # the trainer's own weights

    def batch(groups: int) -> dict[str, Any]:
        stream = ClimateTextStream(ds, "train", tok, prompt=render_prompt(cfg.prompt_template, ds, cfg.caption),
                                   micro_batch=cfg.micro_batch, max_length=cfg.max_length, caption=cfg.caption,
                                   stats=True, length_groups=groups)  # fmt: skip
        return next(iter(stream))

    grouped, plain_batch = batch(cfg.length_groups), batch(1)

    def step(b: dict[str, Any], logits: str) -> float:
        t0 = time.perf_counter()
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], climate=b["climate_x"],
                    labels=b["labels"], token_weights=weights, logits=logits,
                    readout_stats=b["stats"] if cfg.readout_truth else None)  # fmt: skip
        loss = out.loss + torch.nn.functional.huber_loss(out.climate_stats.float(), b["stats"], delta=1.0)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    model.train()
    runs = {
        "plain": (grouped, "all"),
        "lean": (grouped, "none"),
        "lean, no length groups": (plain_batch, "none"),
    }
    for b, mode in runs.values():
        step(b, mode)  # warm-up (and the prompt cache)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(opts.repeats):
        load = os.getloadavg()[0]
        for name, (b, mode) in runs.items():
            times[name].append(step(b, mode))
        print(f"repeat {r}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()) + f"; load {load:.2f}",
              flush=True)  # fmt: skip
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"{precision.name}; widths: grouped {grouped['input_ids'].shape}, ungrouped {plain_batch['input_ids'].shape}"
    )
    for k, v in med.items():
        print(f"{k:<26} {v:7.2f} s a step (forward + backward, median of {opts.repeats})")
    print(
        f"plain / lean {med['plain'] / med['lean']:.2f}; no groups / groups {med['lean, no length groups'] / med['lean']:.2f}"
    )

    from torch.profiler import ProfilerActivity, profile

    for name in ("plain", "lean"):
        b, mode = runs[name]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(b, mode)
        print(f"\n== torch.profiler, one {name} step, top 12 ops by self CPU time ==")
        print(
            prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=40)
        )
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
