"""The records a stream passes along: a sample as read from a shard (`RawSample`) and decoded (`Sample`), and where a
rank stands in the data (`DataPosition`, kept in checkpoints)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["BadSampleHook", "DataPosition", "RawSample", "Sample"]


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

    `shard_reader.iter_shard` parses a shard in place: the climate member is a `memoryview` of the shard's bytes
    (`shards.shuffle_samples` copies it when the sample would keep a shard alive alone); the other members are
    `bytes`."""

    key: str
    shard: str
    members: dict[str, bytes | memoryview]
    decoded: Sample | None = None


BadSampleHook = Callable[[str, str, str], None]
"""`(shard, key, reason)`: called for each bad sample that is skipped instead of raised."""


@dataclass(frozen=True)
class DataPosition:
    """Where a rank stands in the data: samples consumed in `epoch` (the same on every rank), the data seed, and the
    number of lanes the epoch's order was cut into (`ClimateTextStream(lanes=...)`; 1 in checkpoints written before
    lanes existed) and the length grouping of the batches (`ClimateTextStream(length_groups=...)`; 1 before it
    existed)."""

    epoch: int = 0
    consumed: int = 0
    seed: int = 0
    lanes: int = 1
    length_groups: int = 1

    def to_dict(self) -> dict[str, int]:
        """Plain dict for checkpoints."""
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DataPosition:
        """Inverse of `to_dict`."""
        return cls(
            epoch=int(raw["epoch"]), consumed=int(raw["consumed"]), seed=int(raw["seed"]),
            lanes=int(raw.get("lanes", 1)), length_groups=int(raw.get("length_groups", 1)),
        )  # fmt: skip
