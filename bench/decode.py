"""Decode-step time of `FusionModel.generate`'s KV cache against transformers' own, side by side.

The LM is SmolLM2-135M-shaped (`fusion_trainer.preset_config("smollm2-135m")`, random weights, fp32: what the demo
generates with on a CPU without fast bf16); the batch is the demo's (`fusion-generate --batch-size 64`), prompts of
`--prompt` tokens with some rows left padded. Each round decodes `--steps` greedy tokens twice, once with
transformers' `DynamicCache` (which concatenates every layer's cache at each step) and once with
`fusion_trainer.model.decoding.growing_cache` (which writes the new token in place), alternating so both see the same
machine load; it checks the two give the same tokens and logits, and prints the median step time of each and their
ratio. The CPU model and the load average are printed with the figures.

Usage:
    python bench/decode.py                       # 64 rows, 300-token prompts, 24 steps, 3 rounds (about 3 minutes)
    python bench/decode.py --rows 16 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch


def decode(lm: Any, cache: Any, ids: torch.Tensor, mask: torch.Tensor, steps: int) -> tuple[torch.Tensor, list[float]]:
    """Greedy decoding as `decoding.decode` does it (padding-aware positions, logits at the last position only)."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    tokens, times = [], []
    with torch.no_grad():
        out = lm(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True,
                 logits_to_keep=1)  # fmt: skip
        for _ in range(steps):
            nxt = out.logits[:, -1].argmax(-1)[:, None]  # (B, 1)
            tokens.append(nxt)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
            t0 = time.perf_counter()
            out = lm(input_ids=nxt, attention_mask=mask, position_ids=positions, past_key_values=out.past_key_values,
                     use_cache=True, logits_to_keep=1)  # fmt: skip
            times.append(time.perf_counter() - t0)
    return torch.cat(tokens, dim=1), times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=64, help="batch rows (fusion-generate --batch-size)")
    parser.add_argument("--prompt", type=int, default=300, help="prompt tokens")
    parser.add_argument("--steps", type=int, default=24, help="decode steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of each cache")
    parser.add_argument("--json", type=Path, default=None)
    opts = parser.parse_args()
    from fusion_trainer import preset_config
    from fusion_trainer.model.decoding import growing_cache
    from fusion_trainer.precision import cpu_model
    from transformers import AutoModelForCausalLM, DynamicCache

    torch.manual_seed(0)
    config = preset_config("smollm2-135m")
    lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    ids = torch.randint(0, int(config.vocab_size), (opts.rows, opts.prompt))
    mask = torch.ones_like(ids)
    mask[::2, : opts.prompt // 30] = 0  # every other row left padded, as in a batch of mixed prompts
    times: dict[str, list[float]] = {"dynamic": [], "growing": []}
    first: dict[str, torch.Tensor] = {}
    for _ in range(opts.rounds):
        for name in ("dynamic", "growing"):
            cache = DynamicCache(config=config) if name == "dynamic" else growing_cache(config)
            tokens, step_s = decode(lm, cache, ids, mask, opts.steps)
            first.setdefault(name, tokens)
            times[name] += step_s[1:]  # the first step allocates the growing buffers
    same = torch.equal(first["dynamic"], first["growing"])
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "cpu": cpu_model(), "threads": torch.get_num_threads(), "loadavg": list(os.getloadavg()), "rows": opts.rows,
        "prompt": opts.prompt, "steps": opts.steps, "rounds": opts.rounds, "step_s_median": med,
        "dynamic/growing": med["dynamic"] / med["growing"], "same_tokens": same,
    }  # fmt: skip
    print(f"{result['cpu']}, {result['threads']} threads, load {result['loadavg'][0]:.1f}: {opts.rows} rows x "
          f"{opts.prompt}-token prompts, median decode step: transformers' DynamicCache {med['dynamic'] * 1000:.0f} ms, "
          f"growing cache {med['growing'] * 1000:.0f} ms, ratio {result['dynamic/growing']:.2f}; same tokens: {same}")  # fmt: skip
    if opts.json is not None:
        opts.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if not same:
        raise SystemExit("the two caches generated different tokens")


if __name__ == "__main__":
    main()
