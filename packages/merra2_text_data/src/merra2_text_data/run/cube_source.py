"""`CubeSource`: how a task opens the regional cube where it runs (a few hundred bytes every task carries)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from merra2_text_data.fs import is_local, url_to_fs
from merra2_text_data.regions import Region
from merra2_text_data.source.granules import Granule

__all__ = ["CubeSource"]


@dataclass(frozen=True)
class CubeSource:
    """How a task opens the regional cube where it runs (serialisable; carried by every task).

    Attributes:
        cache: the cache URL or local folder (`SourceConfig.cache_location()`, resolved).
        variables: the cube's variables, in order.
        region: the region.
        allow_partial_days: `source.allow_partial_days`.
        granules: the MERRA-2 granules by day (only the days a task needs, see `narrow`).
        era5: the store URL of an ERA5 source (then `granules` is empty and no cache is used).
        start: first day of the build (ERA5).
        end: last day of the build (ERA5).
        build: the version being built: what a task remembers of the cache is kept for one build only.
    """

    cache: str
    variables: tuple[str, ...]
    region: Region
    allow_partial_days: bool = False
    granules: dict[dt.date, tuple[Granule, ...]] = field(default_factory=dict)
    era5: str | None = None
    start: dt.date | None = None
    end: dt.date | None = None
    build: str = ""

    @property
    def shared(self) -> bool:
        """True when every worker sees the same cache (an object store or any non-local URL)."""
        return not is_local(url_to_fs(self.cache)[0])

    def narrow(self, days: Iterable[dt.date]) -> CubeSource:
        """The same source holding only the granules of `days` (what one task carries)."""
        wanted = set(days)
        return replace(self, granules={d: g for d, g in self.granules.items() if d in wanted})
