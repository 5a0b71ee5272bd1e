"""Every benchmark in one run (`make bench`): build, scaling, streaming, training, GPU; one table of ratios with
PASS/MISS.

Each benchmark runs as its own script (`bench/build.py`, `bench/scaling.py`, `bench/stream.py`, `bench/train.py`)
with `--json`; this
script collects the figures and prints one table. The GPU profile (`bench/gpu.py`) runs when a CUDA device is present;
otherwise the table shows the figures recorded on an H200 (`bench/results/gpu-h200.json`) and says so.

Usage:
    python bench/run_all.py            # everything (about 10-15 minutes on 2 cores)
    python bench/run_all.py --quick    # each benchmark's --quick (a few minutes)
    python bench/run_all.py --only stream train scaling
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TARGETS: dict[str, tuple[str, float]] = {
    "build 1x / read 1x (time)": ("<=", 2.0),
    "build 1x / naive 1x (time)": ("<", 1.0),
    "build 4x / naive 4x (time)": ("<", 1.0),
    "build 4x / build 1x (time)": ("<=", 4.4),
    "build 4x / build 1x (peak RSS)": ("<=", 1.3),
    "build 2 workers / 1 worker (granule-days/s)": (">=", 1.6),
    "ours / raw tar": (">=", 0.5),
    "ours / xbatcher": (">=", 2.0),
}


def _verdict(value: float, op: str, target: float) -> str:
    ok = {"<=": value <= target, "<": value < target, ">=": value >= target}[op]
    return "PASS" if ok else "MISS"


def _bench(name: str, args: list[str], out: Path) -> dict[str, Any] | None:
    """Run bench/<name>.py with --json; None (and the error shown) if it fails."""
    t0 = time.perf_counter()
    cmd = [sys.executable, str(HERE / f"{name}.py"), *args, "--json", str(out)]
    print(f"$ {' '.join(cmd)}", flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if "warn" not in ln.lower()]
    print("\n".join(lines[-14:]), flush=True)
    print(f"({name}: {time.perf_counter() - t0:.0f} s)\n", flush=True)
    if proc.returncode or not out.exists():
        print(f"{name} failed with exit code {proc.returncode}", flush=True)
        return None
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="each benchmark's --quick")
    parser.add_argument("--only", nargs="+", choices=["build", "scaling", "stream", "train", "gpu"], default=None)
    opts = parser.parse_args()
    chosen = set(opts.only or ["build", "scaling", "stream", "train", "gpu"])
    quick = ["--quick"] if opts.quick else []
    rows: list[tuple[str, float, str, str]] = []  # name, value, target, verdict
    tmp = Path(tempfile.mkdtemp(prefix="merra2-bench-all-"))
    load = os.getloadavg()[0]
    print(f"{os.cpu_count()} CPU(s), load average {load:.2f} at the start\n", flush=True)

    if "build" in chosen:
        res = _bench("build", quick, tmp / "build.json")
        for name, value in (res or {}).get("figures", {}).items():
            op, target = TARGETS[name]
            rows.append((f"build: {name}", value, f"{op} {target:g}", _verdict(value, op, target)))
    if "scaling" in chosen:
        res = _bench("scaling", quick, tmp / "scaling.json")
        for name, value in (res or {}).get("figures", {}).items():
            op, target = TARGETS[name]
            low, high = (res or {}).get("load", [float("nan")] * 2)
            rows.append((f"scaling: {name} (load {low:.1f}-{high:.1f})", value, f"{op} {target:g}",
                         _verdict(value, op, target)))  # fmt: skip
    if "stream" in chosen:
        res = _bench("stream", quick, tmp / "stream.json")
        for name, value in (res or {}).get("ratios", {}).items():
            op, target = TARGETS[name]
            rows.append(
                (f"stream: {name} (samples/s)", value, f"{op} {target:g}", _verdict(value, op, target))
            )
    if "train" in chosen:
        res = _bench("train", quick, tmp / "train.json")
        for name, value, target, ok in (res or {}).get("figures", []):
            rows.append((f"train: {name}", value, target, "PASS" if ok else "MISS"))
    if "gpu" in chosen:
        gpu: dict[str, Any] | None = None
        try:
            import torch

            has_cuda = torch.cuda.is_available()
        except ImportError:
            has_cuda = False
        if has_cuda:
            gpu = _bench("gpu", ["--tiny"] if opts.quick else [], tmp / "gpu.json")
            where = "measured now"
        else:
            recorded = HERE / "results" / "gpu-h200.json"
            gpu = json.loads(recorded.read_text()) if recorded.exists() else None
            where = f"recorded: {recorded.relative_to(HERE.parent)} (no GPU here)"
        for run in (gpu or {}).get("runs", []):
            if "error" in run:
                continue
            assert gpu is not None
            label = f"gpu: {gpu['device']} micro-batch {run['micro_batch']} x {gpu['seq']}"
            rows.append((f"{label} MFU", run["mfu"] or float("nan"), "(no target)", where))
            rows.append((f"{label} tokens/s", run["tokens_per_s"], "", ""))
            if "peak_allocated_gib" in run:
                rows.append((f"{label} peak GiB", run["peak_allocated_gib"], "", ""))

    print(f"{'figure':<62} {'value':>12}  {'target':<12} verdict")
    for row_name, row_value, row_target, row_verdict in rows:
        print(f"{row_name:<62} {row_value:12.3f}  {row_target:<12} {row_verdict}")
    # the GPU lines come last; the other benchmarks' verdicts decide the closing note
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}; JSON figures in {tmp}")
    if any(row[3] == "MISS" for row in rows):
        print("MISS: see docs/performance.md for where the time goes")


if __name__ == "__main__":
    main()
