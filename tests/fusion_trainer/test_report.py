"""The report: REPORT.md with its figures from a run folder, fusion-eval's JSON and generations."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fusion_trainer.data.stream import open_shards
from fusion_trainer.evaluation.report import budget_line, metrics_table, write_report

PNG = b"\x89PNG\r\n\x1a\n"


def _metrics(beats: bool, uses: bool) -> dict[str, Any]:
    q = {"n": 4, "parsed": 3, "parsed_fraction": 0.75, "mae": 1.25 if beats else 9.5, "baseline_mae": 4.0,
         "baseline_mae_all": 4.1, "best_constant_mae": 3.0, "corr": 0.9, "distinct_outputs": 3,
         "beats_baseline": beats, "beats_best_constant": beats, "grounded": beats}  # fmt: skip
    wind = {**q, "mae": 3.0, "baseline_mae": 2.0, "beats_baseline": False, "grounded": False}
    return {
        "run": "r", "dataset": "d@v", "split": "test", "caption": "numbers", "fusion": "prefix",
        "fused": {"loss": 1.5, "perplexity": 4.48, "tokens": 100, "samples": 4},
        "base": {"loss": 2.5, "perplexity": 12.18, "tokens": 100, "samples": 4},
        "grounding_gain": {"samples": 4, "uses_climate": uses,
                           "caption": {"own": 1.5, "shuffled": 1.7, "gain": 0.2 if uses else 0.0, "stderr": 0.01,
                                       "tokens": 100},
                           "numbers": {"own": 2.0, "shuffled": 2.6, "gain": 0.6, "stderr": 0.05, "tokens": 30}},
        "faithfulness": {"samples": 4, "baseline_values": {"t2m_mean_c": 4.5},
                         "quantities": {"t2m_mean_c": q, "wind_speed_m_s": wind},
                         "grounded": {"t2m_mean_c": beats, "wind_speed_m_s": False}},
    }  # fmt: skip


def _run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    records = [{"step": s, "loss": 3.0 / s} for s in range(1, 21)] + [
        {"step": 10, "split": "val", "val_loss": 0.5},
        {"step": 20, "split": "val", "val_loss": 0.3},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


def test_report_with_dataset_has_every_figure(tmp_path: Path, make_dataset: Callable[..., str]) -> None:
    ref = make_dataset()
    data = open_shards(ref)
    index = data.read_index()
    test = index[index["split"] == "test"]
    gens = [{"key": k, "reference": t, "generated": "The area-weighted mean 2 m temperature was 9.9 °C, ranging "
             "from 1.0 °C to 2.0 °C."} for k, t in zip(test["key"], test["text"], strict=True)]  # fmt: skip
    out = tmp_path / "report"
    path = write_report(out, _run_dir(tmp_path), _metrics(True, True), gens, data, {"train": 12.0, "eval": 3.0},
                        ["a note"])  # fmt: skip
    text = path.read_text()
    for name in ("loss.png", "metrics.png", "scatter_t2m.png", "sample_map.png"):
        assert (out / name).read_bytes().startswith(PNG), name
        assert f"]({name})" in text
    assert "**the model uses the climate**" in text and "**grounded** (beats both)" in text
    assert "| train | 12 |" in text and "| total | 15 |" in text and "- a note" in text
    assert gens[0]["key"] in text
    assert not list(out.glob(".*tmp*"))  # atomic writes leave no temporaries


def test_report_says_plainly_when_not_grounded(tmp_path: Path) -> None:
    out = tmp_path / "report"
    text = write_report(out, _run_dir(tmp_path), _metrics(False, False), []).read_text()
    assert "**does NOT beat the baseline: not grounded**" in text
    assert "**no evidence that the model uses the climate**" in text
    assert (out / "loss.png").exists() and not (out / "sample_map.png").exists()
    assert "(held-out time)." in text
    spatial = {**_metrics(False, False), "ladder": {"spatial": {"samples": 2}}}  # locations held out too: said so
    assert "(held-out times, and every time of the locations held out of training)." in write_report(
        tmp_path / "spatial", tmp_path / "run", spatial, []).read_text()


def test_a_constant_that_beats_the_train_mean_is_not_grounded(tmp_path: Path) -> None:
    metrics = _metrics(True, True)
    metrics["faithfulness"]["quantities"]["t2m_mean_c"].update(beats_best_constant=False, grounded=False)
    text = write_report(tmp_path / "r", _run_dir(tmp_path), metrics, []).read_text()
    assert "**beats the train mean but not the best constant: NOT grounded**" in text


def test_metrics_table_rows() -> None:
    rows = metrics_table(_metrics(True, True))
    assert rows[0] == ["mean 2 m temperature (°C)", "75%", "1.25", "4.00", "3.00", "0.90", "yes", "yes"]
    assert rows[1][-1] == "no"


def test_the_report_checks_the_time_budget(tmp_path: Path) -> None:
    timings = {"train": 1500.0, "eval": 640.0}
    run = _run_dir(tmp_path)
    text = write_report(tmp_path / "r", run, _metrics(True, True), [], timings=timings,
                        budget=(1800.0, "CPU X (2 cores), fp32")).read_text()  # fmt: skip
    assert "2140 s (35.7 min) in all against 30 min: **over the budget by 5.7 min** (measured on CPU X (2 cores), fp32)" \
        in text
    assert "**within the budget**" in budget_line(1800.0, 1800.0, "m")
    assert "**over the budget by 2 s**" in budget_line(1802.0, 1800.0, "m")
    assert "Time budget" not in write_report(tmp_path / "s", run, _metrics(True, True), [],
                                             timings=timings).read_text()  # fmt: skip
