"""The science part of REPORT.md: the baseline ladder (table and plot), the interventions (table and plot), the
science goals checked mechanically, and the spread over seeds. Reads `fusion-eval`'s JSON only."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from climate_text_schema.captions import QUANTITIES

__all__ = ["RUNGS", "goal_lines", "intervention_rows", "ladder_rows", "plot_interventions", "plot_ladder", "seed_rows"]

RUNGS = ("train_mean", "location", "location_hour", "persistence", "ridge", "stats_head", "fused")
"""The ladder's rungs, blind to the window first (`baselines`)."""
_LABELS = {
    "train_mean": "train mean", "location": "location climatology", "location_hour": "location x hour",
    "persistence": "persistence (past truth)", "ridge": "ridge on the window", "stats_head": "stats head (no LM)",
    "fused": "fused LM",
}  # fmt: skip


def _fmt(x: Any, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _cell(entry: Mapping[str, Any] | None) -> str:
    if not entry or entry.get("mae") is None:
        return "n/a"
    lo, hi = entry.get("ci95") or (None, None)
    return f"{entry['mae']:.2f} [{_fmt(lo)}, {_fmt(hi)}]"


def ladder_rows(metrics: Mapping[str, Any], part: str = "all") -> tuple[list[str], list[list[str]]]:
    """Markdown table head and rows: one row per quantity, one column per rung (error [95% CI])."""
    quantities = (((metrics.get("ladder") or {}).get(part)) or {}).get("quantities") or {}
    rungs = [r for r in RUNGS if any(r in row for row in quantities.values())]
    head = ["quantity (error)", *[_LABELS[r] for r in rungs], "best constant (hindsight)"]
    rows = []
    for q, row in quantities.items():
        unit = "°" if row["kind"] == "circular" else "log1p mm" if row["kind"] == "precip" else QUANTITIES[q].unit
        rows.append([f"{QUANTITIES[q].label} ({unit})", *[_cell(row.get(r)) for r in rungs],
                     _cell(row.get("best_constant"))])  # fmt: skip
    return head, rows


def plot_ladder(metrics: Mapping[str, Any], path: Path, part: str = "all") -> Path | None:
    """Each quantity's error per rung, relative to the location x hour climatology (1 = as good as it)."""
    from fusion_trainer.plots import pyplot, save_figure

    quantities = (((metrics.get("ladder") or {}).get(part)) or {}).get("quantities") or {}
    names = [q for q, row in quantities.items() if (row.get("location_hour") or {}).get("mae")]
    if not names:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10, 4.5))
    rungs = [r for r in RUNGS if any(r in quantities[q] for q in names)]
    width = 0.8 / len(rungs)
    for i, rung in enumerate(rungs):
        ratios, lows, highs = [], [], []
        for q in names:
            ref = quantities[q]["location_hour"]["mae"]
            entry = quantities[q].get(rung) or {}
            mae = entry.get("mae")
            ratios.append(mae / ref if mae is not None and ref else np.nan)
            lo, hi = entry.get("ci95") or (np.nan, np.nan)
            lows.append((mae - lo) / ref if mae is not None and ref and lo is not None else 0.0)
            highs.append((hi - mae) / ref if mae is not None and ref and hi is not None else 0.0)
        x = np.arange(len(names)) + i * width
        ax.bar(x, ratios, width, yerr=[lows, highs], label=_LABELS[rung], capsize=2)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(0.5, color="k", lw=0.8, ls="--")
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, [QUANTITIES[q].label for q in names], rotation=20, ha="right")
    ax.set_ylabel("error / location x hour climatology's")
    ax.set_title(f"The baseline ladder ({part} of the test split; 95% intervals clustered by time window)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return save_figure(fig, path)


def intervention_rows(metrics: Mapping[str, Any]) -> list[list[str]]:
    """One row per shifted variable: quantity, shifts, median / mean slope with its interval, samples."""
    slopes = ((metrics.get("interventions") or {}).get("slopes")) or {}
    rows = []
    for var, s in slopes.items():
        ci = s.get("ci95") or (None, None)
        rows.append([var, s["quantity"], ", ".join(s["shifts"]), _fmt(s.get("median")), _fmt(s.get("mean")),
                     f"[{_fmt(ci[0])}, {_fmt(ci[1])}]", str(s.get("samples"))])  # fmt: skip
    return rows


def plot_interventions(metrics: Mapping[str, Any], path: Path) -> Path | None:
    """The mean change of each generated number against the change the shift makes to the truth."""
    from fusion_trainer.plots import pyplot, save_figure

    slopes = ((metrics.get("interventions") or {}).get("slopes")) or {}
    if not slopes:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(slopes), figsize=(4 * len(slopes), 3.5), squeeze=False)
    for ax, (var, s) in zip(axes[0], slopes.items(), strict=True):
        x = np.array([0.0, *s["quantity_shifts"]])
        y = np.array([0.0, *s["per_shift_mean_change"]])
        order = np.argsort(x)
        ax.plot(x[order], x[order], "k--", lw=0.8, label="reads the window (slope 1)")
        ax.axhline(0.0, color="grey", lw=0.8, label="ignores it (slope 0)")
        ax.plot(x[order], y[order], "o-", label=f"model (median slope {_fmt(s.get('median'))})")
        ax.set_title(f"{var} shifted: {QUANTITIES[s['quantity']].label}")
        ax.set_xlabel(f"shift of the true value ({QUANTITIES[s['quantity']].unit})")
        ax.set_ylabel("mean change of the generated value")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def goal_lines(metrics: Mapping[str, Any]) -> list[str]:
    """The science goals, one line each: met / MISSED / not measured, with the figure."""
    goals = metrics.get("goals") or {}
    lines = [f"- {goals.get('met', 0)} met, {goals.get('missed', 0)} missed, {goals.get('not_measured', 0)} not "
             "measured" + (" (**all met**)." if goals.get("all_met") else ".")]  # fmt: skip
    for name, g in (goals.get("goals") or {}).items():
        state = "met" if g["met"] is True else "**MISSED**" if g["met"] is False else "not measured"
        figure = g["figure"]
        if isinstance(figure, Mapping):
            figure = ", ".join(f"{k} {_fmt(v, 3) if isinstance(v, float) else v}" for k, v in figure.items()
                               if not isinstance(v, Mapping))  # fmt: skip
        elif isinstance(figure, float):
            figure = _fmt(figure, 3)
        lines.append(f"- {name}: {state} ({figure}; goal {g['target']})")
    return lines


def seed_rows(per_seed: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    """Mean and spread over seeds of the fused model's error per quantity (the `all` ladder of each seed's eval)."""
    rows = []
    for q in QUANTITIES:
        values = [
            ((((m.get("ladder") or {}).get("all") or {}).get("quantities") or {}).get(q) or {}).get("fused", {}).get("mae")
            for m in per_seed
        ]
        got = [v for v in values if v is not None]
        if got:
            rows.append([QUANTITIES[q].label, ", ".join(_fmt(v) for v in got), _fmt(float(np.mean(got))),
                         _fmt(float(np.std(got, ddof=1)) if len(got) > 1 else None)])  # fmt: skip
    return rows
