"""The records a stream passes along: a sample as read from a shard (`RawSample`) and decoded (`Sample`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = ["BadSampleHook", "RawSample", "Sample"]


@dataclass(frozen=True)
class Sample:
    """One decoded sample: normalised climate `(T, V, H, W)`, its text and (from its `.json`) its window statistics
    `(V, 3)` (mean, min, max per variable, normalised like the climate; None when the sample has no `.json`)."""

    key: str
    shard: str
    climate_x: np.ndarray
    text: str
    stats: np.ndarray | None = None


@dataclass(frozen=True)
class RawSample:
    """One sample as read from a shard: its members' bytes, or (once checked by `skip_bad_samples`) decoded.

    `shards.iter_shard` parses a shard in place: a member is a `memoryview` of the shard's bytes until the sample is
    handed out with a copy of its own (`bytes`)."""

    key: str
    shard: str
    members: dict[str, bytes | memoryview]
    decoded: Sample | None = None


BadSampleHook = Callable[[str, str, str], None]
"""`(shard, key, reason)`: called for each bad sample that is skipped instead of raised."""
