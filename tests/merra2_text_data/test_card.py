"""The dataset card: Hugging Face front matter that parses as YAML with the Hub's keys, a license that follows the
source, and the coverage of the region (what the tiles leave out), from real builds and from unit cases."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from climate_text_schema import Manifest, open_dataset, sample_features
from merra2_text_data import BuildConfig, build
from merra2_text_data.regions import parse_region
from merra2_text_data.samples.coverage import compute_coverage
from merra2_text_data.source.synth import write_synthetic_granules
from merra2_text_data.store.card import front_matter, make_card, size_category

BBOX = "-100,40,-97,42"
"""5 x 5 MERRA-2 grid points (lat 40..42 step 0.5, lon -100..-97.5 step 0.625)."""
START, END = dt.date(2019, 1, 1), dt.date(2019, 1, 3)


def _card_meta(card: str) -> dict[str, Any]:
    assert card.startswith("---\n"), card[:80]
    text, _, body = card[4:].partition("\n---\n")
    assert body.startswith("# "), body[:80]
    meta = yaml.safe_load(text)
    assert isinstance(meta, dict)
    return meta


@pytest.fixture(scope="module")
def granules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("granules")
    write_synthetic_granules(out, parse_region(BBOX), START, END, seed=5)
    return out


def _build(granules: Path, out: Path, tile: str | None) -> str:
    return build(BuildConfig.from_options(region=BBOX, start=str(START), end=str(END), variables="T2M,U10M",
                                          tile=tile, source=str(granules), out=str(out), quiet=True))  # fmt: skip


def test_card_front_matter_is_hub_yaml(granules: Path, tmp_path: Path) -> None:
    ds = open_dataset(_build(granules, tmp_path / "ds", tile=None))
    card = (Path(ds.version_url) / "README.md").read_text(encoding="utf-8")
    meta = _card_meta(card)
    for key in ("license", "task_categories", "size_categories", "source_datasets", "configs", "dataset_info"):
        assert key in meta, key
    assert "&id" not in card.partition("\n---\n")[0], "no YAML anchors"
    assert meta["license"] == "unknown" and meta["source_datasets"] == ["original"]  # synthetic fields
    assert meta["task_categories"] == ["text-generation"] and meta["size_categories"] == ["n<1K"]
    [config] = meta["configs"]
    splits = {f["split"]: f["path"] for f in config["data_files"]}
    assert splits == {s: f"shards/{s}-*.tar" for s in ds.manifest.splits}
    for split, pattern in splits.items():  # every glob matches exactly the split's shards
        matched = sorted(p.relative_to(ds.version_url).as_posix() for p in Path(ds.version_url).glob(pattern))
        assert matched == [s.path for s in ds.shards(split)]
    assert meta["dataset_info"]["features"] == sample_features(["T2M", "U10M"])
    assert {s["name"]: s["num_examples"] for s in meta["dataset_info"]["splits"]} == ds.manifest.splits
    assert "## Coverage" in card and "Not covered: nothing" in card  # no tile: the whole region per sample


def _manifest(kind: str | None, granules: list[str], text_kinds: tuple[str, ...] = ()) -> Manifest:
    return Manifest.model_validate(dict(
        schema_version="1.1", name="conus", version="abc", created_at="2026-01-01T00:00:00Z",
        builder={"package": "t", "version": "0"}, config={}, variables=[{"name": "T2M", "units": "K"}],
        window="1d", time_step="1h", splits={"train": 1500}, normalization={}, quarantined=0,
        shards=[{"path": "shards/train-000000.tar", "split": "train", "samples": 1500, "bytes": 1, "sha256": "0" * 64}],
        sources=[{"granule": g, "file": g.split(":")[-1]} for g in granules],
        text_sources=[{"kind": k, "file": "x.csv", "description": "d"} for k in text_kinds],
        **({} if kind is None else {"source_kind": kind}),
    ))  # fmt: skip


def test_license_and_sources_follow_the_source_kind() -> None:
    merra2 = front_matter(_manifest("merra2", ["M2T1NXSLV.5.12.4:MERRA2_400.a.nc4", "M2T1NXFLX.5.12.4:MERRA2_400.b.nc4"],
                                    ("noaa-storm-events",)))  # fmt: skip
    assert merra2["license"] == "other" and merra2["license_name"] == "nasa-earthdata-open-data"
    assert merra2["license_link"].startswith("https://www.earthdata.nasa.gov/")
    assert merra2["source_datasets"] == ["NASA GMAO MERRA-2 M2T1NXFLX 5.12.4 (doi:10.5067/7MCPBJ41Y0K6)",
                                         "NASA GMAO MERRA-2 M2T1NXSLV 5.12.4 (doi:10.5067/VJAFPLI1CSIV)",
                                         "NOAA NCEI Storm Events Database"]  # fmt: skip
    assert merra2["size_categories"] == ["1K<n<10K"]
    era5 = front_matter(_manifest("era5", ["era5:2019.zarr"]))
    assert era5["license"] == "cc-by-4.0" and "license_name" not in era5
    assert era5["source_datasets"][0].startswith("ECMWF ERA5")
    assert front_matter(_manifest(None, []))["license"] == "other"  # no source_kind: a MERRA-2 build


@pytest.mark.parametrize(("n", "label"), [(0, "n<1K"), (999, "n<1K"), (1000, "1K<n<10K"), (123_456, "100K<n<1M"),
                                          (2 * 10**9, "n>1B")])  # fmt: skip
def test_size_categories(n: int, label: str) -> None:
    assert size_category(n) == label


def test_card_states_the_strips_no_tile_covers(granules: Path, tmp_path: Path) -> None:
    """4x4 tiles on a 5 x 5 grid: one tile, the last row and column are in no sample, and the card says so."""
    ds = open_dataset(_build(granules, tmp_path / "ds", tile="4x4"))
    card = (Path(ds.version_url) / "README.md").read_text(encoding="utf-8")
    index = ds.read_index()
    assert index["lat_max"].max() == 41.5 and index["lon_max"].max() == -98.125
    assert "16 of the region's 5 x 5 grid points (64.0%)" in card
    assert "the northern strip lat 42 (1 row)" in card and "the eastern strip lon -97.5 (1 column)" in card
    assert "Region asked for:" in card


def _index(boxes: list[tuple[float, float, float, float]]) -> pd.DataFrame:
    return pd.DataFrame(boxes * 2, columns=["lat_min", "lat_max", "lon_min", "lon_max"])  # two windows each


def test_coverage_of_tiles_with_a_dropped_edge() -> None:
    lat = np.arange(30.0, 35.01, 0.5)  # 11 rows
    lon = np.arange(-100.0, -94.9, 0.625)  # 9 columns
    tiles = [(30.0 + 2 * i, 31.5 + 2 * i, -100.0 + 2.5 * j, -98.125 + 2.5 * j) for i in range(2) for j in range(2)]
    cov = compute_coverage(_index(tiles), lat, lon)
    assert (cov.n_lat, cov.n_lon, cov.covered, cov.holes) == (11, 9, 64, 0)
    assert cov.lat_range == (30.0, 33.5) and cov.lon_range == (-100.0, -95.625)
    assert cov.strips == {"north": (34.0, 35.0, 3), "east": (-95.0, -95.0, 1)}


def test_coverage_across_the_antimeridian_and_holes() -> None:
    lat = np.array([50.0, 50.5, 51.0, 51.5])
    lon = np.array([178.75, 179.375, -180.0, -179.375])  # west to east across 180
    tiles = [(50.0, 50.5, 178.75, 179.375), (50.0, 50.5, -180.0, -179.375), (51.0, 51.5, 178.75, -180.0)]
    cov = compute_coverage(_index(tiles), lat, lon)
    assert cov.covered == 4 + 4 + 6 and cov.strips == {}  # the third tile spans 178.75, 179.375, -180
    assert cov.holes == 2  # lat 51..51.5 at lon -179.375: that tile was quarantined in every window
    assert cov.lon_range == (178.75, -179.375)
    lines = cov.describe()
    assert "14 of the region's 4 x 4 grid points (87.5%)" in lines[0] and "2 grid point(s)" in lines[1]


def test_card_without_a_grid_states_the_covered_box() -> None:
    index = pd.DataFrame({"lat_min": [40.0], "lat_max": [41.5], "lon_min": [-100.0], "lon_max": [-98.125],
                          "time_start": [pd.Timestamp("2019-01-01", tz="UTC")],
                          "time_end": [pd.Timestamp("2019-01-02", tz="UTC")], "text": ["a caption"]})  # fmt: skip
    card = make_card(_manifest("merra2", []), index, parse_region(BBOX))
    assert "lat 40 to 41.5, lon -100 to -98.125 (grid-point centres)" in card
    assert _card_meta(card)["license"] == "other"
