"""The cube of a build on the workers (`merra2_text_data.run.cube`): one zarr store per day behind a create-only marker,
equal to the local cube; a second build reads no granule; two writers of one day commit once; the client's skeleton
has the plan's coordinates and no readable data."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from merra2_text_data.errors import BuildError
from merra2_text_data.regions import parse_region
from merra2_text_data.run import cube as cube_mod
from merra2_text_data.run import daystore
from merra2_text_data.run.cube import CubeSource, day_tasks, days_of, open_cube, skeleton_cube
from merra2_text_data.samples.pairs import SamplePlan
from merra2_text_data.source.fetch import find_granules
from merra2_text_data.source.subset import open_region
from merra2_text_data.source.synth import write_synthetic_granules

REGION = parse_region("-100,35,-96,38")
START, END = dt.date(2020, 2, 28), dt.date(2020, 3, 1)
VARIABLES = ("T2M", "U10M", "PRECTOT")


@pytest.fixture(scope="module")
def granules(tmp_path_factory: pytest.TempPathFactory) -> list:
    folder = tmp_path_factory.mktemp("granules")
    write_synthetic_granules(folder, REGION, START, END, seed=2)
    found, missing = find_granules(folder, ["M2T1NXSLV", "M2T1NXFLX"], START, END)
    assert not missing
    return found


def _source(granules: list, cache: Path) -> CubeSource:
    by_day: dict[dt.date, list] = {}
    for g in granules:
        by_day.setdefault(g.day, []).append(g)
    return CubeSource(str(cache), VARIABLES, REGION, granules={d: tuple(gs) for d, gs in by_day.items()})


def _plan(start: str, end: str) -> SamplePlan:
    return SamplePlan("k", pd.Timestamp(start, tz="UTC"), pd.Timestamp(end, tz="UTC"), 0, 2, 0, 2, (0, 0, 1, 1))


def test_the_days_a_window_reads() -> None:
    assert days_of([_plan("2020-02-28", "2020-02-29")]) == [dt.date(2020, 2, 28)]
    assert days_of([_plan("2020-02-28 18:00", "2020-03-01 06:00")]) == [dt.date(2020, 2, 28), dt.date(2020, 2, 29),
                                                                       dt.date(2020, 3, 1)]  # fmt: skip


def test_day_stores_equal_the_local_cube_and_are_read_back_without_granules(
    granules: list, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = _source(granules, tmp_path / "cache")
    assert [t.name for t in day_tasks(source)] == ["20200228", "20200229", "20200301"]
    assert [t.with_grid for t in day_tasks(source)] == [True, False, False]
    two_days = open_cube(source.narrow([dt.date(2020, 2, 29), dt.date(2020, 3, 1)]),
                         [_plan("2020-02-29 12:00", "2020-03-01 12:00")]).compute()  # fmt: skip
    local = open_region(granules, list(VARIABLES), REGION, dt.date(2020, 2, 29), dt.date(2020, 3, 1)).compute()
    xr.testing.assert_identical(two_days[list(VARIABLES)].drop_attrs(), local[list(VARIABLES)].drop_attrs())
    for v in VARIABLES:
        assert two_days[v].attrs == local[v].attrs
    markers = sorted(p.name[:8] for p in (tmp_path / "cache" / "zarr" / "days").glob("*.json"))
    assert markers == ["20200229", "20200301"], "only the days the windows touch were built"

    def no_granules(*args: object, **kwargs: object) -> None:
        raise AssertionError("a stored day read a granule")

    monkeypatch.setattr(daystore, "open_region", no_granules)
    again = open_cube(source, [_plan("2020-02-29 12:00", "2020-03-01 12:00")]).compute()
    xr.testing.assert_identical(again, two_days)


def test_two_writers_of_one_day_commit_once_and_a_lost_store_is_rebuilt(granules: list, tmp_path: Path) -> None:
    source = _source(granules, tmp_path / "cache")
    day = dt.date(2020, 2, 28)
    first = daystore.build_day(source, day)
    second = daystore.build_day(source, day)  # as a second worker would, having missed the first's marker
    assert second["store"] == first["store"]
    folder = tmp_path / "cache" / "zarr" / "days"
    assert [p.name for p in folder.glob("*.zarr")] == [first["store"]], "the loser removed its own store"
    assert first["hours"] is None and first["source_kind"] == "synthetic"

    marker = next(folder.glob("*.json"))
    info = json.loads(marker.read_text())
    import shutil

    shutil.rmtree(folder / info["store"])  # the cache lost the store but kept its marker, before the next build
    rebuilt = daystore.ensure_day(replace(source, build="next"), day)
    assert rebuilt["store"] != info["store"] and (folder / rebuilt["store"] / "zarr.json").exists()


def test_the_skeleton_has_the_plan_coordinates_and_no_readable_data() -> None:
    lat, lon = [35.0, 35.5], [-100.0, -99.375, -98.75]
    grid = daystore.grid_digest(np.array(lat), np.array(lon))
    attrs = {"T2M": {"units": "K", "long_name": "t", "collection": "M2T1NXSLV"}}
    receipts = [
        {"day": "2020-03-01", "hours": [3, 4], "attrs": attrs, "grid": grid, "source_kind": "merra2"},
        {"day": "2020-02-29", "hours": None, "attrs": attrs, "grid": grid, "source_kind": "merra2", "lat": lat,
         "lon": lon},
    ]  # fmt: skip
    skeleton = skeleton_cube(receipts, ["T2M"])
    times = pd.DatetimeIndex(skeleton["time"].values)
    assert len(times) == 26 and times[0] == pd.Timestamp("2020-02-29 00:30") and times[-1] == pd.Timestamp(
        "2020-03-01 04:30"
    )
    assert skeleton["lat"].values.tolist() == lat and skeleton["T2M"].attrs["units"] == "K"
    with pytest.raises(BuildError, match="only the workers read it"):
        skeleton["T2M"].values  # noqa: B018
    with pytest.raises(Exception, match="another grid"):
        skeleton_cube([*receipts, {**receipts[0], "day": "2020-03-02", "grid": "other"}], ["T2M"])


def test_cache_wins_over_the_older_cache_dir_and_an_object_store_cache_puts_the_cube_on_the_tasks() -> None:
    from merra2_text_data import BuildConfig

    base = dict(region="conus", years="2019", out="/x")
    assert BuildConfig.from_options(**base, cache="s3://b/c", cache_dir="/old").source.cache_location() == "s3://b/c"
    assert BuildConfig.from_options(**base, cache_dir="/old").source.cache_location() == "/old"
    assert cube_mod.on_workers(BuildConfig.from_options(**base, cache="s3://b/c"))
    assert not cube_mod.on_workers(BuildConfig.from_options(**base, cache="/local"))
    assert cube_mod.on_workers(BuildConfig.from_options(**base, cache="/local", workers=2))
    assert cube_mod.default_cache("s3://b/out") == "s3://b/out/.cache"


def test_a_file_url_cache_is_its_absolute_folder(
    granules: list, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--cache file:///abs/path` is the folder /abs/path (not `./file:/abs/path` under the working directory)."""
    from merra2_text_data import BuildConfig, build
    from merra2_text_data.run.plan import cache_dir

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    cache = tmp_path / "cache"
    opts = dict(region="-100,35,-96,38", start=str(START), end=str(END), source=str(Path(granules[0].url).parent),
                window="1d", variables=",".join(VARIABLES), tile="3x3", quiet=True, out=str(tmp_path / "out"))  # fmt: skip
    config = BuildConfig.from_options(**opts, cache=cache.as_uri())
    assert not cube_mod.on_workers(config) and cache_dir(config) == cache
    build(config)
    assert list(cwd.iterdir()) == [] and list((cache / "zarr").iterdir())


def test_an_object_store_cache_in_one_process_builds_the_local_version(
    granules: list, tmp_path: Path, s3_bucket: str
) -> None:
    """No cluster, `--cache s3://...`: the days are stored on S3 by this process's tasks; same version as with a
    local cache."""
    from climate_text_schema import open_dataset
    from merra2_text_data import BuildConfig, build

    folder = str(Path(granules[0].url).parent)
    opts = dict(region="-100,35,-96,38", start=str(START), end=str(END), source=folder, window="1d",
                variables=",".join(VARIABLES), tile="3x3", quiet=True)  # fmt: skip
    local = build(BuildConfig.from_options(**opts, out=str(tmp_path / "a"), cache=str(tmp_path / "cache")))
    remote = build(BuildConfig.from_options(**opts, out=str(tmp_path / "b"), cache=f"{s3_bucket}/cache"))
    assert local.rsplit("@", 1)[1] == remote.rsplit("@", 1)[1]
    a, b = open_dataset(local).manifest, open_dataset(remote).manifest
    assert [(s.path, s.sha256) for s in a.shards] == [(s.path, s.sha256) for s in b.shards]
    import s3fs

    assert len(s3fs.S3FileSystem().glob(f"{s3_bucket}/cache/zarr/days/*.json")) == 3
