"""The model card of a finished run (`final/README.md`): written by the trainer with the base fingerprint and the
dataset reference, and rewritten by fusion-eval with the evaluation table."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from climate_text_schema import Manifest
from fusion_trainer.config import TrainConfig
from fusion_trainer.evaluation.evaluate import evaluate_run
from fusion_trainer.evaluation.model_card import write_model_card
from fusion_trainer.training.train import train


def _front_matter(card: str) -> dict[str, Any]:
    assert card.startswith("---\n")
    meta = yaml.safe_load(card[4:].partition("\n---\n")[0])
    assert isinstance(meta, dict)
    return meta


def test_trainer_writes_the_card_and_eval_refreshes_it(make_config: Callable[..., TrainConfig], dataset_ref: str) -> None:
    config = make_config(steps=2, log_every=1)
    result = train(config)
    final = Path(config.out) / "final"
    assert result.adapter_dir == final
    record = json.loads((final / "fusion_config.json").read_text())
    card = (final / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["pipeline_tag"] == "text-generation" and "base_model" not in meta  # a local base is no hub id
    assert f"fingerprint `{record['base_fingerprint']}`" in card and record["base_fingerprint"]
    assert f"`{dataset_ref}`" in card and "## Intended use" in card and "## Limits" in card
    assert "Not evaluated yet" in card and "Last logged train loss" in card

    evaluation = evaluate_run(final.parent, dataset_ref, "test", batch_size=2, max_batches=1, generate_limit=2,
                              max_new_tokens=4)  # fmt: skip
    saved = json.loads((final / "evaluation-test.json").read_text())
    assert saved["fused"]["loss"] == evaluation["fused"]["loss"]
    card = (final / "README.md").read_text()
    assert "Not evaluated yet" not in card
    [row] = [line for line in card.splitlines() if line.startswith("| test | ")][:1]
    assert f"{evaluation['fused']['loss']:.4g}" in row and f"{evaluation['base']['loss']:.4g}" in row
    assert f"fingerprint `{record['base_fingerprint']}`" in card


def _manifest(kind: str) -> Manifest:
    return Manifest.model_validate(dict(
        schema_version="1.1", name="conus", version="v1", created_at="2026-01-01T00:00:00Z",
        builder={"package": "t", "version": "0"}, config={"region": {"name": "conus"}, "years": "2019"},
        variables=[{"name": "T2M", "units": "K"}], window="6h", time_step="1h", splits={"train": 3}, shards=[],
        normalization={}, sources=[], quarantined=0, source_kind=kind,
    ))  # fmt: skip


def test_a_hub_base_is_named_in_the_front_matter(tmp_path: Path) -> None:
    final = tmp_path / "run" / "final"
    final.mkdir(parents=True)
    (final / "fusion_config.json").write_text(json.dumps({"fusion": "prefix", "base": "HuggingFaceTB/SmolLM2-135M",
                                                          "base_fingerprint": "abc123", "variables": ["T2M"]}))  # fmt: skip
    card = write_model_card(final, final.parent, reference="s3://bucket/merra2-text/conus@latest").read_text()
    assert _front_matter(card)["base_model"] == "HuggingFaceTB/SmolLM2-135M"
    assert "fingerprint `abc123`" in card and "`s3://bucket/merra2-text/conus@latest`" in card
    assert "SYNTHETIC" not in card
    card = write_model_card(final, final.parent, _manifest("synthetic"), "./datasets/conus@v1").read_text()
    assert "version `v1`" in card and "T2M over conus, 2019; window 6h" in card
    assert "The training climate fields were SYNTHETIC" in card
