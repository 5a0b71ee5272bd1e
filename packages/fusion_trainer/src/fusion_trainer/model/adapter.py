"""Adapter files: the trainable weights (`adapter.safetensors`) and `fusion_config.json` (the fusion config, the base
and its fingerprint), written by `FusionModel.save_adapter` and read back onto the same base by
`FusionModel.load_adapter`."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor

from fusion_trainer.errors import ModelError
from fusion_trainer.fusion_config import FusionConfig
from fusion_trainer.version import __version__

__all__ = ["ADAPTER_FILE", "CONFIG_FILE", "read_adapter_config", "read_adapter_weights", "write_adapter"]

logger = logging.getLogger(__name__)

ADAPTER_FILE = "adapter.safetensors"
CONFIG_FILE = "fusion_config.json"


def write_adapter(
    directory: str | os.PathLike[str],
    tensors: Mapping[str, Tensor],
    config: FusionConfig,
    base_fingerprint: str | None,
) -> Path:
    """Write `tensors` and the config record to `directory`, both atomically (temp sibling + rename), the config
    last (a folder with a config has its weights)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    tmp = out / f".{ADAPTER_FILE}.{os.getpid()}.tmp"
    save_file(cpu, str(tmp), metadata={"format": "pt", "fusion": config.fusion})
    tmp.replace(out / ADAPTER_FILE)
    record = config.model_dump(mode="json")
    record["base_fingerprint"] = base_fingerprint
    record["fusion_trainer_version"] = __version__
    tmp = out / f".{CONFIG_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    tmp.replace(out / CONFIG_FILE)
    logger.info("adapter (%d tensors) saved to %s", len(cpu), out)
    return out


def read_adapter_config(directory: str | os.PathLike[str]) -> tuple[FusionConfig, str | None]:
    """The fusion config of an adapter folder and the base fingerprint it recorded (None in older folders).

    Raises:
        ModelError: either file is missing.
        ConfigError: fusion_config.json is not a valid FusionConfig.
    """
    folder = Path(directory)
    config_path, weights_path = folder / CONFIG_FILE, folder / ADAPTER_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise ModelError(f"{folder} is not an adapter folder: it needs {CONFIG_FILE} and {ADAPTER_FILE}")
    record: dict[str, Any] = json.loads(config_path.read_text(encoding="utf-8"))
    expected = record.pop("base_fingerprint", None)
    record.pop("fusion_trainer_version", None)
    return FusionConfig.model_validate(record), expected


def read_adapter_weights(directory: str | os.PathLike[str]) -> dict[str, Tensor]:
    """The trainable weights of an adapter folder (safetensors: no code runs while reading)."""
    return load_file(str(Path(directory) / ADAPTER_FILE))
