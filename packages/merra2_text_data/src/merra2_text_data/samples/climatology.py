"""The day-of-year climatology of sample means, and anomalies against it (for builds that span several years).

Rules (also the dataset card's wording):

- Per group (a tile label, `all` for whole-region samples) and variable, the climatological mean of a calendar day is
  the mean of the per-sample means of every sample whose start date lies within +-`half_width_days` days of that day
  of the year (circular over the year end), on a 366-slot calendar (29 February has its own slot). Every sample with
  a finite mean counts, in every split, the sample itself included: a caption's "the 2018-2020 average for the date"
  is a statement about the whole dataset.
- A day has a climatology only when at least `min_years` different years contribute to it. A year contributes to a
  day when it has a sample within +-`half_width_days` of that date *in that year* (so late December of 2019 counts as
  2020 for 3 January), and the caption names the first and last contributing years, e.g. `2018-2020`.
- The anomaly is the sample's mean minus that climatological mean; the index stores both (`T2M_clim`, `T2M_anom`).
- Windows shorter than a day, or starting more than once a day, are compared with the same time of day: the group
  carries the window's start time (`climatology_group`), so a 6-hour window at 12:00 is measured against the 12:00
  windows near its date, not against the date's mean over every hour (whose anomaly would be the diurnal offset).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["AnomalyInfo", "DayOfYearClimatology", "by_time_of_day", "climatology_group", "spans_several_years"]

logger = logging.getLogger(__name__)

_SLOTS = 366


@dataclass(frozen=True)
class AnomalyInfo:
    """Departures of a sample's means from the day-of-year climatology."""

    values: dict[str, float]
    """{V: sample mean - climatological mean} in the variable's units (K for temperatures)."""
    period: str
    """The climatology's years, `2018-2020`."""
    reference: dict[str, float] | None = None
    """{V: climatological mean} (what `values` is measured against)."""


def _doy(ts: pd.Timestamp) -> int:
    """Day index 0..365 on a leap-year calendar (29 February has its own slot)."""
    return int(pd.Timestamp(2000, ts.month, ts.day).day_of_year) - 1


def spans_several_years(starts: Iterable[pd.Timestamp], min_years: int = 2) -> bool:
    """True when the window starts fall in at least `min_years` calendar years (a climatology may then exist)."""
    return len({pd.Timestamp(t).year for t in starts}) >= min_years


def by_time_of_day(window: str, stride: str | None) -> bool:
    """True when windows are shorter than a day or start more than once a day: their climatology is kept per time of
    day (`climatology_group`)."""
    from .pairs import parse_duration

    day = pd.Timedelta(days=1)
    return parse_duration(window) < day or parse_duration(stride or window) < day


def climatology_group(tile_label: str, time_start: pd.Timestamp, time_of_day: bool) -> str:
    """The climatology group of a window: its tile label, followed by its start time (`t00x01 06:00`) when the
    climatology is kept per time of day (`by_time_of_day`)."""
    return f"{tile_label} {pd.Timestamp(time_start):%H:%M}" if time_of_day else tile_label


def _smooth_circular(values: np.ndarray, h: int) -> np.ndarray:
    if h == 0:
        return values.copy()
    kernel = np.ones(2 * h + 1)
    return np.convolve(np.concatenate([values[-h:], values, values[:h]]), kernel, mode="valid")


class DayOfYearClimatology:
    """Per group (tile) and variable, the smoothed day-of-year mean of the sample means (rules in the module doc).

    Examples:
        >>> rows = [("all", pd.Timestamp(f"{y}-07-01"), {"T2M": {"mean": 290.0 + y - 2018}}) for y in (2018, 2019)]
        >>> clim = DayOfYearClimatology.from_samples(rows)
        >>> clim.anomalies("all", pd.Timestamp("2019-07-01"), {"T2M": {"mean": 291.0}}).values["T2M"]
        0.5
    """

    def __init__(
        self, tables: dict[tuple[str, str], dict[str, np.ndarray]], half_width_days: int, min_years: int,
        time_of_day: bool = False,
    ):  # fmt: skip
        self._tables = tables
        self.time_of_day = time_of_day
        """The groups carry the window's start time (`climatology_group`)."""
        self.half_width_days = half_width_days
        self.min_years = min_years
        firsts = [int(np.nanmin(t["first"])) for t in tables.values() if np.isfinite(t["first"]).any()]
        lasts = [int(np.nanmax(t["last"])) for t in tables.values() if np.isfinite(t["last"]).any()]
        self.period = f"{min(firsts)}-{max(lasts)}" if firsts else ""
        """The widest span of contributing years over all days (a day's own span may be narrower)."""

    @classmethod
    def from_samples(
        cls,
        rows: Iterable[tuple[str, pd.Timestamp, Mapping[str, Mapping[str, float]]]],
        variables: Sequence[str] = ("T2M",),
        half_width_days: int = 7,
        min_years: int = 2,
        time_of_day: bool = False,
    ) -> DayOfYearClimatology | None:
        """Build from `(group, time_start, stats)` rows (group: `climatology_group` of the sample; `time_of_day`
        says whether the groups carry the start time, for `describe`).

        Returns:
            The climatology, or None when no day of the year has `min_years` contributing years.
        """
        h = int(half_width_days)
        sums: dict[tuple[str, str], np.ndarray] = {}
        counts: dict[tuple[str, str], np.ndarray] = {}
        present: dict[tuple[str, str], dict[int, np.ndarray]] = {}
        for group, start, stats in rows:
            ts = pd.Timestamp(start)
            slot = _doy(ts)
            for var in variables:
                value = float(stats.get(var, {}).get("mean", math.nan))
                if not math.isfinite(value):
                    continue
                key = (group, var)
                sums.setdefault(key, np.zeros(_SLOTS))[slot] += value
                counts.setdefault(key, np.zeros(_SLOTS))[slot] += 1
                present.setdefault(key, {}).setdefault(ts.year, np.zeros(_SLOTS, dtype=bool))[slot] = True
        tables: dict[tuple[str, str], dict[str, np.ndarray]] = {}
        for key, total in sums.items():
            ss, cc = _smooth_circular(total, h), _smooth_circular(counts[key], h)
            years = sorted(present[key])
            first_year = years[0] - 1  # one spare year on each side for the wrap over the year end
            line = np.zeros((years[-1] - first_year + 2) * _SLOTS)
            for y, flags in present[key].items():
                line[(y - first_year) * _SLOTS : (y - first_year + 1) * _SLOTS] = flags
            near = np.convolve(line, np.ones(2 * h + 1), mode="same").reshape(-1, _SLOTS) > 0  # (year, slot)
            near = near[1:-1]  # a year without any sample never contributes (no "2018-2021" from 31 Dec 2020)
            labels = np.arange(years[0], years[-1] + 1)[:, None]
            n_years = near.sum(axis=0)
            ok = (n_years >= min_years) & (cc > 0)
            tables[key] = {
                "mean": np.where(ok, ss / np.maximum(cc, 1), np.nan),
                "first": np.where(ok, np.where(near, labels, np.iinfo(np.int32).max).min(axis=0), np.nan),
                "last": np.where(ok, np.where(near, labels, np.iinfo(np.int32).min).max(axis=0), np.nan),
            }
        if not any(np.isfinite(t["mean"]).any() for t in tables.values()):
            logger.info("no climatology: no day of the year has samples from %d different years", min_years)
            return None
        return cls(tables, h, min_years, time_of_day)

    def mean(self, group: str, variable: str, day: pd.Timestamp) -> float:
        """The smoothed climatological mean for a date (NaN when fewer than `min_years` years are near that day)."""
        table = self._tables.get((group, variable))
        return math.nan if table is None else float(table["mean"][_doy(pd.Timestamp(day))])

    def years(self, group: str, variable: str, day: pd.Timestamp) -> tuple[int, int] | None:
        """First and last year contributing to a date's climatology (None when it has none)."""
        table = self._tables.get((group, variable))
        if table is None or not math.isfinite(table["first"][_doy(pd.Timestamp(day))]):
            return None
        slot = _doy(pd.Timestamp(day))
        return int(table["first"][slot]), int(table["last"][slot])

    def anomalies(
        self, group: str, time_start: pd.Timestamp, stats: Mapping[str, Mapping[str, float]]
    ) -> AnomalyInfo | None:
        """Sample means minus the climatology for the window's start date (None when nothing is known).

        The period is that of the first variable with an anomaly (the years that contribute to its date).
        """
        values: dict[str, float] = {}
        reference: dict[str, float] = {}
        period = ""
        for group_, var in self._tables:
            if group_ != group or var not in stats:
                continue
            clim = self.mean(group, var, time_start)
            delta = float(stats[var]["mean"]) - clim
            if math.isfinite(delta):
                values[var], reference[var] = delta, clim
                if not period:
                    first, last = self.years(group, var, time_start) or (0, 0)
                    period = f"{first}-{last}"
        return AnomalyInfo(values, period, reference) if values else None

    def describe(self) -> dict[str, Any]:
        """A JSON-ready summary for the manifest: variables, period, half width, minimum years, groups, and whether
        it is kept per time of day."""
        return {
            "variables": sorted({v for _, v in self._tables}),
            "period": self.period,
            "half_width_days": self.half_width_days,
            "min_years": self.min_years,
            "groups": len({g for g, _ in self._tables}),
            "time_of_day": self.time_of_day,
        }
