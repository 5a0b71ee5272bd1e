"""What part of the region the samples cover: the union of the samples' tiles against the region's grid.

Tiles are cut from the south-west corner of the region's grid, so a region whose grid does not split into whole
tiles leaves strips at the north and east edges that no sample holds (docs/datasets.md, "Tiles and coverage"). The
dataset card states them, computed here from the index's bounding boxes (`lat_min`, `lat_max`, `lon_min`,
`lon_max`, one distinct box per tile) and the grid-point coordinates of the region.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = ["Coverage", "compute_coverage"]

_EPS = 1e-6


@dataclass(frozen=True)
class Coverage:
    """Grid points of the region in at least one sample, and the edge strips in none."""

    n_lat: int
    n_lon: int
    covered: int
    """Grid points (lat x lon) inside at least one sample's tile."""
    lat_range: tuple[float, float]
    """First and last covered latitude (south, north)."""
    lon_range: tuple[float, float]
    """First and last covered longitude (west, east; west > east across the antimeridian)."""
    strips: dict[str, tuple[float, float, int]]
    """Uncovered edge strips: {side: (first, last, rows or columns)} for side in south, north, west, east."""
    holes: int
    """Uncovered grid points inside the covered rows and columns (tiles whose every window was quarantined)."""

    @property
    def total(self) -> int:
        """Grid points of the region."""
        return self.n_lat * self.n_lon

    def describe(self) -> list[str]:
        """The card's lines (markdown bullets)."""
        pct = 100.0 * self.covered / self.total if self.total else 0.0
        (s, n), (w, e) = self.lat_range, self.lon_range
        lines = [f"- Covered by the samples: {self.covered} of the region's {self.n_lat} x {self.n_lon} grid points"
                 f" ({pct:.1f}%), lat {s:g} to {n:g}, lon {w:g} to {e:g}"]  # fmt: skip
        if not self.strips and not self.holes:
            lines.append("- Not covered: nothing (every grid point of the region is in some sample)")
            return lines
        unit = {"south": "row", "north": "row", "west": "column", "east": "column"}
        axis = {"south": "lat", "north": "lat", "west": "lon", "east": "lon"}
        parts = [f"the {side}ern strip {axis[side]} {a:g}{'' if a == b else f' to {b:g}'}"
                 f" ({k} {unit[side]}{'s' if k > 1 else ''})" for side, (a, b, k) in self.strips.items()]  # fmt: skip
        if self.holes:
            parts.append(f"{self.holes} grid point(s) inside that range whose tiles were quarantined")
        lines.append(f"- Not covered by any sample: {'; '.join(parts)}. The tiles are cut from the south-west corner"
                     " and edge tiles that do not fit the tile size are left out (docs/datasets.md, Tiles and"
                     " coverage); choose a tile that divides the region to cover all of it")  # fmt: skip
        return lines


def _inside(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Grid values inside [low, high]; low > high means the interval crosses the antimeridian."""
    if low <= high:
        return (values >= low - _EPS) & (values <= high + _EPS)
    return (values >= low - _EPS) | (values <= high + _EPS)


def _edge_runs(covered: np.ndarray) -> tuple[int, int]:
    """Uncovered positions at the start and at the end of a 1-D coverage vector."""
    if not covered.any():
        return len(covered), 0
    first, last = int(np.argmax(covered)), int(len(covered) - 1 - np.argmax(covered[::-1]))
    return first, len(covered) - 1 - last


def compute_coverage(index: pd.DataFrame, lat: Sequence[float] | np.ndarray, lon: Sequence[float] | np.ndarray) -> Coverage:
    """The grid points of the region that the samples' tiles cover.

    Args:
        index: the version's index (one row per sample; `lat_min`, `lat_max`, `lon_min`, `lon_max`).
        lat: the region's grid latitudes, south to north.
        lon: the region's grid longitudes, west to east (wrapping across the antimeridian).

    Returns:
        The coverage; strips are reported only where whole grid rows or columns are left out.
    """
    lat_v, lon_v = np.asarray(lat, dtype=float), np.asarray(lon, dtype=float)
    mask = np.zeros((len(lat_v), len(lon_v)), dtype=bool)
    boxes = index[["lat_min", "lat_max", "lon_min", "lon_max"]].drop_duplicates()
    for s, n, w, e in boxes.itertuples(index=False, name=None):
        mask[np.ix_(_inside(lat_v, s, n), _inside(lon_v, w, e))] = True
    rows, cols = np.asarray(mask.any(axis=1)), np.asarray(mask.any(axis=0))
    south, north = _edge_runs(rows)
    west, east = _edge_runs(cols)
    strips: dict[str, tuple[float, float, int]] = {}
    for side, count, values, start in (("south", south, lat_v, 0), ("north", north, lat_v, len(lat_v) - north),
                                       ("west", west, lon_v, 0), ("east", east, lon_v, len(lon_v) - east)):  # fmt: skip
        if count and count < len(values):
            strips[side] = (float(values[start]), float(values[start + count - 1]), count)
    inner = mask[south : len(lat_v) - north, west : len(lon_v) - east]
    covered_lat = lat_v[rows] if rows.any() else lat_v[:0]
    covered_lon = lon_v[cols] if cols.any() else lon_v[:0]
    return Coverage(
        n_lat=len(lat_v), n_lon=len(lon_v), covered=int(mask.sum()),
        lat_range=(float(covered_lat[0]), float(covered_lat[-1])) if len(covered_lat) else (np.nan, np.nan),
        lon_range=(float(covered_lon[0]), float(covered_lon[-1])) if len(covered_lon) else (np.nan, np.nan),
        strips=strips, holes=int((~inner).sum()),
    )  # fmt: skip
