"""`--help` shows the default of every option, and the shown default is the one the config applies.

The options default to None so that a `--config` YAML is not overridden; what `--help` shows is therefore written
beside them (merra2-text) or read from `TrainConfig` (fusion-train), and these tests keep the two equal."""

from __future__ import annotations

from typing import Any

import typer
from merra2_text_data import BuildConfig
from merra2_text_data.cli import app
from merra2_text_data.config.sections import parse_size

NO_DEFAULT = {"region", "years", "start", "end", "scheduler", "events", "text_table", "config", "set_"}
"""Options that have no default value (what to build; optional inputs)."""


def _params(command: Any) -> dict[str, Any]:
    return {p.name: p for p in command.params}


def test_build_help_shows_the_config_defaults() -> None:
    params = _params(typer.main.get_command(app).commands["build"])  # type: ignore[attr-defined]
    shown = {name: p.show_default for name, p in params.items() if isinstance(p.show_default, str)}
    cfg = BuildConfig.from_options(region="-100,40,-98,42", start="2019-01-01", end="2019-01-02")
    assert shown["window"] == cfg.sample.window == "1d"
    assert shown["time_step"] == cfg.sample.time_step
    assert shown["variables"] == ",".join(cfg.subset.variables)
    assert parse_size(shown["shard_size"]) == cfg.shard.shard_size
    assert shown["source"] == cfg.source.source
    assert shown["out"] == cfg.publish.out
    assert int(shown["workers"]) == cfg.run.workers and int(shown["seed"]) == cfg.sample.seed
    assert cfg.sample.tile is None and shown["tile"].startswith("none")
    assert shown["edge_tiles"] == cfg.sample.edge_tiles
    assert cfg.sample.stride is None and shown["stride"] == "the window"
    assert cfg.publish.name is None and shown["name"] == "the region name"
    assert cfg.source.cache_dir is None and "cache" in shown["cache_dir"]
    missing = sorted(
        name for name, p in params.items()
        if p.default is None and name not in shown and name not in NO_DEFAULT
    )  # fmt: skip
    assert not missing, f"options without a default in --help: {missing}"


def test_train_help_shows_the_train_config_defaults() -> None:
    from fusion_trainer.cli import _train_command
    from fusion_trainer.config import FusionConfig, TrainConfig

    params = _params(_train_command())
    fields = TrainConfig.model_fields
    for name in ("zero", "steps", "micro_batch", "grad_accum", "lr", "nproc", "eval_every", "save_every", "seed"):
        assert params[name].show_default == str(fields[name].default), name
    assert params["fusion"].show_default == FusionConfig.model_fields["fusion"].default
    bf16 = fields["bf16"].default
    assert params["bf16"].show_default in {str(bf16), "--bf16" if bf16 is True else "--no-bf16"}
    for name in ("shards", "model", "out"):
        assert not isinstance(params[name].show_default, str), f"--{name} has no default"
