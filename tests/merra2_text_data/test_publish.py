"""Content-addressed versions on local disk: commit protocol, create-only manifest, tags, verify, gc, diff."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pytest
from climate_text_schema import (
    SCHEMA_VERSION,
    BuilderInfo,
    Manifest,
    NormStats,
    SampleMeta,
    SourceInfo,
    VariableInfo,
    open_dataset,
)
from merra2_text_data.errors import PublishError
from merra2_text_data.fs import url_to_fs, write_create_only
from merra2_text_data.store.publish import commit_version, compute_version, manifest_exists
from merra2_text_data.store.shards import SampleRecord, write_shard
from merra2_text_data.store.versions import diff, gc, list_versions, tag, verify

SOURCES = [SourceInfo(granule="M2T1NXSLV.5.12.4:MERRA2_400.tavg1_2d_slv_Nx.20190101.nc4",
                      file="MERRA2_400.tavg1_2d_slv_Nx.20190101.nc4", bytes=1234, checksum=None)]  # fmt: skip


def publish_fake(
    dataset_url: str, days: int = 4, window_tag: str = "1d", tag_name: str | None = "latest"
) -> str:
    """Write and commit a small version with my own API (train: days-1 samples, test: 1); returns its id."""
    fs, dataset_url = url_to_fs(dataset_url)
    config = {"name": "conus", "days": days, "window": window_tag}
    version = compute_version(config, SOURCES)
    vurl = f"{dataset_url}/versions/{version}"
    rows, shards = [], []
    for split, numbers in (("train", range(days - 1)), ("test", range(days - 1, days))):
        records = []
        for i in numbers:
            t0 = pd.Timestamp("2019-01-01", tz="UTC") + pd.Timedelta(days=i)
            arr = np.full((24, 1, 3, 4), 270.0 + i, dtype=np.float32) + np.arange(4, dtype=np.float32)
            stats = {"T2M": {"mean": float(arr.mean()), "min": float(arr.min()), "max": float(arr.max())}}
            key = f"conus-{t0:%Y%m%d}T0000"
            text = f"Over the region the mean 2 m temperature was {arr.mean() - 273.15:.1f} °C."
            meta = SampleMeta(key=key, split=split, time_start=t0.isoformat(),
                              time_end=(t0 + pd.Timedelta(days=1)).isoformat(), region="conus",
                              bbox=[-105.0, 35.0, -103.125, 36.0], variables=["T2M"], units=["K"],
                              lat=[35.0, 35.5, 36.0], lon=[-105.0, -104.375, -103.75, -103.125], stats=stats)  # fmt: skip
            records.append(SampleRecord(key=key, array=arr, text=text, meta=meta))
            rows.append({"key": key, "split": split, "shard": f"shards/{split}-000000.tar", "time_start": t0,
                         "time_end": t0 + pd.Timedelta(days=1), "region": "conus", "lat_min": 35.0, "lat_max": 36.0,
                         "lon_min": -105.0, "lon_max": -103.125, "text": text, "T2M_mean": stats["T2M"]["mean"],
                         "T2M_min": stats["T2M"]["min"], "T2M_max": stats["T2M"]["max"]})  # fmt: skip
        info, _ = write_shard(fs, vurl, split, 0, records)
        shards.append(info)
    manifest = Manifest(
        schema_version=SCHEMA_VERSION, name="conus", version=version, created_at=dt.datetime.now(dt.UTC).isoformat(),
        builder=BuilderInfo(package="merra2-text-data", version="test"), config=config,
        variables=[VariableInfo(name="T2M", units="K")], window=window_tag, time_step="1h",
        splits={"train": days - 1, "test": 1}, shards=shards, normalization={"T2M": NormStats(mean=271.0, std=1.0)},
        sources=SOURCES, quarantined=0,
    )  # fmt: skip
    index = pd.DataFrame(rows)
    quarantine = pd.DataFrame({"key": pd.Series([], dtype=str), "reason": pd.Series([], dtype=str)})
    commit_version(fs, dataset_url, manifest, index, quarantine, "# card\n", tag=tag_name)
    return version


def test_version_id_is_a_content_address() -> None:
    a = compute_version({"x": 1, "y": [1, 2]}, SOURCES)
    assert a == compute_version({"y": [1, 2], "x": 1}, list(reversed(SOURCES)))
    assert len(a) == 20 and int(a, 16) >= 0
    assert a != compute_version({"x": 2, "y": [1, 2]}, SOURCES)
    other = [SourceInfo(granule=SOURCES[0].granule, file=SOURCES[0].file, bytes=999)]
    assert a != compute_version({"x": 1, "y": [1, 2]}, other)
    assert a != compute_version({"x": 1, "y": [1, 2]}, SOURCES, inputs={"events.csv": "abc"})


def test_publish_resolve_list_verify(tmp_path: Path) -> None:
    root = tmp_path / "out" / "conus"
    version = publish_fake(str(root))
    ds = open_dataset(f"{root}@latest")
    assert ds.version == version and ds.manifest.splits == {"train": 3, "test": 1}
    assert (root / "tags" / "latest").read_text().strip() == version
    assert not (root / "staging").exists()
    files = sorted(
        p.relative_to(root / "versions" / version).as_posix()
        for p in (root / "versions" / version).rglob("*")
    )
    assert files == ["README.md", "index.parquet", "manifest.json", "manifest.json.sha256", "quarantine.parquet", "shards",
                     "shards/test-000000.tar", "shards/train-000000.tar"]  # fmt: skip
    report = verify(f"{root}@latest")
    assert report.ok, report.problems
    assert report.samples == 4 and report.shards == 2
    [info] = list_versions(str(root))
    assert (info.id, info.samples, info.tags) == (version, 4, ["latest"])


def test_same_inputs_same_version_nothing_rewritten(tmp_path: Path) -> None:
    root = tmp_path / "conus"
    v1 = publish_fake(str(root))
    manifest = root / "versions" / v1 / "manifest.json"
    files = ("manifest.json", "index.parquet", "quarantine.parquet", "README.md", "manifest.json.sha256")
    before = [((manifest.parent / f).read_bytes(), (manifest.parent / f).stat().st_mtime_ns) for f in files]
    # a second commit of the same version id (another created_at): refused, the published files untouched
    with pytest.raises(PublishError, match="already committed"):
        publish_fake(str(root))
    assert [
        ((manifest.parent / f).read_bytes(), (manifest.parent / f).stat().st_mtime_ns) for f in files
    ] == before
    assert len(list_versions(str(root))) == 1


def test_create_only_never_replaces(tmp_path: Path) -> None:
    fs = fsspec.filesystem("file")
    target = tmp_path / "m.json"
    assert write_create_only(fs, str(target), b"one") is True
    assert write_create_only(fs, str(target), b"two") is False
    assert target.read_bytes() == b"one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


def test_verify_names_the_damaged_shard(tmp_path: Path) -> None:
    root = tmp_path / "conus"
    version = publish_fake(str(root))
    shard = root / "versions" / version / "shards" / "train-000000.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF  # inside the first member's data
    shard.write_bytes(bytes(data))
    report = verify(f"{root}@{version[:8]}")
    assert not report.ok
    assert any(p.startswith("shards/train-000000.tar") and "sha256" in p for p in report.problems), (
        report.problems
    )
    assert not any("test-000000" in p for p in report.problems)


def test_verify_reports_missing_shard_and_index_mismatch(tmp_path: Path) -> None:
    root = tmp_path / "conus"
    version = publish_fake(str(root))
    vdir = root / "versions" / version
    (vdir / "shards" / "test-000000.tar").unlink()
    index = pd.read_parquet(vdir / "index.parquet")
    index.loc[0, "T2M_mean"] = 9999.0
    index.to_parquet(vdir / "index.parquet", index=False)
    problems = verify(str(vdir)).problems
    assert "shards/test-000000.tar: missing" in problems
    assert any("index.parquet" in p and "T2M_mean" in p for p in problems), problems


def test_commit_refuses_bad_index_and_missing_shard(tmp_path: Path) -> None:
    fs, url = url_to_fs(str(tmp_path / "conus"))
    manifest = Manifest(
        schema_version=SCHEMA_VERSION, name="conus", version="abc", created_at="2026-01-01T00:00:00Z",
        builder=BuilderInfo(package="p", version="0"), config={}, variables=[VariableInfo(name="T2M", units="K")],
        window="1d", time_step="1h", splits={"train": 1}, normalization={}, sources=[], quarantined=0,
        shards=[{"path": "shards/train-000000.tar", "split": "train", "samples": 1, "bytes": 10, "sha256": "0" * 64}],
    )  # fmt: skip
    index = pd.DataFrame({"key": ["a b"], "split": ["train"]})
    with pytest.raises(PublishError, match="fails the shared schema"):
        commit_version(fs, url, manifest, index, pd.DataFrame(), "card")
    assert not manifest_exists(fs, url, "abc")


def test_tag_diff_and_gc(tmp_path: Path) -> None:
    root = tmp_path / "conus"
    v1 = publish_fake(str(root), days=4)
    v2 = publish_fake(str(root), days=5)
    assert v1 != v2
    assert open_dataset(f"{root}@latest").version == v2
    ref = tag(f"{root}@{v1}", "paper-2026")
    assert ref == f"{root}@paper-2026" and open_dataset(ref).version == v1
    by_id = {v.id: v for v in list_versions(str(root))}
    assert by_id[v1].tags == ["paper-2026"] and by_id[v2].tags == ["latest"]
    with pytest.raises(PublishError, match="not a valid tag"):
        tag(f"{root}@latest", "a/b")

    d = diff(f"{root}@{v1}", f"{root}@{v2}")
    assert d.config == {"days": (4, 5)}
    assert d.splits == {"test": (1, 1), "train": (3, 4)}
    assert d.added == ["conus-20190105T0000"] and d.removed == []

    # a dead build: shards written, no manifest; and a stale temp file
    dead = root / "versions" / "deadbeef" / "shards"
    dead.mkdir(parents=True)
    (dead / "train-000000.tar").write_bytes(b"x" * 100)
    (root / "versions" / v1 / "shards" / "train-000000.tar.tmp-123").write_bytes(b"y")
    report = gc(str(root))
    names = sorted(Path(p).name for p in report.orphans)
    assert (
        names == ["train-000000.tar", "train-000000.tar.tmp-123"]
        and report.bytes == 101
        and not report.deleted
    )
    assert dead.joinpath("train-000000.tar").exists()
    report = gc(str(root), delete=True)
    assert report.deleted and not dead.joinpath("train-000000.tar").exists()
    assert verify(f"{root}@{v1}").ok and verify(f"{root}@latest").ok
    assert gc(str(root)).orphans == []
