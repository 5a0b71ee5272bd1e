"""A store that fails: an S3 endpoint (moto) behind a proxy on 127.0.0.1 that answers 503 SlowDown, drops the
connection, or forwards a request and then drops the connection (the client never learns it succeeded), during shard
upload and during the manifest commit.

What the user sees: transient faults are retried and the build succeeds; a persistent fault ends the build with one
error naming the object and the way out (rerun). What is preserved: no reader ever sees a partial version (a reader
polling the version folder all along either gets "not found" or the complete, verified version), and the rerun
reaches the fault-free version without uploading again the shards that were already stored.
"""

from __future__ import annotations

import http.client
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import fsspec
import pytest
import s3fs
from climate_text_schema import DatasetNotFoundError, open_dataset

from .conftest import DATASET, build_args, cli

Policy = Callable[[str, str, int], str]
"""`(method, path, attempt) -> action`: forward | 503 | drop | forward-then-drop (attempt counts from 1 per path)."""

_SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code><Message>Please reduce your request rate.'
    b"</Message></Error>"
)


@dataclass
class Proxy:
    """A fault-injecting HTTP proxy in front of the moto server."""

    upstream: str
    policy: Policy = lambda method, path, attempt: "forward"
    log: list[tuple[str, str, str]] = field(default_factory=list)
    attempts: dict[tuple[str, str], int] = field(default_factory=dict)
    url: str = ""

    def puts(self, fragment: str, action: str = "forward") -> int:
        """How many PUTs of paths containing `fragment` got `action`."""
        return sum(1 for m, p, a in self.log if m == "PUT" and fragment in p and a == action)


def _handler(proxy: Proxy) -> type[BaseHTTPRequestHandler]:
    host, port = proxy.upstream.removeprefix("http://").split(":")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        def _body(self) -> bytes:
            if "chunked" not in self.headers.get("Transfer-Encoding", "").lower():
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = b""
            while True:  # HTTP/1.1 chunked transfer (botocore streams bodies with checksum trailers this way)
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return body
                body += self.rfile.read(size)
                self.rfile.readline()

        def _any(self) -> None:
            body = self._body()
            key = (self.command, self.path.split("?")[0])
            attempt = proxy.attempts[key] = proxy.attempts.get(key, 0) + 1
            action = proxy.policy(self.command, self.path, attempt)
            proxy.log.append((self.command, self.path, action))
            if action == "drop":
                self.close_connection = True
                self.connection.close()
                return
            if action == "503":
                self.send_response(503)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(_SLOW_DOWN)))
                self.end_headers()
                self.wfile.write(_SLOW_DOWN)
                return
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
            dropped = ("connection", "expect", "transfer-encoding", "content-length")
            headers = {k: v for k, v in self.headers.items() if k.lower() not in dropped}
            headers["Content-Length"] = str(len(body))
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            conn.close()
            if action == "forward-then-drop":  # the store did it; the client never hears so
                self.close_connection = True
                self.connection.close()
                return
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                    self.send_header(k, v)
            length = resp.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
            self.send_header("Content-Length", length)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

    return Handler


@pytest.fixture
def proxy(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Proxy]:
    """The proxy, with the AWS environment pointed at it and short client timeouts/retries (fsspec config)."""
    werkzeug = logging.getLogger("werkzeug")  # moto's request log would land in the CLI's captured stderr
    monkeypatch.setattr(werkzeug, "level", logging.WARNING)
    state = Proxy(upstream=s3_endpoint)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", state.url)
    monkeypatch.setitem(fsspec.config.conf, "s3", {"config_kwargs": {
        "connect_timeout": 2, "read_timeout": 2, "retries": {"max_attempts": 2, "mode": "standard"}}})  # fmt: skip
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 2)  # s3fs's own retry loop (5 by default, with backoff)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        s3fs.S3FileSystem.clear_instance_cache()


class Reader(threading.Thread):
    """Polls a version folder straight on moto (not through the proxy) while the build runs: each look must be "not
    found" or the complete version (every shard of the manifest present with its size)."""

    def __init__(self, version_url: str, endpoint: str) -> None:
        super().__init__(daemon=True)
        self.version_url, self.options = version_url, {"client_kwargs": {"endpoint_url": endpoint}}
        self.stop, self.looks, self.complete, self.problems = threading.Event(), 0, 0, []  # type: ignore[var-annotated]

    def run(self) -> None:
        while not self.stop.is_set():
            self.looks += 1
            try:
                ds = open_dataset(self.version_url, self.options)
            except DatasetNotFoundError:
                self.stop.wait(0.02)
                continue
            except Exception as exc:  # anything else is a reader seeing a broken version
                self.problems.append(f"{type(exc).__name__}: {exc}")
                continue
            for shard in ds.manifest.shards:
                size = ds.fs.size(ds.fs._strip_protocol(ds.url_of(shard.path)))
                if size != shard.bytes:
                    self.problems.append(f"{shard.path}: {size} bytes, manifest {shard.bytes}")
            self.complete += 1
            self.stop.wait(0.02)


@pytest.fixture
def setting(s3_bucket: str, granule_source: Path, reference_build: str, s3_endpoint: str) -> dict[str, Any]:
    root = f"{s3_bucket}/merra2-text"
    version = open_dataset(reference_build).version
    return {
        "args": build_args(
            granule_source, root, "--cache-dir", str(Path(reference_build).parents[2] / ".cache")
        ),
        "root": root,
        "version": version,
        "ref": f"{root}/{DATASET}@{version}",
        "reader": Reader(f"{root}/{DATASET}/versions/{version}", s3_endpoint),
    }


def _run(setting: dict[str, Any]) -> Any:
    reader: Reader = setting["reader"]
    reader.start()
    try:
        return cli(*setting["args"])
    finally:
        reader.stop.set()
        reader.join(10)


def _healed_rerun(setting: dict[str, Any], proxy: Proxy) -> None:
    proxy.policy = lambda method, path, attempt: "forward"
    res = cli(*setting["args"])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip().splitlines()[-1] == setting["ref"]
    assert cli("verify", setting["ref"]).exit_code == 0


def test_transient_slow_down_and_dropped_connections_are_retried(
    setting: dict[str, Any], proxy: Proxy
) -> None:
    def policy(method: str, path: str, attempt: int) -> str:
        if method == "PUT" and "/shards/" in path and attempt == 1:
            return "503" if "train" in path else "drop"
        if method == "PUT" and path.endswith("manifest.json") and attempt == 1:
            return "503"
        return "forward"

    proxy.policy = policy
    res = _run(setting)
    assert res.exit_code == 0, res.output
    assert res.stdout.strip().splitlines()[-1] == setting["ref"]
    assert proxy.puts("/shards/", "503") >= 1 and proxy.puts("/shards/", "drop") >= 1
    assert proxy.puts("manifest.json", "503") == 1
    assert cli("verify", setting["ref"]).exit_code == 0
    assert not setting["reader"].problems, setting["reader"].problems


@pytest.mark.parametrize("action", ["503", "drop"])
def test_a_shard_upload_that_keeps_failing_then_a_rerun(
    setting: dict[str, Any], proxy: Proxy, action: str
) -> None:
    victim = "shards/train-000002.tar"
    proxy.policy = lambda method, path, attempt: action if method == "PUT" and victim in path else "forward"
    res = _run(setting)
    assert res.exit_code == 1 and res.stderr.startswith("error: ") and "Traceback" not in res.output, (
        res.output
    )
    assert victim in res.stderr and "rerun" in res.stderr, res.stderr
    with pytest.raises(DatasetNotFoundError):
        open_dataset(setting["ref"])
    reader: Reader = setting["reader"]
    assert reader.looks > 0 and reader.complete == 0 and not reader.problems, reader.problems
    stored_before = proxy.puts("shards/train-000000.tar")
    assert stored_before == 1
    _healed_rerun(setting, proxy)
    assert proxy.puts("shards/train-000000.tar") == 1, "a shard stored before the failure was uploaded again"


def test_a_manifest_commit_that_keeps_failing_then_a_rerun(setting: dict[str, Any], proxy: Proxy) -> None:
    proxy.policy = lambda method, path, attempt: (
        "503" if method == "PUT" and path.endswith("manifest.json") else "forward"
    )
    res = _run(setting)
    assert res.exit_code == 1 and res.stderr.startswith("error: ") and "Traceback" not in res.output, (
        res.output
    )
    assert "manifest.json" in res.stderr and "rerun" in res.stderr, res.stderr
    with pytest.raises(DatasetNotFoundError, match="did not finish"):
        open_dataset(f"{setting['root']}/{DATASET}/versions/{setting['version']}")
    assert setting["reader"].complete == 0 and not setting["reader"].problems
    shard_puts = proxy.puts("/shards/")
    _healed_rerun(setting, proxy)
    assert proxy.puts("/shards/") == shard_puts, "shards were uploaded again"


def test_a_manifest_stored_but_never_acknowledged(setting: dict[str, Any], proxy: Proxy) -> None:
    """The manifest PUT reaches the store but the connection drops before the answer: the client retries its
    create-only PUT, the store refuses it (the object exists), and the build recognises its own commit."""

    def policy(method: str, path: str, attempt: int) -> str:
        return (
            "forward-then-drop"
            if method == "PUT" and path.endswith("manifest.json") and attempt == 1
            else "forward"
        )

    proxy.policy = policy
    res = _run(setting)
    assert res.exit_code == 0, res.output
    assert proxy.puts("manifest.json", "forward-then-drop") == 1 and proxy.puts("manifest.json") >= 1
    assert cli("verify", setting["ref"]).exit_code == 0
    assert open_dataset(f"{setting['root']}/{DATASET}@latest").version == setting["version"]
    assert not setting["reader"].problems
