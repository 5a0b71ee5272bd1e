"""The model card of a finished run: `RUN_DIR/final/README.md`, with Hugging Face front matter.

The trainer writes it beside the adapter (base model and fingerprint, dataset reference and version, training
settings and final losses, how to load it, intended use, limits); `fusion-eval` keeps its result as
`final/evaluation-<split>.json` and rewrites the card with the evaluation table. Everything in it is read from the
run's own files (`fusion_config.json`, `config.yaml`, `metrics.jsonl`) and the dataset's manifest.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import yaml
from climate_text_schema import Manifest

from fusion_trainer.metrics import read_metrics

__all__ = ["MODEL_CARD", "save_evaluation", "write_model_card"]

logger = logging.getLogger(__name__)

MODEL_CARD = "README.md"
_EVALUATION = re.compile(r"^evaluation-(?P<split>[a-z]+)\.json$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def save_evaluation(final_dir: Path, result: dict[str, Any]) -> Path:
    """Keep a `fusion-eval` result as `final/evaluation-<split>.json` (atomically) for the model card."""
    path = final_dir / f"evaluation-{result.get('split', 'test')}.json"
    _write(path, json.dumps(result, indent=2) + "\n")
    return path


def _evaluations(final_dir: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(final_dir.glob("evaluation-*.json")):
        match = _EVALUATION.match(path.name)
        if match:
            out[match["split"]] = json.loads(path.read_text(encoding="utf-8"))
    return out


def _num(value: Any, fmt: str = ".4g") -> str:
    return "" if value is None else format(float(value), fmt)


def _evaluation_lines(evaluations: dict[str, dict[str, Any]]) -> list[str]:
    if not evaluations:
        return ["Not evaluated yet: run `fusion-eval --run RUN_DIR --shards REF` (it rewrites this card with the table)."]
    lines = ["| split | fused loss | fused perplexity | base loss | base perplexity | grounding gain (nats/token) |"
             " uses the climate |", "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for split, r in evaluations.items():
        fused, base, gain = r.get("fused") or {}, r.get("base") or {}, (r.get("grounding_gain") or {})
        caption = gain.get("caption") or {}
        lines.append(f"| {split} | {_num(fused.get('loss'))} | {_num(fused.get('perplexity'))} | "
                     f"{_num(base.get('loss'))} | {_num(base.get('perplexity'))} | {_num(caption.get('gain'))}"
                     f" (se {_num(caption.get('stderr'), '.2g')}) | {gain.get('uses_climate', '')} |")  # fmt: skip
    quantities = [(split, q, m) for split, r in evaluations.items()
                  for q, m in ((r.get("faithfulness") or {}).get("quantities") or {}).items()]  # fmt: skip
    if quantities:
        lines += ["", "Numbers in the generated captions against the index statistics (MAE; the baseline always "
                  "says the train mean):", "",
                  "| split | quantity | parsed | MAE | baseline MAE | best constant MAE | grounded |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for split, q, m in quantities:
            lines.append(f"| {split} | {q} | {_num(m.get('parsed_fraction'), '.0%')} | {_num(m.get('mae'))} | "
                         f"{_num(m.get('baseline_mae'))} | {_num(m.get('best_constant_mae'))} | {m.get('grounded')} |")  # fmt: skip
    return lines


def _dataset_lines(reference: str, manifest: Manifest | None) -> tuple[list[str], str | None]:
    if manifest is None:
        return [f"- Dataset: `{reference}`"], None
    extra = manifest.model_extra or {}
    kind = extra.get("source_kind")
    config = manifest.config
    region = config.get("region")
    region = region.get("name") if isinstance(region, dict) else region
    period = config.get("years") or (f"{config['start']} to {config['end']}" if config.get("start") else None)
    where = ", ".join(str(x) for x in (region, period) if x)
    lines = [
        f"- Dataset: `{reference}`, version `{manifest.version}` ({manifest.name}; {sum(manifest.splits.values())}"
        f" samples: {', '.join(f'{s} {n}' for s, n in manifest.splits.items())})",
        f"- Climate input: {', '.join(manifest.variable_names)}{f' over {where}' if where else ''}; window"
        f" {manifest.window}, time step {manifest.time_step}{f'; source: {kind}' if kind else ''}",
    ]
    return lines, None if kind is None else str(kind)


def _training_lines(train: dict[str, Any], steps: list[dict[str, Any]], vals: list[dict[str, Any]]) -> list[str]:
    lines = []
    if train:
        lines.append(f"- Steps {train.get('steps')}, micro-batch {train.get('micro_batch')} x grad-accum"
                     f" {train.get('grad_accum')} per rank, lr {train.get('lr')}, ZeRO {train.get('zero')}, bf16"
                     f" {train.get('bf16')}, seed {train.get('seed')}, caption `{train.get('caption')}`"
                     " (RUN_DIR/config.yaml)")  # fmt: skip
    if steps:
        val = f"; last val loss {_num(vals[-1]['val_loss'])} at step {vals[-1].get('step')}" if vals else ""
        lines.append(f"- Last logged train loss {_num(steps[-1]['loss'])} at step {steps[-1].get('step')}{val}"
                     " (RUN_DIR/metrics.jsonl)")  # fmt: skip
    return lines or ["- No config.yaml or metrics.jsonl beside this adapter."]


def write_model_card(
    final_dir: Path,
    run_dir: Path,
    manifest: Manifest | None = None,
    reference: str | None = None,
) -> Path:
    """Write `final/README.md` from the run's files (and the dataset's manifest when given).

    Args:
        final_dir: the adapter folder (`fusion_config.json`, `adapter.safetensors`).
        run_dir: the RUN_DIR (`config.yaml`, `metrics.jsonl`).
        manifest: the dataset's manifest (version, variables, region, period, source kind).
        reference: the dataset reference the run was given (default: `shards` of config.yaml).

    Returns:
        The card's path.
    """
    record: dict[str, Any] = json.loads((final_dir / "fusion_config.json").read_text(encoding="utf-8"))
    config_path = run_dir / "config.yaml"
    train: dict[str, Any] = yaml.safe_load(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
    reference = reference or str(train.get("shards", "?"))
    base = str(record.get("base") or train.get("model") or "?")
    fingerprint = record.get("base_fingerprint")
    records = read_metrics(run_dir)
    steps = [r for r in records if "loss" in r and "split" not in r]
    vals = [r for r in records if r.get("split") == "val" and "val_loss" in r]
    dataset_lines, kind = _dataset_lines(reference, manifest)
    front: dict[str, Any] = {
        **({"base_model": base} if _HUB_ID.match(base) else {}),
        "pipeline_tag": "text-generation",
        "tags": ["climate", "weather", "fusion", f"fusion-{record.get('fusion', '?')}", "deepspeed"],
        "language": ["en"],
    }
    name = run_dir.resolve().name
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).rstrip("\n"), "---",
        f"# {name}: climate fusion adapter for {base}",
        "",
        "A trainable climate encoder and fusion module (`fusion-trainer`) on a frozen causal language model: it reads"
        " a climate window (float32 `[time, variable, lat, lon]` in physical units) and writes a caption about it."
        " Only the adapter is here; the base model is not changed and not included.",
        "",
        "## Model",
        f"- Base model: `{base}` (frozen), fingerprint `{fingerprint}`; loading checks the fingerprint",
        f"- Fusion: `{record.get('fusion')}`; variables {', '.join(record.get('variables') or [])}",
        f"- Files: `adapter.safetensors` (trainable weights), `fusion_config.json` (config, base, fingerprint);"
        f" fusion-trainer {record.get('fusion_trainer_version', '?')}",
        "",
        "## Data",
        *dataset_lines,
        "",
        "## Training",
        *_training_lines(train, steps, vals),
        "",
        "## Evaluation",
        *_evaluation_lines(_evaluations(final_dir)),
        "",
        "## Use",
        "```python",
        "from fusion_trainer import load_run",
        'run = load_run("RUN_DIR")  # the base model named above must be available',
        "texts = run.describe(climate)  # float32 (T, V, lat, lon) or (B, T, V, lat, lon), variables in the order above",
        "```",
        "",
        "## Intended use",
        "Research on language models grounded in gridded climate data: describing windows of the same variables, grid,"
        " window length and kind of region as the training data, and measuring how much the text uses the climate.",
        "",
        "## Limits",
        "- Not a forecast and not a source of record: the captions can state wrong numbers; check them against the"
        " data (the evaluation above measures how often they are right).",
        "- Trained on one dataset version: other regions, seasons, variables or resolutions are out of distribution.",
        "- English captions in the builder's template wording only.",
    ]
    if kind == "synthetic":
        lines.append("- **The training climate fields were SYNTHETIC** (written by `merra2-text synth`), not NASA"
                     " MERRA-2: this adapter says nothing about the real atmosphere.")  # fmt: skip
    path = final_dir / MODEL_CARD
    _write(path, "\n".join(lines) + "\n")
    logger.info("model card written to %s", path)
    return path
