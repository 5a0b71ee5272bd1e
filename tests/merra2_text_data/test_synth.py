"""Synthetic MERRA-2 granules: the real file format, determinism, region independence, physical coherence."""

from __future__ import annotations

import hashlib
import time
from datetime import date
from pathlib import Path

import h5netcdf
import h5py
import numpy as np
import pytest
import xarray as xr
from climate_text_schema import FILL_VALUE, KNOWN_VARIABLES
from merra2_text_data.errors import ConfigError
from merra2_text_data.regions import REGIONS, Region, parse_region
from merra2_text_data.source.fetch import find_granules, parse_granule_name
from merra2_text_data.source.synth import FLX_VARIABLES, SLV_VARIABLES, write_synthetic_granules

BOTH = ["M2T1NXSLV", "M2T1NXFLX"]


def _read(path: Path) -> xr.Dataset:
    """A granule read with h5py (fast, and independent of the reader under test elsewhere)."""
    with h5py.File(path) as f:
        day = np.datetime64(parse_granule_name(path.name)[2].isoformat(), "m")
        times = day + np.timedelta64(30, "m") + f["time"][:].astype("timedelta64[m]")
        names = [k for k in f if k not in ("time", "lat", "lon")]
        return xr.Dataset({k: (("time", "lat", "lon"), f[k][:]) for k in names},
                          coords={"time": times.astype("datetime64[ns]"), "lat": f["lat"][:], "lon": f["lon"][:]})  # fmt: skip


def _open(paths: list[Path]) -> xr.Dataset:
    return xr.merge([xr.concat([_read(p) for p in paths if kind in p.name], dim="time") for kind in ("slv", "flx")],
                    join="exact")  # fmt: skip


@pytest.fixture(scope="module")
def summer(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], xr.Dataset]:
    """Ten July days over the contiguous United States (seed 0)."""
    paths = write_synthetic_granules(
        tmp_path_factory.mktemp("summer"), REGIONS["conus"], date(2019, 7, 1), date(2019, 7, 10)
    )
    return paths, _open(paths)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_names_and_layout(summer: tuple[list[Path], xr.Dataset]) -> None:
    paths, _ = summer
    assert len(paths) == 20
    assert paths[0].name == "MERRA2_400.tavg1_2d_slv_Nx.20190701.nc4"
    assert paths[1].name == "MERRA2_400.tavg1_2d_flx_Nx.20190701.nc4"
    assert parse_granule_name(paths[-1].name) == ("400", "tavg1_2d_flx_Nx", date(2019, 7, 10))
    granules, missing = find_granules(paths[0].parent, BOTH, date(2019, 7, 1), date(2019, 7, 10))
    assert len(granules) == 20 and missing == []


def test_real_merra2_format(summer: tuple[list[Path], xr.Dataset], shared_data: Path) -> None:
    """Attributes, types, time axis and lattice as in the real M2T1NXSLV granule (checked with h5py)."""
    paths, _ = summer
    with h5py.File(shared_data / "merra2" / "M2T1NXSLV_geo_temporal.nc4") as real, h5py.File(paths[0]) as f:
        real_ps = real["PS"]
        for name in SLV_VARIABLES:
            var = f[name]
            assert var.dtype == np.float32 and var.shape[0] == 24
            assert var.compression == "gzip" and var.chunks is not None and var.chunks[0] == 1
            for key in (
                "_FillValue",
                "missing_value",
                "fmissing_value",
                "scale_factor",
                "add_offset",
                "vmax",
            ):
                assert var.attrs[key].dtype == real_ps.attrs[key].dtype
                assert var.attrs[key] == real_ps.attrs[key] or key not in ("_FillValue", "missing_value")
            assert var.attrs["_FillValue"][0] == np.float32(FILL_VALUE)
            assert var.attrs["scale_factor"][0] == 1 and var.attrs["add_offset"][0] == 0
            assert var.attrs["long_name"].decode() == KNOWN_VARIABLES[name].long_name
            assert var.attrs["standard_name"] == var.attrs["long_name"]
            assert var.attrs["units"].decode() == KNOWN_VARIABLES[name].units
        time_var = f["time"]
        assert time_var.dtype == np.int32 and list(time_var[:]) == list(range(0, 1440, 60))
        assert time_var.attrs["units"].decode() == "minutes since 2019-07-01 00:30:00"
        assert time_var.attrs["begin_date"] == 20190701 and time_var.attrs["begin_time"] == 3000
        for coord in ("lat", "lon"):
            assert f[coord].dtype == np.float64 and "_FillValue" not in f[coord].attrs
            assert f[coord].attrs["units"] == real[coord].attrs["units"]
        assert np.all(np.mod(f["lat"][:] + 90.0, 0.5) == 0) and np.all(
            np.mod(f["lon"][:] + 180.0, 0.625) == 0
        )
        assert (f["lat"][0], f["lat"][-1], f["lon"][0], f["lon"][-1]) == (24.0, 50.0, -125.0, -66.25)
        for key in ("Conventions", "VersionID", "Format", "LatitudeResolution", "LongitudeResolution"):
            assert f.attrs[key] == real.attrs[key]
        assert f.attrs["ShortName"] == b"M2T1NXSLV" and f.attrs["Filename"].decode() == paths[0].name
    with h5py.File(paths[1]) as flx:
        assert sorted(flx) == sorted([*FLX_VARIABLES, "lat", "lon", "time"])
        assert flx["PRECTOTCORR"].attrs["long_name"] == b"total_precipitation_bias_corrected"
        assert flx["PRECTOTCORR"].attrs["units"] == b"kg m-2 s-1"
        assert flx.attrs["ShortName"] == b"M2T1NXFLX"


def test_netcdf4_readers_see_the_real_structure(summer: tuple[list[Path], xr.Dataset]) -> None:
    """h5netcdf (the netCDF-4 reader) sees named dimensions; xarray decodes times at HH:30 and masks no value."""
    paths, _ = summer
    with h5netcdf.File(paths[0], "r") as f:
        assert {k: v.size for k, v in f.dimensions.items()} == {"lon": 95, "time": 24, "lat": 53}
        assert f.variables["T2M"].dimensions == ("time", "lat", "lon")
        assert f.variables["time"].dimensions == ("time",)
    with xr.open_dataset(paths[0], engine="h5netcdf") as ds:
        assert ds.T2M.dtype == np.float32 and not ds.T2M.isnull().any()
        assert ds.time.values[1] == np.datetime64("2019-07-01T01:30")
        assert ds.T2M.encoding["_FillValue"] == np.float32(FILL_VALUE)


def test_xarray_decodes_times_at_half_past(summer: tuple[list[Path], xr.Dataset]) -> None:
    _, ds = summer
    times = ds["time"].values
    assert times[0] == np.datetime64("2019-07-01T00:30") and times[-1] == np.datetime64("2019-07-10T23:30")
    assert np.all(np.diff(times) == np.timedelta64(1, "h"))


def test_values_are_finite_and_inside_the_contract_bounds(summer: tuple[list[Path], xr.Dataset]) -> None:
    _, ds = summer
    for name in (*SLV_VARIABLES, *FLX_VARIABLES):
        values = ds[name].values
        spec = KNOWN_VARIABLES[name]
        assert np.isfinite(values).all(), name
        assert spec.lower <= values.min() and values.max() <= spec.upper, (name, values.min(), values.max())


def test_variables_are_physically_coherent(summer: tuple[list[Path], xr.Dataset]) -> None:
    _, ds = summer
    assert (ds.T2MDEW <= ds.T2M).all()
    tc = ds.T2MDEW.astype(float) - 273.15
    e = 610.94 * np.exp(17.625 * tc / (243.04 + tc))
    q = 0.622 * e / (ds.PS - 0.378 * e)
    assert float(np.abs(q / ds.QV2M - 1).max()) < 1e-3  # QV2M from dew point and surface pressure
    assert (ds.PS <= ds.SLP * 1.0001).all() and float((ds.SLP - ds.PS).max()) > 5000  # terrain lowers PS
    assert float(xr.corr(ds.TQV, ds.QV2M)) > 0.9
    assert float((ds.T2M - ds.T850).mean()) > 3 and float((ds.T850 - ds.T500).min()) > 10
    ts_range = float((ds.TS.max("time") - ds.TS.min("time")).mean())
    t2m_range = float((ds.T2M.max("time") - ds.T2M.min("time")).mean())
    assert ts_range > t2m_range
    assert (ds.PRECTOT >= 0).all() and (ds.PRECTOTCORR >= 0).all()


def test_diurnal_cycle_follows_local_solar_time(summer: tuple[list[Path], xr.Dataset]) -> None:
    _, ds = summer
    solar = (ds["time"].dt.hour + 0.5 + ds["lon"] / 15.0) % 24
    afternoon = float(ds.T2M.where((solar > 13) & (solar < 17)).mean())
    before_dawn = float(ds.T2M.where((solar > 2) & (solar < 6)).mean())
    assert afternoon - before_dawn > 2.0


def test_weather_systems_travel_west_to_east(summer: tuple[list[Path], xr.Dataset]) -> None:
    _, ds = summer
    anomaly = (ds.SLP - ds.SLP.mean("time")).values
    lag = 6

    def score(shift: int) -> float:
        a, b = anomaly[:-lag], anomaly[lag:]
        if shift > 0:
            a, b = a[:, :, :-shift], b[:, :, shift:]
        elif shift < 0:
            a, b = a[:, :, -shift:], b[:, :, :shift]
        return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])

    best = max(range(-8, 9), key=score)
    assert best > 0, "the pressure pattern six hours later should match it shifted east"


def test_winds_turn_counterclockwise_around_northern_lows(summer: tuple[list[Path], xr.Dataset]) -> None:
    _, ds = summer
    anomaly, u, v = (ds.SLP - ds.SLP.mean("time")).values, ds.U10M.values, ds.V10M.values
    northward_east_of_low, eastward_south_of_low = [], []
    for t in range(anomaly.shape[0]):
        j, i = np.unravel_index(np.argmin(anomaly[t]), anomaly[t].shape)
        if 4 <= i < anomaly.shape[2] - 4 and 4 <= j < anomaly.shape[1] - 4 and anomaly[t, j, i] < -800:
            northward_east_of_low.append(v[t, j, i + 4] - v[t, j, i - 4])
            eastward_south_of_low.append(u[t, j - 4, i] - u[t, j + 4, i])
    assert len(northward_east_of_low) > 10
    assert np.mean(northward_east_of_low) > 2.0 and np.mean(eastward_south_of_low) > 2.0


def test_rain_concentrates_near_lows_and_storms_happen(summer: tuple[list[Path], xr.Dataset]) -> None:
    _, ds = summer
    low = (ds.SLP - ds.SLP.mean("time")) < -800
    assert float(ds.PRECTOT.where(low).mean()) > 3 * float(ds.PRECTOT.where(~low).mean())
    assert float(ds.PRECTOT.max()) > 2e-3  # > 7 mm/h somewhere: heavy rain
    assert float(np.hypot(ds.U10M, ds.V10M).max()) > 15.0


def test_seasons_and_latitude_gradient(tmp_path: Path) -> None:
    box = parse_region("-100,30,-90,48")
    winter = _open(write_synthetic_granules(tmp_path / "w", box, date(2019, 1, 10), date(2019, 1, 12)))
    summer = _open(write_synthetic_granules(tmp_path / "s", box, date(2019, 7, 10), date(2019, 7, 12)))
    assert float(summer.T2M.mean() - winter.T2M.mean()) > 10.0
    assert (
        float(winter.T2M.isel(lat=slice(0, 6)).mean())
        > float(winter.T2M.isel(lat=slice(-6, None)).mean()) + 5
    )


def test_heat_wave_over_a_summer(tmp_path: Path) -> None:
    """Seed 0 puts a multi-day heat wave over central Nebraska in early August 2019."""
    paths = write_synthetic_granules(
        tmp_path,
        parse_region("-100,40,-99,41"),
        date(2019, 7, 20),
        date(2019, 8, 20),
        collections=["M2T1NXSLV"],
    )
    ds = xr.concat([_read(p) for p in paths], dim="time")
    daily_max = ds.T2M.resample(time="1D").max().mean(("lat", "lon"))
    anomaly = (daily_max - daily_max.mean()).values
    hot = anomaly > 3.0
    longest = max(len(run) for run in "".join("x" if h else " " for h in hot).split()) if hot.any() else 0
    assert longest >= 3 and anomaly.max() > 5.0


def test_same_seed_same_bytes_other_seed_other_weather(tmp_path: Path) -> None:
    box = parse_region("-105,35,-100,40")
    a = write_synthetic_granules(tmp_path / "a", box, date(2020, 3, 1), date(2020, 3, 2), seed=3)
    b = write_synthetic_granules(tmp_path / "b", box, date(2020, 3, 1), date(2020, 3, 2), seed=3)
    c = write_synthetic_granules(tmp_path / "c", box, date(2020, 3, 1), date(2020, 3, 2), seed=4)
    assert [_digest(p) for p in a] == [_digest(p) for p in b]
    with xr.open_dataset(a[0], engine="h5netcdf") as x, xr.open_dataset(c[0], engine="h5netcdf") as y:
        assert not np.array_equal(x.SLP.values, y.SLP.values)


def test_a_sub_region_equals_the_subset_of_a_larger_region(tmp_path: Path) -> None:
    big = write_synthetic_granules(tmp_path / "big", REGIONS["conus"], date(2019, 4, 2), date(2019, 4, 3))
    small = write_synthetic_granules(tmp_path / "small", parse_region("-105,35,-95,45"), date(2019, 4, 3),
                                     date(2019, 4, 3))  # fmt: skip
    for big_path, small_path in zip(big[2:], small, strict=True):
        with (
            xr.open_dataset(big_path, engine="h5netcdf") as b,
            xr.open_dataset(small_path, engine="h5netcdf") as s,
        ):
            cut = b.sel(lat=s.lat, lon=s.lon)
            for name in s.data_vars:
                np.testing.assert_array_equal(cut[name].values, s[name].values, err_msg=name)


def test_antimeridian_region(tmp_path: Path) -> None:
    paths = write_synthetic_granules(tmp_path, REGIONS["bering"], date(2019, 1, 5), date(2019, 1, 5))
    with xr.open_dataset(paths[0], engine="h5netcdf") as ds:
        lon = ds.lon.values
        assert lon.min() == -180.0 and lon.max() == 179.375 and -160.0 in lon and 160.0 in lon
        assert not ((lon > -160.0) & (lon < 160.0)).any()
        assert lon.size == 65
        t2m = ds.T2M.values
        west_of_line, east_of_line = t2m[:, :, lon == 179.375], t2m[:, :, lon == -180.0]
        jump = float(np.abs(west_of_line - east_of_line).mean())
        typical = float(np.abs(np.diff(t2m[:, :, lon >= 160.0], axis=2)).mean())
        assert jump < 3 * typical + 0.05  # the field is continuous across the date line


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"end": date(2019, 1, 1)}, "before start"),
        ({"seed": -1}, "negative"),
        ({"collections": ["M2I1NXASM"]}, "M2I1NXASM"),
        ({"region": Region("thin", -100.1, 35.1, -100.05, 35.3)}, "no MERRA-2 grid point"),
    ],
)
def test_bad_requests_raise_config_errors(tmp_path: Path, kwargs: dict[str, object], fragment: str) -> None:
    args: dict[str, object] = {"out_dir": tmp_path, "region": REGIONS["conus"], "start": date(2019, 1, 2),
                               "end": date(2019, 1, 3)}  # fmt: skip
    args.update(kwargs)
    with pytest.raises(ConfigError, match=fragment):
        write_synthetic_granules(**args)  # type: ignore[arg-type]
    assert not list(tmp_path.glob("*.nc4"))


@pytest.mark.slow
def test_ninety_days_over_conus_in_well_under_a_minute(tmp_path: Path) -> None:
    started = time.perf_counter()
    paths = write_synthetic_granules(tmp_path, REGIONS["conus"], date(2019, 1, 1), date(2019, 3, 31))
    elapsed = time.perf_counter() - started
    assert len(paths) == 180
    assert elapsed < 60.0, f"90 days over conus took {elapsed:.1f} s"
