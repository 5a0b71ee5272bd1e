"""NASA Earthdata: log in (token, user and password, or netrc; never a prompt) and search CMR for granules."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import date
from typing import Any

from merra2_text_data.errors import CredentialsError, GranuleError, MissingDataError
from merra2_text_data.regions import Region

from .granules import (
    COLLECTIONS,
    VERSION,
    Granule,
    check_request,
    deduplicate,
    hash_name,
    parse_granule_name,
    plain_http,
)

__all__ = ["login_earthaccess", "search_earthaccess"]

logger = logging.getLogger(__name__)


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
    if not https and any(plain_http(u) for u in links):
        raise GranuleError(
            f"the CMR record {ur} offers {name} over plain http only: the Earthdata token is only ever sent over "
            "https; download it yourself and build with --source"
        )
    infos = umm.get("DataGranule", {}).get("ArchiveAndDistributionInformation", [])
    info = next((i for i in infos if i.get("Name") == name), infos[0] if infos else {})
    checksum = info.get("Checksum")
    if checksum and hash_name(str(checksum.get("Algorithm", ""))) is None:
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

    check_request(collections, start, end)
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
    return deduplicate(found)

