"""Captions exactly faithful to a sample's statistics (and its anomaly, see `climatology`), and event text.

A caption is a few sentences chosen from one of `N_TEMPLATES` phrasings (picked from the SHA-256 of the sample key,
so the choice is stable across runs and machines). Every number is computed from the sample's `stats`
(`{V: {"mean", "min", "max"}}`, see `pairs`) and written with ONE decimal, `-` for negatives, never `-0.0`:

| quantity | written as | from |
| --- | --- | --- |
| mean / min / max 2 m temperature | `N.N °C` | T2M mean / min / max, K - 273.15 |
| dew point | `N.N °C` | T2MDEW mean |
| specific humidity | `N.N g/kg` | QV2M mean x 1000 |
| wind | `N.N m/s from the <16-point compass>` | speed and direction of the MEAN VECTOR (U10M mean, V10M mean), meteorological: the direction it blows FROM; `with no prevailing direction` when the speed rounds to 0.0 |
| sea-level pressure | `N.N hPa` | SLP mean / 100 |
| precipitation | `N.N mm` | PRECTOTCORR mean (area-weighted, kg m-2 s-1 = mm s-1) x window seconds: area-mean total |
| temperature anomaly | `N.N °C warmer` / `colder than the YYYY-YYYY average for the date` | T2M mean minus the climatology |
| extremes (after `Notable:`) | `extreme heat (maximum 2 m temperature N.N °C)` if max > 35.0 °C; `extreme cold (minimum 2 m temperature N.N °C)` if min < -20.0 °C; `strong winds (a 10 m wind component reached N.N m/s)` if max(abs(U10M/V10M min/max)) > 20.0; `heavy precipitation (peak rate N.N mm/day)` if PRECTOTCORR max x 86400 > 50.0 | |

The sentences with these numbers use fixed phrases per template (see `_TEMPLATES`); `parse_caption_numbers` inverts
every template. Reported events come last, after `Reported events:` and are not parsed (their narratives hold free
numbers). Dates are UTC, written `1 January 2019`; the region sentence may hold bbox numbers (`35.0°N`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import string
from collections.abc import Mapping, Sequence

import pandas as pd
from climate_text_schema import KNOWN_VARIABLES

from .climatology import AnomalyInfo
from .errors import BuildError, ConfigError
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

TEXT_FORMAT = "1"
"""The version of the caption and event-text format written by this module. It is part of every dataset version id
(the manifest's `config.text_format`), so bump it with any change to this module that changes a text for the same
inputs (wording, templates, number formatting, template choice, thresholds, event formatting)."""

COMPASS = (
    "north", "north-northeast", "northeast", "east-northeast", "east", "east-southeast", "southeast",
    "south-southeast", "south", "south-southwest", "southwest", "west-southwest", "west", "west-northwest",
    "northwest", "north-northwest",
)  # fmt: skip
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")  # fmt: skip
HEAT_C, COLD_C, WIND_MS, HEAVY_MM_DAY = 35.0, -20.0, 20.0, 50.0

# One dict per template: facet -> format string. Number fields are written by `_f1`; `dirp` is the wind direction
# phrase, `sign` is warmer|colder, `period` is YYYY-YYYY. The intro sentence is not parsed.
_TEMPLATES: tuple[dict[str, str], ...] = (
    {
        "intro": "Weather over {region} {dates}.",
        "temp": "The area-weighted mean 2 m temperature was {t_mean} °C, ranging from {t_min} °C to {t_max} °C.",
        "anom": "That is {anom} °C {sign} than the {period} average for the date.",
        "dew": "The mean dew point was {dew} °C.",
        "q": "Mean specific humidity was {q} g/kg.",
        "wind": "The mean 10 m wind vector was {ws} m/s {dirp}.",
        "slp": "Mean sea-level pressure was {slp} hPa.",
        "precip": "Precipitation totalled {pr} mm on area average.",
    },
    {
        "intro": "{Dates}, {region}:",
        "temp": "2 m temperatures averaged {t_mean} °C (area-weighted), between {t_min} °C and {t_max} °C.",
        "anom": "This was {anom} °C {sign} than the {period} average for the date.",
        "dew": "Dew point averaged {dew} °C.",
        "q": "Specific humidity averaged {q} g/kg.",
        "wind": "Mean wind vector at 10 m: {ws} m/s {dirp}.",
        "slp": "Sea-level pressure averaged {slp} hPa.",
        "precip": "Area-mean precipitation: {pr} mm.",
    },
    {
        "intro": "Conditions in {region} {dates}:",
        "temp": "mean 2 m temperature {t_mean} °C (area-weighted; minimum {t_min} °C, maximum {t_max} °C);",
        "anom": "{anom} °C {sign} than the {period} average for the date;",
        "dew": "dew point {dew} °C;",
        "q": "specific humidity {q} g/kg;",
        "wind": "10 m mean wind vector {ws} m/s {dirp};",
        "slp": "sea-level pressure {slp} hPa;",
        "precip": "area-mean precipitation total {pr} mm;",
    },
)
N_TEMPLATES = len(_TEMPLATES)
_EXTREMES = {
    "heat": "extreme heat (maximum 2 m temperature {t_max} °C)",
    "cold": "extreme cold (minimum 2 m temperature {t_min} °C)",
    "wind": "strong winds (a 10 m wind component reached {wmax} m/s)",
    "rain": "heavy precipitation (peak rate {peak} mm/day)",
}
_NUMBER = r"-?\d+(?:\.\d+)?"
_PARSED_NAMES = {
    "t_mean": "t2m_mean_c", "t_min": "t2m_min_c", "t_max": "t2m_max_c", "dew": "dewpoint_c", "q": "qv_g_kg",
    "ws": "wind_speed_m_s", "slp": "slp_hpa", "pr": "precip_mm", "anom": "t2m_anomaly_c",
    "wmax": "wind_component_max_m_s", "peak": "precip_peak_mm_day",
}  # fmt: skip


def _f1(x: float) -> str:
    text = f"{x:.1f}"
    return "0.0" if text == "-0.0" else text


def _template_index(key: str) -> int:
    return hashlib.sha256(key.encode("utf-8")).digest()[0] % N_TEMPLATES


def compass_direction(u: float, v: float) -> str:
    """16-point compass word of the direction the wind (u eastward, v northward) blows FROM."""
    from_deg = (270.0 - math.degrees(math.atan2(v, u))) % 360.0
    return COMPASS[int((from_deg + 11.25) // 22.5) % 16]


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


def _stat(stats: Mapping[str, Mapping[str, float]], var: str, which: str, key: str) -> float:
    value = float(stats[var][which])
    if not math.isfinite(value):
        raise BuildError(f"sample {key!r}: {var} {which} is {value}; validate samples before captioning them")
    return value


def _convert(value: float, var: str, unit: str) -> float:
    unit = unit.strip()
    table = {
        ("K", "C"): lambda x: x - 273.15, ("degC", "C"): lambda x: x, ("°C", "C"): lambda x: x,
        ("Pa", "hPa"): lambda x: x / 100.0, ("hPa", "hPa"): lambda x: x,
        ("kg kg-1", "g/kg"): lambda x: x * 1000.0, ("g kg-1", "g/kg"): lambda x: x,
        ("m s-1", "m/s"): lambda x: x, ("m/s", "m/s"): lambda x: x,
        ("kg m-2 s-1", "mm/s"): lambda x: x, ("mm s-1", "mm/s"): lambda x: x,
    }  # fmt: skip
    target = {"T2M": "C", "T2MDEW": "C", "SLP": "hPa", "QV2M": "g/kg", "U10M": "m/s", "V10M": "m/s",
              "PRECTOTCORR": "mm/s"}[var]  # fmt: skip
    try:
        return table[(unit, target)](value)
    except KeyError as exc:
        raise ConfigError(
            f"{var} is in units {unit!r}; captions understand {KNOWN_VARIABLES[var].units!r}"
        ) from exc


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
    """Write the caption of one sample (formats in the module docstring).

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
    tpl = _TEMPLATES[_template_index(key)]
    start, end = pd.Timestamp(time_start), pd.Timestamp(time_end)
    dates = _dates(start, end)
    values: dict[str, str] = {
        "region": region_words or "the region",
        "dates": dates,
        "Dates": dates[0].upper() + dates[1:],
    }

    def conv(var: str, which: str) -> float:
        return _convert(_stat(stats, var, which, key), var, units.get(var) or KNOWN_VARIABLES[var].units)

    parts = [tpl["intro"]]
    notable: list[str] = []
    if "T2M" in stats:
        values.update(
            t_mean=_f1(conv("T2M", "mean")), t_min=_f1(conv("T2M", "min")), t_max=_f1(conv("T2M", "max"))
        )
        parts.append(tpl["temp"])
        delta = None if anomalies is None else anomalies.values.get("T2M")
        if anomalies is not None and delta is not None and math.isfinite(delta):
            values.update(
                anom=_f1(abs(delta)), sign="warmer" if delta >= 0 else "colder", period=anomalies.period
            )
            parts.append(tpl["anom"])
        notable += ["heat"] if float(values["t_max"]) > HEAT_C else []
        notable += ["cold"] if float(values["t_min"]) < COLD_C else []
    if "T2MDEW" in stats:
        values["dew"] = _f1(conv("T2MDEW", "mean"))
        parts.append(tpl["dew"])
    if "QV2M" in stats:
        values["q"] = _f1(conv("QV2M", "mean"))
        parts.append(tpl["q"])
    if "U10M" in stats and "V10M" in stats:
        u, v = conv("U10M", "mean"), conv("V10M", "mean")
        values["ws"] = _f1(math.hypot(u, v))
        values["dirp"] = (
            f"from the {compass_direction(u, v)}" if values["ws"] != "0.0" else "with no prevailing direction"
        )
        parts.append(tpl["wind"])
        values["wmax"] = _f1(max(abs(conv(c, w)) for c in ("U10M", "V10M") for w in ("min", "max")))
        notable += ["wind"] if float(values["wmax"]) > WIND_MS else []
    if "SLP" in stats:
        values["slp"] = _f1(conv("SLP", "mean"))
        parts.append(tpl["slp"])
    if "PRECTOTCORR" in stats:
        values["pr"] = _f1(conv("PRECTOTCORR", "mean") * (end - start).total_seconds())
        values["peak"] = _f1(conv("PRECTOTCORR", "max") * 86400.0)
        parts.append(tpl["precip"])
        notable += ["rain"] if float(values["peak"]) > HEAVY_MM_DAY else []
    if len(parts) == 1:
        parts.append(_generic(stats, units, key))
    text = " ".join(p.format(**values) for p in parts)
    if text.endswith(";"):
        text = text[:-1] + "."
    if notable:
        text += " Notable: " + "; ".join(_EXTREMES[n].format(**values) for n in notable) + "."
    if events:
        text += " " + format_events(events, max_events=max_events)
    return text


def _generic(stats: Mapping[str, Mapping[str, float]], units: Mapping[str, str], key: str) -> str:
    items = [f"{v} {_stat(stats, v, 'mean', key):.4g} {units.get(v, '')}".rstrip() for v in stats]
    return "Area-weighted means: " + ", ".join(items) + "."


def _pattern(fmt: str) -> re.Pattern[str]:
    out = []
    for literal, name, _, _ in string.Formatter().parse(fmt.rstrip(".;:")):
        out.append(re.escape(literal))
        if name in _PARSED_NAMES:
            out.append(f"(?P<{name}>{_NUMBER})")
        elif name == "sign":
            out.append("(?P<sign>warmer|colder)")
        elif name == "dirp":
            out.append(r"(?:from the (?P<dir>[a-z\-]+)|with no prevailing direction)")
        elif name is not None:
            out.append(r".+?")
    return re.compile("".join(out))


_PATTERNS = [[_pattern(f) for facet, f in t.items() if facet != "intro"] for t in _TEMPLATES] + [
    [_pattern(f) for f in _EXTREMES.values()]
]


def parse_caption_numbers(text: str) -> dict[str, float]:
    """Read back the numbers of a caption written by `make_caption` (any template).

    Returns:
        Those present of `t2m_mean_c`, `t2m_min_c`, `t2m_max_c`, `t2m_anomaly_c` (signed), `dewpoint_c`, `qv_g_kg`,
        `wind_speed_m_s`, `wind_from_deg` (compass point centre), `slp_hpa`, `precip_mm`,
        `wind_component_max_m_s`, `precip_peak_mm_day` (the last two only when notable).
    """
    body = text.split("Reported events:", 1)[0]
    out: dict[str, float] = {}
    for group in _PATTERNS:
        for pattern in group:
            match = pattern.search(body)
            if not match:
                continue
            for name, value in match.groupdict().items():
                if name in _PARSED_NAMES and value is not None:
                    out.setdefault(_PARSED_NAMES[name], float(value))
            if match.groupdict().get("sign") == "colder":
                out["t2m_anomaly_c"] = -abs(out["t2m_anomaly_c"])
            if match.groupdict().get("dir") in COMPASS:
                out.setdefault("wind_from_deg", COMPASS.index(match.group("dir")) * 22.5)
    return out


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
