"""text: captions faithful to the statistics (parsed back), templates, extremes, events, climatology anomalies."""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from climate_text_schema.captions import template_index
from merra2_text_data.errors import BuildError, ConfigError
from merra2_text_data.samples.climatology import AnomalyInfo, DayOfYearClimatology
from merra2_text_data.samples.events import Event
from merra2_text_data.samples.pairs import iter_samples, plan_samples
from merra2_text_data.samples.text import (
    N_TEMPLATES,
    compass_direction,
    describe_region,
    format_events,
    make_caption,
    parse_caption_numbers,
)

UNITS = {"T2M": "K", "T2MDEW": "K", "QV2M": "kg kg-1", "U10M": "m s-1", "V10M": "m s-1", "SLP": "Pa",
         "PRECTOTCORR": "kg m-2 s-1", "TQV": "kg m-2"}  # fmt: skip
DAY0, DAY1 = pd.Timestamp("2019-01-01", tz="UTC"), pd.Timestamp("2019-01-02", tz="UTC")


def _stats(**over: tuple[float, float, float]) -> dict[str, dict[str, float]]:
    base = {
        "T2M": (269.75, 262.1, 275.26), "T2MDEW": (265.0, 260.0, 270.0), "QV2M": (0.00234, 0.001, 0.004),
        "U10M": (-3.0, -9.0, 4.0), "V10M": (-4.0, -10.0, 2.0), "SLP": (101623.4, 100900.0, 102500.0),
        "PRECTOTCORR": (1.2e-5, 0.0, 3e-4),
    }  # fmt: skip
    base.update(over)
    return {k: {"mean": m, "min": lo, "max": hi} for k, (m, lo, hi) in base.items()}


def _keys_per_template() -> list[str]:
    found: dict[int, str] = {}
    i = 0
    while len(found) < N_TEMPLATES:
        key = f"conus-20190101T0000-t{i:02d}x00"
        found.setdefault(template_index(key), key)
        i += 1
    return [found[t] for t in range(N_TEMPLATES)]


def _r1(x: float) -> float:
    return float(f"{x:.1f}")


def _expected(stats: dict[str, dict[str, float]], seconds: float) -> dict[str, float]:
    """The numbers a caption must hold, computed here independently of the module."""
    u, v = stats["U10M"]["mean"], stats["V10M"]["mean"]
    return {
        "t2m_mean_c": _r1(stats["T2M"]["mean"] - 273.15),
        "t2m_min_c": _r1(stats["T2M"]["min"] - 273.15),
        "t2m_max_c": _r1(stats["T2M"]["max"] - 273.15),
        "dewpoint_c": _r1(stats["T2MDEW"]["mean"] - 273.15),
        "qv_g_kg": _r1(stats["QV2M"]["mean"] * 1000),
        "wind_speed_m_s": _r1(math.hypot(u, v)),
        "slp_hpa": _r1(stats["SLP"]["mean"] / 100),
        "precip_mm": _r1(stats["PRECTOTCORR"]["mean"] * seconds),
    }


def test_there_are_at_least_three_templates_chosen_by_key() -> None:
    keys = _keys_per_template()
    captions = [make_caption(k, "the contiguous United States", DAY0, DAY1, _stats(), UNITS) for k in keys]
    assert N_TEMPLATES >= 3 and len(set(captions)) == N_TEMPLATES
    assert make_caption(keys[1], "x", DAY0, DAY1, _stats(), UNITS) == make_caption(
        keys[1], "x", DAY0, DAY1, _stats(), UNITS
    )
    # sha256-based: stable across processes (Python's hash() of a str is salted per process)
    assert template_index("abc") == hashlib.sha256(b"abc").digest()[0] % N_TEMPLATES


@pytest.mark.parametrize("template", range(N_TEMPLATES))
def test_every_number_parses_back_to_the_statistics(template: int) -> None:
    key = _keys_per_template()[template]
    stats = _stats()
    caption = make_caption(key, "the contiguous United States", DAY0, DAY1, stats, UNITS)
    parsed = parse_caption_numbers(caption)
    expected = _expected(stats, 86400.0)
    assert {k: parsed[k] for k in expected} == expected
    assert parsed["wind_dir_deg"] == 45.0  # u<0, v<0: the wind blows from the northeast
    assert "-3.4 °C" in caption and "the contiguous United States" in caption and "1 January 2019" in caption
    # every number after the intro is one of the derivable values
    body = caption.split(":", 1)[1] if caption.startswith(("On", "Conditions")) else caption.split(".", 1)[1]
    numbers = {float(x) for x in re.findall(r"-?\d+(?:\.\d+)?", body)} - {2.0, 10.0}  # "2 m", "10 m"
    assert numbers <= set(expected.values()), numbers - set(expected.values())


def test_caption_from_an_extracted_sample_is_faithful(make_cube: Callable[..., xr.Dataset]) -> None:
    cube = make_cube(days=2, t2m_offset=-20.0)
    variables = list(cube.data_vars)
    plans = plan_samples(
        cube["time"].values, 9, 12, cube["lat"].values, cube["lon"].values, "conus", tile=(4, 6)
    )
    units = {v: cube[v].attrs["units"] for v in variables}
    for sample in iter_samples(cube, plans, variables, "3h"):
        caption = make_caption(
            sample.plan.key, "conus", sample.plan.time_start, sample.plan.time_end, sample.stats, units
        )
        parsed = parse_caption_numbers(caption)
        for name, value in _expected(sample.stats, 86400.0).items():
            assert parsed[name] == value, (name, caption)


def test_rounding_never_writes_minus_zero_and_dates_and_units() -> None:
    stats = _stats(T2M=(273.13, 273.11, 273.2))
    assert "-0.0" not in make_caption("k", "r", DAY0, DAY1, stats, UNITS)
    assert parse_caption_numbers(make_caption("k", "r", DAY0, DAY1, stats, UNITS))["t2m_mean_c"] == 0.0
    in_c = _stats(T2M=(-1.26, -5.0, 3.0), SLP=(1016.23, 1000.0, 1020.0))
    caption = make_caption(
        "k", "r", DAY0, DAY0 + pd.Timedelta(days=3), in_c, {**UNITS, "SLP": "hPa", "T2M": "degC"}
    )
    parsed = parse_caption_numbers(caption)
    assert parsed["t2m_mean_c"] == -1.3 and parsed["slp_hpa"] == 1016.2  # already in °C / hPa
    assert "from 1 january 2019 to 3 january 2019" in caption.lower()
    assert parsed["precip_mm"] == _r1(1.2e-5 * 3 * 86400)
    sub = make_caption("k", "r", DAY0 + pd.Timedelta(hours=6), DAY0 + pd.Timedelta(hours=12), stats, UNITS)
    assert "1 January 2019 06:00 to 1 January 2019 12:00 UTC" in sub
    with pytest.raises(ConfigError, match="'furlongs'"):
        make_caption("k", "r", DAY0, DAY1, stats, {**UNITS, "SLP": "furlongs"})
    with pytest.raises(BuildError, match="T2M mean is nan"):
        make_caption("k", "r", DAY0, DAY1, _stats(T2M=(math.nan, 1.0, 2.0)), UNITS)


@pytest.mark.parametrize(
    ("u", "v", "word"),
    [(1, 0, "west"), (-1, 0, "east"), (0, 1, "south"), (0, -1, "north"), (-1, -1, "northeast"), (1, 1, "southwest"),
     (1, -0.4, "west-northwest"), (-0.2, -1, "north-northeast")],
)  # fmt: skip
def test_compass_is_where_the_wind_blows_from(u: float, v: float, word: str) -> None:
    assert compass_direction(u, v) == word


def test_calm_mean_wind_has_no_direction() -> None:
    caption = make_caption("k", "r", DAY0, DAY1, _stats(U10M=(0.01, -3, 3), V10M=(0.02, -3, 3)), UNITS)
    assert "no prevailing direction" in caption
    assert parse_caption_numbers(caption)["wind_speed_m_s"] == 0.0


def test_notable_extremes() -> None:
    hot = _stats(T2M=(300.0, 290.0, 309.0), U10M=(1.0, -22.04, 5.0), PRECTOTCORR=(1e-4, 0.0, 7e-4))
    caption = make_caption("k", "r", DAY0, DAY1, hot, UNITS)
    assert "extreme heat (maximum 2 m temperature 35.9 °C)" in caption
    assert "strong winds (a 10 m wind component reached 22.0 m/s)" in caption
    assert "heavy precipitation (peak rate 60.5 mm/day)" in caption
    parsed = parse_caption_numbers(caption)
    assert parsed["wind_component_max_m_s"] == 22.0 and parsed["precip_peak_mm_day"] == 60.5
    cold = make_caption("k", "r", DAY0, DAY1, _stats(T2M=(250.0, 240.0, 260.0)), UNITS)
    assert "extreme cold (minimum 2 m temperature -33.1 °C)" in cold and "heat" not in cold
    mild = make_caption("k", "r", DAY0, DAY1, _stats(T2M=(300.0, 290.0, 308.19)), UNITS)  # 35.04 -> "35.0"
    assert "Notable" not in mild


def test_absent_variables_leave_their_sentences_out() -> None:
    only_t = make_caption("k", "r", DAY0, DAY1, {"T2M": _stats()["T2M"]}, UNITS)
    assert set(parse_caption_numbers(only_t)) == {"t2m_mean_c", "t2m_min_c", "t2m_max_c"}
    other = make_caption("k", "r", DAY0, DAY1, {"TQV": {"mean": 12.345, "min": 1.0, "max": 20.0}}, UNITS)
    assert "TQV 12.35 kg m-2" in other


def test_anomaly_sentence_parses_with_sign() -> None:
    for delta, word in ((-2.34, "colder"), (1.26, "warmer")):
        anomalies = AnomalyInfo({"T2M": delta}, "2018-2020")
        for key in _keys_per_template():
            caption = make_caption(key, "r", DAY0, DAY1, _stats(), UNITS, anomalies=anomalies)
            assert f"{abs(delta):.1f} °C {word} than the 2018-2020 average for the date" in caption
            assert parse_caption_numbers(caption)["t2m_anomaly_c"] == _r1(delta)


def _event(i: int, narrative: str) -> Event:
    begin = pd.Timestamp("2019-01-01 15:00", tz="UTC") + pd.Timedelta(hours=i)
    return Event(str(100 + i), "Heavy Snow", begin, begin, 40.0, -100.0, "Denver, Colorado", narrative)


def test_events_are_appended_truncated_and_not_parsed() -> None:
    long = "Snow fell at 3 inches per hour " * 30
    events = [
        _event(2, "Late."),
        _event(0, long),
        _event(1, "Roads closed near mile 42."),
        _event(3, "Extra."),
    ]
    block = format_events(events, max_events=3)
    assert block.startswith("Reported events: Heavy Snow near Denver, Colorado on 1 January 2019: Snow fell")
    first = block.split(": ", 2)[2].split(" Heavy Snow")[0]
    assert first.endswith("...") and len(first) <= 304 and not first[:-3].endswith(" ")
    assert "Roads closed near mile 42." in block and "Late." in block and "Extra." not in block
    assert block.endswith("(1 more reported.)")
    caption = make_caption("k", "r", DAY0, DAY1, _stats(), UNITS, events=events)
    assert caption.endswith(block)
    assert parse_caption_numbers(caption) == parse_caption_numbers(
        make_caption("k", "r", DAY0, DAY1, _stats(), UNITS)
    )


def test_region_words_for_tiles() -> None:
    assert describe_region("the contiguous United States") == "the contiguous United States"
    tile = describe_region("the contiguous United States", (-105.0, 35.0, -95.0, 45.5))
    assert tile == "part of the contiguous United States (the area 35.0°N to 45.5°N, 105.0°W to 95.0°W)"
    assert (
        describe_region("", (179.375, -10.0, -179.375, -5.0))
        == "the area 10.0°S to 5.0°S, 179.4°E to 179.4°W"
    )


def test_climatology_anomalies_over_several_years() -> None:
    rows = []
    for year, offset in ((2018, -1.0), (2019, 0.0), (2020, 1.0)):
        for day in pd.date_range(f"{year}-01-01", f"{year}-12-31", tz="UTC"):
            value = 280.0 + 10.0 * np.sin(2 * np.pi * day.day_of_year / 366.0) + offset
            rows.append(("t00x00", day, {"T2M": {"mean": value, "min": value, "max": value}}))
    clim = DayOfYearClimatology.from_samples(rows, half_width_days=7)
    assert clim is not None and clim.period == "2018-2020"
    day = pd.Timestamp("2020-06-15", tz="UTC")
    window = [
        r[2]["T2M"]["mean"] for r in rows if abs((r[1].replace(year=2000) - day.replace(year=2000)).days) <= 7
    ]
    assert clim.mean("t00x00", "T2M", day) == pytest.approx(np.mean(window), rel=1e-12)
    stats = {"T2M": {"mean": clim.mean("t00x00", "T2M", day) + 2.3, "min": 0.0, "max": 0.0}}
    anomalies = clim.anomalies("t00x00", day, stats)
    assert anomalies is not None and anomalies.values["T2M"] == pytest.approx(2.3)
    assert clim.anomalies("t09x09", day, stats) is None  # another tile has its own climatology
    caption = make_caption("k", "r", day, day + pd.Timedelta(days=1), {**_stats(), **stats}, UNITS, anomalies)
    assert "2.3 °C warmer than the 2018-2020 average for the date" in caption


def test_climatology_needs_several_years() -> None:
    rows = [
        ("all", pd.Timestamp("2019-01-01", tz="UTC") + pd.Timedelta(days=i), _stats()) for i in range(300)
    ]
    assert DayOfYearClimatology.from_samples(rows) is None
