"""Adapter files: the trainable weights (`adapter.safetensors`) and `fusion_config.json` (the fusion config, the base
and its fingerprint), written by `FusionModel.save_adapter` and read back onto the same base by
`FusionModel.load_adapter`."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .config import FusionConfig
from .errors import ModelError

if TYPE_CHECKING:
    from .model import FusionModel

__all__ = ["ADAPTER_FILE", "CONFIG_FILE"]

logger = logging.getLogger(__name__)

ADAPTER_FILE = "adapter.safetensors"
CONFIG_FILE = "fusion_config.json"


def _save_adapter(
    model: FusionModel, directory: str | os.PathLike[str], state_dict: Mapping[str, Tensor] | None
) -> Path:
    """`FusionModel.save_adapter`: both files written atomically (temp sibling + rename), the config last."""
    from . import __version__

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = dict(state_dict) if state_dict is not None else model.fusion_state_dict()
    unknown = sorted(set(state) - {n for n, _ in model.fusion_named_parameters()})
    if unknown:
        raise ModelError(f"save_adapter: {unknown[:5]} are not trainable parameters of this model")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    tmp = out / f".{ADAPTER_FILE}.{os.getpid()}.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt", "fusion": model.config.fusion})
    tmp.replace(out / ADAPTER_FILE)
    record = model.config.model_dump(mode="json")
    record["base_fingerprint"] = model.base_fingerprint
    record["fusion_trainer_version"] = __version__
    tmp = out / f".{CONFIG_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    tmp.replace(out / CONFIG_FILE)
    logger.info("adapter (%d tensors) saved to %s", len(tensors), out)
    return out


def _load_adapter(
    cls: type[FusionModel],
    directory: str | os.PathLike[str],
    base: str | os.PathLike[str] | PreTrainedModel | None,
    dtype: torch.dtype | None,
    tokenizer: PreTrainedTokenizerBase | None,
) -> FusionModel:
    """`FusionModel.load_adapter`: the config and weights of `directory` onto the base it names (or `base`)."""
    folder = Path(directory)
    config_path, weights_path = folder / CONFIG_FILE, folder / ADAPTER_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise ModelError(f"{folder} is not an adapter folder: it needs {CONFIG_FILE} and {ADAPTER_FILE}")
    record: dict[str, Any] = json.loads(config_path.read_text(encoding="utf-8"))
    expected = record.pop("base_fingerprint", None)
    record.pop("fusion_trainer_version", None)
    config = FusionConfig.model_validate(record)
    chosen = base if base is not None else config.base
    if chosen is None:
        raise ModelError(f"{config_path} names no base model; pass base=PATH_OR_ID")
    model = cls.from_base(chosen, config, dtype=dtype, tokenizer=tokenizer)
    if expected is not None and model.base_fingerprint != expected:
        raise ModelError(
            f"the adapter in {folder} was trained on base {config.base!r} ({expected}), but {model.config.base!r} "
            f"has fingerprint {model.base_fingerprint}; load it onto the original base weights"
        )
    model.load_fusion_state_dict(load_file(str(weights_path)))
    logger.info("adapter %s loaded onto %s", folder, model.config.base)
    return model
