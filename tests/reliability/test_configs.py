"""Bad configs: every field of the build config (each BuildConfig section) and of the training config (TrainConfig)
set wrong at once gives ONE readable error that names every key, through the library and through the CLIs (exit 2 /
exit 1, one message, no traceback). Preserved: nothing is read or written before the config is valid.

The tables below must name every field: a new field without a wrong value here fails the test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from fusion_trainer.config import TrainConfig
from fusion_trainer.errors import ConfigError as TrainConfigError
from merra2_text_data.config.build import _SECTIONS, BuildConfig
from merra2_text_data.errors import ConfigError

from .conftest import cli, run_tool

BAD_BUILD_TYPES: dict[str, dict[str, Any]] = {
    "source": {
        "source": 5,
        "cache": ["x"],
        "cache_dir": ["x"],
        "allow_gaps": "perhaps",
        "allow_partial_days": "some",
        "hash_granules": "sometimes",
    },
    "subset": {"region": 12, "years": [2019], "start": "yesterday", "end": {"day": 1}, "variables": 7},
    "sample": {
        "window": 1,
        "stride": [1],
        "time_step": 7,
        "tile": 16.5,
        "edge_tiles": 3,
        "val_fraction": "some",
        "test_fraction": [],
        "val_years": "1999",
        "test_years": {"a": 1},
        "seed": "s",
        "holdout_tiles": "few",
        "events": "a.csv",
        "text_table": 3,
        "strict": "maybe",
    },  # fmt: skip
    "shard": {"shard_size": [256]},
    "publish": {"out": 5, "name": 6, "tag": 7.5, "parent": 8},
    "run": {"workers": "many", "scheduler": 5, "quiet": "loud"},
}
"""A wrong type for every field of every section."""

BAD_BUILD_VALUES: dict[str, dict[str, Any]] = {
    "source": {
        "source": "",
        "cache": "",
        "cache_dir": "",
        "allow_gaps": "perhaps",
        "allow_partial_days": "some",
        "hash_granules": "sometimes",
    },
    "subset": {
        "region": "atlantis",
        "years": "19x9",
        "start": "1900-01-01",
        "end": "2999-01-01",
        "variables": ["T2M", "BOGUS", "T2M"],
    },  # fmt: skip
    "sample": {
        "window": "forever",
        "stride": "0x",
        "time_step": "7 parsecs",
        "tile": "big",
        "edge_tiles": "pad",
        "val_fraction": 1.5,
        "test_fraction": -1,
        "val_years": [-5],
        "test_years": [10**6],
        "seed": 1.5,
        "holdout_tiles": 1.5,
        "events": [""],
        "text_table": "",
        "strict": "maybe",
    },  # fmt: skip
    "shard": {"shard_size": "huge"},
    "publish": {"out": "", "name": "a/b", "tag": "x@y", "parent": ""},
    "run": {"workers": -1, "scheduler": "", "quiet": "loud"},
}
"""A wrong value (often of the right type) for every field of every section."""


def _keys(table: dict[str, dict[str, Any]]) -> list[str]:
    return [f"{section}.{field}" for section, fields in table.items() for field in fields]


@pytest.mark.parametrize("table", [BAD_BUILD_TYPES, BAD_BUILD_VALUES], ids=["types", "values"])
def test_every_build_field_wrong_is_one_error_naming_each_key(
    table: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    assert {s: set(m.model_fields) for s, m in _SECTIONS.items()} == {s: set(f) for s, f in table.items()}
    with pytest.raises(ConfigError) as info:
        BuildConfig.from_dict(table)
    message = str(info.value)
    missing = [key for key in _keys(table) if f"  - {key}:" not in message]
    assert not missing, f"not named: {missing}\n{message}"
    assert message.count("\n  - ") >= len(_keys(table)) - 1

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(table))
    res = cli("build", "--config", str(path))
    assert res.exit_code == 2 and res.stderr.startswith("error: ") and "Traceback" not in res.output
    assert all(key in res.stderr for key in _keys(table)), res.stderr
    assert not (tmp_path / "datasets").exists() and list(tmp_path.iterdir()) == [path], "nothing was written"


BAD_TRAIN_TYPES: dict[str, Any] = {
    "shards": 5, "model": ["m"], "out": 3.5, "fusion": "xattn", "zero": "two", "steps": "many", "stop_at_step": [],
    "micro_batch": "four", "grad_accum": "two", "global_batch": {}, "lr": "fast", "min_lr_ratio": "low",
    "weight_decay": [], "betas": 0.9, "warmup_steps": "few", "schedule": 3, "grad_clip": "x", "bf16": "maybe",
    "seed": "s", "eval_every": "often", "eval_batches": "all", "save_every": [], "log_every": {}, "resume": "perhaps",
    "nproc": "n", "dist_timeout_s": "long", "deepspeed": 5, "prompt_template": 5, "number_loss_weight": "heavy", "stats_loss_weight": "some", "readout_truth": "x", "caption": 4,
    "max_length": "long", "num_workers": "w", "data_lanes": "l", "length_groups": "g", "token_cache_dir": 5, "shuffle_buffer": "b", "verify_shards": "x", "rehash_shards": "x", "verify_frozen": "x",
    "log_keys": "x", "tensorboard": "x", "show_progress": "x", "skip_bad_samples": "x", "compile_base": "x",
}  # fmt: skip
"""A wrong type for every TrainConfig field."""

BAD_TRAIN_VALUES: dict[str, Any] = {
    "shards": "", "model": "", "out": "", "fusion": {"fusion": "telepathy", "d_encoder": 3}, "zero": 7, "steps": 0,
    "stop_at_step": -1, "micro_batch": 0, "grad_accum": 0, "global_batch": 0, "lr": -1.0, "min_lr_ratio": 2.0,
    "weight_decay": -0.1, "betas": [0.9, 0.95, 0.99], "warmup_steps": -1, "schedule": "zigzag", "grad_clip": -1.0,
    "bf16": "maybe", "seed": -1, "eval_every": -1, "eval_batches": 0, "save_every": -1, "log_every": 0,
    "resume": "perhaps", "nproc": 0, "dist_timeout_s": 0, "deepspeed": "", "prompt_template": "{bogus}", "number_loss_weight": 0,
    "stats_loss_weight": -1.0, "readout_truth": "x", "caption": "poem", "max_length": 8, "num_workers": -1, "data_lanes": 0,
    "length_groups": 0, "token_cache_dir": [], "shuffle_buffer": -1, "verify_shards": "x", "rehash_shards": "x",
    "verify_frozen": "x", "log_keys": "x", "tensorboard": "x", "show_progress": "x", "skip_bad_samples": "x",
    "compile_base": "x",
}  # fmt: skip
"""A wrong value (mostly of the right type) for every TrainConfig field."""


@pytest.mark.parametrize("table", [BAD_TRAIN_TYPES, BAD_TRAIN_VALUES], ids=["types", "values"])
def test_every_train_field_wrong_is_one_error_naming_each_key(table: dict[str, Any], tmp_path: Path) -> None:
    assert set(TrainConfig.model_fields) == set(table)
    with pytest.raises(TrainConfigError) as info:
        TrainConfig.load(table)
    message = str(info.value)
    missing = [key for key in table if f"  - {key}:" not in message and f"  - {key}." not in message]
    assert not missing, f"not named: {missing}\n{message}"
    assert "(got " in message, "each problem shows the value given"

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(table))
    res = run_tool("fusion-train", "--config", str(path), timeout=120)
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert all(f"  - {key}:" in res.stderr or f"  - {key}." in res.stderr for key in table), res.stderr[-3000:]
    assert list(tmp_path.iterdir()) == [path], "nothing was written"
