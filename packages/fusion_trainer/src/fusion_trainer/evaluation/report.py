"""REPORT.md with PNG figures for a finished run: loss curves, a test sample's map with its captions, the metrics.

`write_report` takes what the demo's stages produced (the RUN_DIR, `fusion-eval`'s JSON, `fusion-generate`'s rows)
and writes `OUT/REPORT.md`, `OUT/loss.png`, `OUT/sample_map.png`, `OUT/metrics.png` and `OUT/scatter_t2m.png`.
Figures are drawn with matplotlib's Agg backend (no display needed). Every file is written atomically.
"""

from __future__ import annotations

import logging
import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fusion_trainer.grounding import QUANTITIES, parse_caption_numbers
from fusion_trainer.metrics import read_metrics
from fusion_trainer.plots import pyplot, save_figure

__all__ = [
    "budget_line",
    "metrics_table",
    "plot_losses",
    "plot_metrics_table",
    "plot_sample_map",
    "plot_scatter",
    "write_report",
]

logger = logging.getLogger(__name__)



def _fmt(x: Any, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def plot_losses(records: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Train loss (per logged interval) and val loss against the step."""
    plt = pyplot()
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and r.get("split") != "val"]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("split") == "val"]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    if train:
        ax.plot(*zip(*train, strict=True), label="train (caption tokens)", color="tab:blue")
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="val", color="tab:orange")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("Training and validation loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def metrics_table(metrics: Mapping[str, Any]) -> list[list[str]]:
    """Rows `[quantity, parsed %, model MAE, train-mean MAE, best-constant MAE, corr, beats train mean, grounded]`."""
    rows = []
    quantities = metrics.get("faithfulness", {}).get("quantities", {})
    for q, m in quantities.items():
        rows.append([
            QUANTITIES.get(q, q), f"{100 * m['parsed_fraction']:.0f}%", _fmt(m["mae"]), _fmt(m["baseline_mae"]),
            _fmt(m.get("best_constant_mae")), _fmt(m["corr"]), _fmt(m["beats_baseline"]),
            _fmt(m.get("grounded", m["beats_baseline"])),
        ])  # fmt: skip
    return rows


_TABLE_HEAD = [
    "quantity", "parsed", "model MAE", "train-mean MAE", "best-constant MAE", "corr", "beats train mean", "grounded",
]  # fmt: skip


def plot_metrics_table(metrics: Mapping[str, Any], path: Path) -> Path:
    """The losses, grounding gain and faithfulness table as an image."""
    plt = pyplot()
    rows = metrics_table(metrics)
    fig, ax = plt.subplots(figsize=(9, 0.9 + 0.32 * (len(rows) + 1)))
    ax.axis("off")
    if rows:
        table = ax.table(cellText=rows, colLabels=_TABLE_HEAD, loc="center", cellLoc="center")
        table.auto_set_font_size(False)
        table.set_fontsize(8)
        table.scale(1, 1.3)
    gain = metrics.get("grounding_gain", {})
    fused, base = metrics.get("fused", {}), metrics.get("base", {})
    ax.set_title(
        f"test loss fused {_fmt(fused.get('loss'), 3)} vs base {_fmt(base.get('loss'), 3)}; grounding gain "
        f"{_fmt(gain.get('caption', {}).get('gain'), 3)} (numbers {_fmt(gain.get('numbers', {}).get('gain'), 3)})",
        fontsize=9,
    )
    return save_figure(fig, path)


def plot_sample_map(
    field: np.ndarray, bbox: Sequence[float], title: str, reference: str, generated: str, path: Path
) -> Path:
    """A map of one 2-D field over its bounding box (W, S, E, N), with the reference and generated captions."""
    plt = pyplot()
    fig = plt.figure(figsize=(7.5, 7.2))
    ax = fig.add_axes((0.1, 0.42, 0.8, 0.52))
    west, south, east, north = bbox
    image = ax.imshow(
        field, origin="lower", extent=(west, east, south, north), cmap="coolwarm", aspect="auto"
    )
    fig.colorbar(image, ax=ax, label="°C")
    ax.set_xlabel("longitude")
    ax.set_ylabel("latitude")
    ax.set_title(title, fontsize=9)
    wrap = textwrap.TextWrapper(width=105)
    text = "Reference:\n" + wrap.fill(reference) + "\n\nGenerated:\n" + wrap.fill(generated or "(empty)")
    fig.text(0.03, 0.02, text, fontsize=7.5, va="bottom", family="monospace")
    return save_figure(fig, path)


def plot_scatter(
    generations: Sequence[Mapping[str, Any]], truth: Any, path: Path, baseline: float | None
) -> Path:
    """Generated vs true mean 2 m temperature of the test samples (the parsed ones), with the mean baseline."""
    plt = pyplot()
    pairs = [
        (float(truth.loc[g["key"], "t2m_mean_c"]), parse_caption_numbers(g["generated"]).get("t2m_mean_c"))
        for g in generations
        if g["key"] in truth.index
    ]
    pts = [(t, p) for t, p in pairs if p is not None]
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    if pts:
        t, p = np.array(pts).T
        ax.scatter(t, p, s=12, alpha=0.7, label=f"model ({len(pts)}/{len(pairs)} parsed)")
        lo, hi = float(min(t.min(), p.min())), float(max(t.max(), p.max()))
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="perfect")
        if baseline is not None:
            ax.axhline(baseline, color="tab:red", lw=1, label="train-mean baseline")
    ax.set_xlabel("true mean 2 m temperature (°C, index)")
    ax.set_ylabel("generated (°C, parsed)")
    ax.set_title("Test samples: generated vs true", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def _sample_field(dataset: Any, key: str) -> tuple[np.ndarray, list[float], str] | None:
    """T2M (°C, time mean) of one sample from the shards, its bbox and its time span; None when not found."""
    from climate_text_schema import CLIMATE_MEMBER, decode_climate

    from fusion_trainer.data.stream import iter_shard

    index = dataset.read_index().set_index("key")
    if key not in index.index or "T2M" not in dataset.manifest.variable_names:
        return None
    row = index.loc[key]
    shard = next(s for s in dataset.shards() if s.path == row["shard"])
    for raw in iter_shard(dataset, shard, verify=False):
        if raw.key == key:
            array = decode_climate(bytes(raw.members[CLIMATE_MEMBER]), key)  # (T, V, H, W)
            t2m = array[:, dataset.manifest.variable_names.index("T2M")].mean(axis=0) - 273.15
            bbox = [
                float(row["lon_min"]),
                float(row["lat_min"]),
                float(row["lon_max"]),
                float(row["lat_max"]),
            ]
            return t2m, bbox, f"{row['time_start']} to {row['time_end']}"
    return None


def _markdown_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def write_report(
    out: Path,
    run_dir: Path,
    metrics: Mapping[str, Any],
    generations: Sequence[Mapping[str, Any]],
    dataset: Any = None,
    timings: Mapping[str, float] | None = None,
    notes: Sequence[str] = (),
    seed_metrics: Sequence[Mapping[str, Any]] = (),
    budget: tuple[float, str] | None = None,
) -> Path:
    """Write OUT/REPORT.md and its PNG figures.

    Args:
        out: the report folder (created).
        run_dir: the finished fusion-train RUN_DIR (metrics.jsonl, config.yaml).
        metrics: `fusion-eval`'s JSON.
        generations: `fusion-generate`'s rows ({"key", "reference", "generated"}).
        dataset: the opened dataset (for the sample map and the scatter's truth); None leaves those figures out.
        timings: stage name -> seconds, listed in the report.
        notes: extra lines for the report's notes section (e.g. what was left out).
        seed_metrics: `fusion-eval`'s JSON of every seed trained (the main run's first), for their spread.
        budget: (seconds, the machine and precision the timings were measured on): the timings' total is checked
            against it and the report says whether it was met.

    Returns:
        The path of REPORT.md.
    """
    from fusion_trainer.grounding import truth_from_index

    out.mkdir(parents=True, exist_ok=True)
    figures: list[tuple[str, str]] = []
    plot_losses(read_metrics(run_dir), out / "loss.png")
    figures.append(("Loss curves", "loss.png"))
    plot_metrics_table(metrics, out / "metrics.png")
    figures.append(("Metrics", "metrics.png"))
    from .report_science import plot_interventions, plot_ladder

    if plot_ladder(metrics, out / "ladder.png") is not None:
        figures.append(("The baseline ladder: each quantity's error relative to the location x hour climatology",
                        "ladder.png"))  # fmt: skip
    if plot_interventions(metrics, out / "interventions.png") is not None:
        figures.append(("Interventions: the generated numbers against shifts of the window", "interventions.png"))
    if dataset is not None and generations:
        truth = truth_from_index(dataset.read_index())
        base = metrics.get("faithfulness", {}).get("baseline_values", {}).get("t2m_mean_c")
        plot_scatter(generations, truth, out / "scatter_t2m.png", base)
        figures.append(("Generated vs true mean temperature", "scatter_t2m.png"))
        first = generations[0]
        found = _sample_field(dataset, str(first["key"]))
        if found is not None:
            field, bbox, span = found
            plot_sample_map(field, bbox, f"{first['key']}: mean 2 m temperature, {span}",
                            str(first.get("reference", "")), str(first["generated"]), out / "sample_map.png")  # fmt: skip
            figures.append(("A test sample: its field, reference and generated caption", "sample_map.png"))
    text = _report_text(run_dir, metrics, generations, timings or {}, notes, figures, seed_metrics, budget)
    tmp = out / ".REPORT.md.tmp"
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out / "REPORT.md")
    logger.info("wrote %s with %d figures", out / "REPORT.md", len(figures))
    return out / "REPORT.md"


def budget_line(total_s: float, budget_s: float, machine: str) -> str:
    """One sentence: the stages' total against a time budget, met or missed, and where it was measured."""
    over = total_s - budget_s
    verdict = ("**within the budget**" if over <= 0
               else f"**over the budget by {over / 60:.1f} min**" if over >= 60 else f"**over the budget by {over:.0f} s**")  # fmt: skip
    return (f"Time budget: {total_s:.0f} s ({total_s / 60:.1f} min) in all against {budget_s / 60:.0f} min: {verdict} "
            f"(measured on {machine}).")  # fmt: skip


def _verdict(metrics: Mapping[str, Any]) -> list[str]:
    gain = metrics.get("grounding_gain", {})
    quantities = metrics.get("faithfulness", {}).get("quantities", {})
    t2m = quantities.get("t2m_mean_c", {})
    uses = bool(gain.get("uses_climate"))
    beats = bool(t2m.get("beats_baseline"))
    grounded = bool(t2m.get("grounded", beats))
    lines = [
        f"- Grounding gain (loss with another sample's climate minus with its own): caption tokens "
        f"{_fmt(gain.get('caption', {}).get('gain'), 4)} ± {_fmt(gain.get('caption', {}).get('stderr'), 4)}, "
        f"number tokens {_fmt(gain.get('numbers', {}).get('gain'), 4)} ± "
        f"{_fmt(gain.get('numbers', {}).get('stderr'), 4)} nats/token: "
        + ("**the model uses the climate**." if uses else "**no evidence that the model uses the climate**."),
        f"- Mean 2 m temperature: MAE {_fmt(t2m.get('mae'))} °C vs {_fmt(t2m.get('baseline_mae'))} °C for the "
        f"train-mean baseline and {_fmt(t2m.get('best_constant_mae'))} °C for the best constant, correlation "
        f"{_fmt(t2m.get('corr'))}, {t2m.get('distinct_outputs', 'n/a')} distinct values, parsed from "
        f"{100 * float(t2m.get('parsed_fraction', 0)):.0f}% of the outputs: "
        + (
            "**grounded** (beats both)."
            if grounded
            else "**beats the train mean but not the best constant: NOT grounded** (the level shifted between train "
            "and test; the outputs do not follow the climate)."
            if beats
            else "**does NOT beat the baseline: not grounded**."
        ),
    ]
    others = [QUANTITIES[q] for q, m in quantities.items() if q != "t2m_mean_c" and m.get("grounded")]
    lines.append(f"- Other quantities grounded: {', '.join(others) if others else 'none'}.")
    return lines


def _report_text(
    run_dir: Path,
    metrics: Mapping[str, Any],
    generations: Sequence[Mapping[str, Any]],
    timings: Mapping[str, float],
    notes: Sequence[str],
    figures: Sequence[tuple[str, str]],
    seed_metrics: Sequence[Mapping[str, Any]] = (),
    budget: tuple[float, str] | None = None,
) -> str:
    from .report_science import goal_lines, intervention_rows, ladder_rows, seed_rows

    fused, base = metrics.get("fused", {}), metrics.get("base", {})
    parts = [
        "# merra2-fusion demo report",
        "",
        f"Run `{run_dir}` (fusion `{metrics.get('fusion', '?')}`, caption form `{metrics.get('caption', 'full')}`), "
        f"dataset `{metrics.get('dataset', '?')}`, split `{metrics.get('split', 'test')}` ("
        + ("held-out times, and every time of the locations held out of training)."
           if (metrics.get("ladder") or {}).get("spatial") else "held-out time)."),
        "",
        "## Verdict",
        "",
        *_verdict(metrics),
        "",
        "## Losses on the test split",
        "",
        _markdown_table(
            ["model", "loss (nats/token)", "perplexity", "tokens"],
            [
                [
                    "fused (own climate)",
                    _fmt(fused.get("loss"), 4),
                    _fmt(fused.get("perplexity")),
                    _fmt(fused.get("tokens")),
                ],
                [
                    "frozen base alone",
                    _fmt(base.get("loss"), 4),
                    _fmt(base.get("perplexity")),
                    _fmt(base.get("tokens")),
                ],
            ],
        ),  # fmt: skip
        "",
        "## Numeric faithfulness of generated captions",
        "",
        _markdown_table(_TABLE_HEAD, metrics_table(metrics)),
        "",
        "MAE against the index statistics of each sample, over the parsed outputs. Baselines on the same samples: "
        "the train-split mean (what a climate-blind model says), and the best constant in hindsight (the median of "
        "the true values). Grounded = at least half the outputs parse and the MAE beats both.",
        "",
    ]
    if metrics.get("goals"):
        parts += ["## Science goals (checked mechanically)", "", *goal_lines(metrics), ""]
    for part in ("all", "temporal", "spatial"):
        head, rows = ladder_rows(metrics, part)
        if rows:
            what = {"all": "the whole evaluated test split", "temporal": "test times, locations trained on",
                    "spatial": "locations held out of training (every time)"}[part]  # fmt: skip
            parts += [f"## Baseline ladder: {what}", "", _markdown_table(head, rows), "",
                      "Error [95% bootstrap interval, clustered by time window]: absolute (°C, m/s, hPa), the angle for "
                      "wind direction, log1p(mm) for precipitation. Every rung but the hindsight constant is fitted on "
                      "the train split only (the ridge's alpha on val).", ""]  # fmt: skip
    if intervention_rows(metrics):
        permute = ((metrics.get("interventions") or {}).get("permute")) or {}
        moved = ", ".join(f"{QUANTITIES[q]} {_fmt(v['mean_change'])}" for q, v in permute.items())
        parts += ["## Interventions", "", _markdown_table(
            ["variable", "quantity read back", "shifts", "median slope", "mean slope", "95% CI", "samples"],
            intervention_rows(metrics)), "",
            f"A model that reads the window has slope 1, one that ignores it slope 0. Permuting the grid points "
            f"within each latitude row (the caption's weighted mean, min and max unchanged) moved the outputs by: "
            f"{moved or 'n/a'}.", ""]  # fmt: skip
    place = metrics.get("same_place_gain") or {}
    same = place.get("caption") or {}
    if same:
        left = f"; {place['unswapped']} without another time left out" if place.get("unswapped") else ""
        parts += [f"Grounding gain against the same location's climate at another time: {_fmt(same.get('gain'), 4)} "
                  f"± {_fmt(same.get('stderr'), 4)} nats/token (standard error clustered by time window; "
                  f"{place.get('samples')} samples{left}).", ""]  # fmt: skip
    if len(seed_metrics) > 1:
        parts += ["## Seeds", "", _markdown_table(["quantity", "fused error per seed", "mean", "std"],
                                                 seed_rows(seed_metrics)), ""]  # fmt: skip
    if timings:
        parts += ["## Stage timings", "", _markdown_table(["stage", "seconds"],
                  [[k, f"{v:.0f}"] for k, v in timings.items()] + [["total", f"{sum(timings.values()):.0f}"]]), ""]  # fmt: skip
        if budget is not None:
            parts += [budget_line(sum(timings.values()), *budget), ""]
    parts += ["## Figures", ""] + [f"### {title}\n\n![{title}]({name})\n" for title, name in figures]
    if generations:
        parts += ["## Example generations (test split)", ""]
        for g in list(generations)[:3]:
            parts += [
                f"- `{g['key']}`",
                f"  - reference: {g.get('reference', '')}",
                f"  - generated: {g['generated']}",
            ]
        parts.append("")
    if notes:
        parts += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    return "\n".join(parts)
