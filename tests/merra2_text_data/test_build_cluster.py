"""The build on a dask cluster that shares no disk with the client: separate worker processes (each in its own
working directory), granules, cache and output on a real S3 protocol server (moto). The workers fetch and subset the
granules, store the days, compute samples and write shards; the client only plans and commits, never opens a
granule, and ends with the version (id and content) of the same build run locally. A worker killed mid-build and a
client killed mid-build both end with that version too."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from climate_text_schema import open_dataset
from merra2_text_data import BuildConfig, build, verify

BIN = Path(sys.executable).parent
BBOX = "-103,36,-97,41"
PERIOD = ("2019-12-29", "2020-01-02")  # across a new year: the climatology pass runs too
NAME = "bbox-103_36_-97_41"


@pytest.fixture(scope="module")
def granule_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic MERRA-2 granules (SLV + FLX) written by `merra2-text synth`."""
    out = tmp_path_factory.mktemp("granules")
    done = subprocess.run([str(BIN / "merra2-text"), "synth", "--out", str(out), f"--region={BBOX}",
                           "--start", PERIOD[0], "--end", PERIOD[1], "--seed", "5"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(list(out.rglob("*.nc4"))) == 10
    return out


@pytest.fixture
def s3_granules(granule_folder: Path, s3_bucket: str) -> str:
    """The granules uploaded to the bucket: the build's source is `s3://BUCKET/granules`."""
    import s3fs

    fs = s3fs.S3FileSystem()
    for path in sorted(granule_folder.rglob("*.nc4")):
        fs.put_file(str(path), f"{s3_bucket}/granules/{path.relative_to(granule_folder)}")
    return f"{s3_bucket}/granules"


def _options(**extra: Any) -> dict[str, Any]:
    options: dict[str, Any] = dict(region=BBOX, start=PERIOD[0], end=PERIOD[1], window="1d", time_step="3h",
                                   tile="11x3", shard_size="40KB", quiet=True)  # fmt: skip
    options.update(extra)
    return options


@pytest.fixture
def local_version(granule_folder: Path, tmp_path: Path) -> tuple[str, Path]:
    """The same build run locally (one process, local folder source, local cache and output)."""
    ref = build(BuildConfig.from_options(**_options(source=str(granule_folder), out=str(tmp_path / "local"),
                                                    cache_dir=str(tmp_path / "local-cache"))))  # fmt: skip
    return ref, Path(open_dataset(ref).version_url)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Any]:
    """Two worker processes, each with its own working and scratch directory (none is the client's)."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=2,
            processes=True,
            threads_per_worker=1,
            dashboard_address=None,
            local_directory=str(tmp_path / "dask"),
        ) as cluster,  # fmt: skip
        Client(cluster) as client,
    ):
        for i, worker in enumerate(sorted(client.scheduler_info()["workers"])):
            home = tmp_path / f"worker{i}"
            home.mkdir()
            client.run(os.chdir, str(home), workers=[worker])
        yield cluster


class _GranuleOpens:
    """Every granule this (the client) process opens or fetches: h5py.File and the download transfer."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import h5py
        from merra2_text_data.source import download

        self.calls: list[str] = []
        original = h5py.File.__init__

        def opened(obj: Any, name: Any, *args: Any, **kwargs: Any) -> None:
            self.calls.append(f"h5py.File({getattr(name, 'path', name)!r})")
            original(obj, name, *args, **kwargs)

        def transfer(granule: Any, *args: Any, **kwargs: Any) -> Any:
            self.calls.append(f"download {granule.url}")
            raise AssertionError("the client downloads a granule")

        monkeypatch.setattr(h5py.File, "__init__", opened)
        monkeypatch.setattr(download, "_transfer", transfer)


def _content(version_url: str) -> dict[str, Any]:
    """What a version holds: manifest (but its creation time and file digests), index, quarantine, card and every shard's bytes."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(version_url)
    manifest = json.loads(fs.cat_file(f"{root}/manifest.json"))
    created = manifest.pop("created_at")
    manifest.pop("files")  # digests of the bytes of the card (which holds created_at) and the parquet files
    shards = {p.rsplit("/", 1)[-1]: fs.cat_file(p) for p in sorted(fs.glob(f"{root}/shards/*.tar"))}
    with fs.open(f"{root}/index.parquet", "rb") as fh:
        index = pd.read_parquet(fh)
    with fs.open(f"{root}/quarantine.parquet", "rb") as fh:
        quarantine = pd.read_parquet(fh)
    card = fs.cat_file(f"{root}/README.md").decode().replace(created, "CREATED")
    return {"manifest": manifest, "shards": shards, "index": index, "quarantine": quarantine, "card": card}


def _assert_same_version(ref: str, local: tuple[str, Path]) -> None:
    assert ref.rsplit("@", 1)[1] == local[0].rsplit("@", 1)[1], "the version id"
    ours, theirs = _content(open_dataset(ref).version_url), _content(str(local[1]))
    assert ours["manifest"] == theirs["manifest"]
    assert ours["shards"] == theirs["shards"] and len(ours["shards"]) >= 4
    pd.testing.assert_frame_equal(ours["index"], theirs["index"])
    pd.testing.assert_frame_equal(ours["quarantine"], theirs["quarantine"])
    assert ours["card"] == theirs["card"]
    assert verify(ref).ok


def test_a_cluster_build_with_s3_cache_and_output_equals_the_local_build(
    s3_granules: str, s3_bucket: str, cluster: Any, local_version: tuple[str, Path], monkeypatch: pytest.MonkeyPatch,
    granule_folder: Path, tmp_path: Path,
) -> None:  # fmt: skip
    """Acceptance: `--scheduler ADDRESS --cache s3://... --out s3://...`, granules on S3: the version equals the local
    build's; the cube was stored day by day in the S3 cache by the workers, and the client opened no granule."""
    import s3fs
    from distributed import Client, get_task_stream

    opens = _GranuleOpens(monkeypatch)
    config = BuildConfig.from_options(**_options(source=s3_granules, out=f"{s3_bucket}/out",
                                                 cache=f"{s3_bucket}/cache", scheduler=cluster.scheduler_address))  # fmt: skip
    with Client(cluster) as watcher, get_task_stream(watcher) as stream:
        ref = build(config)
    assert opens.calls == [], opens.calls
    _assert_same_version(ref, local_version)

    version = ref.rsplit("@", 1)[1]
    ran = {str(t["key"]).split("-", 1)[0] for t in stream.data if version in str(t["key"])}
    assert ran == {"cube", "stats", "samples"}, (
        "fetch + subset, the climatology pass and the shards ran as tasks"
    )
    fs = s3fs.S3FileSystem()
    markers = sorted(p.rsplit("/", 1)[-1][:8] for p in fs.glob(f"{s3_bucket}/cache/zarr/days/*.json"))
    assert markers == ["20191229", "20191230", "20191231", "20200101", "20200102"]
    assert not fs.exists(f"{s3_bucket}/out/{NAME}/staging"), "the receipts are cleaned up after the commit"

    # the instrument sees a client that does read granules: a local build (new output and cache) in this process
    build(BuildConfig.from_options(**_options(source=str(granule_folder), out=str(tmp_path / "control"),
                                              cache_dir=str(tmp_path / "control-cache"))))  # fmt: skip
    assert any(c.startswith("h5py.File(") and ".nc4" in c for c in opens.calls), opens.calls


def test_a_worker_killed_mid_build_still_ends_with_the_local_version(
    s3_granules: str, s3_bucket: str, cluster: Any, local_version: tuple[str, Path]
) -> None:
    """One worker process is SIGKILLed as soon as the first day is stored: the scheduler reruns its tasks on the
    other worker (or its restarted self) and the build ends with the local version."""
    import s3fs
    from distributed import Client

    config = BuildConfig.from_options(**_options(source=s3_granules, out=f"{s3_bucket}/out",
                                                 cache=f"{s3_bucket}/cache", scheduler=cluster.scheduler_address))  # fmt: skip
    fs = s3fs.S3FileSystem()
    killed: list[str] = []
    finished = threading.Event()

    def kill_one() -> None:
        with Client(cluster) as client:
            pids = client.run(os.getpid)
            while not finished.is_set() and not fs.glob(f"{s3_bucket}/cache/zarr/days/*.json", refresh=True):
                time.sleep(0.05)
            if finished.is_set():
                return
            victim = sorted(pids)[0]
            os.kill(pids[victim], signal.SIGKILL)
            killed.append(victim)

    killer = threading.Thread(target=kill_one)
    killer.start()
    try:
        ref = build(config)
    finally:
        finished.set()
        killer.join(timeout=60)
    assert killed, "the build finished before a worker could be killed"
    _assert_same_version(ref, local_version)


@pytest.mark.slow
def test_a_client_killed_mid_build_resumes_to_the_local_version(
    s3_granules: str, s3_bucket: str, cluster: Any, local_version: tuple[str, Path], tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """`merra2-text build --scheduler ...` SIGKILLed once shards are being written: the same command again skips what
    the receipts say is done and ends with the local version."""
    import s3fs

    args = [str(BIN / "merra2-text"), "build", f"--region={BBOX}", "--start", PERIOD[0], "--end", PERIOD[1],
            "--window", "1d", "--time-step", "3h", "--tile", "11x3", "--shard-size", "40KB", "--quiet",
            "--source", s3_granules, "--out", f"{s3_bucket}/out", "--cache", f"{s3_bucket}/cache",
            "--scheduler", cluster.scheduler_address]  # fmt: skip
    fs = s3fs.S3FileSystem()
    version = local_version[0].rsplit("@", 1)[1]
    staging = f"{s3_bucket}/out/{NAME}/staging/{version}"
    with (tmp_path / "client.log").open("w") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while (
            time.monotonic() < deadline
            and proc.poll() is None
            and not fs.glob(f"{staging}/*.json", refresh=True)
        ):
            time.sleep(0.05)
        assert proc.poll() is None, (tmp_path / "client.log").read_text()[-3000:]
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not fs.exists(f"{s3_bucket}/out/{NAME}/versions/{version}/manifest.json"), "killed before its commit"
    caplog.set_level("INFO", logger="merra2_text_data.run.runner")
    ref = build(BuildConfig.from_options(**_options(source=s3_granules, out=f"{s3_bucket}/out",
                                                    cache=f"{s3_bucket}/cache",
                                                    scheduler=cluster.scheduler_address)))  # fmt: skip
    assert any("resuming cube" in r.getMessage() for r in caplog.records), [
        r.getMessage() for r in caplog.records
    ]
    _assert_same_version(ref, local_version)


def test_a_per_worker_local_cache_builds_the_same_version(
    s3_granules: str, s3_bucket: str, cluster: Any, local_version: tuple[str, Path], tmp_path: Path
) -> None:
    """`--cache` a local folder on a cluster: each worker's own (here: different folders, as on machines without a
    shared disk, by giving each worker process its own relative path). Shard tasks build the days their worker
    lacks from the granules, and the version is the local one."""
    config = BuildConfig.from_options(**_options(source=s3_granules, out=f"{s3_bucket}/out", cache="cache",
                                                 scheduler=cluster.scheduler_address))  # fmt: skip
    ref = build(config)
    _assert_same_version(ref, local_version)


def test_an_era5_store_is_opened_by_the_workers_themselves(
    s3_bucket: str, cluster: Any, tmp_path: Path
) -> None:
    """A source that already is a zarr store (`era5:s3://...`) has no cube stage: each task opens the store URL where
    it runs; the version equals the same build in one process."""
    import s3fs
    from distributed import Client, get_task_stream

    from .test_era5 import _sculpt_store

    store = _sculpt_store(tmp_path / "era5.zarr")
    s3fs.S3FileSystem().put(str(store), f"{s3_bucket}/era5.zarr", recursive=True)
    options = dict(source=f"era5:{s3_bucket}/era5.zarr", region="-30,-20,30,40", start="2026-03-24",
                   end="2026-03-26", window="1h", quiet=True)  # fmt: skip
    local = build(BuildConfig.from_options(**options, out=str(tmp_path / "local")))
    with Client(cluster) as watcher, get_task_stream(watcher) as stream:
        ref = build(
            BuildConfig.from_options(**options, out=f"{s3_bucket}/out", scheduler=cluster.scheduler_address)
        )
    assert not any(str(t["key"]).startswith("cube-") for t in stream.data)
    assert any(str(t["key"]).startswith("samples-") for t in stream.data)
    assert ref.rsplit("@", 1)[1] == local.rsplit("@", 1)[1]
    ours, theirs = _content(open_dataset(ref).version_url), _content(open_dataset(local).version_url)
    assert ours["manifest"] == theirs["manifest"] and ours["shards"] == theirs["shards"]
