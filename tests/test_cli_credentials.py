"""Missing object-store credentials are one `error:` line in every command line of both packages, never botocore's
traceback (it used to be 33 frames ending in NoCredentialsError)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

BIN = Path(sys.executable).parent
NO_CREDENTIALS = dict(
    AWS_EC2_METADATA_DISABLED="true",  # no instance-metadata probe
    AWS_ENDPOINT_URL="http://127.0.0.1:9",  # nothing listens: no request may leave the machine
    AWS_SHARED_CREDENTIALS_FILE="/nonexistent/credentials",
    AWS_CONFIG_FILE="/nonexistent/config",
)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k not in ("RANK", "WORLD_SIZE")}
    env.update(NO_CREDENTIALS, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    return env


def _assert_one_line(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith("error: no credentials for S3 (NoCredentialsError")
    assert "AWS_ACCESS_KEY_ID" in errors[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["versions", "s3://bucket-x/merra2-text/conus"],
        ["verify", "s3://bucket-x/merra2-text/conus@latest"],
        ["inspect", "s3://bucket-x/merra2-text/conus@latest"],
        ["tag", "s3://bucket-x/merra2-text/conus@latest", "paper"],
        ["gc", "s3://bucket-x/merra2-text/conus"],
        ["build", "--source", "s3://bucket-x/granules", "--region=-100,40,-98,42", "--start", "2019-01-01",
         "--end", "2019-01-01", "--out", "OUT", "-q"],
    ],
    ids=lambda a: a[0],
)  # fmt: skip
def test_merra2_text_without_credentials(args: list[str], tmp_path: Path) -> None:
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    proc = subprocess.run([str(BIN / "merra2-text"), *args], capture_output=True, text=True, env=_env(), timeout=120)
    _assert_one_line(proc)


def test_fusion_train_without_credentials(tmp_path: Path, tiny_model_dir: Path) -> None:
    proc = subprocess.run(
        [str(BIN / "fusion-train"), "--shards", "s3://bucket-x/merra2-text/conus@latest", "--model",
         str(tiny_model_dir), "--out", str(tmp_path / "run"), "--steps", "1"],
        capture_output=True, text=True, env=_env(), timeout=300,
    )  # fmt: skip
    _assert_one_line(proc)


@pytest.mark.parametrize("command", ["eval", "generate"])
def test_fusion_eval_and_generate_without_credentials(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both read the dataset after loading the run; the error the store raises there is what they report."""
    from botocore.exceptions import NoCredentialsError
    from fusion_trainer import cli_eval
    from fusion_trainer.evaluation import evaluate, generate

    def no_credentials(*args: Any, **kwargs: Any) -> Any:
        raise NoCredentialsError()

    monkeypatch.setattr(evaluate, "evaluate_run", no_credentials)
    monkeypatch.setattr(generate, "generate_run", no_credentials)
    app = cli_eval.eval_app if command == "eval" else cli_eval.generate_app
    result = CliRunner().invoke(app, ["--run", str(tmp_path), "--shards", "s3://bucket-x/ds/conus@latest"])
    assert result.exit_code == 1
    assert result.output.startswith("error: no credentials for S3 (NoCredentialsError")
    assert result.output.count("\n") == 1
