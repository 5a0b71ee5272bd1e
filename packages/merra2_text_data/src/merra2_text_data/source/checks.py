"""Checks of one MERRA-2 granule that stop a silent misread: its collection, its time axis, its stored chunks.

Each raises GranuleError naming the file, what is wrong and the way out. `subset` calls them on every granule it
reads: the collection and the time axis from metadata while planning, the chunks right before the data is read.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import h5py
import numpy as np

from merra2_text_data.errors import GranuleError

from .granules import Granule, parse_granule_name

__all__ = ["check_chunks", "check_collection", "check_time"]


def check_collection(granule: Granule, short_name: Any) -> None:
    """A granule's `ShortName` attribute (GES DISC files carry one) must be the collection its name says.

    Args:
        granule: the granule (its collection comes from its name or record).
        short_name: the file's global `ShortName` attribute, or None when it has none (nothing to check).

    Raises:
        GranuleError: the file holds another collection than its name says.
    """
    if short_name is not None and str(short_name).strip() and str(short_name).strip() != granule.collection:
        raise GranuleError(
            f"{granule.file_name}: its ShortName attribute says {str(short_name).strip()} but its name says "
            f"{granule.collection}: the file was renamed or saved under the wrong name; fetch the {granule.collection} "
            "granule"
        )


def _hours(stamps: np.ndarray) -> str:
    return ", ".join(str(t)[11:16] for t in stamps[:6]) + (", ..." if stamps.size > 6 else "")


def _time_problems(times: np.ndarray, expected: np.ndarray) -> str:
    """What is wrong with a day's time axis: missing, repeated and off-grid steps."""
    values, counts = np.unique(times, return_counts=True)
    parts = []
    missing = np.setdiff1d(expected, times)
    if missing.size:
        parts.append(f"missing {_hours(missing)}")
    if (counts > 1).any():
        parts.append(f"repeated {_hours(values[counts > 1])}")
    off = np.setdiff1d(times, expected)
    if off.size:
        parts.append(f"off the HH:30 grid {_hours(off)}")
    if not parts and np.any(np.diff(times) <= np.timedelta64(0, "ns")):
        parts.append("steps out of order")
    return "; ".join(parts)


def check_time(granule: Granule, times: np.ndarray, allow_partial_days: bool) -> None:
    """The time axis must be the 24 hourly means at HH:30 of the day the granule's name and record say.

    Args:
        granule: the granule.
        times: its decoded time coordinate (datetime64).
        allow_partial_days: accept a subset of those 24 steps (ascending, on the HH:30 grid).

    Raises:
        GranuleError: name and record disagree, the axis is empty, covers another day, or has missing, repeated,
            off-grid or unordered steps (each listed).
    """
    try:
        named = parse_granule_name(granule.file_name)[2]
    except GranuleError:  # a free-form name: the granule record's day is all there is
        named = granule.day
    if named != granule.day:
        raise GranuleError(
            f"{granule.file_name}: the granule record says {granule.day} but the name says {named}"
        )
    if times.size == 0:
        raise GranuleError(
            f"{granule.file_name}: its time axis is empty; the file is damaged: download it again"
        )
    day = np.datetime64(granule.day.isoformat(), "D")
    expected = day.astype("datetime64[ns]") + np.timedelta64(30, "m") + np.arange(24) * np.timedelta64(1, "h")
    days = np.unique(times.astype("datetime64[D]"))
    if days.size != 1 or days[0] != day:
        raise GranuleError(
            f"{granule.file_name}: its name says {granule.day} but its time coordinate runs {times[0]} .. {times[-1]};"
            " the file was renamed or mislabelled: fetch the right granule"
        )
    if times.size == 24 and np.array_equal(times, expected):
        return
    on_grid = np.isin(times, expected).all() and np.all(np.diff(times) > np.timedelta64(0, "ns"))
    if allow_partial_days and on_grid:
        return
    raise GranuleError(
        f"{granule.file_name}: the time axis holds {times.size} step(s) ({times[0]} .. {times[-1]}) instead of the "
        f"24 hourly means at HH:30 of {granule.day} ({_time_problems(times, expected)}); the file is incomplete, "
        "damaged or a temporal subset: download the full granule, or build subsets with --allow-partial-days "
        "(source.allow_partial_days: true)"
    )


def check_chunks(granule: Granule, name: str, dset: h5py.Dataset, lat_runs: Sequence[slice],
                  lon_runs: Sequence[slice]) -> None:  # fmt: skip
    """Every chunk the region's hyperslab touches must be stored: HDF5 silently returns the fill value for a chunk
    its index does not list (a damaged chunk index), which must not pass for data.

    Args:
        granule: the granule, for the message.
        name: the variable.
        dset: its (time, lat, lon) dataset.
        lat_runs: the lat index ranges to be read.
        lon_runs: the lon index ranges to be read.

    Raises:
        GranuleError: a chunk the read needs is not stored.
    """
    if dset.chunks is None:
        return
    ct, cy, cx = dset.chunks
    starts_y = sorted({y for la in lat_runs for y in range(la.start - la.start % cy, la.stop, cy)})
    starts_x = sorted({x for lo in lon_runs for x in range(lo.start - lo.start % cx, lo.stop, cx)})
    for t in range(0, dset.shape[0], ct):
        for y in starts_y:
            for x in starts_x:
                if dset.id.get_chunk_info_by_coord((t, y, x)).byte_offset is None:
                    raise GranuleError(
                        f"{granule.file_name} ({granule.url}): {name} has no stored data for the chunk at "
                        f"(time {t}, lat {y}, lon {x}); its chunk index is damaged (HDF5 would return fill values): "
                        "delete the file and download it again"
                    )
