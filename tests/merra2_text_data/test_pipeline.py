"""The build end to end on synthetic MERRA-2 granules: layout, values checked against the files, idempotence, resume."""

from __future__ import annotations

import datetime as dt
import io
import re
import tarfile
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import pytest
from climate_text_schema import DEFAULT_VARIABLES, decode_meta, open_dataset
from merra2_text_data import BuildConfig, build, verify
from merra2_text_data.errors import MissingDataError, SampleValidationError
from merra2_text_data.regions import parse_region
from merra2_text_data.run import tasks as tasks_mod
from merra2_text_data.source.synth import write_synthetic_granules

BBOX = "-105,35,-95,45"
START, END = dt.date(2019, 1, 1), dt.date(2019, 1, 5)
CACHE: list[Path] = []


@pytest.fixture(scope="module")
def granules(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> Path:
    out = tmp_path_factory.mktemp("granules")
    write_synthetic_granules(out, parse_region(BBOX), START, END, seed=3)
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One zarr cache for the module: only the first build reads the granules."""
    CACHE[:] = [tmp_path_factory.mktemp("cache")]
    return CACHE[0]


def _config(granules: Path, out: Path | str, **extra: Any) -> BuildConfig:
    options: dict[str, Any] = dict(region=BBOX, start=str(START), end=str(END), window="1d", time_step="1h",
                                   source=str(granules), out=str(out), cache_dir=str(CACHE[0]), quiet=True)  # fmt: skip
    options.update(extra)
    return BuildConfig.from_options(**options)


def _t2m_from_file(granules: Path, day: dt.date) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """T2M (time, lat, lon) inside the bbox, read with h5py directly (not through the package)."""
    [path] = granules.glob(f"MERRA2_*.tavg1_2d_slv_Nx.{day:%Y%m%d}.nc4")
    with h5py.File(path, "r") as f:
        lat, lon = f["lat"][:], f["lon"][:]
        t2m = f["T2M"][:].astype(np.float32)
    ilat = (lat >= 35 - 1e-9) & (lat <= 45 + 1e-9)
    ilon = (lon >= -105 - 1e-9) & (lon <= -95 + 1e-9)
    return t2m[:, ilat][:, :, ilon], lat[ilat], lon[ilon]


def _samples(vdir: Path) -> dict[str, tuple[np.ndarray, str, Any]]:
    out = {}
    for shard in sorted((vdir / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
        for name in members:
            if name.endswith(".climate.npy"):
                key = name.split(".", 1)[0]
                arr = np.load(io.BytesIO(members[name]), allow_pickle=False)
                out[key] = (arr, members[f"{key}.txt"].decode(), decode_meta(members[f"{key}.json"], key))
    return out


def test_build_layout_values_and_captions(granules: Path, tmp_path: Path) -> None:
    ref = build(_config(granules, tmp_path / "datasets"))
    ds = open_dataset(ref)
    m = ds.manifest
    vdir = Path(ds.version_url)
    assert ref == f"{tmp_path / 'datasets' / 'bbox-105_35_-95_45'}@{m.version}"
    assert {p.name for p in vdir.iterdir()} == {"manifest.json", "manifest.json.sha256", "index.parquet",
                                                "quarantine.parquet", "README.md", "shards"}  # fmt: skip
    assert (vdir.parent.parent / "tags" / "latest").read_text().strip() == m.version
    assert m.variable_names == list(DEFAULT_VARIABLES) and sum(m.splits.values()) == 5 and m.quarantined == 0
    assert set(m.splits) == {"train", "val", "test"}
    assert len(m.sources) == 10 and {s.file.split(".")[1] for s in m.sources} == {
        "tavg1_2d_slv_Nx",
        "tavg1_2d_flx_Nx",
    }
    assert verify(ref).ok

    index = ds.read_index().set_index("key")
    samples = _samples(vdir)
    assert sorted(samples) == sorted(index.index)
    t = m.variable_names.index("T2M")
    for key, (array, text, meta) in samples.items():
        day = pd.Timestamp(meta.time_start).date()
        t2m, lat, lon = _t2m_from_file(granules, day)
        assert array.shape == (24, len(DEFAULT_VARIABLES), lat.size, lon.size) and array.dtype == np.float32
        np.testing.assert_array_equal(array[:, t], t2m)
        np.testing.assert_allclose(meta.lat, lat)
        np.testing.assert_allclose(meta.lon, lon)
        w = np.cos(np.deg2rad(lat))
        expected = float(
            (t2m.astype(np.float64) * w[None, :, None]).sum() / (w.sum() * t2m.shape[0] * lon.size)
        )
        assert index.loc[key, "T2M_mean"] == pytest.approx(expected, rel=1e-9, abs=1e-6)
        assert index.loc[key, "T2M_min"] == pytest.approx(float(t2m.min()))
        assert index.loc[key, "T2M_max"] == pytest.approx(float(t2m.max()))
        quoted = re.search(r"(-?\d+\.\d) °C", text)
        assert quoted is not None and float(quoted.group(1)) == pytest.approx(
            round(expected - 273.15, 1), abs=0.051
        )
        assert index.loc[key, "text"] == text
    card = (vdir / "README.md").read_text()
    assert m.version in card and "T2M" in card and "## Variables" in card


def test_same_config_twice_same_version_nothing_rewritten(granules: Path, tmp_path: Path) -> None:
    cfg = _config(granules, tmp_path / "ds")
    ref = build(cfg)
    root = tmp_path / "ds" / "bbox-105_35_-95_45"
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in root.rglob("*") if p.is_file()}
    assert build(cfg) == ref
    assert build(_config(granules, tmp_path / "ds", workers=None, quiet=False)) == ref
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in root.rglob("*") if p.is_file()}
    assert after == before


def test_interrupted_build_resumes_to_the_same_version(
    granules: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _config(granules, tmp_path / "ds", shard_size=2048)  # one sample per shard: five tasks
    reference = build(_config(granules, tmp_path / "clean", shard_size=2048))
    calls = {"n": 0}
    real_write = tasks_mod.write_shard

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("injected: connection reset while writing a shard")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(tasks_mod, "write_shard", flaky)
    with pytest.raises(OSError, match="injected"):
        build(cfg)
    root = tmp_path / "ds" / "bbox-105_35_-95_45"
    assert not list(root.glob("versions/*/manifest.json")) and not (root / "tags").exists()
    assert len(list(root.glob("staging/*/*.json"))) == 2

    monkeypatch.setattr(tasks_mod, "write_shard", real_write)
    ran: list[str] = []
    real_run = tasks_mod.run_task

    def counting(task: Any, *args: Any, **kwargs: Any) -> Any:
        ran.append(task.name)
        return real_run(task, *args, **kwargs)

    monkeypatch.setattr(tasks_mod, "run_task", counting)
    ref = build(cfg)
    assert ref.rsplit("@", 1)[1] == reference.rsplit("@", 1)[1]
    assert len(ran) == 3  # the two finished shards were not recomputed
    assert verify(ref).ok and not (root / "staging").exists()
    clean = open_dataset(reference).manifest
    assert [(s.path, s.sha256) for s in open_dataset(ref).manifest.shards] == [
        (s.path, s.sha256) for s in clean.shards
    ]


def test_missing_days_fail_unless_allowed(granules: Path, tmp_path: Path) -> None:
    partial = tmp_path / "partial"
    partial.mkdir()
    for f in granules.iterdir():
        if ".20190103." not in f.name:
            (partial / f.name).symlink_to(f)
    with pytest.raises(MissingDataError, match=r"2019-01-03.*--allow-gaps"):
        build(_config(partial, tmp_path / "ds"))
    ref = build(_config(partial, tmp_path / "ds", allow_gaps=True))
    m = open_dataset(ref).manifest
    assert m.config["gaps"] == ["2019-01-03"] and sum(m.splits.values()) == 4


def test_allowed_gap_of_one_collection_is_built_around(granules: Path, tmp_path: Path) -> None:
    """A day that lacks only the flux granule is a gap like a day that lacks both: none of its granules is read."""
    partial = tmp_path / "partial"
    partial.mkdir()
    for f in granules.iterdir():
        if not (".20190103." in f.name and "_flx_" in f.name):
            (partial / f.name).symlink_to(f)
    ref = build(_config(partial, tmp_path / "ds", allow_gaps=True))
    ds = open_dataset(ref)
    assert ds.manifest.config["gaps"] == ["2019-01-03"] and sum(ds.manifest.splits.values()) == 4
    assert "20190103" not in " ".join(s.file for s in ds.manifest.sources)
    assert not any(t.startswith("2019-01-03") for t in ds.read_index()["time_start"].astype(str))


def test_quarantine_and_strict(granules: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = tasks_mod.validate_sample

    def picky(array: np.ndarray, stats: Any, *args: Any) -> list[str]:
        reasons = real(array, stats, *args)
        return reasons + (
            ["T2M: injected implausible value"] if stats["T2M"]["max"] == stats_max["max"] else []
        )

    stats_max: dict[str, float] = {}
    ref = build(_config(granules, tmp_path / "a"))
    index = open_dataset(ref).read_index()
    stats_max["max"] = float(index["T2M_max"].iloc[1])
    bad_key = str(index["key"].iloc[1])
    monkeypatch.setattr(tasks_mod, "validate_sample", picky)
    ref = build(_config(granules, tmp_path / "b"))
    ds = open_dataset(ref)
    q = pd.read_parquet(Path(ds.version_url) / "quarantine.parquet")
    assert list(q["key"]) == [bad_key] and "injected" in q["reason"].iloc[0]
    assert ds.manifest.quarantined == 1 and bad_key not in set(ds.read_index()["key"])
    assert verify(ref).ok
    with pytest.raises(SampleValidationError, match=f"{bad_key}.*without --strict"):
        build(_config(granules, tmp_path / "c", strict=True))


def test_workers_and_s3_output_give_the_same_version(granules: Path, tmp_path: Path, s3_bucket: str) -> None:
    """Two local dask workers writing straight to S3 build the same version, byte for byte, as one process on disk."""
    local = build(_config(granules, tmp_path / "ds", shard_size=2048))
    remote = build(_config(granules, f"{s3_bucket}/merra2-text", workers=2, shard_size=2048))
    assert remote == f"{s3_bucket}/merra2-text/bbox-105_35_-95_45@{local.rsplit('@', 1)[1]}"
    a, b = (
        open_dataset(local).manifest,
        open_dataset(f"{s3_bucket}/merra2-text/bbox-105_35_-95_45@latest").manifest,
    )
    assert [(s.path, s.sha256) for s in a.shards] == [(s.path, s.sha256) for s in b.shards]
    assert a.normalization == b.normalization
    assert verify(remote).ok


def test_scheduler_address_runs_the_tasks_on_that_cluster(granules: Path, tmp_path: Path) -> None:
    """`--scheduler ADDRESS`: the build connects to an existing dask cluster and ends with the same version."""
    from distributed import Client, LocalCluster, get_task_stream

    local = build(_config(granules, tmp_path / "local", shard_size=2048))
    with (
        LocalCluster(n_workers=2, processes=False, threads_per_worker=1, dashboard_address=None) as cluster,
        Client(cluster) as client,
        get_task_stream(client) as stream,
    ):
        remote = build(
            _config(granules, tmp_path / "remote", scheduler=cluster.scheduler_address, shard_size=2048)
        )
    version = local.rsplit("@", 1)[1]
    assert remote.rsplit("@", 1)[1] == version
    ran = sorted({str(t["key"]) for t in stream.data if str(t["key"]).startswith("samples-")})
    assert ran == [f"samples-{version}-{s}" for s in ("test-000000", "train-000000", "train-000001", "train-000002",
                                                        "val-000000")]  # fmt: skip
    a, b = open_dataset(local).manifest, open_dataset(remote).manifest
    assert [(s.path, s.sha256) for s in a.shards] == [(s.path, s.sha256) for s in b.shards]
    assert verify(remote).ok


def test_a_tile_that_does_not_divide_the_region_gives_one_array_shape(
    granules: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The box is 21 x 17 grid points: 8x8 tiles leave 5 rows and 1 column over. By default those partial edge tiles
    are dropped, so every sample (and plain webdataset batching) sees one shape, recorded in the manifest."""
    import webdataset as wds

    with caplog.at_level("WARNING", logger="merra2_text_data"):
        ref = build(_config(granules, tmp_path / "datasets", tile="8x8"))
    assert "tile 8x8 does not divide the region grid 21x17" in caplog.text
    assert "A tile that divides the grid: 7x17" in caplog.text
    ds = open_dataset(ref)
    variables = len(ds.manifest.variables)
    assert ds.manifest.array_shape == [24, variables, 8, 8]
    assert ds.manifest.config["edge_tiles"] == "drop"
    assert sum(ds.manifest.splits.values()) + ds.manifest.quarantined == 5 * 4  # 5 days x 2 x 2 tiles
    shapes = {arr.shape for arr, _, _ in _samples(Path(ds.version_url)).values()}
    assert shapes == {(24, variables, 8, 8)}
    batches = wds.WebDataset(ds.shard_urls("train"), shardshuffle=False, empty_check=False).decode()
    batches = batches.to_tuple("climate.npy", "txt").batched(3, partial=True)
    seen = 0
    for arrays, texts in batches:
        assert arrays.shape[1:] == (24, variables, 8, 8) and len(texts) == arrays.shape[0]
        seen += arrays.shape[0]
    assert seen == ds.manifest.splits["train"]


def test_edge_tiles_keep_is_explicit_and_recorded(granules: Path, tmp_path: Path) -> None:
    ref = build(BuildConfig.from_options(["sample.edge_tiles=keep"], region=BBOX, start=str(START), end=str(END),
                                         source=str(granules), out=str(tmp_path / "datasets"), tile="8x8",
                                         cache_dir=str(CACHE[0]), quiet=True))  # fmt: skip
    ds = open_dataset(ref)
    assert ds.manifest.array_shape is None and ds.manifest.config["edge_tiles"] == "keep"
    shapes = {arr.shape[2:] for arr, _, _ in _samples(Path(ds.version_url)).values()}
    assert shapes == {(8, 8), (5, 8)}  # the northern row of tiles keeps its 5 rows (5 >= half of 8)
    drop = open_dataset(build(_config(granules, tmp_path / "datasets", tile="8x8")))
    assert drop.version != ds.version  # the choice is part of the version id
