"""Tiles along one axis of a region grid: the index ranges (the partial edge tile dropped or kept, `pairs` rules) and
the tile edges that divide a grid, for messages that suggest one."""

from __future__ import annotations

import math

from merra2_text_data.errors import ConfigError

__all__ = ["EDGE_TILES", "dividing_tiles", "tile_ranges"]

EDGE_TILES = ("drop", "keep")
"""What happens to the partial tile at the north/east edge of a region the tile does not divide (module rules)."""


def tile_ranges(n: int, size: int | None, edge_tiles: str = "drop") -> list[tuple[int, int]]:
    """Index ranges of the tiles along one axis of `n` points (see the module rules for the partial edge tile).

    Raises:
        ConfigError: `edge_tiles` is not one of `EDGE_TILES`.
    """
    if edge_tiles not in EDGE_TILES:
        raise ConfigError(f"edge_tiles {edge_tiles!r} is not one of {', '.join(EDGE_TILES)}")
    if size is None:
        return [(0, n)] if n > 0 else []
    ranges = [(i, i + size) for i in range(0, n - size + 1, size)]
    rest = n - len(ranges) * size
    if edge_tiles == "keep" and rest and 2 * rest >= size:
        ranges.append((n - rest, n))
    return ranges


def dividing_tiles(n: int, size: int, count: int = 3) -> list[int]:
    """Tile edges that divide `n` grid points, nearest to `size` first (by ratio; 1 only for a 1-point axis), for
    messages that suggest one."""
    divisors = [d for d in range(2, n + 1) if n % d == 0] or [1]
    return sorted(divisors, key=lambda d: (abs(math.log(d / size)), d))[:count]
