"""validate: every reason to reject a sample, and the quarantine table."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from merra2_text_data.errors import SampleValidationError
from merra2_text_data.samples.pairs import SampleData, extract_sample, plan_samples
from merra2_text_data.samples.validate import (
    QUARANTINE_COLUMNS,
    quarantine_frame,
    quarantine_row,
    raise_if_invalid,
    validate_sample,
)

VARIABLES = ["T2M", "U10M", "SLP", "PRECTOTCORR"]


def _sample(make_cube: Callable[..., xr.Dataset], **kw: object) -> SampleData:
    cube = make_cube(days=1, **kw)
    plan = plan_samples(cube["time"].values, 9, 12, cube["lat"].values, cube["lon"].values, "r")[0]
    return extract_sample(cube, plan, VARIABLES, "3h")


def _reasons(s: SampleData, **over: object) -> list[str]:
    args = {"array": s.array, "stats": s.stats, "variables": VARIABLES, "lat": s.lat, "lon": s.lon, **over}
    return validate_sample(**args)  # type: ignore[arg-type]


def test_a_good_sample_has_no_reasons(make_cube: Callable[..., xr.Dataset]) -> None:
    assert _reasons(_sample(make_cube)) == []
    assert _reasons(_sample(make_cube, antimeridian=True)) == []  # lon wraps once: fine


def test_nan_patch_is_rejected(make_cube: Callable[..., xr.Dataset]) -> None:
    s = _sample(make_cube, nan_patches=[("U10M", slice(0, 3), slice(2, 4), slice(2, 4))])
    reasons = _reasons(s)
    assert any("NaN values" in r for r in reasons)
    assert any(r.startswith("U10M: mean=nan") for r in reasons)


def test_array_contract_and_plausibility(make_cube: Callable[..., xr.Dataset]) -> None:
    s = _sample(make_cube)
    assert any("dtype is float64" in r for r in _reasons(s, array=s.array.astype(np.float64)))
    assert any("1 variables" in r for r in _reasons(s, array=s.array[:, :1]))
    filled = s.array.copy()
    filled[0, 2, 0, 0] = 1e15
    assert any("fill values" in r for r in _reasons(s, array=filled))
    celsius = {**s.stats, "T2M": {k: v - 273.15 for k, v in s.stats["T2M"].items()}}
    reasons = _reasons(s, stats=celsius)
    assert any(r.startswith("T2M: min") and "plausible range 170..340" in r for r in reasons)
    assert any("T2M: statistics min" in r and "differs from the array" in r for r in reasons)


def test_statistics_problems(make_cube: Callable[..., xr.Dataset]) -> None:
    s = _sample(make_cube)
    missing = {k: v for k, v in s.stats.items() if k != "SLP"}
    assert any(r.startswith("SLP: statistics missing") for r in _reasons(s, stats=missing))
    swapped = {
        **s.stats,
        "U10M": {"mean": 50.0, "min": s.stats["U10M"]["min"], "max": s.stats["U10M"]["max"]},
    }
    assert any("U10M: statistics out of order" in r for r in _reasons(s, stats=swapped))
    inf = {**s.stats, "SLP": {**s.stats["SLP"], "max": float("inf")}}
    assert any("SLP: max=inf" in r for r in _reasons(s, stats=inf))


def test_coordinate_order(make_cube: Callable[..., xr.Dataset]) -> None:
    s = _sample(make_cube)
    assert any("lat is not strictly ascending" in r for r in _reasons(s, lat=s.lat[::-1]))
    assert any("lon is not ascending" in r for r in _reasons(s, lon=s.lon[::-1]))
    two_wraps = np.array(
        [170.0, 175.0, -180.0, -175.0, 170.0, 175.0, -180.0, -175.0, 170.0, 171.0, 172.0, 173.0]
    )
    assert any("lon is not ascending" in r for r in _reasons(s, lon=two_wraps))
    assert any("do not match the array grid" in r for r in _reasons(s, lat=s.lat[:-1]))
    assert any("outside -90..90" in r for r in _reasons(s, lat=s.lat + 60))


def test_strict_policy_names_the_sample() -> None:
    raise_if_invalid("k", [])
    with pytest.raises(SampleValidationError, match="'conus-1'.*NaN.*--strict"):
        raise_if_invalid("conus-1", ["climate array: 3 NaN values"])


def test_quarantine_frame_dtypes_with_and_without_rows(tmp_path: Path) -> None:
    empty = quarantine_frame([])
    assert list(empty.columns) == list(QUARANTINE_COLUMNS) and len(empty) == 0
    t0 = pd.Timestamp("2019-01-01", tz="UTC")
    rows = [
        quarantine_row("a", "train", t0, t0 + pd.Timedelta(days=1), ["x", "y"]),
        {"key": "b", "split": "test", "time_start": "2019-01-02T00:00:00Z", "time_end": t0, "reason": ["z"]},
    ]
    full = quarantine_frame(rows)
    assert list(full["reason"]) == ["x; y", "z"]
    assert full["time_start"].iloc[1] == pd.Timestamp("2019-01-02", tz="UTC")
    for frame in (empty, full):
        assert str(frame["time_start"].dtype) == "datetime64[us, UTC]" == str(frame["time_end"].dtype)
        assert all(pd.api.types.is_string_dtype(frame[c]) for c in ("key", "split", "reason"))
    assert dict(empty.dtypes) == dict(full.dtypes)
    full.to_parquet(tmp_path / "q.parquet")
    back = pd.read_parquet(tmp_path / "q.parquet")
    assert list(back["key"]) == ["a", "b"] and str(back["time_end"].dt.tz) == "UTC"
