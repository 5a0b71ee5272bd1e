"""The day-of-year climatology of sample means, and anomalies against it (for builds that span several years)."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = ["AnomalyInfo", "DayOfYearClimatology"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnomalyInfo:
    """Departures of a sample's means from the day-of-year climatology."""

    values: dict[str, float]
    """{V: sample mean - climatological mean} in the variable's units (K for temperatures)."""
    period: str
    """The climatology's years, `2018-2020`."""


def _doy(ts: pd.Timestamp) -> int:
    """Day index 0..365 on a leap-year calendar (29 February has its own slot)."""
    return int(pd.Timestamp(2000, ts.month, ts.day).day_of_year) - 1


class DayOfYearClimatology:
    """Per group (tile) and variable: the mean of the per-sample means for each day of the year, smoothed over
    +-`half_width_days` days (circular), on a 366-slot calendar. Built only when the samples span at least
    `min_years` distinct years; then `anomalies` gives "N.N °C warmer than the YYYY-YYYY average for the date".

    The climatology includes the sample itself; build it from the train rows for a leakage-free reference.
    """

    def __init__(self, means: dict[tuple[str, str], np.ndarray], first_year: int, last_year: int):
        self._means = means
        self.period = f"{first_year}-{last_year}"

    @classmethod
    def from_samples(
        cls,
        rows: Iterable[tuple[str, pd.Timestamp, Mapping[str, Mapping[str, float]]]],
        variables: Sequence[str] = ("T2M",),
        half_width_days: int = 7,
        min_years: int = 2,
    ) -> DayOfYearClimatology | None:
        """Build from `(group, time_start, stats)` rows (group: `SamplePlan.tile_label`); None with too few years."""
        sums: dict[tuple[str, str], np.ndarray] = {}
        counts: dict[tuple[str, str], np.ndarray] = {}
        years: set[int] = set()
        for group, start, stats in rows:
            ts = pd.Timestamp(start)
            years.add(ts.year)
            for var in variables:
                value = float(stats.get(var, {}).get("mean", math.nan))
                if math.isfinite(value):
                    sums.setdefault((group, var), np.zeros(366))[_doy(ts)] += value
                    counts.setdefault((group, var), np.zeros(366))[_doy(ts)] += 1
        if len(years) < min_years:
            logger.info("no climatology: samples span %d year(s), anomalies need %d", len(years), min_years)
            return None
        h = half_width_days
        kernel = np.ones(2 * h + 1)
        means = {}
        for k, s in sums.items():
            c = counts[k]
            ss = np.convolve(np.concatenate([s[-h:], s, s[:h]]) if h else s, kernel, mode="valid")
            cc = np.convolve(np.concatenate([c[-h:], c, c[:h]]) if h else c, kernel, mode="valid")
            means[k] = np.where(cc > 0, ss / np.maximum(cc, 1), np.nan)
        return cls(means, min(years), max(years))

    def mean(self, group: str, variable: str, day: pd.Timestamp) -> float:
        """The smoothed climatological mean for a date (NaN when no sample is near that day of the year)."""
        table = self._means.get((group, variable))
        return math.nan if table is None else float(table[_doy(pd.Timestamp(day))])

    def anomalies(
        self, group: str, time_start: pd.Timestamp, stats: Mapping[str, Mapping[str, float]]
    ) -> AnomalyInfo | None:
        """Sample means minus the climatology for the window's start date (None when nothing is known)."""
        values = {}
        for group_, var in self._means:
            if group_ == group and var in stats:
                delta = float(stats[var]["mean"]) - self.mean(group, var, time_start)
                if math.isfinite(delta):
                    values[var] = delta
        return AnomalyInfo(values, self.period) if values else None
