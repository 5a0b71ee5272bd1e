"""Captions exactly faithful to a sample's statistics (and its anomaly, see `climatology`), and event text.

The caption format itself (the quantities, the three phrasings, number formatting, the parser) is the contract's:
`climate_text_schema.captions`, whose docstring tables every sentence. This module puts a sample's parts together:
the intro (region words and dates, UTC, written `1 January 2019`; a tile's bounding box such as `35.0°N`), the
number sentences of the sample's template (`captions.template_index(key)`), the anomaly when a climatology exists,
the `Notable:` extremes, and the reported events (after `Reported events:`, never parsed: their narratives hold free
numbers).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
from climate_text_schema import ContractError
from climate_text_schema.caption_reading import parse_caption_numbers
from climate_text_schema.captions import (
    COMPASS,
    FACETS,
    N_TEMPLATES,
    TEXT_FORMAT,
    caption_quantities,
    compass_direction,
    notable_extremes,
    render_facet,
    template_index,
)

from merra2_text_data.errors import BuildError, ConfigError

from .climatology import AnomalyInfo
from .events import Event

__all__ = [
    "COMPASS",
    "N_TEMPLATES",
    "TEXT_FORMAT",
    "compass_direction",
    "describe_bbox",
    "describe_region",
    "format_events",
    "make_caption",
    "parse_caption_numbers",
]

logger = logging.getLogger(__name__)

_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")  # fmt: skip


def _f1(x: float) -> str:
    text = f"{x:.1f}"
    return "0.0" if text == "-0.0" else text


def _date_words(ts: pd.Timestamp) -> str:
    return f"{ts.day} {_MONTHS[ts.month - 1]} {ts.year}"


def _dates(start: pd.Timestamp, end: pd.Timestamp) -> str:
    if start == start.normalize() and end == end.normalize():
        last = end - pd.Timedelta(days=1)
        return (
            f"on {_date_words(start)}"
            if last == start
            else f"from {_date_words(start)} to {_date_words(last)}"
        )
    return f"from {_date_words(start)} {start:%H:%M} to {_date_words(end)} {end:%H:%M} UTC"


def describe_bbox(bbox: Sequence[float]) -> str:
    """Words for (W, S, E, N): `the area 35.0°N to 45.0°N, 105.0°W to 95.0°W`."""
    west, south, east, north = (float(x) for x in bbox)

    def lat(x: float) -> str:
        return f"{_f1(abs(x))}°{'N' if x >= 0 else 'S'}"

    def lon(x: float) -> str:
        x = ((x + 180.0) % 360.0) - 180.0
        return f"{_f1(abs(x))}°{'E' if x >= 0 else 'W'}"

    return f"the area {lat(south)} to {lat(north)}, {lon(west)} to {lon(east)}"


def describe_region(region_words: str, bbox: Sequence[float] | None = None) -> str:
    """The region phrase of a caption: the region's words; for a tile (bbox given) `part of <words> (<bbox words>)`."""
    if bbox is None:
        return region_words
    return f"part of {region_words} ({describe_bbox(bbox)})" if region_words else describe_bbox(bbox)


def make_caption(
    key: str,
    region_words: str,
    time_start: pd.Timestamp,
    time_end: pd.Timestamp,
    stats: Mapping[str, Mapping[str, float]],
    units: Mapping[str, str],
    anomalies: AnomalyInfo | None = None,
    events: Sequence[Event] | None = None,
    max_events: int = 3,
) -> str:
    """Write the caption of one sample (the format: `climate_text_schema.captions`).

    Args:
        key: the sample key (chooses the template).
        region_words: the region phrase (see `describe_region`), e.g. "the contiguous United States".
        time_start: window start (UTC).
        time_end: window end (UTC, exclusive).
        stats: `{V: {"mean", "min", "max"}}` of the sample; absent variables leave their sentence out.
        units: `{V: units}` (default: the contract's units for known variables).
        anomalies: departures from the climatology (only the T2M one is written).
        events: reported events joined to the sample (`events.match_events`).
        max_events: at most this many events are written.

    Returns:
        The caption text.

    Raises:
        BuildError: a statistic used by the caption is NaN or infinite.
        ConfigError: a variable's units are not ones the caption can convert.
    """
    for var, row in stats.items():
        for which, value in row.items():
            if not math.isfinite(float(value)):
                raise BuildError(f"sample {key!r}: {var} {which} is {value}; validate samples before captioning them")
    start, end = pd.Timestamp(time_start), pd.Timestamp(time_end)
    try:
        values: dict[str, Any] = caption_quantities(stats, (end - start).total_seconds(), units)
    except ContractError as exc:
        raise ConfigError(str(exc)) from exc
    delta = None if anomalies is None else anomalies.values.get("T2M")
    if anomalies is not None and delta is not None and math.isfinite(delta) and "t2m_mean_c" in values:
        values.update(t2m_anomaly_c=delta, anomaly_period=anomalies.period)
    values.update(region=region_words or "the region", dates=_dates(start, end))
    template = template_index(key)
    parts = [p for f in ("intro", *FACETS) if (p := render_facet(f, values, template)) is not None]
    if len(parts) == 1:
        parts.append(_generic(stats, units, key))
    text = " ".join(parts)
    if text.endswith(";"):
        text = text[:-1] + "."
    notable = notable_extremes(values)
    if notable:
        text += " Notable: " + "; ".join(notable) + "."
    if events:
        text += " " + format_events(events, max_events=max_events)
    return text


def _generic(stats: Mapping[str, Mapping[str, float]], units: Mapping[str, str], key: str) -> str:
    items = [f"{v} {float(stats[v]['mean']):.4g} {units.get(v, '')}".rstrip() for v in stats]
    return "Area-weighted means: " + ", ".join(items) + "."


# ---- events ---------------------------------------------------------------------------------------------------------
def _truncate(text: str, limit: int) -> str:
    text = " ".join(str(text).split())
    if len(text) <= limit:
        return text
    cut = text[:limit].rsplit(" ", 1)[0].rstrip(",;:-")
    return cut + "..."


def format_events(events: Sequence[Event], max_events: int = 3, max_chars: int = 300) -> str:
    """`Reported events: <TYPE> near <place> on <date>: <narrative>` for the first `max_events` events (by time).

    Narratives are truncated at a word boundary to about `max_chars` characters (`...` marks a cut).
    """
    chosen = sorted(events, key=lambda e: (e.begin, e.event_id))[: max(max_events, 0)]
    items = []
    for e in chosen:
        narrative = _truncate(e.text, max_chars)
        if narrative and narrative[-1] not in ".!?":
            narrative += "."
        where = f" near {e.place}" if e.place else ""
        items.append(f"{e.event_type or 'Event'}{where} on {_date_words(e.begin)}: {narrative}".rstrip(": "))
    more = len(events) - len(chosen)
    tail = f" ({more} more reported.)" if more > 0 else ""
    return ("Reported events: " + " ".join(items) + tail) if items else ""
