"""pairs: durations, the sample plan (windows x tiles), splits, extraction with statistics, normalisation."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from climate_text_schema.sample import KEY_PATTERN
from merra2_text_data.errors import BuildError, ConfigError, MissingDataError
from merra2_text_data.samples import pairs
from merra2_text_data.samples.normalize import NormAccumulator
from merra2_text_data.samples.pairs import (
    SamplePlan,
    check_time_step,
    extract_sample,
    extract_window,
    iter_samples,
    parse_duration,
    plan_samples,
    tile_ranges,
)
from merra2_text_data.samples.splits import assign_splits

MakeCube = Callable[..., xr.Dataset]


def _plan(cube: xr.Dataset, **kw: object) -> list[SamplePlan]:
    return plan_samples(
        cube["time"].values, cube.sizes["lat"], cube.sizes["lon"], cube["lat"].values, cube["lon"].values,
        kw.pop("region", "conus"), **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def _daily_plans(days: int, start: str = "2019-01-01", **kw: object) -> list[SamplePlan]:
    times = pd.date_range(pd.Timestamp(start) + pd.Timedelta(minutes=30), periods=days * 24, freq="h")
    lat, lon = np.arange(4) * 0.5, np.arange(4) * 0.625
    return plan_samples(times, 4, 4, lat, lon, "box", **kw)  # type: ignore[arg-type]


# ---- durations ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "hours"),
    [("1h", 1), ("3h", 3), ("6h", 6), ("12h", 12), ("1d", 24), ("2d", 48), ("7d", 168), ("2w", 336)],
)
def test_parse_duration_accepts_whole_hours(text: str, hours: int) -> None:
    assert parse_duration(text) == pd.Timedelta(hours=hours)
    assert parse_duration(pairs.format_duration(parse_duration(text))) == pd.Timedelta(hours=hours)


@pytest.mark.parametrize("text", ["", "1", "0h", "1.5h", "30min", "1y", "-1d", "d1", "one day"])
def test_parse_duration_rejects_and_names_the_value(text: str) -> None:
    with pytest.raises(ConfigError, match=repr(text).replace("(", r"\(").replace(".", r"\.")):
        parse_duration(text)


def test_time_step_must_divide_the_window() -> None:
    assert check_time_step("1d", "3h") == pd.Timedelta(hours=3)
    assert check_time_step("1d", "1d") == pd.Timedelta(days=1)
    with pytest.raises(ConfigError, match="5h.*1d"):
        check_time_step("1d", "5h")
    with pytest.raises(ConfigError, match="2d"):
        check_time_step("1d", "2d")


# ---- plan -----------------------------------------------------------------------------------------------------------
def test_plan_whole_region_daily_windows(make_cube: MakeCube) -> None:
    cube = make_cube(days=3)
    plans = _plan(cube)
    assert [p.key for p in plans] == ["conus-20190101T0000", "conus-20190102T0000", "conus-20190103T0000"]
    first = plans[0]
    assert first.time_start == pd.Timestamp("2019-01-01", tz="UTC")
    assert first.time_end == pd.Timestamp("2019-01-02", tz="UTC")
    assert (first.lat_slice, first.lon_slice) == (slice(0, 9), slice(0, 12))
    assert first.bbox == (-105.0, 35.0, -105.0 + 11 * 0.625, 39.0)
    assert first.split == pairs.UNASSIGNED and first.tile is None


def test_plan_starts_at_first_whole_day_and_skips_incomplete_windows(make_cube: MakeCube) -> None:
    cube = make_cube(days=3, first_hour=5)  # 2019-01-01 starts at 05:30: not a whole day
    assert [p.time_start.day for p in _plan(cube)] == [2, 3]
    gappy = cube.drop_sel(time=cube["time"].values[40])  # one hour missing on 2 January
    assert [p.time_start.day for p in _plan(gappy)] == [3]


def test_plan_of_a_cube_shorter_than_a_window_is_empty() -> None:
    late = pd.date_range("2019-01-01 05:30", periods=10, freq="h")
    assert plan_samples(late, 1, 1, [0.0], [0.0], "r") == []
    early = pd.date_range("2019-01-01 00:30", periods=10, freq="h")
    assert [p.key for p in plan_samples(early, 1, 1, [0.0], [0.0], "r", window="6h")] == ["r-20190101T0000"]


def test_plan_stride_and_multi_day_windows(make_cube: MakeCube) -> None:
    cube = make_cube(days=3)
    half = _plan(cube, stride="12h")
    assert [p.time_start.hour for p in half] == [0, 12, 0, 12, 0]
    assert len({p.key for p in half}) == 5
    two = _plan(cube, window="2d", stride="1d")
    assert [(p.time_start.day, p.time_end.day) for p in two] == [(1, 3), (2, 4)]
    assert _plan(cube, window="6h")[-1].time_end == pd.Timestamp("2019-01-04", tz="UTC")


def test_tile_ranges_drop_partial_edge_tiles_by_default() -> None:
    assert tile_ranges(9, 4) == tile_ranges(10, 4) == [(0, 4), (4, 8)]
    assert tile_ranges(8, 4) == [(0, 4), (4, 8)]
    assert tile_ranges(5, 8) == []
    assert tile_ranges(7, None) == [(0, 7)]


def test_tile_ranges_keep_edge_tiles_of_at_least_half_a_tile() -> None:
    assert tile_ranges(9, 4, "keep") == [(0, 4), (4, 8)]  # rest 1 < 2: dropped
    assert tile_ranges(10, 4, "keep") == [(0, 4), (4, 8), (8, 10)]  # rest 2 >= 2: kept
    assert tile_ranges(5, 8, "keep") == [(0, 5)]
    assert tile_ranges(3, 8, "keep") == []
    with pytest.raises(ConfigError, match="'pad' is not one of drop, keep"):
        tile_ranges(9, 4, "pad")


def test_dividing_tiles_are_suggested_nearest_first() -> None:
    assert pairs.dividing_tiles(21, 8) == [7, 21, 3]  # by ratio: 8/7, 21/8, 8/3
    assert pairs.dividing_tiles(17, 8) == [17]  # prime: the whole axis, never 1-point tiles
    assert pairs.dividing_tiles(95, 16)[0] == 19


def test_plan_tiles_keys_and_bboxes(make_cube: MakeCube) -> None:
    cube = make_cube(days=1, n_lat=9, n_lon=12)
    plans = _plan(cube, tile=(4, 5))
    assert [p.key for p in plans] == [
        f"conus-20190101T0000-t{y:02d}x{x:02d}" for y in range(2) for x in range(2)
    ]
    p = plans[3]
    assert (p.lat_start, p.lat_stop, p.lon_start, p.lon_stop, p.tile) == (4, 8, 5, 10, (1, 1))
    lat, lon = cube["lat"].values, cube["lon"].values
    assert p.bbox == (lon[5], lat[4], lon[9], lat[7])
    assert all(KEY_PATTERN.match(q.key) for q in plans)
    assert p.tile_label == "t01x01" and _plan(cube)[0].tile_label == "all"


def test_plan_across_the_antimeridian_keeps_array_order(make_cube: MakeCube) -> None:
    cube = make_cube(days=1, n_lon=12, antimeridian=True)
    plans = _plan(cube, tile=(9, 6))
    west, _, east, _ = plans[1].bbox
    assert (west, east) == (-180.0, -176.875)
    whole = _plan(cube)[0]
    assert whole.bbox[0] == 176.25 and whole.bbox[2] == -176.875  # W > E: crosses the antimeridian


def test_plan_errors_name_the_problem(make_cube: MakeCube) -> None:
    cube = make_cube(days=1, n_lat=3, n_lon=3)
    with pytest.raises(ConfigError, match="8x8.*3x3"):
        _plan(cube, tile=(8, 8))
    with pytest.raises(ConfigError, match="'1x'"):
        _plan(cube, window="1x")
    times = cube["time"].values[::-1]
    with pytest.raises(BuildError, match="ascending"):
        plan_samples(times, 3, 3, cube["lat"].values, cube["lon"].values, "r")
    with pytest.raises(BuildError, match="n_lat=4"):
        plan_samples(cube["time"].values, 4, 3, cube["lat"].values, cube["lon"].values, "r")


def test_plan_is_serialisable_and_keys_are_safe() -> None:
    plans = plan_samples(
        pd.date_range("2019-01-01 00:30", periods=48, freq="h", tz="UTC"), 2, 2, [0.0, 0.5], [0.0, 0.625],
        "my region/1.0",
    )  # fmt: skip
    assert plans[0].key == "my_region_1_0-20190101T0000"
    for p in plans:
        text = json.dumps(p.to_dict())
        assert SamplePlan.from_dict(json.loads(text)) == p


# ---- splits ---------------------------------------------------------------------------------------------------------
def test_splits_are_contiguous_blocks_of_whole_days() -> None:
    plans = assign_splits(_daily_plans(20, tile=(2, 2)))
    days = {}
    for p in plans:
        days.setdefault(p.time_start.normalize(), set()).add(p.split)
    assert all(len(s) == 1 for s in days.values()), "a day is shared between splits"
    order = [next(iter(days[d])) for d in sorted(days)]
    assert order == ["train"] * 16 + ["val"] * 2 + ["test"] * 2
    assert assign_splits(_daily_plans(20, tile=(2, 2))) == plans  # deterministic


def test_splits_small_period_gets_one_day_each_and_zero_fractions() -> None:
    assert [p.split for p in assign_splits(_daily_plans(3))] == ["train", "val", "test"]
    assert [p.split for p in assign_splits(_daily_plans(2))] == ["train", "test"]
    assert {p.split for p in assign_splits(_daily_plans(5), 0.0, 0.0)} == {"train"}


def test_split_years_pin_whole_years() -> None:
    plans = _daily_plans(3 * 365 + 1, start="2018-01-01")
    out = assign_splits(plans, split_years={"test": [2020]})
    by_year = {y: {p.split for p in out if p.time_start.year == y} for y in (2018, 2019, 2020)}
    assert by_year[2020] == {"test"}
    assert by_year[2019] == {"train", "val"} and by_year[2018] == {"train"}
    val_days = [p.time_start for p in out if p.split == "val"]
    assert len(val_days) == round(0.1 * 730) and max(val_days) == pd.Timestamp("2019-12-31", tz="UTC")
    same = assign_splits(plans, split_years={2019: "val", 2020: "test"})
    assert {p.split for p in same if p.time_start.year == 2019} == {"val"}
    assert {p.split for p in same if p.time_start.year == 2018} == {"train"}


def test_split_errors() -> None:
    plans = _daily_plans(10)
    with pytest.raises(ConfigError, match="0.6"):
        assign_splits(plans, 0.6, 0.5)
    with pytest.raises(ConfigError, match="2019"):
        assign_splits(plans, split_years={"val": [2019], "test": [2019]})
    with pytest.raises(ConfigError, match="'holdout'"):
        assign_splits(plans, split_years={"holdout": [2019]})
    with pytest.raises(ConfigError, match=r"\[2019\]"):
        assign_splits(plans, split_years={"train": [2018]})


def test_straddling_windows_go_with_their_start_day() -> None:
    plans = assign_splits(_daily_plans(10, window="2d", stride="1d"))
    assert len(plans) == 9
    assert [p.split for p in plans] == ["train"] * 7 + ["val", "test"]


# ---- extraction -----------------------------------------------------------------------------------------------------
def test_extract_sample_means_over_time_steps_and_weighted_stats(make_cube: MakeCube) -> None:
    cube = make_cube(days=2)
    variables = ["T2M", "SLP", "PRECTOTCORR"]
    plan = _plan(cube, tile=(4, 6))[5]  # day 2, tile (0, 1)
    s3 = extract_sample(cube, plan, variables, "3h")
    assert s3.array.dtype == np.float32 and s3.array.shape == (8, 3, 4, 6)
    window = cube.sel(time=slice("2019-01-02", "2019-01-02T23:59")).isel(lat=slice(0, 4), lon=slice(6, 12))
    expected = window["T2M"].coarsen(time=3).mean().values
    np.testing.assert_allclose(s3.array[:, 0], expected, rtol=1e-6)
    np.testing.assert_array_equal(s3.lat, window["lat"].values)
    np.testing.assert_array_equal(s3.lon, window["lon"].values)
    assert list(s3.times) == list(pd.date_range("2019-01-02", periods=8, freq="3h", tz="UTC"))
    weights = np.cos(np.deg2rad(window["lat"]))
    for i, v in enumerate(variables):
        want = float(window[v].astype("float64").weighted(weights).mean())
        assert s3.stats[v]["mean"] == pytest.approx(want, rel=1e-6)
        assert s3.stats[v]["min"] == float(s3.array[:, i].min())
        assert s3.stats[v]["max"] == float(s3.array[:, i].max())
        assert type(s3.stats[v]["mean"]) is float
    s1 = extract_sample(cube, plan, variables, "1h")
    assert s1.array.shape[0] == 24
    assert s1.stats["T2M"]["mean"] == pytest.approx(s3.stats["T2M"]["mean"], rel=1e-6)
    assert s1.stats["T2M"]["max"] >= s3.stats["T2M"]["max"]


def test_extract_keeps_nan_for_validation(make_cube: MakeCube) -> None:
    cube = make_cube(days=1, nan_patches=[("T2M", slice(3, 5), slice(0, 2), slice(0, 2))])
    sample = extract_sample(cube, _plan(cube)[0], ["T2M", "U10M"], "1h")
    assert np.isnan(sample.array[:, 0]).sum() == 8
    assert np.isnan(sample.stats["T2M"]["mean"]) and not np.isnan(sample.stats["U10M"]["mean"])


def test_extract_errors_name_what_is_missing(make_cube: MakeCube) -> None:
    cube = make_cube(days=2, variables=["T2M"])
    plan = _plan(cube)[1]
    with pytest.raises(MissingDataError, match="U10M"):
        extract_sample(cube, plan, ["T2M", "U10M"])
    with pytest.raises(MissingDataError, match="23 hourly steps"):
        extract_sample(cube.drop_sel(time=cube["time"].values[30]), plan, ["T2M"])
    with pytest.raises(ConfigError, match="5h"):
        extract_sample(cube, plan, ["T2M"], "5h")
    with pytest.raises(ConfigError, match="one window"):
        extract_window(cube, _plan(cube), ["T2M"])


def test_iter_samples_reads_each_window_once(make_cube: MakeCube, monkeypatch: pytest.MonkeyPatch) -> None:
    cube = make_cube(days=3)
    plans = _plan(cube, tile=(3, 4))
    calls = []
    real = pairs._load_block
    monkeypatch.setattr(pairs, "_load_block", lambda *a: calls.append(a[2]) or real(*a))
    samples = list(iter_samples(cube, plans, ["T2M", "V10M"], "1d"))
    assert [s.plan.key for s in samples] == [p.key for p in plans]
    assert len(calls) == 3 and samples[0].array.shape == (1, 2, 3, 4)


def test_extraction_is_fast(make_cube: MakeCube) -> None:
    cube = make_cube(days=30, n_lat=32, n_lon=32).load()
    plans = _plan(cube, tile=(8, 8))
    t0 = time.perf_counter()
    samples = list(iter_samples(cube, plans, list(cube.data_vars), "3h"))
    elapsed = time.perf_counter() - t0
    assert len(samples) == 30 * 16
    assert elapsed < 5.0, f"{len(samples)} samples took {elapsed:.1f} s"


# ---- normalisation --------------------------------------------------------------------------------------------------
def test_norm_accumulator_is_exact_and_mergeable() -> None:
    rng = np.random.default_rng(1)
    arrays = [
        np.stack([101325 + 30 * rng.standard_normal((4, 3, 5)), 280 + rng.standard_normal((4, 3, 5))], axis=1)
        .astype(np.float32)
        for _ in range(6)
    ]  # fmt: skip
    one, a, b = (
        NormAccumulator(["SLP", "T2M"]),
        NormAccumulator(["SLP", "T2M"]),
        NormAccumulator(["SLP", "T2M"]),
    )
    for i, arr in enumerate(arrays):
        one.update(arr)
        (a if i % 2 else b).update(arr)
    merged = NormAccumulator.from_dict(json.loads(json.dumps(a.to_dict()))).merge(b).result()
    flat = np.concatenate([np.moveaxis(x, 1, 0).reshape(2, -1) for x in arrays], axis=1).astype(np.float64)
    for i, v in enumerate(["SLP", "T2M"]):
        for res in (one.result(), merged):
            assert res[v]["mean"] == pytest.approx(flat[i].mean(), rel=1e-12)
            assert res[v]["std"] == pytest.approx(flat[i].std(), rel=1e-9)


def test_norm_accumulator_floor_and_errors() -> None:
    acc = NormAccumulator(["PRECTOTCORR"])
    acc.update(np.zeros((2, 1, 2, 2), dtype=np.float32))
    assert acc.result()["PRECTOTCORR"]["std"] > 0
    with pytest.raises(BuildError, match="T2M"):
        NormAccumulator(["T2M"]).result()
    with pytest.raises(BuildError, match="shape"):
        acc.update(np.zeros((2, 3, 2, 2), dtype=np.float32))
    with pytest.raises(BuildError, match="merge"):
        acc.merge(NormAccumulator(["T2M"]))


def test_holdout_tiles_go_to_test_at_every_time() -> None:
    from merra2_text_data.samples.splits import holdout_tiles

    plans = _daily_plans(10, tile=(2, 2))  # 4 tiles x 10 days
    held = holdout_tiles(plans, 0.25, seed=3)
    assert len(held) == 1 and held == holdout_tiles(plans, 0.25, seed=3)  # seeded, stable
    assert holdout_tiles(plans, 0.0) == [] and holdout_tiles(_daily_plans(3), 0.5) == []  # no tiles, none to hold
    out = assign_splits(plans, 0.1, 0.1, None, held)
    assert {p.split for p in out if p.tile_label in held} == {"test"}
    rest = [p for p in out if p.tile_label not in held]
    assert {p.split for p in rest} == {"train", "val", "test"}
    assert max(p.time_start for p in rest if p.split == "train") < min(p.time_start for p in rest if p.split == "test")
    with pytest.raises(ConfigError, match="would hold out all 4 tiles"):
        holdout_tiles(plans, 0.9)
