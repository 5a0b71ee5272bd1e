"""Granule discovery (a folder, any fsspec URL, or NASA CMR through earthaccess) and resumable downloads.

A granule is one MERRA-2 file: one collection, one day (`MERRA2_<stream>.<product>.<YYYYMMDD>.nc4`). The stream
(100/200/300/400, 401 for reprocessed months) is read from the name, never inferred from the year.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import fsspec

from .errors import ConfigError, CredentialsError, GranuleError, MissingDataError
from .regions import Region

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
_GRADS_RE = re.compile(r"^MERRA-2\.(?P<product>\w+)\.(?P<ymd>\d{8})(?:\.SUB)?\.nc4?$")


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
    if _GRADS_RE.match(base):
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


def _deduplicate(granules: Iterable[Granule]) -> list[Granule]:
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


def _check_request(collections: Sequence[str], start: date, end: date) -> None:
    unknown = [c for c in collections if c not in COLLECTIONS]
    if unknown:
        raise ConfigError(f"unknown collection(s) {unknown}: supported are {sorted(COLLECTIONS)}")
    if end < start:
        raise ConfigError(f"end {end} is before start {start}: give an end on or after the start")


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
    _check_request(collections, start, end)
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
            grads_match = _GRADS_RE.match(name)
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
    granules = _deduplicate(found)
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


def login_earthaccess() -> Any:
    """Log in to NASA Earthdata: environment (EARTHDATA_TOKEN, or EARTHDATA_USERNAME + EARTHDATA_PASSWORD), then
    ~/.netrc (or the file named by NETRC). Never prompts. Credentials never appear in logs or messages.

    Returns:
        The authenticated `earthaccess.Auth`.

    Raises:
        CredentialsError: no credentials were found, or Earthdata Login rejected them.
    """
    import earthaccess
    from earthaccess.exceptions import LoginAttemptFailure, LoginStrategyUnavailable

    for strategy in ("environment", "netrc"):
        try:
            auth = earthaccess.login(strategy=strategy)
        except LoginStrategyUnavailable:
            logger.debug("Earthdata login strategy %s unavailable", strategy)
            continue
        except LoginAttemptFailure:
            raise CredentialsError(
                f"NASA Earthdata Login rejected the credentials from the {strategy} strategy: check "
                "EARTHDATA_USERNAME/EARTHDATA_PASSWORD or EARTHDATA_TOKEN, or the urs.earthdata.nasa.gov entry of "
                "~/.netrc"
            ) from None
        except OSError as exc:  # urs.earthdata.nasa.gov unreachable (requests' errors are OSErrors)
            raise CredentialsError(
                f"NASA Earthdata Login (urs.earthdata.nasa.gov) cannot be reached to check the {strategy} credentials "
                f"({type(exc).__name__}); check the network, or build from a local copy with --source"
            ) from None
        if auth is not None and auth.authenticated:
            logger.info("logged in to NASA Earthdata (strategy %s)", strategy)
            return auth
    raise CredentialsError(
        "no NASA Earthdata credentials: set EARTHDATA_TOKEN, or EARTHDATA_USERNAME and EARTHDATA_PASSWORD, or add "
        "'machine urs.earthdata.nasa.gov login USER password PASS' to ~/.netrc (or the file named by NETRC); "
        "register at https://urs.earthdata.nasa.gov"
    )


_UNITS = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}


def _record_size(info: dict[str, Any]) -> int | None:
    if info.get("SizeInBytes") is not None:
        return int(info["SizeInBytes"])
    if info.get("Size") is None:
        return None
    unit = str(info.get("SizeUnit", "MB")).upper().replace("BYTES", "B")
    return round(float(info["Size"]) * _UNITS.get(unit, 1024**2))


def _granule_from_umm(record: dict[str, Any], collection: str) -> Granule:
    umm = record["umm"]
    ur = umm["GranuleUR"]
    name = ur.split(":", 1)[-1]
    if name != name.rsplit("/", 1)[-1] or "\\" in name or name.startswith("."):
        raise GranuleError(
            f"the CMR record's GranuleUR {ur!r} names a path, not a file name: it would be written outside the "
            "cache; refusing it (report the record to GES DISC, or build from a local copy with --source)"
        )
    stream, product, day = parse_granule_name(name)
    if product != COLLECTIONS[collection].product:
        raise GranuleError(f"CMR returned {ur} for collection {collection}, whose product is "
                           f"{COLLECTIONS[collection].product}")  # fmt: skip
    links = [u["URL"] for u in umm.get("RelatedUrls", []) if u.get("Type") == "GET DATA"]
    https = [u for u in links if u.startswith("https://")]
    if not (https or links):
        raise GranuleError(f"the CMR record {ur} has no 'GET DATA' link to download {name}")
    if not https and any(_plain_http(u) for u in links):
        raise GranuleError(
            f"the CMR record {ur} offers {name} over plain http only: the Earthdata token is only ever sent over "
            "https; download it yourself and build with --source"
        )
    infos = umm.get("DataGranule", {}).get("ArchiveAndDistributionInformation", [])
    info = next((i for i in infos if i.get("Name") == name), infos[0] if infos else {})
    checksum = info.get("Checksum")
    if checksum and _hash_name(str(checksum.get("Algorithm", ""))) is None:
        logger.warning("%s: CMR checksum algorithm %r is not one this reader checks; only the size is checked",
                       name, checksum.get("Algorithm"))  # fmt: skip
    return Granule(collection, day, stream, name, (https or links)[0], _record_size(info),
                   f"{checksum['Algorithm']}:{checksum['Value']}" if checksum else None, ur)  # fmt: skip


def search_earthaccess(
    collections: Sequence[str], start: date, end: date, region: Region | None = None
) -> list[Granule]:
    """Search NASA CMR (through earthaccess) for the granules of `collections` over start..end.

    Args:
        collections: CMR short names.
        start: first day, inclusive.
        end: last day, inclusive.
        region: passed as the CMR bounding box (MERRA-2 granules are global, so it only guards the query).

    Returns:
        Granules sorted by day then collection, url = the https "GET DATA" link, size in bytes from the record.

    Raises:
        ConfigError: unknown collection or end before start.
        MissingDataError: CMR could not be queried.
        GranuleError: a record does not describe a usable granule.
    """
    import earthaccess

    _check_request(collections, start, end)
    found: list[Granule] = []
    for collection in collections:
        kwargs: dict[str, Any] = {"short_name": collection, "version": VERSION,
                                  "temporal": (f"{start.isoformat()}T00:00:00Z", f"{end.isoformat()}T23:59:59Z")}  # fmt: skip
        if region is not None:
            kwargs["bounding_box"] = region.bbox
        try:
            records = earthaccess.search_data(**kwargs)
        except (RuntimeError, OSError) as exc:  # requests' connection errors are OSErrors
            raise MissingDataError(f"the NASA CMR search for {collection} {start}..{end} failed "
                                   f"({type(exc).__name__}: {exc}); check the network, retry later or use --source "
                                   "with a local copy") from exc  # fmt: skip
        for record in records:
            granule = _granule_from_umm(record, collection)
            if start <= granule.day <= end:
                found.append(granule)
        logger.info("CMR: %d granules of %s for %s..%s", len(records), collection, start, end)
    return _deduplicate(found)


class _SizeMismatch(Exception):
    pass


_HASHES = {"MD5": "md5", "SHA1": "sha1", "SHA256": "sha256", "SHA384": "sha384", "SHA512": "sha512"}
"""CMR `Checksum.Algorithm` values (`MD5`, `SHA-256`, ...) without dashes -> hashlib names."""


def _hash_name(algorithm: str) -> str | None:
    return _HASHES.get(algorithm.upper().replace("-", "").replace("_", ""))


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes (read 1 MiB at a time)."""
    digest = hashlib.new(algorithm)
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _checksum_problem(granule: Granule, path: Path) -> str | None:
    """Why `path` is not the granule the CMR record describes (its checksum differs), or None (also when unknown)."""
    if not granule.checksum or ":" not in granule.checksum:
        return None
    algorithm, _, expected = granule.checksum.partition(":")
    name = _hash_name(algorithm)
    if name is None:
        return None
    found = file_digest(path, name)
    if found.lower() != expected.strip().lower():
        return f"its {algorithm} is {found} where the CMR record lists {expected.strip()}"
    return None


def _verified_mark(target: Path) -> Path:
    return target.with_name(f".{target.name}.verified")


def _is_verified(granule: Granule, target: Path) -> bool:
    """The cached file was checked against this checksum before, and is unchanged since (size, mtime)."""
    stat = target.stat()
    try:
        return _verified_mark(target).read_text() == f"{granule.checksum} {stat.st_size} {stat.st_mtime_ns}"
    except FileNotFoundError:
        return False


def _mark_verified(granule: Granule, target: Path) -> None:
    if granule.checksum:
        stat = target.stat()
        _verified_mark(target).write_text(f"{granule.checksum} {stat.st_size} {stat.st_mtime_ns}")


def _plain_http(url: str) -> bool:
    """True for an `http://` URL to another machine (a loopback address, such as a local mirror, is not a network)."""
    if not url.lower().startswith("http://"):
        return False
    host = urlsplit(url).hostname or ""
    return host not in ("localhost", "127.0.0.1", "::1")


def _refuse_plain_http_redirect(response: Any, *args: Any, **kwargs: Any) -> Any:
    """A requests response hook: never follow a redirect of an authenticated download to plain http."""
    location = str(response.headers.get("Location", "")) if getattr(response, "is_redirect", False) else ""
    if _plain_http(location):
        raise CredentialsError(
            f"the download of {response.url.split('?', 1)[0]} redirects to plain http ({location.split('?', 1)[0]}): "
            "the Earthdata token is only ever sent over https; not following it"
        )
    return response


def _transfer(granule: Granule, part: Path, session: Any, chunk: int = 1 << 16) -> int | None:
    """Copy the granule into `part`, resuming from its current size when the server supports ranges.

    Returns the total size the server announced (None when unknown).
    """
    offset = part.stat().st_size if part.exists() else 0
    if granule.size is not None and offset > granule.size:
        offset = 0
    if granule.size is not None and offset == granule.size:
        return granule.size
    if granule.url.startswith(("http://", "https://")):
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        with session.get(granule.url, headers=headers, stream=True, timeout=60) as resp:
            if resp.status_code in (401, 403):
                raise CredentialsError(f"{granule.file_name}: the server answered HTTP {resp.status_code}; log in "
                                       "to Earthdata and accept the GES DISC data use agreement")  # fmt: skip
            if resp.status_code == 416:
                part.unlink(missing_ok=True)
                raise _SizeMismatch(f"range {offset}- not satisfiable")
            resp.raise_for_status()
            if resp.status_code != 206:
                offset = 0
            length = resp.headers.get("Content-Length")
            total = int(length) + offset if length is not None else None
            with part.open("ab" if offset else "wb") as out:
                out.truncate(offset)
                for block in resp.iter_content(chunk):
                    out.write(block)
        return total
    with fsspec.open(granule.url, "rb") as src, part.open("ab" if offset else "wb") as out:
        out.truncate(offset)
        src.seek(offset)
        while block := src.read(chunk):
            out.write(block)
    return None


def _download_one(granule: Granule, target: Path, session: Any, retries: int, backoff_s: float) -> None:
    part = target.with_name(target.name + ".part")
    problem = ""
    for attempt in range(retries + 1):
        try:
            announced = _transfer(granule, part, session)
            expected = granule.size if granule.size is not None else announced
            actual = part.stat().st_size
            if expected is not None and actual != expected:
                if actual > expected:
                    part.unlink()
                raise _SizeMismatch(f"got {actual} bytes, expected {expected}")
            wrong = _checksum_problem(granule, part)
            if wrong is not None:
                part.unlink()  # wrong bytes (a same-size corruption, or a .part of an older file): start again
                raise _SizeMismatch(wrong)
            os.replace(part, target)
            _mark_verified(granule, target)
            logger.info("downloaded %s (%d bytes)", target, actual)
            return
        except (OSError, _SizeMismatch) as exc:  # requests' errors are OSErrors
            problem = str(exc)
            logger.warning("download of %s failed (attempt %d/%d): %s", granule.file_name, attempt + 1,
                           retries + 1, problem)  # fmt: skip
            if attempt < retries:
                time.sleep(backoff_s * 2**attempt)
    raise GranuleError(f"could not download {granule.file_name} from {granule.url} after {retries + 1} attempts: "
                       f"{problem}; the partial file {part} is kept for a later resume")  # fmt: skip


def download_granules(
    granules: Sequence[Granule],
    cache_dir: str | Path,
    show_progress: bool = False,
    retries: int = 3,
    *,
    session: Any = None,
    backoff_s: float = 1.0,
) -> list[Granule]:
    """Download granules into `cache_dir/<collection>/<YYYY>/`, skipping complete files and resuming partial ones.

    A file is complete when its size matches the record (any existing file counts when the size is unknown).
    Partial data lives in a `.part` sibling, resumed with an HTTP Range request when the server honours it (else
    restarted), retried with exponential backoff, then renamed atomically.

    Args:
        granules: granules whose url is https, http, an fsspec URL or a local path.
        cache_dir: local folder for the files.
        show_progress: show a rich progress bar.
        retries: attempts after the first one.
        session: a `requests.Session` for http(s); default: earthaccess's authenticated session (logging in).
        backoff_s: first retry delay in seconds, doubled at each retry.

    Returns:
        The granules with `url` set to the local path (and `size` to the file's size).

    Raises:
        CredentialsError: https downloads without Earthdata credentials, or HTTP 401/403.
        GranuleError: a file could not be downloaded completely (size mismatch after the retries).
    """
    cache = Path(cache_dir)
    todo: list[tuple[Granule, Path]] = []
    done: dict[Granule, Path] = {}
    for g in granules:
        target = cache / g.collection / f"{g.day:%Y}" / g.file_name
        if not target.resolve().is_relative_to(cache.resolve()):
            raise GranuleError(f"{g.file_name!r} would be written outside the cache {cache}; refusing it")
        if target.exists() and (g.size is None or target.stat().st_size == g.size):
            wrong = None if not g.checksum or _is_verified(g, target) else _checksum_problem(g, target)
            if wrong is not None:
                logger.warning("%s: %s; downloading it again", target, wrong)
                target.unlink()
                todo.append((g, target))
                continue
            _mark_verified(g, target)
            logger.debug("%s already complete", target)
            done[g] = target
        else:
            todo.append((g, target))
    if todo and session is None and any(g.url.startswith(("http://", "https://")) for g, _ in todo):
        plain = [g.file_name for g, _ in todo if _plain_http(g.url)]
        if plain:
            raise CredentialsError(
                f"{plain[0]} (and {len(plain) - 1} more) would be downloaded over plain http with the Earthdata "
                "token: it is only ever sent over https; use the https links"
            )
        import earthaccess

        login_earthaccess()
        session = earthaccess.get_requests_https_session()
        session.hooks.setdefault("response", []).append(_refuse_plain_http_redirect)
    progress: Any = None
    if show_progress and todo:
        from rich.progress import Progress

        progress = Progress()
        progress.start()
        task = progress.add_task("downloading granules", total=len(todo))
    try:
        for g, target in todo:
            target.parent.mkdir(parents=True, exist_ok=True)
            _download_one(g, target, session, retries, backoff_s)
            done[g] = target
            if progress is not None:
                progress.advance(task)
    finally:
        if progress is not None:
            progress.stop()
    return [replace(g, url=str(done[g]), size=done[g].stat().st_size) for g in granules]
