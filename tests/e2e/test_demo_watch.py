"""The demo warns, once and with what to change, when the trainer's first estimate is far past its budget."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from types import ModuleType

import pytest

from tests.script_module import load_script

ROOT = Path(__file__).resolve().parents[2]


def _demo_module() -> ModuleType:
    return load_script(ROOT / "scripts/demo.py", "demo_script")


def _write(run: Path, *records: dict[str, object]) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.mark.parametrize(("eta_s", "warned"), [(5000.0, True), (30.0, False)])
def test_watch_eta(tmp_path: Path, capsys: pytest.CaptureFixture[str], eta_s: float, warned: bool) -> None:
    demo = _demo_module()
    run = tmp_path / "run"
    done = threading.Event()
    later = time.time() + 1
    _write(run, {"step": 5, "loss": 1.0, "eta_s": eta_s, "precision": "fp32", "time": later}, {"step": 10})
    watcher = threading.Thread(target=demo.watch_eta, args=(run, 600.0, done), kwargs={"poll_s": 0.01})
    watcher.start()
    watcher.join(timeout=10)
    assert not watcher.is_alive()  # it stops after the first estimate, warning or not
    out = capsys.readouterr().out
    assert ("WARNING training is estimated at" in out) is warned
    if warned:
        assert "in fp32" in out and "QUICK=1" in out and "--steps" in out


@pytest.mark.parametrize("tail", ["", '{"step": 2'])
def test_watch_eta_warns_on_the_first_logged_estimate(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      tail: str) -> None:  # fmt: skip
    """The first estimate is the only line of metrics.jsonl while training goes on (it was skipped as "maybe half
    written", so the warning waited for the second log line); a half-written line after it is ignored."""
    demo = _demo_module()
    run = tmp_path / "run"
    _write(run, {"step": 1, "eta_s": 5000.0, "precision": "fp32", "time": time.time() + 1})
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write(tail)
    done = threading.Event()
    watcher = threading.Thread(target=demo.watch_eta, args=(run, 600.0, done), kwargs={"poll_s": 0.01})
    watcher.start()
    watcher.join(timeout=10)
    done.set()
    assert not watcher.is_alive()
    assert "WARNING training is estimated at" in capsys.readouterr().out


def test_watch_eta_ignores_an_earlier_run_and_stops_with_training(tmp_path: Path) -> None:
    demo = _demo_module()
    run = tmp_path / "run"
    _write(run, {"step": 5, "eta_s": 1e9, "precision": "fp32", "time": time.time() - 3600}, {"step": 6})
    done = threading.Event()
    watcher = threading.Thread(target=demo.watch_eta, args=(run, 1.0, done), kwargs={"poll_s": 0.01})
    watcher.start()
    time.sleep(0.1)
    assert watcher.is_alive()  # a record from before this training started is not its estimate
    done.set()
    watcher.join(timeout=10)
    assert not watcher.is_alive()


def test_machine_names_the_cpu_and_the_precision_training_chose(tmp_path: Path) -> None:
    from fusion_trainer.precision import cpu_model

    demo = _demo_module()
    run = tmp_path / "run"
    _write(run, {"step": 10, "loss": 1.0, "precision": "fp32"}, {"step": 10, "split": "val", "val_loss": 1.0},
           {"step": 20, "loss": 0.5, "precision": "fp32"})  # fmt: skip
    text = demo.machine(run)
    assert text.startswith(cpu_model()) and text.endswith("CPUs, training in fp32"), text
    _write(run, {"step": 10, "loss": 1.0})
    assert demo.machine(run).endswith("training in unknown precision")


def test_the_budget_counts_this_invocations_stages_only(tmp_path: Path) -> None:
    """timings.json keeps every stage ever timed in OUT (`--compare`'s variants, more seeds); the budget and the
    report's table take the stages this invocation ran or found complete."""
    demo = _demo_module()
    (tmp_path / "timings.json").write_text(json.dumps({"train readout": 3000.0, "train": 200.0, "train seed4": 9.0}))
    stages = demo.Stages(tmp_path)
    stages.run("train", True, lambda: None)
    stages.run("eval", False, lambda: None)
    assert set(stages.current()) == {"train", "eval"} and stages.current()["train"] == 200.0
    assert stages.skipped == ["train"]
    assert set(json.loads((tmp_path / "timings.json").read_text())) == {"train readout", "train", "train seed4", "eval"}
