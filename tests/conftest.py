"""Fixtures shared by every test folder: the real reference data in ../shared/data, a real S3 protocol server, and
the tiny random LM of the trainer and reliability suites (built once per session, see `tests/tiny_model.py`)."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from .tiny_model import build_tiny_model, use_cpu_deepspeed

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data`: real MERRA-2 subsets, CMR records and NOAA storm reports (see its README)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"the reference data folder {SHARED_DATA} is missing: clone next to shared/ as CI does")
    return SHARED_DATA


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 (a real S3 protocol endpoint); the AWS environment points at it."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {
        k: os.environ.get(k)
        for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    }
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """A fresh, empty bucket on the moto server; returns `s3://<bucket>`."""
    import boto3
    import s3fs

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    s3fs.S3FileSystem.clear_instance_cache()
    return f"s3://{name}"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with a small tokenizer (`fusion_trainer.model.tiny.make_tiny_model`), one per session."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), seed=0)


@pytest.fixture
def cpu_deepspeed(monkeypatch: pytest.MonkeyPatch) -> None:
    """DeepSpeed on the CPU accelerator, one thread per process (the trainer and reliability suites use it for
    every test)."""
    use_cpu_deepspeed(monkeypatch)
