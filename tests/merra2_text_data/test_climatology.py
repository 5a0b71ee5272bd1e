"""Anomalies against a day-of-year climatology: the rules, and a 3-year synthetic build with its two passes and resume."""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from climate_text_schema import open_dataset
from merra2_text_data import BuildConfig, build, verify
from merra2_text_data.regions import parse_region
from merra2_text_data.run import tasks as tasks_mod
from merra2_text_data.samples.climatology import DayOfYearClimatology, spans_several_years
from merra2_text_data.samples.text import parse_caption_numbers
from merra2_text_data.source.synth import write_synthetic_granules

BBOX = "-100,40,-98,41"
YEARS = (2018, 2019, 2020)
DAYS = 8  # 1..8 January of each year: a tiny, fast multi-year build (the rest of each year is a recorded gap)


def _row(day: str, mean: float, group: str = "all") -> tuple[str, pd.Timestamp, dict[str, dict[str, float]]]:
    return group, pd.Timestamp(day, tz="UTC"), {"T2M": {"mean": mean}}


def test_a_date_needs_two_years_near_it() -> None:
    # December 2019 and January 2020: two calendar years, but no date has two years of samples near it.
    rows = [_row(str(d.date()), 270.0) for d in pd.date_range("2019-12-01", "2020-01-31")]
    assert spans_several_years(r[1] for r in rows)
    assert DayOfYearClimatology.from_samples(rows) is None


def test_period_and_mean_are_those_of_the_date() -> None:
    rows = [
        _row(f"{y}-07-{d:02d}", 280.0 + (y - 2018) + 0.1 * d) for y in (2018, 2019, 2020) for d in (1, 2, 3)
    ]
    rows += [_row("2018-12-31", 250.0), _row("2019-12-31", 251.0)]
    clim = DayOfYearClimatology.from_samples(rows, half_width_days=2)
    assert clim is not None and clim.period == "2018-2020"
    day = pd.Timestamp("2019-07-03", tz="UTC")
    near = [r[2]["T2M"]["mean"] for r in rows if r[1].month == 7 and abs(r[1].day - 3) <= 2]
    assert clim.mean("all", "T2M", day) == pytest.approx(np.mean(near), rel=1e-12)
    assert clim.years("all", "T2M", day) == (2018, 2020)
    # 31 December has 2018 and 2019; late December counts for the next year's early January; 4 January has none
    assert clim.years("all", "T2M", pd.Timestamp("2019-12-31")) == (2018, 2019)
    assert clim.years("all", "T2M", pd.Timestamp("2020-01-02")) == (2019, 2020)
    assert math.isnan(clim.mean("all", "T2M", pd.Timestamp("2020-01-04")))
    info = clim.anomalies("all", day, {"T2M": {"mean": 290.0}})
    assert info is not None and info.period == "2018-2020"
    assert info.values["T2M"] == pytest.approx(290.0 - np.mean(near))
    assert info.reference is not None and info.reference["T2M"] == pytest.approx(np.mean(near))


@pytest.fixture(scope="module")
def granules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("granules3y")
    for year in YEARS:
        write_synthetic_granules(out, parse_region(BBOX), dt.date(year, 1, 1), dt.date(year, 1, DAYS), seed=5,
                                 collections=("M2T1NXSLV",))  # fmt: skip
    return out


def _config(granules: Path, out: Path, **extra: Any) -> BuildConfig:
    options: dict[str, Any] = dict(region=BBOX, start=f"{YEARS[0]}-01-01", end=f"{YEARS[-1]}-01-{DAYS:02d}",
                                   variables="T2M,U10M,V10M,SLP", window="1d", time_step="3h", source=str(granules),
                                   out=str(out), cache_dir=str(out.parent / "cache"), allow_gaps=True, quiet=True,
                                   shard_size=4096)  # fmt: skip
    options.update(extra)
    return BuildConfig.from_options(**options)


def test_multi_year_build_states_faithful_anomalies(granules: Path, tmp_path: Path) -> None:
    ref = build(_config(granules, tmp_path / "ds"))
    ds = open_dataset(ref)
    index = ds.read_index()
    assert len(index) == len(YEARS) * DAYS and verify(ref).ok
    extra = ds.manifest.model_extra or {}
    assert extra["climatology"]["period"] == "2018-2020" and extra["climatology"]["variables"] == ["T2M"]
    doy = index["time_start"].dt.strftime("%m-%d")
    for _, row in index.iterrows():
        # the climatology, computed independently: all samples within 7 days of the date, any year, any split
        near = index.loc[(pd.to_datetime("2000-" + doy) - pd.Timestamp(f"2000-{row['time_start']:%m-%d}")).abs()
                         <= pd.Timedelta(days=7), "T2M_mean"]  # fmt: skip
        assert row["T2M_clim"] == pytest.approx(near.mean(), rel=1e-12)
        assert row["T2M_anom"] == pytest.approx(row["T2M_mean"] - row["T2M_clim"], abs=1e-9)
        words = "warmer" if row["T2M_anom"] >= 0 else "colder"
        assert f"{abs(row['T2M_anom']):.1f} °C {words} than the 2018-2020 average for the date" in row["text"]
        assert parse_caption_numbers(row["text"])["t2m_anomaly_c"] == pytest.approx(
            round(row["T2M_anom"], 1), abs=0.051
        )
    assert index["T2M_anom"].abs().max() > 0.05  # the synthetic weather differs between years
    card = (Path(ds.version_url) / "README.md").read_text()
    assert "day-of-year climatology" in card and "SYNTHETIC" in card


def test_sub_daily_windows_are_compared_with_the_same_time_of_day(granules: Path, tmp_path: Path) -> None:
    """6-hour windows: a window's climatology is that of its date *and* its time of day (the samples starting at the
    same hour within 7 days, any year), not the date's mean over every hour, which made each anomaly mostly the
    diurnal offset of its hour."""
    ref = build(_config(granules, tmp_path / "ds", window="6h"))
    ds = open_dataset(ref)
    index = ds.read_index()
    assert len(index) == len(YEARS) * DAYS * 4 and verify(ref).ok
    doy = pd.to_datetime("2000-" + index["time_start"].dt.strftime("%m-%d"))
    hour = index["time_start"].dt.strftime("%H:%M")
    for _, row in index.iterrows():
        near = index.loc[((doy - pd.Timestamp(f"2000-{row['time_start']:%m-%d}")).abs() <= pd.Timedelta(days=7))
                         & (hour == f"{row['time_start']:%H:%M}"), "T2M_mean"]  # fmt: skip
        assert row["T2M_clim"] == pytest.approx(near.mean(), rel=1e-12)
        assert row["T2M_anom"] == pytest.approx(row["T2M_mean"] - row["T2M_clim"], abs=1e-9)
    by_hour = index.groupby(hour)["T2M_clim"].mean()
    assert by_hour.max() - by_hour.min() > 0.5  # the diurnal cycle is in the climatology, not in the anomalies
    assert (ds.manifest.model_extra or {})["climatology"]["time_of_day"] is True
    daily = build(_config(granules, tmp_path / "daily"))
    assert (open_dataset(daily).manifest.model_extra or {})["climatology"]["time_of_day"] is False
    assert "climatology" not in open_dataset(daily).manifest.config
    assert ds.manifest.config["climatology"] == "time_of_day"


def test_two_passes_resume_and_one_year_has_no_anomaly(
    granules: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clean = build(_config(granules, tmp_path / "clean"))
    real_stats, real_write = tasks_mod.run_stats_task, tasks_mod.write_shard
    calls = {"stats": 0, "writes": 0}

    def counting_stats(*args: Any, **kwargs: Any) -> Any:
        calls["stats"] += 1
        return real_stats(*args, **kwargs)

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls["writes"] += 1
        if calls["writes"] == 2:
            raise OSError("injected: disk full while writing a shard")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(tasks_mod, "run_stats_task", counting_stats)
    monkeypatch.setattr(tasks_mod, "write_shard", flaky)
    with pytest.raises(OSError, match="injected"):
        build(_config(granules, tmp_path / "ds"))
    root = tmp_path / "ds" / "bbox-100_40_-98_41"
    n_tasks = calls["stats"]
    assert n_tasks > 1 and len(list(root.glob("staging/*/stats/*.json"))) == n_tasks
    assert not list(root.glob("versions/*/manifest.json"))
    monkeypatch.setattr(tasks_mod, "write_shard", real_write)
    ref = build(_config(granules, tmp_path / "ds"))
    assert calls["stats"] == n_tasks  # pass 1 was not redone: its receipts were reused
    assert ref.rsplit("@", 1)[1] == clean.rsplit("@", 1)[1] and not (root / "staging").exists()
    pd.testing.assert_frame_equal(open_dataset(ref).read_index(), open_dataset(clean).read_index())

    one = build(_config(granules, tmp_path / "one", start="2019-01-01", end="2019-01-08", allow_gaps=False))
    index = open_dataset(one).read_index()
    assert calls["stats"] == n_tasks  # a single year runs no first pass
    assert index["T2M_anom"].isna().all() and not index["text"].str.contains("average for the date").any()
    assert (open_dataset(one).manifest.model_extra or {})["climatology"] is None
