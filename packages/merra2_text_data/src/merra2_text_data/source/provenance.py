"""Where a version's climate fields and texts come from, in words the manifest and the dataset card can state.

`source_kind` reads the global attributes of the granules (the HDF5 root attributes of a netCDF4 file, no data): a
file written by `merra2-text synth` says so in its `Comment`, `Institution` and `History` attributes, and a dataset
built from such files must never be presented as NASA MERRA-2 reanalysis.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import fsspec

from .granules import Granule

__all__ = ["NOAA_STORM_EVENTS", "granule_attributes", "source_kind", "text_sources"]

logger = logging.getLogger(__name__)

NOAA_STORM_EVENTS = (
    "NOAA NCEI Storm Events Database (https://www.ncei.noaa.gov/stormevents/): real reports by the US National "
    "Weather Service, public domain"
)
_MARKERS = ("synthetic",)


def granule_attributes(url: str) -> dict[str, str]:
    """The global attributes of one netCDF4/HDF5 granule as text (empty when the file cannot be read)."""
    import h5py

    try:
        with fsspec.open(url, "rb") as fh, h5py.File(fh, "r") as f:
            return {str(k): _text(v) for k, v in f.attrs.items()}
    except (OSError, ValueError) as exc:
        logger.debug("cannot read the attributes of %s: %s", url, exc)
        return {}


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list):
        return " ".join(_text(v) for v in value)
    return str(value)


def source_kind(granules: Sequence[Granule], cache_dir: str | Path | None = None) -> str:
    """`synthetic` when any granule (one per collection is read) says it is synthetic, else `merra2`.

    Args:
        granules: the build's granules (url: a local path or an fsspec URL).
        cache_dir: when given, the answer is kept in `cache_dir/provenance/<digest of the granule ids>.json`, so a
            rebuild from the cache opens no granule at all.
    """
    memo: Path | None = None
    if cache_dir is not None:
        ids = sorted(f"{g.granule_id or g.file_name}|{g.size}|{g.checksum}" for g in granules)
        digest = hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest()[:32]
        memo = Path(cache_dir) / "provenance" / f"{digest}.json"
        if memo.exists():
            return str(json.loads(memo.read_text(encoding="utf-8"))["source_kind"])
    kind = _detect(granules)
    if memo is not None:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f"{memo.name}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.write_text(json.dumps({"source_kind": kind}), encoding="utf-8")
        os.replace(tmp, memo)
    return kind


def _detect(granules: Sequence[Granule]) -> str:
    seen: set[str] = set()
    for g in granules:
        if g.collection in seen:
            continue
        seen.add(g.collection)
        attrs = granule_attributes(g.url)
        words = " ".join(attrs.get(k, "") for k in ("Comment", "Institution", "History", "Source")).lower()
        if any(m in words for m in _MARKERS):
            logger.info("%s is a synthetic granule (%s)", g.file_name, attrs.get("Comment", ""))
            return "synthetic"
    return "merra2"


def text_sources(events: Sequence[str], text_table: str | None) -> list[dict[str, str]]:
    """The sources of the event text: `[{kind, file, description}]` for the manifest and the card."""
    out = [
        {"kind": "noaa-storm-events", "file": Path(p).name, "description": NOAA_STORM_EVENTS} for p in events
    ]
    if text_table:
        out.append({"kind": "text-table", "file": Path(text_table).name,
                    "description": "a user-supplied table of (time, lat, lon, text)"})  # fmt: skip
    return out
