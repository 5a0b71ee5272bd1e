"""Text tied to a time and a place: NOAA Storm Events, any (time, lat, lon, text) table, and their join to samples.

Every loader returns an *event frame*: the columns of `EVENT_COLUMNS` (`begin_utc`/`end_utc` tz-aware UTC,
`lat`/`lon` in degrees with NaN for events without a point, `has_point`), plus the source's own columns.

NOAA Storm Events: `BEGIN_DATE_TIME`/`END_DATE_TIME` (`12-JAN-19 10:00:00`, two-digit years) are local standard time;
the century comes from `BEGIN_YEARMONTH`/`END_YEARMONTH` when present (else years up to this year's two digits are
20xx, the rest 19xx). The offset comes from `CZ_TIMEZONE` (`EST-5`, `CST-6`, `AKST-9`, `SST-11`, `GST10`: the number is hours
east of UTC; older files' `CST`, `PDT`, ... without a number use a table). An unknown timezone raises ConfigError
naming the value and its rows, or, with `on_unknown_timezone="skip"`, those rows are dropped and counted in a log line.
Zone events (`CZ_TYPE` Z, `is_zone`) mostly have no coordinates: those are kept with NaN lat/lon, flagged
(`has_point` False) and never joined. Marine zones that carry a point are joined like point events.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from merra2_text_data.errors import ConfigError
from merra2_text_data.regions import LAT_STEP, LON_STEP

from .pairs import SamplePlan

__all__ = [
    "EVENT_COLUMNS",
    "STORM_COLUMNS",
    "Event",
    "grid_margins",
    "load_storm_events",
    "load_text_table",
    "match_events",
]

logger = logging.getLogger(__name__)

EVENT_COLUMNS: tuple[str, ...] = (
    "event_id", "event_type", "begin_utc", "end_utc", "lat", "lon", "place", "text", "has_point",
)  # fmt: skip
STORM_COLUMNS: tuple[str, ...] = (
    "EVENT_ID", "EVENT_TYPE", "STATE", "CZ_NAME", "BEGIN_LAT", "BEGIN_LON", "EVENT_NARRATIVE", "EPISODE_NARRATIVE",
    "BEGIN_DATE_TIME", "END_DATE_TIME", "CZ_TIMEZONE",
)  # fmt: skip
_OPTIONAL_STORM = ("CZ_TYPE", "BEGIN_LOCATION", "BEGIN_YEARMONTH", "END_YEARMONTH")
_TZ_RE = re.compile(r"^\s*([A-Za-z]{1,5})?\s*([+-]?\d{1,2})?\s*$")
_TZ_NAMES = {
    "UTC": 0, "GMT": 0, "Z": 0, "AST": -4, "ADT": -3, "EST": -5, "EDT": -4, "CST": -6, "CDT": -5, "MST": -7,
    "MDT": -6, "PST": -8, "PDT": -7, "AKST": -9, "AKDT": -8, "HST": -10, "SST": -11, "GST": 10, "CHST": 10,
}  # fmt: skip


@dataclass(frozen=True)
class Event:
    """One reported event joined to a sample."""

    event_id: str
    event_type: str
    begin: pd.Timestamp
    """UTC."""
    end: pd.Timestamp
    lat: float
    lon: float
    place: str
    """E.g. `Subiaco, Arkansas` (may be empty)."""
    text: str
    """The narrative (EVENT_NARRATIVE, else EPISODE_NARRATIVE)."""


def _tz_offset(value: str) -> float | None:
    """Hours east of UTC of a CZ_TIMEZONE string, or None when unknown."""
    match = _TZ_RE.match(str(value))
    if not match or not (match.group(1) or match.group(2)):
        return None
    if match.group(2):
        return float(int(match.group(2)))
    return _TZ_NAMES.get(match.group(1).upper())


def _local_times(text: pd.Series, yearmonth: pd.Series | None) -> pd.Series:
    """Parse `12-JAN-19 10:00:00` (two-digit year; century from YEARMONTH when given) to naive datetimes."""
    s = text.astype("string").str.strip()
    yy = pd.to_numeric(s.str.slice(7, 9), errors="coerce")
    if yearmonth is not None:
        year = pd.to_numeric(yearmonth, errors="coerce") // 100
    else:
        pivot = dt.date.today().year % 100
        year = yy + np.where(yy <= pivot, 2000, 1900)
    full = s.str.slice(0, 7) + year.astype("Int64").astype("string") + s.str.slice(9)
    return pd.to_datetime(full, format="%d-%b-%Y %H:%M:%S", errors="coerce")


def _title(s: pd.Series) -> pd.Series:
    return s.fillna("").astype(str).str.strip().str.title().str.replace(" Of ", " of ", regex=False)


def _read_storm_file(path: str | Path, on_unknown_timezone: str) -> pd.DataFrame:
    try:
        raw = pd.read_csv(path, low_memory=False)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"storm events file {path} cannot be read as CSV ({exc}); give a NOAA details CSV(.gz)"
        ) from exc
    missing = [c for c in STORM_COLUMNS if c not in raw.columns]
    if missing:
        raise ConfigError(
            f"storm events file {path} lacks column(s) {', '.join(missing)}; give a NOAA Storm Events "
            "'details' file (StormEvents_details-ftp_v1.0_dYYYY_cYYYYMMDD.csv.gz)"
        )
    df = raw[[c for c in STORM_COLUMNS + _OPTIONAL_STORM if c in raw.columns]].copy()
    zones = df["CZ_TIMEZONE"].astype(str)
    offsets = {z: _tz_offset(z) for z in zones.unique()}
    unknown = sorted(z for z, o in offsets.items() if o is None)
    if unknown:
        rows = np.flatnonzero(zones.isin(unknown).to_numpy())
        if on_unknown_timezone != "skip":
            raise ConfigError(
                f"storm events file {path}: unknown CZ_TIMEZONE value(s) {unknown} in {rows.size} row(s) "
                f"(first data rows {list(rows[:5] + 1)}); fix the file or load with on_unknown_timezone='skip'"
            )
        logger.warning("%s: skipped %d event(s) with unknown CZ_TIMEZONE %s", path, rows.size, unknown)
        df = df[~zones.isin(unknown)].copy()
        zones = zones[df.index]
    hours = pd.to_timedelta(zones.map(offsets).astype(float), unit="h")
    for col, ym, out in (
        ("BEGIN_DATE_TIME", "BEGIN_YEARMONTH", "begin_utc"),
        ("END_DATE_TIME", "END_YEARMONTH", "end_utc"),
    ):
        local = _local_times(df[col], df[ym] if ym in df.columns else None)
        bad = local.isna()
        if bad.any():
            raise ConfigError(
                f"storm events file {path}: {int(bad.sum())} {col} value(s) are not like '12-JAN-19 10:00:00', "
                f"e.g. {df.loc[bad, col].iloc[0]!r}"
            )
        df[out] = (local - hours).dt.tz_localize("UTC")
    df["lat"] = pd.to_numeric(df["BEGIN_LAT"], errors="coerce")
    df["lon"] = pd.to_numeric(df["BEGIN_LON"], errors="coerce")
    df["has_point"] = df["lat"].notna() & df["lon"].notna()
    df["is_zone"] = df["CZ_TYPE"].astype(str).eq("Z") if "CZ_TYPE" in df.columns else ~df["has_point"]
    df["event_id"] = df["EVENT_ID"].astype(str)
    df["event_type"] = df["EVENT_TYPE"].fillna("").astype(str)
    town = _title(df["BEGIN_LOCATION"]) if "BEGIN_LOCATION" in df.columns else pd.Series("", index=df.index)
    town = town.where(town != "", _title(df["CZ_NAME"]))
    df["place"] = (town + ", " + _title(df["STATE"])).str.strip(", ")
    narrative = df["EVENT_NARRATIVE"].fillna("").astype(str).str.strip()
    df["text"] = narrative.where(narrative != "", df["EPISODE_NARRATIVE"].fillna("").astype(str).str.strip())
    return df


def load_storm_events(
    paths: Sequence[str | Path], on_unknown_timezone: Literal["raise", "skip"] = "raise"
) -> pd.DataFrame:
    """Load NOAA Storm Events details files (`.csv` or `.csv.gz`) into one event frame, times in UTC.

    Args:
        paths: the files.
        on_unknown_timezone: `raise` (default) or `skip` rows whose CZ_TIMEZONE is not understood.

    Returns:
        The kept NOAA columns (`STORM_COLUMNS`, plus CZ_TYPE and BEGIN_LOCATION when present), `EVENT_COLUMNS` and
        `is_zone`, sorted by `begin_utc` then `event_id`.

    Raises:
        ConfigError: a file cannot be read, lacks a column, or holds an unknown timezone or malformed date.

    Examples:
        >>> df = load_storm_events(["StormEvents_details-ftp_v1.0_d2019_c20190617.csv.gz"])  # doctest: +SKIP
    """
    if isinstance(paths, str | Path):
        paths = [paths]
    if not paths:
        raise ConfigError("no storm events files given; pass NOAA StormEvents_details CSV(.gz) paths")
    frames = [_read_storm_file(p, on_unknown_timezone) for p in paths]
    df = pd.concat(frames, ignore_index=True).sort_values(["begin_utc", "event_id"], kind="stable")
    df = df.reset_index(drop=True)
    logger.info("loaded %d storm event(s) from %d file(s); %d without coordinates (zone events)",
                len(df), len(frames), int((~df["has_point"]).sum()))  # fmt: skip
    return df


def load_text_table(path: str | Path) -> pd.DataFrame:
    """Load a CSV or Parquet table with `time`, `lat`, `lon`, `text` columns into an event frame.

    Optional columns: `end_time` (else the event is instantaneous), `event_type`, `place`, `id`. Naive times are UTC.

    Raises:
        ConfigError: the file cannot be read, columns are missing (all listed), or a time does not parse.
    """
    name = str(path).lower()
    try:
        raw = pd.read_parquet(path) if name.endswith((".parquet", ".pq")) else pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"text table {path} cannot be read ({exc}); give a CSV or Parquet file") from exc
    missing = [c for c in ("time", "lat", "lon", "text") if c not in raw.columns]
    if missing:
        raise ConfigError(
            f"text table {path} lacks column(s) {', '.join(missing)} (it has {', '.join(map(str, raw.columns))}); "
            "it needs time, lat, lon, text"
        )
    df = raw.copy()
    for src, out in (("time", "begin_utc"), ("end_time" if "end_time" in raw.columns else "time", "end_utc")):
        parsed = pd.to_datetime(df[src], utc=True, errors="coerce", format="mixed")
        if parsed.isna().any():
            first = df.loc[parsed.isna(), src].iloc[0]
            raise ConfigError(f"text table {path}: column {src} holds {first!r}, not a time; write ISO 8601")
        df[out] = parsed
    df["lat"] = pd.to_numeric(df["lat"], errors="coerce")
    df["lon"] = pd.to_numeric(df["lon"], errors="coerce")
    df["has_point"] = df["lat"].notna() & df["lon"].notna()
    df["event_id"] = df["id"].astype(str) if "id" in df.columns else [f"row{i}" for i in range(len(df))]
    df["event_type"] = df["event_type"].fillna("").astype(str) if "event_type" in df.columns else "Report"
    df["place"] = df["place"].fillna("").astype(str) if "place" in df.columns else ""
    df["text"] = df["text"].fillna("").astype(str)
    return df.sort_values(["begin_utc", "event_id"], kind="stable").reset_index(drop=True)


def _in_lon(lon: np.ndarray, west: np.ndarray, east: np.ndarray) -> np.ndarray:
    """lon within [west, east] going eastwards (antimeridian-aware, inclusive)."""
    return ((lon - west) % 360.0) <= ((east - west) % 360.0)


def grid_margins(lat: np.ndarray, lon: np.ndarray) -> tuple[float, float]:
    """Half of each axis's grid step, `(lat, lon)` in degrees: the margins that leave no point between two tiles'
    edges outside both. An axis of one point takes MERRA-2's step (`LAT_STEP`, `LON_STEP`)."""

    def half(values: np.ndarray, default: float) -> float:
        steps = np.abs(np.diff(np.asarray(values, dtype=float)))
        steps = steps[steps > 0]
        return float(steps.min() if steps.size else default) / 2

    return half(lat, LAT_STEP), half(lon, LON_STEP)


def match_events(
    events: pd.DataFrame, plans: Sequence[SamplePlan], margin_deg: float | tuple[float, float] = 0.0
) -> dict[str, list[Event]]:
    """Join events to samples: the event's UTC interval overlaps the window and its point lies in the sample bbox.

    The bbox test is inclusive and antimeridian-aware; `margin_deg` widens it (e.g. half a grid step, so events
    between tile edges are not lost). Events without a point (zone events) are never joined and are counted in a log
    line.

    Args:
        events: an event frame (`load_storm_events`, `load_text_table`).
        plans: the samples.
        margin_deg: degrees added on every side of each bbox; a pair is `(lat, lon)`, one margin per axis (MERRA-2's
            grid steps differ: 0.5° lat, 0.625° lon; `grid_margins` gives half of each).

    Returns:
        `{key: [Event, ...]}` for every plan (empty lists included), each list ordered by begin time and id.

    Raises:
        ConfigError: `events` lacks event-frame columns.
    """
    missing = [c for c in EVENT_COLUMNS if c not in events.columns]
    if missing:
        raise ConfigError(
            f"events frame lacks column(s) {', '.join(missing)}; load it with load_storm_events"
        )
    lat_margin, lon_margin = margin_deg if isinstance(margin_deg, tuple) else (margin_deg, margin_deg)
    out: dict[str, list[Event]] = {p.key: [] for p in plans}
    n_zone = int((~events["has_point"].astype(bool)).sum())
    if n_zone:
        logger.info("%d event(s) without coordinates (zone events) are not joined to samples", n_zone)
    ev = events[events["has_point"].astype(bool)].sort_values(["begin_utc", "event_id"], kind="stable")
    if ev.empty or not plans:
        return out
    begin = pd.DatetimeIndex(ev["begin_utc"]).as_unit("ns").asi8
    end = np.maximum(pd.DatetimeIndex(ev["end_utc"]).as_unit("ns").asi8, begin)
    lat = ev["lat"].to_numpy(dtype=float)
    lon = ((ev["lon"].to_numpy(dtype=float) + 180.0) % 360.0) - 180.0
    longest = int((end - begin).max())
    windows: dict[tuple[int, int], list[SamplePlan]] = {}
    for p in plans:
        windows.setdefault((pd.Timestamp(p.time_start).value, pd.Timestamp(p.time_end).value), []).append(p)
    cache: dict[int, Event] = {}
    joined = 0
    for (w0, w1), group in windows.items():
        lo, hi = np.searchsorted(begin, w0 - longest, "left"), np.searchsorted(begin, w1, "left")
        cand = np.arange(lo, hi)[end[lo:hi] >= w0]
        if cand.size == 0:
            continue
        box = np.array([p.bbox for p in group], dtype=float)  # (P, 4) W, S, E, N
        ok = (lat[cand, None] >= box[None, :, 1] - lat_margin) & (
            lat[cand, None] <= box[None, :, 3] + lat_margin
        )
        ok &= _in_lon(lon[cand, None], box[None, :, 0] - lon_margin, box[None, :, 2] + lon_margin)
        for i, j in zip(*np.nonzero(ok), strict=True):
            e = int(cand[i])
            if e not in cache:
                row = ev.iloc[e]
                cache[e] = Event(str(row["event_id"]), str(row["event_type"]), row["begin_utc"], row["end_utc"],
                                 float(row["lat"]), float(row["lon"]), str(row["place"]), str(row["text"]))  # fmt: skip
            out[group[j].key].append(cache[e])
            joined += 1
    logger.info(
        "joined %d event-sample pair(s) from %d event(s) to %d sample(s)", joined, len(cache), len(plans)
    )
    return out
