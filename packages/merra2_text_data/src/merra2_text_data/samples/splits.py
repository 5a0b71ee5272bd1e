"""Train/val/test splits in contiguous blocks of whole days, deterministic, so no day leaks between splits."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import pandas as pd

from merra2_text_data.errors import ConfigError

from .pairs import SamplePlan

__all__ = ["assign_splits", "holdout_tiles"]

logger = logging.getLogger(__name__)


def _year_map(split_years: dict[str, list[int]] | dict[int, str] | None) -> dict[int, str]:
    out: dict[int, str] = {}
    for a, b in (split_years or {}).items():
        pairs = [(int(y), str(a)) for y in b] if isinstance(b, list | tuple) else [(int(a), str(b))]
        for year, split in pairs:
            if split not in ("train", "val", "test"):
                raise ConfigError(f"split_years names split {split!r}; use train, val or test")
            if out.get(year, split) != split:
                raise ConfigError(
                    f"year {year} is given to both {out[year]} and {split}; give each year one split"
                )
            out[year] = split
    return out


def _n_days(n: int, fraction: float) -> int:
    return 0 if fraction <= 0 else max(1, int(np.floor(n * fraction + 0.5)))


def holdout_tiles(plans: Sequence[SamplePlan], fraction: float, seed: int = 0) -> list[str]:
    """The tiles (labels `tYYxXX`) held out of training altogether: `round(fraction x tiles)` of them (at least one
    when `fraction` > 0), drawn with `seed`. Whole-region samples (no tiles) have none to hold out.

    Raises:
        ConfigError: `fraction` outside [0, 1), or it would hold out every tile.
    """
    if not 0 <= fraction < 1:
        raise ConfigError(f"holdout_tiles {fraction} must be in [0, 1): the fraction of tiles trained on by nobody")
    labels = sorted({p.tile_label for p in plans if p.tile is not None})
    if fraction == 0 or not labels:
        return []
    n = max(1, int(np.floor(len(labels) * fraction + 0.5)))
    if n >= len(labels):
        raise ConfigError(f"holdout_tiles {fraction} would hold out all {len(labels)} tiles; lower it")
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(labels, size=n, replace=False).tolist())


def assign_splits(
    plans: Sequence[SamplePlan],
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    split_years: dict[str, list[int]] | dict[int, str] | None = None,
    held_tiles: Sequence[str] = (),
) -> list[SamplePlan]:
    """Assign train/val/test in contiguous blocks of whole days, deterministically.

    A plan belongs to the UTC day of its `time_start` (a window that straddles a boundary goes with its start day).
    Years pinned in `split_years` go to their split. The other days, in time order, are cut into blocks: the last
    `test_fraction` of them is test, the `val_fraction` before it val, the rest train (a split with pinned years gets no
    fraction). A non-zero fraction gets at least one day while train keeps one; a split left empty is logged.

    Args:
        plans: the plans of `plan_samples`.
        val_fraction: share of the (unpinned) days for val.
        test_fraction: share of the (unpinned) days for test.
        split_years: `{"val": [2019], "test": [2020]}` (or `{2019: "val", 2020: "test"}`); other years are train,
            unless `train` is listed, in which case an unlisted year is an error.
        held_tiles: tile labels (`holdout_tiles`) whose every window goes to test: a spatial hold-out, locations
            that neither train nor val ever sees.

    Returns:
        New plans, in the same order, with `split` set.

    Raises:
        ConfigError: fractions outside [0, 1) or summing to 1 or more, unknown split names, a year in two splits, or
            plan years missing from an explicit `train` list.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ConfigError(
            f"val_fraction {val_fraction} and test_fraction {test_fraction} must be in [0, 1) and leave train days"
        )
    years = _year_map(split_years)
    days = [p.time_start.normalize() for p in plans]
    if "train" in years.values():
        unlisted = sorted({d.year for d in days} - set(years))
        if unlisted:
            raise ConfigError(f"year(s) {unlisted} are in no split of split_years; list them or drop 'train'")
    free = sorted({d for d in days if d.year not in years})
    fractions = {s: f for s, f in (("test", test_fraction), ("val", val_fraction)) if s not in years.values()}
    counts = {s: _n_days(len(free), f) for s, f in fractions.items()}
    for split in ("val", "test"):  # keep one train day: take back from val first
        while counts.get(split, 0) and sum(counts.values()) >= len(free):
            counts[split] -= 1
    n_test, n_val = counts.get("test", 0), counts.get("val", 0)
    by_day = {d: "test" if i >= len(free) - n_test else "val" if i >= len(free) - n_test - n_val else "train"
              for i, d in enumerate(free)}  # fmt: skip
    held = set(held_tiles)
    out = [replace(p, split="test" if p.tile_label in held else years.get(d.year) or by_day[d])
           for p, d in zip(plans, days, strict=True)]  # fmt: skip
    found = {p.split for p in out}
    for split in [s for s, f in fractions.items() if f > 0] + list(set(years.values())):
        if split not in found:
            logger.warning("split %s is empty (%d day(s) to share); lengthen the period or change the fractions",
                           split, len(free))  # fmt: skip
    straddle = sum(1 for p, d in zip(out, days, strict=True)
                   if by_day.get((p.time_end - pd.Timedelta(microseconds=1)).normalize(), p.split) != p.split)  # fmt: skip
    if straddle:
        logger.info(
            "%d window(s) reach into the next split's first day; assigned by their start day", straddle
        )
    return out
