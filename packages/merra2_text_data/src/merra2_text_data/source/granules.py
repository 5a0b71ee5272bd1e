"""MERRA-2 granules: the supported collections, the `Granule` record, file names, and which days a set covers.

A granule is one MERRA-2 file: one collection, one day (`MERRA2_<stream>.<product>.<YYYYMMDD>.nc4`). The stream
(100/200/300/400, 401 for reprocessed months) is read from the name, never inferred from the year.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from urllib.parse import urlsplit

from merra2_text_data.errors import ConfigError, GranuleError

__all__ = [
    "COLLECTIONS",
    "VERSION",
    "Collection",
    "Granule",
    "collection_for",
    "granule_name",
    "missing_days",
    "parse_granule_name",
]

logger = logging.getLogger(__name__)

VERSION = "5.12.4"
"""The MERRA-2 collection version searched in CMR and written by `synth`."""


@dataclass(frozen=True)
class Collection:
    """A MERRA-2 collection: its CMR short name, file product name, and variables."""

    short_name: str
    product: str
    title: str
    doi: str
    variables: tuple[str, ...]


_SLV_NAMES = (
    "CLDPRS CLDTMP DISPH H1000 H250 H500 H850 OMEGA500 PBLTOP PS Q250 Q500 Q850 QV10M QV2M SLP T10M T250 "
    "T2M T2MDEW T2MWET T500 T850 TO3 TOX TQI TQL TQV TROPPB TROPPT TROPPV TROPQ TROPT TS U10M U250 U2M "
    "U500 U50M U850 V10M V250 V2M V500 V50M V850 ZLCL"
)
_FLX_NAMES = (
    "BSTAR CDH CDM CDQ CN DISPH EFLUX EVAP FRCAN FRCCN FRCLS FRSEAICE GHTSKIN HFLUX HLML NIRDF NIRDR PBLH "
    "PGENTOT PRECANV PRECCON PRECLSC PRECSNO PRECTOT PRECTOTCORR PREVTOT QLML QSH QSTAR RHOA RISFC SPEED "
    "SPEEDMAX TAUGWX TAUGWY TAUX TAUY TCZPBL TLML TSH TSTAR ULML USTAR VLML Z0H Z0M"
)

COLLECTIONS: dict[str, Collection] = {
    "M2T1NXSLV": Collection(
        "M2T1NXSLV",
        "tavg1_2d_slv_Nx",
        "MERRA2 tavg1_2d_slv_Nx: 2d,1-Hourly,Time-Averaged,Single-Level,Assimilation,Single-Level Diagnostics",
        "10.5067/VJAFPLI1CSIV",
        tuple(_SLV_NAMES.split()),
    ),
    "M2T1NXFLX": Collection(
        "M2T1NXFLX",
        "tavg1_2d_flx_Nx",
        "MERRA2 tavg1_2d_flx_Nx: 2d,1-Hourly,Time-Averaged,Single-Level,Assimilation,Surface Flux Diagnostics",
        "10.5067/7MCPBJ41Y0K6",
        tuple(_FLX_NAMES.split()),
    ),
}
"""The supported collections by CMR short name (M2T1NXSLV: single-level diagnostics; M2T1NXFLX: surface fluxes)."""

_NAME_RE = re.compile(
    r"^MERRA2_(?P<stream>\d{3})\.(?P<product>\w+)\.(?P<ymd>\d{8})(?:\.nc4|\.SUB\.nc4|\.SUB\.nc)$"
)
GRADS_RE = re.compile(r"^MERRA-2\.(?P<product>\w+)\.(?P<ymd>\d{8})(?:\.SUB)?\.nc4?$")


@dataclass(frozen=True)
class Granule:
    """One MERRA-2 file.

    Attributes:
        collection: CMR short name, e.g. "M2T1NXSLV".
        day: the UTC day the file covers.
        stream: the production stream from the file name ("400", "401", ...).
        file_name: the file's base name.
        url: a local path, an fsspec URL (s3://...), or an https data link.
        size: size in bytes when known (from the listing or the CMR record).
        checksum: "ALGORITHM:value" when the CMR record carries one.
        granule_id: "<collection>.<version>:<file_name>" (the CMR GranuleUR form).
    """

    collection: str
    day: date
    stream: str
    file_name: str
    url: str
    size: int | None = None
    checksum: str | None = None
    granule_id: str = ""


def collection_for(variable: str) -> str:
    """Return the collection short name that holds a MERRA-2 variable.

    Raises:
        ConfigError: the variable is in no supported collection (the message lists the known ones).
    """
    for collection in COLLECTIONS.values():
        if variable in collection.variables:
            return collection.short_name
    known = ", ".join(f"{c.short_name}: {' '.join(c.variables)}" for c in COLLECTIONS.values())
    raise ConfigError(
        f"unknown MERRA-2 variable {variable!r} (names are upper case); known variables are {known}"
    )


def granule_name(collection: str, day: date, stream: str) -> str:
    """The real file name `MERRA2_<stream>.<product>.<YYYYMMDD>.nc4` of a collection's granule for a day."""
    return f"MERRA2_{stream}.{COLLECTIONS[collection].product}.{day:%Y%m%d}.nc4"


def parse_granule_name(name: str) -> tuple[str, str, date]:
    """Parse `MERRA2_<stream>.<product>.<YYYYMMDD>.nc4` (or a subsetter's `.SUB.nc4` / `.SUB.nc`).

    Returns:
        (stream, product, day), e.g. ("401", "tavg1_2d_slv_Nx", date(2020, 9, 1)).

    Raises:
        GranuleError: the name does not follow the pattern, has an impossible date, or is the GrADS Data Server
            variant `MERRA-2.<product>.<date>.SUB.nc4` (lowercase variables, `hours since` time), which is rejected.
    """
    base = name.rsplit("/", 1)[-1]
    if GRADS_RE.match(base):
        raise GranuleError(
            f"{base} is a GrADS Data Server export of MERRA-2 (lowercase variable names, 'hours since' time, "
            "point subsets): this reader does not support it; download the GES DISC granule "
            "MERRA2_<stream>.<product>.<YYYYMMDD>.nc4 instead"
        )
    match = _NAME_RE.match(base)
    if match is None:
        raise GranuleError(f"{base} is not a MERRA-2 granule name MERRA2_<stream>.<product>.<YYYYMMDD>.nc4")
    try:
        day = datetime.strptime(match["ymd"], "%Y%m%d").date()
    except ValueError as exc:
        raise GranuleError(f"{base} has an impossible date {match['ymd']}: {exc}") from exc
    return match["stream"], match["product"], day


def _choose(candidates: list[Granule]) -> Granule:
    """Of several granules for one collection and day, keep the highest stream (401 reprocesses 400)."""
    best = max(candidates, key=lambda g: (int(g.stream), not g.file_name.endswith((".SUB.nc4", ".SUB.nc"))))
    others = ", ".join(g.file_name for g in candidates if g is not best)
    logger.warning("%s %s: %d granules (%s); using %s and ignoring %s", best.collection, best.day,
                   len(candidates), ", ".join(g.file_name for g in candidates), best.file_name, others)  # fmt: skip
    return best


def deduplicate(granules: Iterable[Granule]) -> list[Granule]:
    groups: dict[tuple[str, date], list[Granule]] = {}
    for g in granules:
        groups.setdefault((g.collection, g.day), []).append(g)
    chosen = [group[0] if len(group) == 1 else _choose(group) for group in groups.values()]
    return sorted(chosen, key=lambda g: (g.day, g.collection))


def _days(start: date, end: date) -> list[date]:
    return [start + timedelta(days=i) for i in range((end - start).days + 1)]


def missing_days(
    granules: Sequence[Granule], collections: Sequence[str], start: date, end: date
) -> list[date]:
    """The days in start..end (inclusive) for which at least one of `collections` has no granule."""
    have = {(g.collection, g.day) for g in granules}
    return [d for d in _days(start, end) if any((c, d) not in have for c in collections)]


def check_request(collections: Sequence[str], start: date, end: date) -> None:
    unknown = [c for c in collections if c not in COLLECTIONS]
    if unknown:
        raise ConfigError(f"unknown collection(s) {unknown}: supported are {sorted(COLLECTIONS)}")
    if end < start:
        raise ConfigError(f"end {end} is before start {start}: give an end on or after the start")



_HASHES = {"MD5": "md5", "SHA1": "sha1", "SHA256": "sha256", "SHA384": "sha384", "SHA512": "sha512"}
"""CMR `Checksum.Algorithm` values (`MD5`, `SHA-256`, ...) without dashes -> hashlib names."""


def hash_name(algorithm: str) -> str | None:
    return _HASHES.get(algorithm.upper().replace("-", "").replace("_", ""))



def plain_http(url: str) -> bool:
    """True for an `http://` URL to another machine (a loopback address, such as a local mirror, is not a network)."""
    if not url.lower().startswith("http://"):
        return False
    host = urlsplit(url).hostname or ""
    return host not in ("localhost", "127.0.0.1", "::1")

