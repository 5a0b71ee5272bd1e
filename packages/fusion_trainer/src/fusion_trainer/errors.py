"""Errors of fusion_trainer. User mistakes (ConfigError) are kept apart from runtime failures.

Every message states what failed, the actual value, and the next step.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "FusionError",
    "ModelError",
    "TrainingError",
    "UnsupportedArchitectureError",
]


class FusionError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(FusionError, ValueError):
    """Invalid FusionConfig/TrainConfig values or flags (all problems listed at once), or a batch layout that does not
    fit (micro x accumulation x world != global batch)."""


class UnsupportedArchitectureError(ConfigError):
    """The base model's architecture is not in the registry; the message lists the supported ones."""


class ModelError(FusionError):
    """The base model cannot be loaded (missing path, unreadable weights), or adapter weights do not match the base
    (different fingerprint)."""


class DataError(FusionError):
    """The dataset cannot be used: unknown reference, unsupported schema version, a shard that is truncated or fails its
    checksum, a sample that breaks the contract. The message names the shard or sample."""


class CheckpointError(FusionError):
    """A checkpoint is missing, incomplete or belongs to a different run configuration."""


class TrainingError(FusionError):
    """Training cannot go on: NaN/inf loss (the message names the step, batch keys and last good checkpoint)."""
