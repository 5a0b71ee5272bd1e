"""End to end through the command lines: `scripts/demo.py --tiny` runs merra2-text synth and build, fusion-base tiny,
fusion-train, fusion-generate and fusion-eval as subprocesses, then writes the report; a second run skips every
finished stage. Tiny data (8 days over a 10° box, one sample per 6 h window) and a tiny random Llama."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n"


def _demo(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts/demo.py"), "--tiny", "--out", str(out), *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip


@pytest.mark.slow
def test_demo_stages_through_the_clis(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = _demo(out, "--seeds", "2")
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    # the second seed's evaluation takes the frozen base's loss from the first's (the same base, samples, prompt)
    seed1 = json.loads((out / "metrics-seed1.json").read_text())
    assert seed1["base"]["reused_from"] == str(out / "metrics.json") and "base loss reused from" in log
    assert f"{out}/run --steps 4 --eval-every 2" in log and f"{out}/run-seed1 --steps 4 --eval-every 4" in log  # val at the end
    # every stage ran through its CLI and was timed
    for cli in ("merra2-text synth", "merra2-text build", "fusion-base tiny llama", "fusion-train",
                "fusion-generate", "fusion-eval"):  # fmt: skip
        assert f"{cli} " in log.replace(str(Path(sys.executable).parent) + "/", ""), cli
    for stage in ("synth", "build", "tiny base", "train", "generate", "eval", "report"):
        assert f"== {stage}: " in log, stage
    assert "training steps 1..4 of 4" in log and "fusion-eval: grounding_gain" in log
    assert "are cut at max_length" not in log, "the plan's max_length leaves room for the prompt and the captions"
    assert "generated 3/3 test samples" in log, "fusion-generate reports its progress"
    timings = json.loads((out / "timings.json").read_text())
    assert set(timings) >= {"synth", "build", "train", "generate", "eval", "report"}

    metrics = json.loads((out / "run/../metrics.json").read_text())
    for side in ("fused", "base"):
        assert isinstance(metrics[side]["loss"], float) and metrics[side]["tokens"] > 0
    assert isinstance(metrics["loss_delta"], float)
    gain = metrics["grounding_gain"]
    for part in ("caption", "numbers"):
        assert {"own", "shuffled", "gain", "stderr", "tokens"} <= set(gain[part])
        assert isinstance(gain[part]["tokens"], int)
    assert isinstance(gain["uses_climate"], bool)
    faith = metrics["faithfulness"]
    assert faith["samples"] == 3
    t2m = faith["quantities"]["t2m_mean_c"]
    assert 0.0 <= t2m["parsed_fraction"] <= 1.0 and isinstance(t2m["baseline_mae_all"], float)
    assert isinstance(t2m["beats_baseline"], bool) and isinstance(t2m["grounded"], bool)
    assert metrics["grounded"]["numbers"] == faith["grounded"]
    assert metrics["grounded"]["beats_mean_baseline"]["t2m_mean_c"] == t2m["beats_baseline"]

    rows = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all({"key", "reference", "generated"} <= set(r) for r in rows)
    assert all("°C" in r["reference"] for r in rows)  # the reference is the caption's number sentences

    report = (out / "REPORT.md").read_text()
    assert "## Verdict" in report and "## Stage timings" in report
    for name in ("loss.png", "metrics.png", "sample_map.png", "scatter_t2m.png"):
        assert (out / name).read_bytes().startswith(PNG), name
    assert "climate fields are synthetic" in report
    # the stages' total against the plan's budget, with where it was measured and the precision training chose
    assert re.search(r"Time budget: \d+ s \([\d.]+ min\) in all against 10 min: \*\*(within|over) the budget", report)
    assert ", training in fp32)." in report

    # a second run finds every stage complete and redoes none of the expensive ones
    again = _demo(out, "--seeds", "2")
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    for stage in ("synth", "build", "train", "generate", "eval", "train seed1", "eval seed1"):
        assert f"== {stage}: already complete, skipped" in again.stdout, stage
    assert "complete from an earlier invocation, timed then: synth, build, tiny base, train" in (
        out / "REPORT.md").read_text()
    assert "Time budget: " in again.stdout


@pytest.mark.slow
def test_compare_tabulates_each_variant(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = _demo(out, "--compare", "--variants", "add,gated-xattn", "--compare-steps", "2")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    table = (out / "compare/results.md").read_text()
    rows = [
        line for line in table.splitlines() if line.startswith("| add ") or line.startswith("| gated-xattn ")
    ]
    header = next(line for line in table.splitlines() if line.startswith("| variant "))
    assert len(rows) == 2 and all(len(r.split("|")) == len(header.split("|")) for r in rows)
    for variant in ("add", "gated-xattn"):
        metrics = json.loads((out / f"compare/{variant}/metrics-{variant}.json").read_text())
        assert metrics["fusion"] == variant and "grounding_gain" in metrics
        slope = metrics["interventions"]["slopes"]["T2M"]  # each variant is scored on the extra seeds' shifts
        assert slope["shifts"] == ["T2M=+3"] and metrics["interventions"]["permute"] is not None
        assert (out / f"compare/{variant}/run/final/adapter.safetensors").exists()
