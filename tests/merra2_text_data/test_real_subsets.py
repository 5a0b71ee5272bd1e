"""Real OPeNDAP/Hyrax subsets of a MERRA-2 granule (../shared/data/merra2/: PS only, 2 hourly steps) build from the
command line with `--allow-partial-days`, and every stored value equals an independent xarray read of the file."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from climate_text_schema import open_dataset

from .test_pipeline import _samples

BIN = Path(sys.executable).parent
GRANULE = "MERRA2_400.tavg1_2d_slv_Nx.20210110.SUB.nc4"  # the name GES DISC's subsetter gives such a file


def _build(source: Path, out: Path, region: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "merra2-text"), "build", "--source", str(source), f"--region={region}", "--start", "2021-01-10",
         "--end", "2021-01-10", "--variables", "PS", "--out", str(out), "--cache", str(out / "cache"), "-q",
         *extra],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


def _independent(path: Path, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """PS (time, lat, lon) at the given coordinates, read with xarray + h5netcdf (not through the package)."""
    with xr.open_dataset(path, engine="h5netcdf") as ds:
        return ds["PS"].sel(lat=lat, lon=lon).transpose("time", "lat", "lon").values.astype(np.float32)


@pytest.mark.parametrize(
    ("subset", "region", "tile", "n_tiles"),
    [
        ("M2T1NXSLV_geo_temporal.nc4", "40,-30,50,-20", "7x17", 3),  # a spatial + temporal subset: 21 x 17 points
        ("M2T1NXSLV_temporal.nc4", "170,-5,-170,5", "7x11", 9),  # the global grid cut across the antimeridian: 21x33
    ],
)
def test_real_subsets_build_with_allow_partial_days(
    shared_data: Path, tmp_path: Path, subset: str, region: str, tile: str, n_tiles: int
) -> None:
    source = tmp_path / "granules"
    source.mkdir()
    path = source / GRANULE
    shutil.copy(shared_data / "merra2" / subset, path)
    out = tmp_path / "out"

    refused = _build(source, out, region, "--window", "1h")
    assert refused.returncode != 0 and "--allow-partial-days" in refused.stderr, refused.stderr[-2000:]
    assert "Traceback" not in refused.stderr

    res = _build(source, out, region, "--window", "1h", "--tile", tile, "--allow-partial-days")
    assert res.returncode == 0, res.stderr[-3000:]
    ds = open_dataset(res.stdout.strip().splitlines()[-1])
    samples = _samples(Path(ds.version_url))
    assert len(samples) == 2 * n_tiles  # the subset's two hourly steps (01:30, 02:30), each a 1-hour window
    assert sorted({m.time_start for _, _, m in samples.values()}) == ["2021-01-10T01:00:00+00:00",
                                                                      "2021-01-10T02:00:00+00:00"]  # fmt: skip
    for array, _, meta in samples.values():
        expected = _independent(path, np.array(meta.lat), np.array(meta.lon))
        hour = int(meta.time_start[11:13]) - 1  # step 0 is 01:30, step 1 is 02:30
        assert array.shape == (1, 1, *expected.shape[1:])
        np.testing.assert_array_equal(array[:, 0], expected[hour : hour + 1])
        assert meta.stats["PS"]["min"] == pytest.approx(float(expected[hour].min()))
    if region.startswith("170"):
        lons = sorted({x for _, _, m in samples.values() for x in m.lon})
        assert min(lons) == -180.0 and max(lons) == 179.375  # both sides of the antimeridian

    two = _build(source, tmp_path / "two", region, "--window", "2h", "--tile", tile, "--allow-partial-days")
    assert two.returncode == 0, two.stderr[-3000:]
    assert sum(open_dataset(two.stdout.strip().splitlines()[-1]).manifest.splits.values()) == n_tiles

    whole_day = _build(source, tmp_path / "day", region, "--window", "1d", "--allow-partial-days")
    assert whole_day.returncode != 0 and "no complete 1d window" in whole_day.stderr
    assert "2 hourly step(s)" in whole_day.stderr and "Traceback" not in whole_day.stderr
