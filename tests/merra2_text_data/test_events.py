"""events: real NOAA Storm Events files parsed to UTC, text tables, and the time/place join to samples."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from merra2_text_data.errors import ConfigError
from merra2_text_data.regions import grid_points, parse_region
from merra2_text_data.samples import events as events_mod
from merra2_text_data.samples.events import (
    EVENT_COLUMNS,
    grid_margins,
    load_storm_events,
    load_text_table,
    match_events,
)
from merra2_text_data.samples.pairs import SamplePlan, plan_samples

SAMPLE = "noaa-storm-events/StormEvents_details_d2019_c20190617_sample300.csv"
FULL = "noaa-storm-events/StormEvents_details-ftp_v1.0_d2019_c20190617.csv.gz"


@pytest.fixture(scope="module")
def sample300(shared_data: Path) -> pd.DataFrame:
    return load_storm_events([shared_data / SAMPLE])


@pytest.fixture(scope="module")
def full(shared_data: Path) -> pd.DataFrame:
    return load_storm_events([shared_data / FULL])


def _conus_plans(days: int, tile: tuple[int, int] | None, start: str = "2019-01-01") -> list[SamplePlan]:
    """Plans of a CONUS-like 0.5 x 0.625 degree grid (24..50N, 125..67W), without reading data."""
    times = pd.date_range(pd.Timestamp(start) + pd.Timedelta(minutes=30), periods=days * 24, freq="h")
    lat, lon = 24.0 + 0.5 * np.arange(53), -125.0 + 0.625 * np.arange(94)
    return plan_samples(times, lat.size, lon.size, lat, lon, "conus", tile=tile)


def _utc(text: str) -> pd.Timestamp:
    return pd.Timestamp(text, tz="UTC")


def _row(df: pd.DataFrame, event_id: int) -> pd.Series:
    return df[df["event_id"] == str(event_id)].iloc[0]


@pytest.mark.parametrize(
    ("event_id", "begin", "end"),
    [
        (814096, "2019-03-09 13:50", "2019-03-09 13:50"),  # CST-6, 07:50 local
        (800014, "2019-02-15 02:10", "2019-02-15 05:05"),  # HST-10, 16:10 local on the 14th: next UTC day
        (792082, "2019-01-04 11:10", "2019-01-04 11:12"),  # EST-5, 06:10 local
        (807081, "2019-01-16 16:00", "2019-01-17 16:00"),  # PST-8, two days
        (801968, "2019-01-31 01:00", "2019-01-31 15:00"),  # EST-5 zone event, 20:00 local on the 30th
    ],
)
def test_sample_file_times_are_converted_to_utc(
    sample300: pd.DataFrame, event_id: int, begin: str, end: str
) -> None:
    row = _row(sample300, event_id)
    assert row["begin_utc"] == _utc(begin) and row["end_utc"] == _utc(end)


def test_sample_file_columns_points_and_zones(sample300: pd.DataFrame) -> None:
    assert len(sample300) == 300
    assert set(EVENT_COLUMNS) <= set(sample300.columns)
    for col in (
        "EVENT_TYPE",
        "STATE",
        "CZ_NAME",
        "BEGIN_LAT",
        "BEGIN_LON",
        "EVENT_NARRATIVE",
        "EPISODE_NARRATIVE",
    ):
        assert col in sample300.columns
    assert str(sample300["begin_utc"].dt.tz) == "UTC"
    assert int(sample300["has_point"].sum()) == 270
    zones = sample300[~sample300["has_point"]]
    assert zones["lat"].isna().all() and zones["is_zone"].all()
    row = _row(sample300, 814096)
    assert (row["lat"], row["lon"], row["event_type"]) == (35.3, -93.64, "Thunderstorm Wind")
    assert row["place"] == "Subiaco, Arkansas"
    assert row["text"].startswith("Tree limbs were broken")
    assert sample300["begin_utc"].is_monotonic_increasing


def test_full_gzip_file(full: pd.DataFrame) -> None:
    assert len(full) == 15447
    assert full["begin_utc"].notna().all() and (full["end_utc"] >= full["begin_utc"]).all()
    assert full["begin_utc"].min() >= _utc("2019-01-01 03:00") and full["begin_utc"].max() < _utc(
        "2019-04-01 12:00"
    )
    row = _row(full, 804158)  # EST-5, 12-JAN-19 10:00:00 local
    assert row["begin_utc"] == _utc("2019-01-12 15:00") and row["end_utc"] == _utc("2019-01-13 19:00")
    assert _row(full, 816892)["begin_utc"] == _utc("2019-03-06 11:00")  # SST-11
    assert _row(full, 802498)["begin_utc"] == _utc("2019-01-17 19:42")  # AST-4
    assert (full["text"].str.len() > 0).all()


@pytest.mark.parametrize(
    ("text", "hours"),
    [("EST-5", -5), ("CST-6", -6), ("MST-7", -7), ("PST-8", -8), ("AKST-9", -9), ("HST-10", -10), ("AST-4", -4),
     ("SST-11", -11), ("GST10", 10), ("CSt", -6), ("PDT", -7), ("UTC", 0), ("XYZ", None), ("", None)],
)  # fmt: skip
def test_timezone_offsets(text: str, hours: float | None) -> None:
    assert events_mod._tz_offset(text) == hours


def test_unknown_timezone_raises_or_skips(
    shared_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    raw = pd.read_csv(shared_data / SAMPLE)
    raw.loc[[5, 9], "CZ_TIMEZONE"] = "XYZ"
    path = tmp_path / "bad.csv"
    raw.to_csv(path, index=False)
    with pytest.raises(ConfigError, match=r"'XYZ'.*2 row"):
        load_storm_events([path])
    with caplog.at_level(logging.WARNING):
        df = load_storm_events([path], on_unknown_timezone="skip")
    assert len(df) == 298 and "skipped 2 event(s)" in caplog.text


def test_century_comes_from_yearmonth(shared_data: Path, tmp_path: Path) -> None:
    raw = pd.read_csv(shared_data / SAMPLE).head(3)
    raw["BEGIN_DATE_TIME"] = "31-DEC-69 23:00:00"
    raw["END_DATE_TIME"] = "01-JAN-70 01:00:00"
    raw["BEGIN_YEARMONTH"], raw["END_YEARMONTH"] = 196912, 197001
    raw["CZ_TIMEZONE"] = "CST-6"
    raw.to_csv(tmp_path / "old.csv", index=False)
    df = load_storm_events([tmp_path / "old.csv"])
    assert (df["begin_utc"] == _utc("1970-01-01 05:00")).all() and (
        df["end_utc"] == _utc("1970-01-01 07:00")
    ).all()


def test_bad_storm_files(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    pd.DataFrame({"EVENT_ID": [1], "BEGIN_DATE_TIME": ["01-JAN-19 00:00:00"]}).to_csv(path, index=False)
    with pytest.raises(ConfigError, match="EVENT_TYPE.*CZ_TIMEZONE"):
        load_storm_events([path])
    with pytest.raises(ConfigError, match="no storm events"):
        load_storm_events([])


def test_match_joins_by_time_overlap_and_bbox(sample300: pd.DataFrame) -> None:
    plans = _conus_plans(90, tile=(8, 8))
    joined = match_events(sample300, plans)
    assert set(joined) == {p.key for p in plans}
    where = sorted(k for k, evs in joined.items() for e in evs if e.event_id == "814096")
    assert where == ["conus-20190309T0000-t02x06"]
    two_days = sorted(k for k, evs in joined.items() for e in evs if e.event_id == "807081")
    assert [k.split("-")[1] for k in two_days] == ["20190116T0000", "20190117T0000"]
    ev = next(e for e in joined["conus-20190309T0000-t02x06"] if e.event_id == "814096")
    assert ev.begin == _utc("2019-03-09 13:50") and ev.place == "Subiaco, Arkansas" and ev.lat == 35.3


def test_match_equals_brute_force(sample300: pd.DataFrame, caplog: pytest.LogCaptureFixture) -> None:
    plans = _conus_plans(12, tile=(16, 16), start="2019-03-01")
    with caplog.at_level(logging.INFO):
        joined = match_events(sample300, plans, margin_deg=0.25)
    assert "30 event(s) without coordinates (zone events) are not joined" in caplog.text
    points = list(sample300[sample300["has_point"]].itertuples())
    for p in plans:
        w, s, e, n = p.bbox
        want = [
            str(r.event_id) for r in points
            if r.begin_utc < p.time_end and r.end_utc >= p.time_start
            and s - 0.25 <= r.lat <= n + 0.25 and w - 0.25 <= r.lon <= e + 0.25
        ]  # fmt: skip
        assert [ev.event_id for ev in joined[p.key]] == want, p.key
    assert sum(len(v) for v in joined.values()) > 20


def test_match_across_the_antimeridian(tmp_path: Path) -> None:
    table = pd.DataFrame(
        {"time": ["2019-01-01T06:00:00"] * 3 + ["2019-01-02T06:00:00"], "lat": [36.0, 36.0, 36.0, 36.0],
         "lon": [179.9, -179.9, 0.0, 179.9], "text": ["east of 180", "west of 180", "far away", "next day"]}
    )  # fmt: skip
    table.to_csv(tmp_path / "t.csv", index=False)
    events = load_text_table(tmp_path / "t.csv")
    plan = SamplePlan(
        "p", _utc("2019-01-01"), _utc("2019-01-02"), 0, 4, 0, 12, (176.25, 35.0, -176.875, 39.0)
    )
    assert [e.text for e in match_events(events, [plan])["p"]] == ["east of 180", "west of 180"]


def test_match_is_fast_on_the_full_file(full: pd.DataFrame) -> None:
    plans = _conus_plans(90, tile=(4, 6))  # 14 x 16 tiles x 90 days
    assert len(plans) >= 10_000
    t0 = time.perf_counter()
    joined = match_events(full, plans)
    elapsed = time.perf_counter() - t0
    assert elapsed < 10.0, f"{elapsed:.1f} s"
    assert sum(len(v) for v in joined.values()) > 1000


def test_text_table_csv_and_parquet(tmp_path: Path) -> None:
    df = pd.DataFrame(
        {"time": ["2019-01-01T12:00:00", "2019-01-01T12:00:00-05:00"], "lat": [40.0, None], "lon": [-100.0, None],
         "text": ["plain", "offset"], "place": ["Here", "There"]}
    )  # fmt: skip
    df.to_csv(tmp_path / "t.csv", index=False)
    df.to_parquet(tmp_path / "t.parquet")
    for path in (tmp_path / "t.csv", tmp_path / "t.parquet"):
        out = load_text_table(path)
        assert set(EVENT_COLUMNS) <= set(out.columns)
        assert list(out["begin_utc"]) == [_utc("2019-01-01 12:00"), _utc("2019-01-01 17:00")]
        assert list(out["has_point"]) == [True, False] and list(out["place"]) == ["Here", "There"]


def test_text_table_errors(tmp_path: Path) -> None:
    pd.DataFrame({"time": ["2019-01-01"], "body": ["x"]}).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(ConfigError, match="lat, lon, text"):
        load_text_table(tmp_path / "m.csv")
    pd.DataFrame({"time": ["soon"], "lat": [1], "lon": [1], "text": ["x"]}).to_csv(
        tmp_path / "b.csv", index=False
    )
    with pytest.raises(ConfigError, match="'soon'"):
        load_text_table(tmp_path / "b.csv")
    with pytest.raises(ConfigError, match="begin_utc"):
        match_events(pd.DataFrame({"x": [1]}), [])


def test_grid_margins_are_half_of_each_axis_step() -> None:
    lat, lon = grid_points(parse_region("-105,35,-95,45"))
    assert grid_margins(lat, lon) == (0.25, 0.3125)
    assert grid_margins(np.array([40.0]), np.array([-100.0])) == (0.25, 0.3125)  # one point: MERRA-2's steps
    event = pd.DataFrame({"event_id": ["e"], "event_type": ["Hail"], "begin_utc": [_utc("2019-01-01 12:00")],
                          "end_utc": [_utc("2019-01-01 12:00")], "lat": [40.0], "lon": [-102.825], "place": [""],
                          "text": ["x"], "has_point": [True]})  # fmt: skip
    plan = SamplePlan("p", _utc("2019-01-01"), _utc("2019-01-02"), 0, 4, 0, 4, (-105.0, 38.0, -103.125, 41.5))
    assert match_events(event, [plan], margin_deg=(0.25, 0.25))["p"] == []
    assert [e.event_id for e in match_events(event, [plan], margin_deg=grid_margins(lat, lon))["p"]] == ["e"]
