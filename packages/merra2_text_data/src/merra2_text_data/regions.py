"""Named regions and bounding boxes: what `--region` accepts.

A region is an inclusive longitude/latitude box in degrees east/north. West greater than east means the box crosses
the antimeridian (e.g. the Bering Sea, 160..-160). Longitudes are kept in -180..180.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError

__all__ = ["LAT_STEP", "LON_STEP", "REGIONS", "Region", "grid_points", "parse_region"]

logger = logging.getLogger(__name__)

LAT_STEP = 0.5
"""MERRA-2 latitude spacing in degrees (lat = -90 + 0.5 j, 361 rows)."""
LON_STEP = 0.625
"""MERRA-2 longitude spacing in degrees (lon = -180 + 0.625 i, 576 columns)."""


@dataclass(frozen=True)
class Region:
    """An inclusive bounding box on the MERRA-2 longitude/latitude grid.

    Attributes:
        name: a short identifier (a key of `REGIONS`, or the bbox written `W,S,E,N` for ad-hoc boxes).
        west: western bound in degrees east, -180..180.
        south: southern bound in degrees north, -90..90.
        east: eastern bound in degrees east, -180..180; smaller than `west` when the box crosses the antimeridian.
        north: northern bound in degrees north, greater than `south`.
    """

    name: str
    west: float
    south: float
    east: float
    north: float

    @property
    def crosses_antimeridian(self) -> bool:
        """True when the box runs east from `west` across 180° to `east` (west > east)."""
        return self.west > self.east

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """The box as (west, south, east, north) in degrees."""
        return (self.west, self.south, self.east, self.north)

    @property
    def lon_span(self) -> float:
        """The box's width in degrees of longitude, counted eastwards from `west` (antimeridian-aware)."""
        return (self.east - self.west) % 360.0 if self.crosses_antimeridian else self.east - self.west

    def contains_lon(self, lon: float) -> bool:
        """Whether a longitude (any representation, e.g. 0..360) lies inside the box, bounds included."""
        offset = (lon - self.west) % 360.0
        return offset <= self.lon_span + 1e-9 or math.isclose(offset, 360.0, abs_tol=1e-9)

    def describe(self) -> str:
        """The region in words: its name for a named region, otherwise the bbox.

        Examples:
            >>> REGIONS["conus"].describe()
            'the contiguous United States'
            >>> parse_region("-105,35,-95,45").describe()
            '35.0°N-45.0°N, 105.0°W-95.0°W'
        """
        named = REGIONS.get(self.name)
        if named is not None and named.bbox == self.bbox:
            return _LABELS[self.name]
        return f"{_lat_words(self.south)}-{_lat_words(self.north)}, {_lon_words(self.west)}-{_lon_words(self.east)}"


def _lat_words(lat: float) -> str:
    return f"{abs(lat):.1f}°{'S' if lat < 0 else 'N'}"


def _lon_words(lon: float) -> str:
    if lon in (180.0, -180.0):
        return "180.0°"
    return f"{abs(lon):.1f}°{'W' if lon < 0 else 'E'}"


_LABELS: dict[str, str] = {
    "conus": "the contiguous United States",
    "europe": "Europe",
    "sahel": "the Sahel",
    "south-asia": "South Asia",
    "amazon": "the Amazon basin",
    "arctic": "the Arctic",
    "australia": "Australia",
    "east-asia": "East Asia",
    "bering": "the Bering Sea",
    "globe": "the globe",
    "globe60": "the globe between 60°S and 60°N",
}

REGIONS: dict[str, Region] = {
    r.name: r
    for r in (
        Region("conus", -125.0, 24.0, -66.0, 50.0),
        Region("europe", -11.0, 35.0, 40.0, 71.0),
        Region("sahel", -18.0, 10.0, 40.0, 20.0),
        Region("south-asia", 60.0, 5.0, 98.0, 37.0),
        Region("amazon", -80.0, -20.0, -44.0, 6.0),
        Region("arctic", -180.0, 66.5, 180.0, 90.0),
        Region("australia", 112.0, -44.0, 154.0, -10.0),
        Region("east-asia", 100.0, 20.0, 146.0, 50.0),
        Region("bering", 160.0, 50.0, -160.0, 66.0),
        Region("globe", -180.0, -90.0, 180.0, 90.0),
        Region("globe60", -180.0, -60.0, 180.0, 60.0),
    )
}
"""The named regions (`merra2-text regions` lists them). `bering` crosses the antimeridian."""


def _normalise_lon(lon: float) -> float:
    """Map a longitude in -180..360 to -180..180 (180 itself stays 180 so a box can end on the date line)."""
    return lon - 360.0 if lon > 180.0 else lon


def _bbox_name(w: float, s: float, e: float, n: float) -> str:
    return ",".join(f"{v:g}" for v in (w, s, e, n))


def parse_region(text: str) -> Region:
    """Parse `--region`: a named region (see `REGIONS`) or a bbox `W,S,E,N` in degrees east/north.

    Bounds are inclusive. W > E crosses the antimeridian. Longitudes in 180..360 are mapped to -180..180;
    a box spanning 360° of longitude becomes the whole circle -180..180.

    Args:
        text: a region name (case-insensitive, `_` or `-`) or four comma-separated numbers.

    Returns:
        The region.

    Raises:
        ConfigError: unknown name (the message lists the known ones), a malformed bbox, latitude out of -90..90,
            south >= north, or longitude out of -180..360.

    Examples:
        >>> parse_region("conus").bbox
        (-125.0, 24.0, -66.0, 50.0)
        >>> parse_region("170,50,190,60").bbox
        (170.0, 50.0, -170.0, 60.0)
    """
    raw = text.strip()
    key = raw.lower().replace("_", "-")
    if key in REGIONS:
        return REGIONS[key]
    if "," not in raw:
        known = ", ".join(sorted(REGIONS))
        raise ConfigError(
            f"unknown region {text!r}: use one of {known}, or a bounding box 'W,S,E,N' in degrees east/north "
            "(write --region=-105,35,-95,45 so the minus sign is not read as an option)"
        )
    parts = [p.strip() for p in raw.split(",")]
    if len(parts) != 4:
        raise ConfigError(
            f"malformed bounding box {text!r}: expected 4 numbers W,S,E,N, got {len(parts)} parts"
        )
    try:
        w, s, e, n = (float(p) for p in parts)
    except ValueError as exc:
        raise ConfigError(f"malformed bounding box {text!r}: {exc}; expected 4 numbers W,S,E,N") from exc
    if not all(math.isfinite(v) for v in (w, s, e, n)):
        raise ConfigError(f"malformed bounding box {text!r}: every bound must be a finite number")
    problems: list[str] = []
    for label, lat in (("south", s), ("north", n)):
        if not -90.0 <= lat <= 90.0:
            problems.append(f"{label} latitude {lat:g} is outside -90..90")
    for label, lon in (("west", w), ("east", e)):
        if not -180.0 <= lon <= 360.0:
            problems.append(f"{label} longitude {lon:g} is outside -180..360")
    if s >= n:
        problems.append(f"south {s:g} must be less than north {n:g}")
    if problems:
        raise ConfigError(f"invalid bounding box {text!r}: " + "; ".join(problems) + " (format W,S,E,N)")
    if e - w >= 360.0:
        w_n, e_n = -180.0, 180.0
    else:
        w_n, e_n = _normalise_lon(w), _normalise_lon(e)
        if w_n == 180.0 and e_n != 180.0:
            w_n = -180.0
    region = Region(_bbox_name(w_n, s, e_n, n), w_n, s, e_n, n)
    logger.debug("parsed region %r as %s", text, region)
    return region


def grid_points(region: Region) -> tuple[np.ndarray, np.ndarray]:
    """The MERRA-2 lattice points inside a region (bounds inclusive).

    Returns:
        (lat ascending south to north, lon ascending west to east across the antimeridian, e.g. 170..179.375
        then -180..-170), both float64 in degrees.

    Raises:
        ConfigError: the box holds no grid point (narrower than the grid spacing).
    """
    lat = -90.0 + LAT_STEP * np.arange(361)
    lon = -180.0 + LON_STEP * np.arange(576)
    lat = lat[(lat >= region.south - 1e-9) & (lat <= region.north + 1e-9)]
    offset = np.mod(lon - region.west, 360.0)
    offset = np.where(offset >= 360.0 - 1e-9, 0.0, offset)
    inside = offset <= region.lon_span + 1e-9
    lon = lon[inside][np.argsort(offset[inside], kind="stable")]
    if lat.size == 0 or lon.size == 0:
        raise ConfigError(
            f"region {region.name} {region.bbox} holds no MERRA-2 grid point (lat step {LAT_STEP}°, lon step "
            f"{LON_STEP}°): widen the box"
        )
    return lat, lon
