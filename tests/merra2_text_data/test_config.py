"""BuildConfig: YAML + flags + overrides, every problem listed once by key, and the canonical resolved dict."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from climate_text_schema import DEFAULT_VARIABLES
from merra2_text_data.config.build import BuildConfig, parse_size
from merra2_text_data.errors import ConfigError


def test_defaults_and_years_range() -> None:
    cfg = BuildConfig.from_options(region="conus", years="2018-2020")
    assert cfg.subset.period() == (dt.date(2018, 1, 1), dt.date(2020, 12, 31))
    assert cfg.subset.variables == list(DEFAULT_VARIABLES)
    assert cfg.sample.window == "1d" and cfg.sample.stride is None and cfg.sample.time_step == "1h"
    assert cfg.shard.shard_size == 256_000_000 and cfg.publish.out == "./datasets"
    assert cfg.dataset_name() == "conus"
    assert BuildConfig.from_options(region="conus", years=2019).subset.period()[0] == dt.date(2019, 1, 1)


def test_bbox_region_and_start_end() -> None:
    cfg = BuildConfig.from_options(
        region="-105,35,-95,45", start="2019-01-01", end="2019-01-05", tile="16X16"
    )
    assert cfg.subset.period() == (dt.date(2019, 1, 1), dt.date(2019, 1, 5))
    assert cfg.sample.tile == "16x16" and cfg.sample.tile_shape() == (16, 16)
    assert cfg.dataset_name() == "bbox-105_35_-95_45"
    assert cfg.resolved()["region"] == {"name": "-105,35,-95,45", "bbox": [-105.0, 35.0, -95.0, 45.0]}


def test_every_problem_is_listed_once_with_its_key() -> None:
    with pytest.raises(ConfigError) as info:
        BuildConfig.from_options(
            region="atlantis", years="1979", variables="T2M,NOPE", window="1x", tile="16", shard_size="big"
        )
    msg = str(info.value)
    for key in ("subset.region", "subset.years", "subset.variables", "sample.window", "sample.tile",
                "shard.shard_size"):  # fmt: skip
        assert f"  - {key}:" in msg, msg
    assert "1979" in msg and "1980.." in msg and "NOPE" in msg and "atlantis" in msg


def test_year_in_future_and_cross_field_problems() -> None:
    future = dt.date.today().year + 1
    with pytest.raises(ConfigError, match=f"year {future}"):
        BuildConfig.from_options(region="conus", years=f"2019-{future}")
    with pytest.raises(ConfigError, match="either years or start/end"):
        BuildConfig.from_dict({"subset": {"region": "conus", "years": "2019", "start": "2019-01-01"}})
    with pytest.raises(ConfigError, match="end 2019-01-01 is before start"):
        BuildConfig.from_options(region="conus", start="2019-01-05", end="2019-01-01")
    with pytest.raises(ConfigError, match="window 1d is not a whole number of time_step 5h"):
        BuildConfig.from_options(region="conus", years="2019", window="1d", time_step="5h")
    with pytest.raises(ConfigError, match="leave no train"):
        BuildConfig.from_options(region="conus", years="2019", val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ConfigError, match="exclude each other"):
        BuildConfig.from_options(region="conus", years="2019", workers=2, scheduler="tcp://x:8786")
    with pytest.raises(ConfigError, match="unknown key"):
        BuildConfig.from_dict({"subset": {"region": "conus", "years": "2019", "colour": "red"}})


def test_yaml_with_flags_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "b.yaml"
    path.write_text(
        "subset:\n  region: europe\n  years: 2019\n  variables: [T2M, U10M]\nsample:\n  window: 2d\n"
        "publish:\n  out: s3://bucket/merra2-text\n",
        encoding="utf-8",
    )
    cfg = BuildConfig.from_yaml(path, overrides=["sample.stride=1d", "shard_size=64MB"],
                                options={"start": "2019-02-01", "end": "2019-02-10", "workers": 2})  # fmt: skip
    assert cfg.subset.years is None and cfg.subset.period() == (dt.date(2019, 2, 1), dt.date(2019, 2, 10))
    assert cfg.sample.window == "2d" and cfg.sample.stride == "1d" and cfg.shard.shard_size == 64_000_000
    assert cfg.publish.out == "s3://bucket/merra2-text" and cfg.run.workers == 2
    with pytest.raises(ConfigError, match=r"config file .*missing\.yaml does not exist"):
        BuildConfig.from_yaml(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not KEY=VALUE"):
        BuildConfig.from_yaml(path, overrides=["sample.window"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("subset: [1, 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        BuildConfig.from_yaml(bad)


def test_resolved_ignores_run_settings_only() -> None:
    a = BuildConfig.from_options(
        region="conus", years="2019", workers=4, quiet=True, out="/x", cache_dir="/c"
    )
    b = BuildConfig.from_options(region="conus", years="2019")
    c = BuildConfig.from_options(region="conus", years="2019", window="2d")
    assert a.resolved() == b.resolved()
    assert a.resolved() != c.resolved()
    assert c.resolved()["stride"] == "2d"


def test_parse_size() -> None:
    assert parse_size("256MB") == 256_000_000
    assert parse_size("64MiB") == 64 * 2**20
    assert parse_size("1.5G") == 1_500_000_000
    assert parse_size(4096) == 4096
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")


def test_events_files_need_distinct_names() -> None:
    """The version id and the manifest know an events file by its name: two files of one name would be one input."""
    base = dict(region="conus", years="2019")
    with pytest.raises(ConfigError) as info:
        BuildConfig.from_options(overrides=["sample.events=[a/ev.csv, b/ev.csv]"], **base)
    msg = str(info.value)
    assert "  - sample.events:" in msg and "a/ev.csv and b/ev.csv" in msg and "rename one" in msg, msg
    with pytest.raises(ConfigError, match=r"a/ev\.csv is listed twice"):
        BuildConfig.from_options(overrides=["sample.events=[a/ev.csv, a/ev.csv]"], **base)
    cfg = BuildConfig.from_options(overrides=["sample.events=[a/ev.csv, b/ev2.csv]"], **base)
    assert cfg.resolved()["events"] == ["ev.csv", "ev2.csv"]


def test_the_year_range_is_the_sources_record() -> None:
    """ERA5 starts in 1940, MERRA-2 in 1980: each source's builds may ask for its own record, and the error names it."""
    era5 = dict(region="conus", source="era5:/data/era5.zarr")
    assert BuildConfig.from_options(**era5, years="1950-1951").subset.period()[0] == dt.date(1950, 1, 1)
    cfg = BuildConfig.from_options(**era5, start="1940-01-01", end="1945-06-30", overrides=["sample.test_years=[1944]"])
    assert cfg.subset.period() == (dt.date(1940, 1, 1), dt.date(1945, 6, 30)) and cfg.sample.test_years == [1944]
    with pytest.raises(ConfigError) as info:
        BuildConfig.from_options(**era5, years="1939", overrides=["sample.val_years=[1939]"])
    msg = str(info.value)
    assert "  - subset.years:" in msg and "  - sample.val_years:" in msg and "1940.." in msg, msg
    assert "(ERA5's record)" in msg and "MERRA-2" not in msg, msg
    with pytest.raises(ConfigError, match=r"1939-12-31 is outside 1940-01-01\.\..*\(ERA5's record\)"):
        BuildConfig.from_options(**era5, start="1939-12-31", end="1940-01-02")
    for options in (dict(years="1950"), dict(start="1979-12-31", end="1980-01-02")):
        with pytest.raises(ConfigError, match=r"outside 1980.*\(MERRA-2's record\)"):
            BuildConfig.from_options(region="conus", source="/data/merra2", **options)
