"""Per-variable normalisation statistics over the train split: exact, streaming and mergeable across workers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from merra2_text_data.errors import BuildError

__all__ = ["NormAccumulator"]


class NormAccumulator:
    """Exact per-variable mean and standard deviation over train arrays, mergeable across workers.

    Keeps, per variable, the count, mean and sum of squared deviations (Chan et al.'s parallel update, float64): this
    is the sum / sum-of-squares scheme without its cancellation on large values such as SLP in Pa. NaN are ignored.

    Examples:
        >>> acc = NormAccumulator(["T2M"])
        >>> acc.update(np.full((2, 1, 3, 3), 280.0, dtype=np.float32))
        >>> acc.result()["T2M"]["mean"]
        280.0
    """

    def __init__(self, variables: Sequence[str]):
        self.variables = tuple(variables)
        n = len(self.variables)
        self.count = np.zeros(n, dtype=np.int64)
        self.mean = np.zeros(n, dtype=np.float64)
        self.m2 = np.zeros(n, dtype=np.float64)

    def update(self, array: np.ndarray) -> None:
        """Add one `[time, variable, lat, lon]` array (variables in this accumulator's order)."""
        if array.ndim != 4 or array.shape[1] != len(self.variables):
            raise BuildError(f"array of shape {array.shape} does not hold the {len(self.variables)} variables "
                             f"{', '.join(self.variables)} on axis 1")  # fmt: skip
        x = np.moveaxis(array, 1, 0).reshape(len(self.variables), -1).astype(np.float64)
        ok = np.isfinite(x)
        n = ok.sum(axis=1)
        mean = np.where(ok, x, 0.0).sum(axis=1) / np.maximum(n, 1)
        m2 = (np.where(ok, x - mean[:, None], 0.0) ** 2).sum(axis=1)
        self._combine(n, mean, m2)

    def _combine(self, n: np.ndarray, mean: np.ndarray, m2: np.ndarray) -> None:
        total = self.count + n
        safe = np.maximum(total, 1)
        delta = mean - self.mean
        self.mean = self.mean + delta * n / safe
        self.m2 = self.m2 + m2 + delta**2 * self.count * n / safe
        self.count = total

    def merge(self, other: NormAccumulator) -> NormAccumulator:
        """Fold another worker's accumulator into this one (same variables); returns self."""
        if other.variables != self.variables:
            raise BuildError(f"cannot merge accumulators of {other.variables} into {self.variables}")
        self._combine(other.count, other.mean, other.m2)
        return self

    def to_dict(self) -> dict[str, list[Any]]:
        """The state as JSON-ready lists (a worker's receipt); `from_dict` restores it."""
        return {"variables": list(self.variables), "count": self.count.tolist(), "mean": self.mean.tolist(),
                "m2": self.m2.tolist()}  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, list[Any]]) -> NormAccumulator:
        """Inverse of `to_dict`."""
        acc = cls(data["variables"])
        acc.count = np.asarray(data["count"], dtype=np.int64)
        acc.mean = np.asarray(data["mean"], dtype=np.float64)
        acc.m2 = np.asarray(data["m2"], dtype=np.float64)
        if not acc.count.shape == acc.mean.shape == acc.m2.shape == (len(acc.variables),):
            raise BuildError(f"normalisation state for {acc.variables} has mismatched lengths")
        return acc

    def result(self) -> dict[str, dict[str, float]]:
        """`{V: {"mean", "std"}}` (population std, floored to stay > 0).

        Raises:
            BuildError: a variable saw no finite value (no train samples).
        """
        empty = [v for v, n in zip(self.variables, self.count, strict=True) if n == 0]
        if empty:
            raise BuildError(f"no train values for {', '.join(empty)}: the train split is empty or all NaN; "
                             "lengthen the period or lower val/test fractions")  # fmt: skip
        std = np.sqrt(self.m2 / self.count)
        floor = np.maximum(np.abs(self.mean) * 1e-6, 1e-12)
        return {v: {"mean": float(self.mean[i]), "std": float(max(std[i], floor[i]))}
                for i, v in enumerate(self.variables)}  # fmt: skip
