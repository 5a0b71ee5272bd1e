"""Regions: named boxes, bbox parsing and its errors, antimeridian handling, the MERRA-2 grid points inside."""

from __future__ import annotations

import numpy as np
import pytest
from merra2_text_data.errors import ConfigError
from merra2_text_data.regions import REGIONS, Region, grid_points, parse_region


def test_named_regions_have_sane_boxes() -> None:
    required = {"conus", "europe", "sahel", "south-asia", "amazon", "arctic", "australia", "east-asia"}
    assert required <= set(REGIONS)
    for name, region in REGIONS.items():
        assert region.name == name
        assert -90 <= region.south < region.north <= 90
        assert -180 <= region.west <= 180 and -180 <= region.east <= 180
    assert REGIONS["conus"].bbox == (-125.0, 24.0, -66.0, 50.0)
    assert REGIONS["conus"].describe() == "the contiguous United States"


@pytest.mark.parametrize("text", ["conus", "CONUS", " south_asia ", "South-Asia"])
def test_names_are_case_and_separator_insensitive(text: str) -> None:
    assert parse_region(text) in (REGIONS["conus"], REGIONS["south-asia"])


def test_bbox_is_parsed_and_described() -> None:
    region = parse_region("-105,35,-95,45")
    assert region.bbox == (-105.0, 35.0, -95.0, 45.0)
    assert not region.crosses_antimeridian
    assert region.describe() == "35.0°N-45.0°N, 105.0°W-95.0°W"
    assert parse_region(" -105 , 35 , -95 , 45 ") == region
    assert parse_region("110,-40,150,-10").describe() == "40.0°S-10.0°S, 110.0°E-150.0°E"


def test_antimeridian_and_0_360_longitudes() -> None:
    region = parse_region("170,50,190,60")
    assert region.bbox == (170.0, 50.0, -170.0, 60.0)
    assert region.crosses_antimeridian
    assert region.lon_span == pytest.approx(20.0)
    assert parse_region("170,50,-170,60") == region
    assert parse_region("200,10,250,20").bbox == (-160.0, 10.0, -110.0, 20.0)
    assert parse_region("0,-10,360,10").bbox == (-180.0, -10.0, 180.0, 10.0)
    assert REGIONS["bering"].crosses_antimeridian


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("atlantis", "unknown region 'atlantis'"),
        ("1,2,3", "expected 4 numbers"),
        ("a,b,c,d", "malformed bounding box"),
        ("-105,35,-95,95", "north latitude 95 is outside -90..90"),
        ("-105,45,-95,35", "south 45 must be less than north 35"),
        ("-105,40,-95,40", "must be less than north"),
        ("-200,35,-95,45", "west longitude -200 is outside -180..360"),
        ("-105,35,400,45", "east longitude 400 is outside -180..360"),
        ("nan,35,-95,45", "finite"),
    ],
)
def test_bad_regions_raise_config_errors(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        parse_region(text)


def test_unknown_region_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError) as info:
        parse_region("atlantis")
    for name in REGIONS:
        assert name in str(info.value)


def test_grid_points_are_inclusive_on_the_merra2_lattice() -> None:
    lat, lon = grid_points(parse_region("-105,35,-95,45"))
    assert lat[0] == 35.0 and lat[-1] == 45.0 and lat.size == 21
    assert lon[0] == -105.0 and lon[-1] == -95.0 and lon.size == 17
    assert np.all(np.diff(lat) == 0.5) and np.all(np.diff(lon) == 0.625)
    lat, lon = grid_points(parse_region("-105.1,35.2,-94.9,44.9"))  # off-lattice bounds: only points inside
    assert (lat[0], lat[-1], lon[0], lon[-1]) == (35.5, 44.5, -105.0, -95.0)


def test_grid_points_across_the_antimeridian_run_west_to_east() -> None:
    lat, lon = grid_points(parse_region("170,50,-170,60"))
    assert lon[0] == 170.0 and lon[-1] == -170.0 and lon.size == 33
    assert np.allclose(np.diff(np.unwrap(np.radians(lon))), np.radians(0.625))
    assert list(lon[15:18]) == [179.375, -180.0, -179.375]
    _, lon = grid_points(REGIONS["arctic"])
    assert lon.size == 576 and lon[0] == -180.0


def test_grid_points_reject_a_box_between_grid_lines() -> None:
    with pytest.raises(ConfigError, match="holds no MERRA-2 grid point"):
        grid_points(Region("thin", -100.1, 35.1, -100.05, 35.3))
