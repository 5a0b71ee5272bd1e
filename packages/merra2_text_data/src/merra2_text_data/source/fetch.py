"""Granule discovery (a folder, any fsspec URL, or NASA CMR through earthaccess) and resumable downloads.

A granule is one MERRA-2 file: one collection, one day (`MERRA2_<stream>.<product>.<YYYYMMDD>.nc4`). The stream
(100/200/300/400, 401 for reprocessed months) is read from the name, never inferred from the year.

The parts live in their own modules and are re-exported here: `granules` (collections, the `Granule` record, names),
`cmr` (Earthdata login and CMR search), `download` (the download cache); this module lists a folder or a URL.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import date, datetime
from pathlib import Path

import fsspec

from merra2_text_data.errors import ConfigError, GranuleError

from .cmr import login_earthaccess, search_earthaccess
from .download import download_granules
from .granules import (
    COLLECTIONS,
    GRADS_RE,
    VERSION,
    Collection,
    Granule,
    check_request,
    collection_for,
    deduplicate,
    granule_name,
    missing_days,
    parse_granule_name,
)

__all__ = [
    "COLLECTIONS",
    "VERSION",
    "Collection",
    "Granule",
    "collection_for",
    "download_granules",
    "find_granules",
    "granule_name",
    "login_earthaccess",
    "missing_days",
    "parse_granule_name",
    "search_earthaccess",
]

logger = logging.getLogger(__name__)


def _warn_stray(source: str | Path, names: list[str], shown: int = 10) -> None:
    """Name the files of a granule folder that are not MERRA-2 granules (they are ignored, never read)."""
    listed = ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
    logger.warning(
        "%s holds %d file(s) that are not MERRA-2 granules (MERRA2_<stream>.<product>.<YYYYMMDD>.nc4); they are "
        "ignored: %s", source, len(names), listed,
    )  # fmt: skip


def find_granules(
    source: str | Path, collections: Sequence[str], start: date, end: date
) -> tuple[list[Granule], list[date]]:
    """List the granules of `collections` for start..end in a local folder or any fsspec URL (searched recursively).

    Duplicate days (e.g. streams 400 and 401) keep the highest stream and log a warning naming both files. Files
    whose names are not granule names (other than hidden ones) are ignored with a warning that names them.

    Args:
        source: a folder path, `file://`, `s3://bucket/prefix`, ...
        collections: CMR short names, e.g. ["M2T1NXSLV", "M2T1NXFLX"].
        start: first day, inclusive.
        end: last day, inclusive.

    Returns:
        (granules sorted by day then collection, the days missing for at least one collection).

    Raises:
        ConfigError: unknown collection, end before start, or the source does not exist.
        GranuleError: a GrADS-variant file is the only file for a requested collection and day.
    """
    check_request(collections, start, end)
    fs, root = fsspec.core.url_to_fs(str(source))
    if not fs.isdir(root):
        raise ConfigError(f"granule source {source} is not an existing folder: check the path or URL")
    local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    wanted = {COLLECTIONS[c].product: c for c in collections}
    found: list[Granule] = []
    grads: list[tuple[str, date, GranuleError]] = []
    stray: list[str] = []
    for path, info in sorted(fs.find(root, detail=True).items()):
        name = path.rsplit("/", 1)[-1]
        try:
            stream, product, day = parse_granule_name(name)
        except GranuleError as exc:
            grads_match = GRADS_RE.match(name)
            if grads_match and grads_match["product"] in wanted:
                day = datetime.strptime(grads_match["ymd"], "%Y%m%d").date()
                if start <= day <= end:
                    grads.append((wanted[grads_match["product"]], day, exc))
            elif not name.startswith("."):
                stray.append(path[len(root) :].lstrip("/") or name)
            logger.debug("ignoring %s: %s", path, exc)
            continue
        if product not in wanted or not start <= day <= end:
            logger.debug("ignoring %s: product %s or day %s not requested", path, product, day)
            continue
        collection = wanted[product]
        url = path if local else fs.unstrip_protocol(path)
        size = info.get("size")
        found.append(Granule(collection, day, stream, name, url, int(size) if size is not None else None,
                             None, f"{collection}.{VERSION}:{name}"))  # fmt: skip
    if stray:
        _warn_stray(source, stray)
    granules = deduplicate(found)
    have = {(g.collection, g.day) for g in granules}
    for collection, day, grads_error in grads:
        if (collection, day) not in have:
            raise grads_error
        logger.warning(
            "ignoring the GrADS-variant file for %s %s: a GES DISC granule exists", collection, day
        )
    missing = missing_days(granules, collections, start, end)
    logger.info("found %d granules in %s for %s..%s; %d day(s) missing", len(granules), source, start, end,
                len(missing))  # fmt: skip
    return granules, missing


