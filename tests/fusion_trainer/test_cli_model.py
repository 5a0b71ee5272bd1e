"""The `fusion-base` and `fusion-model` commands."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fusion_trainer.cli_model import base_app, model_app
from typer.testing import CliRunner

runner = CliRunner()


def test_help_lists_the_commands() -> None:
    base = runner.invoke(base_app, ["--help"])
    assert base.exit_code == 0 and "fetch" in base.output and "tiny" in base.output
    model = runner.invoke(model_app, ["info", "--help"])
    assert model.exit_code == 0 and "--preset" in model.output and "--zero" in model.output


def test_tiny_writes_a_loadable_model(tmp_path: Path) -> None:
    result = runner.invoke(base_app, ["tiny", "gpt_neo", "--out", str(tmp_path / "neo"), "--seed", "2"])
    assert result.exit_code == 0, result.output
    assert Path(result.output.strip().splitlines()[-1]) == (tmp_path / "neo").resolve()
    assert json.loads((tmp_path / "neo" / "fusion_base.json").read_text()) == {"tiny": "gpt_neo", "seed": 2}

    info = runner.invoke(
        model_app, ["info", "--model", str(tmp_path / "neo"), "--fusion", "prefix", "--json"]
    )
    assert info.exit_code == 0, info.output
    report = json.loads(info.output)
    assert report["model_type"] == "gpt_neo" and report["fusion"] == "prefix"
    assert report["parameters"]["trainable"] > 0 and report["parameters"]["frozen"] > 0
    config_only = runner.invoke(
        model_app, ["info", "--model", str(tmp_path / "neo" / "config.json"), "--json"]
    )
    assert (
        json.loads(config_only.output)["parameters"]
        == json.loads(runner.invoke(model_app, ["info", "--model", str(tmp_path / "neo"), "--json"]).output)[
            "parameters"
        ]
    )


def test_info_llama_3_8b_preset_without_weights() -> None:
    result = runner.invoke(
        model_app, ["info", "--preset", "llama-3-8b", "--world", "8", "--zero", "2", "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    mem = report["memory_per_rank"]
    assert 15.9e9 < mem["frozen_bytes"] < 16.2e9
    assert mem["world_size"] == 8 and mem["zero_stage"] == 2
    assert mem["optimizer_bytes"] == -(-report["parameters"]["trainable"] * 8 // 8)
    text = runner.invoke(model_app, ["info", "--preset", "llama-3-8b"])
    assert text.exit_code == 0 and "frozen" in text.output and "16.06 GB" in text.output


def test_fusion_config_file_feeds_info(tmp_path: Path) -> None:
    (tmp_path / "run.yaml").write_text("fusion:\n  fusion: add\n  variables: [T2M, U10M]\n  d_encoder: 64\n")
    result = runner.invoke(
        model_app, ["info", "--preset", "smollm2-135m", "--config", str(tmp_path / "run.yaml"), "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["fusion"] == "add"


@pytest.mark.parametrize(
    ("app", "args", "message"),
    [
        (base_app, ["tiny", "bert", "--out", "x"], "unknown tiny architecture 'bert'"),
        (base_app, ["fetch", "llama-70b", "--out", "x"], "unknown base 'llama-70b'"),
        (model_app, ["info"], "exactly one of --model"),
        (model_app, ["info", "--model", "/nonexistent/base"], "no such file or folder"),
        (model_app, ["info", "--preset", "gpt-9"], "unknown preset 'gpt-9'"),
        (model_app, ["info", "--preset", "llama-3-8b", "--zero", "5"], "zero_stage"),
        (model_app, ["info", "--preset", "llama-3-8b", "--fusion", "concat"], "FusionConfig.fusion"),
        (model_app, ["info", "--preset", "llama-3-8b", "--n-variables", "3", "--dtype", "fp8"], "--dtype"),
    ],
)
def test_errors_exit_non_zero_with_one_clear_message(app: object, args: list[str], message: str) -> None:
    result = runner.invoke(app, args)  # type: ignore[arg-type]
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output


def test_console_scripts_are_installed() -> None:
    exe = shutil.which("fusion-model", path=str(Path(sys.executable).parent))
    assert exe is not None, "reinstall: pip install --no-deps -e packages/fusion_trainer"
    proc = subprocess.run([exe, "info", "--preset", "gpt-9"], capture_output=True, text=True, check=False)
    assert proc.returncode == 1 and "unknown preset 'gpt-9'" in proc.stderr
