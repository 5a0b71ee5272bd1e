"""Events end to end: `merra2-text build --events <real NOAA reports> --text-table <table>` over a western-US box in
January 2019 on synthetic granules. The joined samples carry the event text, the index records it, the card says
what is synthetic and what is real."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from climate_text_schema import open_dataset
from merra2_text_data.cli import app
from merra2_text_data.samples.events import load_storm_events
from typer.testing import CliRunner

runner = CliRunner()
REGION = "--region=-125,32,-114,42"  # California and Nevada: many of the sample file's January events
START, END = "2019-01-15", "2019-01-18"
HALF_LAT, HALF_LON = 0.25, 0.3125  # events are joined to a tile's bbox widened by half a grid step on each axis
TABLE_TEXT = "Ski patrol measured 150 cm of new snow at the summit."
GAP_TEXT = "Drifts closed the pass between two grid columns."
# (time, lat, lon, text): -120.35 lies between the columns at -120.625 (tile 0's east edge, 0.275 away: within half
# the 0.625 longitude step) and -120.0 (tile 1's west edge, 0.35 away); the last row is outside the period
TABLE = [("2019-01-17T12:00:00Z", 38.0, -120.0, TABLE_TEXT), ("2019-01-16T12:00:00Z", 38.0, -120.35, GAP_TEXT),
         ("2019-03-01T00:00:00Z", 38.0, -120.0, "Outside the period.")]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> tuple[str, Path, Path]:
    root = tmp_path_factory.mktemp("events")
    granules = root / "granules"
    res = runner.invoke(app, ["synth", "--out", str(granules), REGION, "--start", START, "--end", END, "-q"])
    assert res.exit_code == 0, res.output
    events = shared_data / "noaa-storm-events" / "StormEvents_details_d2019_c20190617_sample300.csv"
    table = root / "reports.csv"
    pd.DataFrame({"time": [r[0] for r in TABLE], "lat": [r[1] for r in TABLE], "lon": [r[2] for r in TABLE],
                  "event_type": ["Snow report"] * len(TABLE), "text": [r[3] for r in TABLE]}
                 ).to_csv(table, index=False)  # fmt: skip
    res = runner.invoke(app, ["build", "--source", str(granules), REGION, "--start", START, "--end", END,
                              "--tile", "8x8", "--time-step", "3h", "--variables", "T2M,U10M,V10M,SLP,PRECTOTCORR",
                              "--events", str(events), "--text-table", str(table), "--out", str(root / "ds"),
                              "--cache", str(root / "cache"), "-q"])  # fmt: skip
    assert res.exit_code == 0, res.output
    return res.stdout.strip().splitlines()[-1], events, table


def test_joined_samples_carry_the_event_text(built: tuple[str, Path, Path]) -> None:
    ref, events_file, _ = built
    ds = open_dataset(ref)
    index = ds.read_index()
    events = load_storm_events([events_file])
    events = events[events["has_point"]]
    n_joined = 0
    n_own = {text: 0 for *_, text in TABLE}
    for _, row in index.iterrows():
        inside = events[(events["begin_utc"] < row["time_end"]) & (events["end_utc"] >= row["time_start"])
                        & events["lat"].between(row["lat_min"] - HALF_LAT, row["lat_max"] + HALF_LAT)
                        & events["lon"].between(row["lon_min"] - HALF_LON, row["lon_max"] + HALF_LON)]  # fmt: skip
        own = [(pd.Timestamp(t), f"row{i}", text) for i, (t, lat, lon, text) in enumerate(TABLE)
               if row["time_start"] <= pd.Timestamp(t) < row["time_end"]
               and row["lat_min"] - HALF_LAT <= lat <= row["lat_max"] + HALF_LAT
               and row["lon_min"] - HALF_LON <= lon <= row["lon_max"] + HALF_LON]  # fmt: skip
        assert row["n_events"] == len(inside) + len(own), row["key"]
        for *_, text in own:
            n_own[text] += 1
        if row["n_events"] == 0:
            assert "Reported events:" not in row["text"] and row["event_types"] == ""
            continue
        n_joined += 1
        assert "Reported events:" in row["text"]
        assert set(row["event_types"].split("; ")) == set(inside["event_type"]) | (
            {"Snow report"} if own else set()
        )
        joined = [(e["begin_utc"], e["event_id"], e["text"]) for _, e in inside.iterrows()] + own
        written = sorted(joined)[:3]  # the caption writes the first three by time, then counts the rest
        reported = row["text"].split("Reported events:", 1)[1]
        for _, _, narrative in written:
            assert " ".join(narrative.split()[:6]) in reported
        rest = len(joined) - len(written)
        assert (f"({rest} more reported.)" in reported) == (rest > 0)
    assert n_own == {TABLE_TEXT: 1, GAP_TEXT: 1, "Outside the period.": 0}
    assert n_joined >= 3 and (index["n_events"] == 0).any()
    assert "Outside the period." not in " ".join(index["text"])
    extra = ds.manifest.model_extra or {}
    assert extra["samples_with_events"] == n_joined
    assert [s["kind"] for s in extra["text_sources"]] == ["noaa-storm-events", "text-table"]


def test_shard_members_hold_the_same_text_and_event_ids(built: tuple[str, Path, Path]) -> None:
    ref, _, _ = built
    ds = open_dataset(ref)
    index = ds.read_index().set_index("key")
    seen = 0
    for url in ds.shard_urls():
        with tarfile.open(url) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
        for name, data in members.items():
            if name.endswith(".json"):
                key = name.split(".", 1)[0]
                meta = json.loads(data)
                assert members[f"{key}.txt"].decode() == index.loc[key, "text"]
                assert len(meta.get("events", [])) == index.loc[key, "n_events"]
                seen += 1
    assert seen == len(index)
    assert np.issubdtype(index["n_events"].dtype, np.integer)


def test_card_says_synthetic_fields_and_real_reports(built: tuple[str, Path, Path]) -> None:
    ref, events_file, table = built
    ds = open_dataset(ref)
    card = (Path(ds.version_url) / "README.md").read_text()
    assert (ds.manifest.model_extra or {})["source_kind"] == "synthetic"
    assert "The climate fields are SYNTHETIC" in card and "not* NASA MERRA-2 reanalysis" in card
    assert "NOAA NCEI Storm Events Database" in card and "real reports" in card and events_file.name in card
    assert table.name in card and "carry event text" in card
