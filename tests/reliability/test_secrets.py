"""Secrets: with EARTHDATA_PASSWORD, EARTHDATA_TOKEN and AWS_SECRET_ACCESS_KEY set to marker strings, a build to S3,
verify, inspect, a training run on that S3 version and failing cases (NASA unreachable, unknown dataset, missing
bucket, login without network) run with debug logging; no marker may appear in any output, log, manifest, card,
checkpoint, metrics file, object in the bucket or error message.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import boto3
import pytest

from .conftest import BBOX, TINY_TRAIN, build_args, files_under, run_tool, tool_env

MARKERS = {
    "EARTHDATA_PASSWORD": "pw-LEAK-3b9f1c77",
    "EARTHDATA_TOKEN": "tok-LEAK-8e2d4a19",
    "AWS_SECRET_ACCESS_KEY": "aws-LEAK-51c7e0d2",
}


def _leaks(name: str, data: bytes | str) -> list[str]:
    raw = data.encode("utf-8", "replace") if isinstance(data, str) else data
    return [f"{env} in {name}" for env, marker in MARKERS.items() if marker.encode() in raw]


@pytest.mark.slow
def test_no_secret_reaches_any_output_file_or_message(
    granule_source: Path, tiny_model_dir: Path, s3_bucket: str, s3_endpoint: str, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = tool_env(**MARKERS, EARTHDATA_USERNAME="someone", HOME=str(home), AWS_ENDPOINT_URL=s3_endpoint,
                   AWS_ACCESS_KEY_ID="testing")  # fmt: skip
    outputs: list[tuple[str, str]] = []

    def run(ok: bool, tool: str, *args: str) -> Any:
        res = run_tool(tool, *args, env=env, timeout=300)
        outputs.append((f"{tool} {args[:2]}", res.stdout + res.stderr))
        assert (res.returncode == 0) is ok, f"{tool} {args}: exit {res.returncode}\n{res.stderr[-3000:]}"
        if not ok:
            assert "error" in res.stderr.lower() and "Traceback" not in res.stderr, res.stderr[-3000:]
        return res

    root = f"{s3_bucket}/merra2-text"
    built = run(
        True, "merra2-text", *build_args(granule_source, root, "--cache-dir", str(tmp_path / "cache")), "-vv"
    )
    ref = built.stdout.strip().splitlines()[-1]
    run(True, "merra2-text", "verify", ref, "-vv")
    run(True, "merra2-text", "inspect", ref, "--png", str(tmp_path / "sample.png"))
    run(True, "fusion-train", "--shards", ref, "--model", str(tiny_model_dir), "--out", str(tmp_path / "run"),
        "--steps", "3", "--save-every", "2", "--no-progress", "--log-level", "DEBUG", *TINY_TRAIN)  # fmt: skip

    run(False, "merra2-text", "build", "--source", "earthaccess", f"--region={BBOX}", "--start", "2019-01-01",
        "--end", "2019-01-02", "--out", str(tmp_path / "nasa"), "-vv")  # fmt: skip
    run(False, "merra2-text", "verify", f"{root}/nowhere@latest", "-vv")
    run(False, "merra2-text", *build_args(granule_source, "s3://no-such-bucket-for-tests/x"), "-vv")
    run(False, "fusion-train", "--shards", f"{root}/nowhere@latest", "--model", str(tiny_model_dir),
        "--out", str(tmp_path / "run2"), "--log-level", "DEBUG")  # fmt: skip

    leaks: list[str] = []
    for name, text in outputs:
        leaks += _leaks(f"the output of {name}", text)
    for path in files_under(tmp_path):
        leaks += _leaks(str(path.relative_to(tmp_path)), path.read_bytes())
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    bucket = s3_bucket.removeprefix("s3://")
    keys = [
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        for o in page.get("Contents", [])
    ]
    assert any(k.endswith("manifest.json") for k in keys) and any(k.endswith(".tar") for k in keys)
    for key in keys:
        leaks += _leaks(f"s3://{bucket}/{key}", s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    assert (tmp_path / "run" / "checkpoints").is_dir() and (tmp_path / "run" / "metrics.jsonl").is_file()
    assert not leaks, leaks


def test_login_without_network_names_no_secret(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Earthdata login with marker credentials and no reachable urs.earthdata.nasa.gov: a CredentialsError that says
    so, and neither it nor the debug log holds a marker."""
    import earthaccess
    from merra2_text_data.errors import CredentialsError
    from merra2_text_data.source.fetch import login_earthaccess

    for key, value in MARKERS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("EARTHDATA_USERNAME", "someone")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    from earthaccess.auth import Auth

    monkeypatch.setattr(earthaccess, "_auth", Auth())  # logged out
    if "__store__" in vars(earthaccess):
        monkeypatch.delattr(earthaccess, "__store__")

    def unreachable(*args: Any, **kwargs: Any) -> Any:
        import requests

        raise requests.ConnectionError(
            "HTTPSConnectionPool(host='urs.earthdata.nasa.gov', port=443): unreachable"
        )

    monkeypatch.setattr("requests.Session.request", unreachable)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(CredentialsError, match="cannot be reached") as info:
        login_earthaccess()
    assert not _leaks("the message", str(info.value)) and not _leaks("the log", caplog.text)


@pytest.mark.parametrize("package", ["merra2_text_data", "fusion_trainer"])
def test_log_lines_never_show_a_password_in_a_url(
    package: str, capsys: pytest.CaptureFixture[str], root_logging: logging.Logger
) -> None:
    """Every command line's logging redacts URL passwords at every level (INFO lines echo URLs too)."""
    import importlib

    cli = importlib.import_module("merra2_text_data.cli" if package == "merra2_text_data" else "fusion_trainer.cli_support")
    cli.setup_logging(2 if package == "merra2_text_data" else "DEBUG")
    logging.getLogger(f"{package}.probe").info("reading s3://AKIA:SECRET-PW@minio:9000/bucket/ds@latest")
    logging.getLogger(f"{package}.probe").debug("GET https://user:hunter2@example.org/x")
    err = capsys.readouterr().err
    assert "s3://AKIA:***@minio:9000/bucket/ds@latest" in err and "https://user:***@example.org/x" in err, err
    assert "SECRET-PW" not in err and "hunter2" not in err
