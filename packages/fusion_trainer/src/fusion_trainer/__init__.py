"""fusion_trainer: DeepSpeed ZeRO training of a frozen causal LM fused with a trainable climate encoder.

The model API users script against is exported here. The torch/transformers-heavy names are imported on first use,
so `import fusion_trainer` (and its config and errors) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    CheckpointError,
    ConfigError,
    DataError,
    FusionError,
    ModelError,
    TrainingError,
    UnsupportedArchitectureError,
)
from .fusion_config import FusionConfig, FusionSettings
from .version import __version__

if TYPE_CHECKING:
    from .model.base import fetch_smollm2, fingerprint_base, load_base
    from .model.encoder import ClimateEncoder, ClimateTokens
    from .model.fusion_model import FusionModel
    from .model.registry import MemoryEstimate, architecture_for, preset_config, supported_architectures
    from .model.tiny import make_tiny_model
    from .runs import FusionRun, load_run


_LAZY = {
    "FusionModel": "model.fusion_model",
    "ClimateEncoder": "model.encoder",
    "ClimateTokens": "model.encoder",
    "MemoryEstimate": "model.registry",
    "architecture_for": "model.registry",
    "preset_config": "model.registry",
    "supported_architectures": "model.registry",
    "FusionRun": "runs",
    "load_run": "runs",
    "fetch_smollm2": "model.base",
    "fingerprint_base": "model.base",
    "load_base": "model.base",
    "make_tiny_model": "model.tiny",
}

__all__ = [
    "CheckpointError",
    "ClimateEncoder",
    "ClimateTokens",
    "ConfigError",
    "DataError",
    "FusionConfig",
    "FusionSettings",
    "FusionError",
    "FusionModel",
    "FusionRun",
    "MemoryEstimate",
    "ModelError",
    "TrainingError",
    "UnsupportedArchitectureError",
    "__version__",
    "architecture_for",
    "fetch_smollm2",
    "fingerprint_base",
    "load_base",
    "load_run",
    "make_tiny_model",
    "preset_config",
    "supported_architectures",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fusion_trainer' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
