"""open_region on real MERRA-2 subsets (values checked against h5py) and on synthetic granules: inclusive bounds,
the antimeridian, SLV+FLX merge, fill values, every granule error, remote (S3) granules and the zarr v3 cache."""

from __future__ import annotations

import json
import shutil
from datetime import date
from pathlib import Path

import h5py
import numpy as np
import pytest
import xarray as xr
from merra2_text_data.errors import ConfigError, GranuleError, MissingDataError
from merra2_text_data.regions import REGIONS, parse_region
from merra2_text_data.source.fetch import Granule, find_granules
from merra2_text_data.source.subset import cache_key, open_region
from merra2_text_data.source.synth import write_synthetic_granules

BOTH = ["M2T1NXSLV", "M2T1NXFLX"]
REAL_DAY = date(2021, 1, 10)
REAL_NAME = "MERRA2_400.tavg1_2d_slv_Nx.20210110.nc4"


def _real(shared_data: Path, file: str) -> Granule:
    path = shared_data / "merra2" / file
    return Granule("M2T1NXSLV", REAL_DAY, "400", REAL_NAME, str(path), path.stat().st_size, None,
                   f"M2T1NXSLV.5.12.4:{REAL_NAME}:{file}")  # fmt: skip


# --- real MERRA-2 files ----------------------------------------------------------------------------------------------


def test_real_spatial_temporal_subset_matches_h5py(shared_data: Path) -> None:
    granule = _real(shared_data, "M2T1NXSLV_geo_temporal.nc4")
    ds = open_region(
        [granule], ["PS"], parse_region("40,-30,50,-20"), REAL_DAY, REAL_DAY, allow_partial_days=True
    )
    with h5py.File(granule.url) as f:
        raw = f["PS"][:]
        lat, lon = f["lat"][:], f["lon"][:]
    assert ds.PS.dims == ("time", "lat", "lon") and ds.PS.dtype == np.float32
    np.testing.assert_array_equal(ds.PS.values, raw)
    np.testing.assert_array_equal(ds.lat.values, lat)
    np.testing.assert_array_equal(ds.lon.values, lon)
    assert ds.lat.values[0] == -30.0 and ds.lat.values[-1] == -20.0 and ds.lon.values[-1] == 50.0
    assert list(ds.time.values) == [
        np.datetime64("2021-01-10T01:30", "ns"),
        np.datetime64("2021-01-10T02:30", "ns"),
    ]
    assert ds.PS.attrs == {"units": "Pa", "long_name": "surface_pressure", "collection": "M2T1NXSLV"}
    assert float(ds.PS.min()) > 50000 and float(ds.PS.max()) < 110000


def test_real_temporal_subset_is_rejected_by_default(shared_data: Path) -> None:
    granule = _real(shared_data, "M2T1NXSLV_geo_temporal.nc4")
    with pytest.raises(GranuleError, match=rf"{REAL_NAME}: the time axis holds 2 step\(s\)"):
        open_region([granule], ["PS"], parse_region("40,-30,50,-20"), REAL_DAY, REAL_DAY)


@pytest.mark.parametrize("region", ["conus", "bering", "40,-30,50,-20", "-0.3,-0.3,0.3,0.3"])
def test_real_global_granule_cut_matches_h5py(shared_data: Path, region: str) -> None:
    granule = _real(shared_data, "M2T1NXSLV_temporal.nc4")
    box = parse_region(region)
    ds = open_region([granule], ["PS"], box, REAL_DAY, REAL_DAY, allow_partial_days=True)
    with h5py.File(granule.url) as f:
        rows = np.rint((ds.lat.values + 90.0) / 0.5).astype(int)
        cols = np.rint((ds.lon.values + 180.0) / 0.625).astype(int)
        expected = f["PS"][:][:, rows][:, :, cols]
        assert np.array_equal(f["lat"][:][rows], ds.lat.values) and np.array_equal(
            f["lon"][:][cols], ds.lon.values
        )
    np.testing.assert_array_equal(ds.PS.values, expected)
    assert ds.lat.values[0] >= box.south and ds.lat.values[-1] <= box.north
    assert np.all(np.diff(ds.lat.values) == 0.5)
    steps = np.mod(np.diff(ds.lon.values), 360.0)
    assert np.all(steps == 0.625)  # west to east, also across the date line
    if region == "bering":
        assert ds.lon.values[0] == 160.0 and ds.lon.values[-1] == -160.0


def test_a_granule_that_does_not_cover_the_region(shared_data: Path) -> None:
    granule = _real(shared_data, "M2T1NXSLV_geo_temporal.nc4")
    with pytest.raises(GranuleError, match="misses grid points of the region"):
        open_region([granule], ["PS"], REGIONS["conus"], REAL_DAY, REAL_DAY, allow_partial_days=True)


def test_grads_variant_is_rejected(shared_data: Path, tmp_path: Path) -> None:
    path = tmp_path / "MERRA2_100.tavg1_2d_flx_Nx.19800102.nc4"
    shutil.copy(shared_data / "merra2-other" / "MERRA-2.tavg1_2d_flx_Nx.19800102.SUB.nc4", path)
    granule = Granule("M2T1NXFLX", date(1980, 1, 2), "100", path.name, str(path))
    with pytest.raises(GranuleError, match=rf"{path.name}: no 1-D time, lat and lon.*GrADS"):
        open_region([granule], ["PRECTOTCORR"], REGIONS["conus"], date(1980, 1, 2), date(1980, 1, 2))


# --- synthetic granules ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("granules")
    write_synthetic_granules(folder, parse_region("-110,30,-90,50"), date(2019, 1, 1), date(2019, 1, 3))
    return folder


@pytest.fixture
def granules(synth_dir: Path, tmp_path: Path) -> list[Granule]:
    """A private copy of the synthetic granules (tests may break or move them)."""
    folder = tmp_path / "granules"
    shutil.copytree(synth_dir, folder)
    found, missing = find_granules(folder, BOTH, date(2019, 1, 1), date(2019, 1, 3))
    assert not missing
    return found


def _file_values(granule: Granule, name: str, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    with h5py.File(granule.url) as f:
        rows = [int(np.flatnonzero(f["lat"][:] == v)[0]) for v in lat]
        cols = [int(np.flatnonzero(f["lon"][:] == v)[0]) for v in lon]
        return f[name][:][:, rows][:, :, cols]


def test_bbox_bounds_are_inclusive_and_values_exact(granules: list[Granule]) -> None:
    ds = open_region(granules, ["T2M"], parse_region("-105,35,-95,45"), date(2019, 1, 2), date(2019, 1, 2))
    assert (ds.lat.values[0], ds.lat.values[-1], ds.lon.values[0], ds.lon.values[-1]) == (
        35.0,
        45.0,
        -105.0,
        -95.0,
    )
    assert ds.sizes == {"time": 24, "lat": 21, "lon": 17}
    day2 = next(g for g in granules if g.day == date(2019, 1, 2) and g.collection == "M2T1NXSLV")
    np.testing.assert_array_equal(ds.T2M.values, _file_values(day2, "T2M", ds.lat.values, ds.lon.values))


def test_slv_and_flx_merge_on_time(granules: list[Granule]) -> None:
    ds = open_region(granules, ["T2M", "PRECTOTCORR", "SLP"], parse_region("-100,40,-98,42"), date(2019, 1, 1),
                     date(2019, 1, 3))  # fmt: skip
    assert list(ds.data_vars) == ["T2M", "PRECTOTCORR", "SLP"]
    assert ds.sizes["time"] == 72 and all(ds[v].dtype == np.float32 for v in ds.data_vars)
    assert ds.time.dtype == np.dtype("datetime64[ns]")
    assert ds.time.values[0] == np.datetime64("2019-01-01T00:30") and ds.time.values[-1] == np.datetime64(
        "2019-01-03T23:30"
    )
    assert np.all(np.diff(ds.time.values) == np.timedelta64(1, "h"))
    assert ds.chunks["time"] == (24, 24, 24)
    assert ds.PRECTOTCORR.attrs == {"units": "kg m-2 s-1", "long_name": "total_precipitation_bias_corrected",
                                    "collection": "M2T1NXFLX"}  # fmt: skip
    assert ds.T2M.attrs["collection"] == "M2T1NXSLV" and ds.T2M.attrs["units"] == "K"
    assert len(ds.attrs["source_granules"]) == 6 and ds.attrs["bbox"] == [-100.0, 40.0, -98.0, 42.0]
    flx = next(g for g in granules if g.day == date(2019, 1, 3) and g.collection == "M2T1NXFLX")
    np.testing.assert_array_equal(ds.PRECTOTCORR.values[48:],
                                  _file_values(flx, "PRECTOTCORR", ds.lat.values, ds.lon.values))  # fmt: skip


def test_days_outside_the_period_are_ignored_and_gaps_allowed(granules: list[Granule]) -> None:
    kept = [g for g in granules if g.day != date(2019, 1, 2)]
    ds = open_region(kept, ["T2M"], parse_region("-100,40,-99,41"), date(2019, 1, 1), date(2019, 1, 3))
    assert ds.sizes["time"] == 48 and not (ds.time.dt.day == 2).any()
    ds = open_region(granules, ["T2M"], parse_region("-100,40,-99,41"), date(2019, 1, 3), date(2019, 1, 9))
    assert ds.sizes["time"] == 24


def test_fill_values_become_nan(granules: list[Granule]) -> None:
    slv = next(g for g in granules if g.day == date(2019, 1, 1) and g.collection == "M2T1NXSLV")
    with h5py.File(slv.url, "r+") as f:
        lat, lon = f["lat"][:], f["lon"][:]
        row, col = int(np.flatnonzero(lat == 40.0)[0]), int(np.flatnonzero(lon == -100.0)[0])
        f["T2M"][5, row, col] = np.float32(1e15)
    ds = open_region(granules, ["T2M"], parse_region("-100,40,-99,41"), date(2019, 1, 1), date(2019, 1, 1))
    values = ds.T2M.values
    assert np.isnan(values[5, 0, 0]) and np.isnan(values).sum() == 1
    assert np.nanmax(values) < 400


def test_scale_and_offset_are_decoded_like_xarray(granules: list[Granule]) -> None:
    """A packed variable (scale_factor, add_offset, a fill value) is decoded by the CF rules xarray applies to the
    same file: the values equal xarray's own decoding, not the stored numbers; the variable read beside it, not
    packed, keeps its stored numbers (each variable gets its own attributes)."""
    slv = next(g for g in granules if g.day == date(2019, 1, 1) and g.collection == "M2T1NXSLV")
    with h5py.File(slv.url, "r+") as f:
        f["T2M"].attrs["scale_factor"] = np.float32(0.5)
        f["T2M"].attrs["add_offset"] = np.float32(100.0)
        row, col = int(np.flatnonzero(f["lat"][:] == 40.0)[0]), int(np.flatnonzero(f["lon"][:] == -100.0)[0])
        f["T2M"][3, row, col] = np.float32(1e15)
    ds = open_region(
        granules, ["SLP", "T2M"], parse_region("-100,40,-99,41"), date(2019, 1, 1), date(2019, 1, 1)
    )
    np.testing.assert_array_equal(ds.SLP.values, _file_values(slv, "SLP", ds.lat.values, ds.lon.values))
    with xr.open_dataset(slv.url, engine="h5netcdf") as ref:
        expected = ref["T2M"].sel(lat=ds.lat.values, lon=ds.lon.values).values.astype(np.float32)
    stored = _file_values(slv, "T2M", ds.lat.values, ds.lon.values)
    assert ds.T2M.dtype == np.float32 and np.isnan(ds.T2M.values[3, 0, 0])
    assert np.isnan(ds.T2M.values).sum() == 1
    np.testing.assert_array_equal(ds.T2M.values, expected)
    np.testing.assert_allclose(ds.T2M.values[4], stored[4] * 0.5 + 100.0, rtol=1e-6)


def test_antimeridian_crossing(tmp_path: Path) -> None:
    paths = write_synthetic_granules(tmp_path, REGIONS["bering"], date(2019, 2, 1), date(2019, 2, 1),
                                     collections=["M2T1NXSLV"])  # fmt: skip
    granules, _ = find_granules(tmp_path, ["M2T1NXSLV"], date(2019, 2, 1), date(2019, 2, 1))
    ds = open_region(granules, ["SLP"], parse_region("170,55,-170,60"), date(2019, 2, 1), date(2019, 2, 1))
    lon = ds.lon.values
    assert lon[0] == 170.0 and lon[-1] == -170.0 and lon.size == 33
    assert list(lon[14:18]) == [178.75, 179.375, -180.0, -179.375]
    np.testing.assert_array_equal(ds.SLP.values, _file_values(granules[0], "SLP", ds.lat.values, lon))
    with h5py.File(paths[0]) as f:
        assert np.all(
            np.diff(f["lon"][:]) > 0
        )  # the file stores lon in grid order; the cube runs west to east


def test_missing_variable_names_the_file_and_lists_what_it_has(granules: list[Granule]) -> None:
    with pytest.raises(GranuleError) as info:
        open_region(
            granules, ["T2M", "T2MWET"], parse_region("-100,40,-99,41"), date(2019, 1, 1), date(2019, 1, 1)
        )
    message = str(info.value)
    assert "MERRA2_400.tavg1_2d_slv_Nx.20190101.nc4 lacks ['T2MWET']" in message and "T2MDEW" in message


def test_truncated_file_names_the_file(granules: list[Granule]) -> None:
    victim = next(g for g in granules if g.day == date(2019, 1, 2) and g.collection == "M2T1NXFLX")
    data = Path(victim.url).read_bytes()
    Path(victim.url).write_bytes(data[: len(data) // 2])
    with pytest.raises(GranuleError, match=rf"{victim.file_name} .*truncated or corrupt"):
        open_region(
            granules, ["PRECTOTCORR"], parse_region("-100,40,-99,41"), date(2019, 1, 1), date(2019, 1, 3)
        )


def test_damaged_cf_attributes_name_the_file_and_the_variable(granules: list[Granule]) -> None:
    slv = next(g for g in granules if g.day == date(2019, 1, 1) and g.collection == "M2T1NXSLV")
    with h5py.File(slv.url, "r+") as f:
        f["T2M"].attrs["scale_factor"] = np.bytes_(b"abc")
    ds = open_region(granules, ["T2M"], parse_region("-100,40,-99,41"), date(2019, 1, 1), date(2019, 1, 1))
    with pytest.raises(
        GranuleError, match=rf"{slv.file_name}: T2M cannot be decoded .*'scale_factor': 'abc'.*download"
    ):
        ds.load()


def test_name_and_content_dates_must_agree(granules: list[Granule]) -> None:
    day2 = next(g for g in granules if g.day == date(2019, 1, 2) and g.collection == "M2T1NXSLV")
    day3 = next(g for g in granules if g.day == date(2019, 1, 3) and g.collection == "M2T1NXSLV")
    shutil.copy(day2.url, day3.url)  # the file named ...20190103 now holds 2019-01-02
    with pytest.raises(GranuleError, match=rf"{day3.file_name}: its name says 2019-01-03 .*2019-01-02T00:30"):
        open_region(granules, ["T2M"], parse_region("-100,40,-99,41"), date(2019, 1, 1), date(2019, 1, 3))


def test_plan_errors(granules: list[Granule]) -> None:
    box = parse_region("-100,40,-99,41")
    with pytest.raises(MissingDataError, match="M2T1NXFLX 2019-01-02"):
        kept = [g for g in granules if not (g.collection == "M2T1NXFLX" and g.day == date(2019, 1, 2))]
        open_region(kept, ["T2M", "PRECTOT"], box, date(2019, 1, 1), date(2019, 1, 3))
    with pytest.raises(MissingDataError, match="no granule"):
        open_region(granules, ["T2M"], box, date(2020, 1, 1), date(2020, 1, 3))
    with pytest.raises(GranuleError, match="two granules for M2T1NXSLV on 2019-01-01"):
        twin = next(g for g in granules if g.collection == "M2T1NXSLV")
        open_region([*granules, Granule(twin.collection, twin.day, "401", "other.nc4", twin.url)], ["T2M"], box,
                    date(2019, 1, 1), date(2019, 1, 1))  # fmt: skip
    with pytest.raises(ConfigError, match="unknown MERRA-2 variable 'T2m'"):
        open_region(granules, ["T2m"], box, date(2019, 1, 1), date(2019, 1, 1))
    with pytest.raises(ConfigError, match="repeat"):
        open_region(granules, ["T2M", "T2M"], box, date(2019, 1, 1), date(2019, 1, 1))
    with pytest.raises(ConfigError, match="before start"):
        open_region(granules, ["T2M"], box, date(2019, 1, 2), date(2019, 1, 1))


def test_remote_granules_on_s3(granules: list[Granule], s3_bucket: str) -> None:
    import s3fs

    fs = s3fs.S3FileSystem()
    for g in granules:
        fs.put(g.url, f"{s3_bucket}/merra2/{g.file_name}")
    remote, missing = find_granules(f"{s3_bucket}/merra2", BOTH, date(2019, 1, 1), date(2019, 1, 2))
    assert not missing and all(g.url.startswith("s3://") for g in remote)
    box = parse_region("-104,38,-100,41")
    got = open_region(remote, ["T2M", "PRECTOTCORR"], box, date(2019, 1, 1), date(2019, 1, 2)).load()
    local = open_region(granules, ["T2M", "PRECTOTCORR"], box, date(2019, 1, 1), date(2019, 1, 2)).load()
    xr.testing.assert_identical(got, local)


# --- the zarr v3 cache -----------------------------------------------------------------------------------------------


def test_cache_is_written_atomically_and_reused_without_reading_granules(granules: list[Granule],
                                                                        tmp_path: Path) -> None:  # fmt: skip
    box, start, end = parse_region("-104,38,-100,41"), date(2019, 1, 1), date(2019, 1, 3)
    variables = ["T2M", "PRECTOTCORR"]
    cache = tmp_path / "cache"
    first = open_region(granules, variables, box, start, end, cache_dir=cache)
    stores = list((cache / "regional").iterdir())
    assert [p.name for p in stores] == [f"{cache_key(granules, variables, box, start, end)}.zarr"]
    assert json.loads((stores[0] / "zarr.json").read_text())["zarr_format"] == 3
    assert json.loads((stores[0] / "T2M" / "zarr.json").read_text())["chunk_grid"]["configuration"][
        "chunk_shape"
    ][0] == 24  # fmt: skip
    direct = open_region(granules, variables, box, start, end).load()
    xr.testing.assert_identical(first.load(), direct)

    shutil.rmtree(Path(granules[0].url).parent)  # no granule can be read any more
    second = open_region(granules, variables, box, start, end, cache_dir=cache)
    xr.testing.assert_identical(second.load(), direct)
    assert second.time.dtype == np.dtype("datetime64[ns]") and second.T2M.dtype == np.float32
    with pytest.raises(GranuleError):  # other inputs are another cube, and its granules are gone
        open_region(granules, ["T2M"], box, start, end, cache_dir=cache)
    assert len(list((cache / "regional").iterdir())) == 1  # the failed build left no temporary store


def test_cache_key_tracks_the_inputs(granules: list[Granule]) -> None:
    box, start, end = parse_region("-104,38,-100,41"), date(2019, 1, 1), date(2019, 1, 3)
    key = cache_key(granules, ["T2M"], box, start, end)
    moved = [Granule(g.collection, g.day, g.stream, g.file_name, "/elsewhere/" + g.file_name, g.size, g.checksum,
                     g.granule_id) for g in granules]  # fmt: skip
    assert cache_key(moved, ["T2M"], box, start, end) == key
    assert cache_key(granules, ["T2M", "SLP"], box, start, end) != key
    assert cache_key(granules, ["T2M"], parse_region("-104,38,-100,42"), start, end) != key
    assert cache_key(granules, ["T2M"], box, start, date(2019, 1, 2)) != key
    changed = [*granules[:-1], Granule(granules[-1].collection, granules[-1].day, "401", granules[-1].file_name,
                                       granules[-1].url, 1, None, granules[-1].granule_id)]  # fmt: skip
    assert cache_key(changed, ["T2M"], box, start, end) != key


def test_a_failed_cache_write_leaves_nothing_behind(granules: list[Granule], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import merra2_text_data.source.subset as subset

    def broken(granule: Granule, *args: object) -> np.ndarray:
        raise GranuleError(f"{granule.file_name}: simulated read failure")

    monkeypatch.setattr(subset, "_read_block", broken)
    cache = tmp_path / "cache"
    with pytest.raises(GranuleError, match="simulated read failure"):
        open_region(granules, ["T2M"], parse_region("-100,40,-99,41"), date(2019, 1, 1), date(2019, 1, 1),
                    cache_dir=cache)  # fmt: skip
    assert list((cache / "regional").iterdir()) == []


def test_cache_dir_must_be_local(granules: list[Granule]) -> None:
    with pytest.raises(ConfigError, match="must be a local folder"):
        open_region(granules, ["T2M"], parse_region("-100,40,-99,41"), date(2019, 1, 1), date(2019, 1, 1),
                    cache_dir="s3://bucket/cache")  # fmt: skip


def test_granule_record_and_name_must_agree(granules: list[Granule]) -> None:
    day1 = next(g for g in granules if g.day == date(2019, 1, 1) and g.collection == "M2T1NXSLV")
    wrong = Granule(day1.collection, date(2019, 1, 2), day1.stream, day1.file_name, day1.url)
    with pytest.raises(GranuleError, match="record says 2019-01-02 but the name says 2019-01-01"):
        open_region([wrong], ["T2M"], parse_region("-100,40,-99,41"), date(2019, 1, 2), date(2019, 1, 2))
