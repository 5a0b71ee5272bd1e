"""Checkpoints of a run: DeepSpeed state of the trainable part, data position, RNG states, and the final adapter.

Layout: `RUN_DIR/checkpoints/step<N>/` holds DeepSpeed's files (saved with `exclude_frozen_parameters=True`, so never
the frozen base), `rng_rank<R>.pt` per rank and `COMPLETE` (written last by rank 0: a checkpoint exists if and only if
its marker exists). `RUN_DIR/final/` holds the adapter (`model.save_adapter`).

ZeRO-3 parameter gathering lives only in this module (`deepspeed.zero.GatheredParameters`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import random
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import CheckpointError

__all__ = [
    "CHECKPOINTS_DIR",
    "COMPLETE_MARKER",
    "FINAL_DIR",
    "checkpoint_tensor_names",
    "export_adapter",
    "find_latest_checkpoint",
    "frozen_digest",
    "gathered",
    "load_checkpoint",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
COMPLETE_MARKER = "COMPLETE"
FINAL_DIR = "final"
_TAG = re.compile(r"^step(\d+)$")


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _is_zero3_param(p: torch.nn.Parameter) -> bool:
    return hasattr(p, "ds_id")


@contextlib.contextmanager
def gathered(params: list[torch.nn.Parameter]) -> Iterator[None]:
    """Make ZeRO-3-partitioned `params` whole on every rank inside the block (a no-op for other stages)."""
    partitioned = [p for p in params if _is_zero3_param(p)]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


def frozen_digest(module: torch.nn.Module) -> str:
    """sha256 over the names and bytes of every frozen parameter (gathered one at a time under ZeRO-3)."""
    digest = hashlib.sha256()
    for name, param in module.named_parameters():
        if param.requires_grad:
            continue
        with gathered([param]):
            data = param.detach().to("cpu").contiguous()
            digest.update(name.encode())
            digest.update(str(data.dtype).encode())
            digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def _only_trainable_module_state(engine: Any) -> Iterator[None]:
    """Make `engine.module_state_dict(exclude_frozen_parameters=True)` drop every frozen entry.

    DeepSpeed drops a frozen parameter only when its `named_parameters()` name is also its state-dict key; modules
    that keep pretrained keys stable across wrapping (FusionLayer) break that match, and the base would leak into
    the checkpoint. Here frozen entries are found by identity (`state_dict(keep_vars=True)`), and buffers of the
    frozen LM (`lm.`) are dropped too.
    """
    original = engine.module_state_dict

    def filtered(*args: Any, **kwargs: Any) -> Any:
        state = original(*args, **kwargs)
        if kwargs.get("exclude_frozen_parameters"):
            for key, value in engine.module.state_dict(keep_vars=True).items():
                is_param = isinstance(value, torch.nn.Parameter)
                if (is_param and not value.requires_grad) or (not is_param and key.startswith("lm.")):
                    state.pop(key, None)
        return state

    engine.module_state_dict = filtered
    try:
        yield
    finally:
        del engine.module_state_dict  # back to the class method


def save_checkpoint(engine: Any, run_dir: Path, step: int, client_state: dict[str, Any], rank: int) -> Path:
    """Save the trainable state (never the frozen base), optimizer, scheduler, RNGs and `client_state`.

    Every rank must call this. Returns `RUN_DIR/checkpoints/step<step>`.
    """
    root = run_dir / CHECKPOINTS_DIR
    tag = f"step{step}"
    with _only_trainable_module_state(engine):
        engine.save_checkpoint(str(root), tag=tag, client_state=client_state, exclude_frozen_parameters=True)
    torch.save(_rng_state(), root / tag / f"rng_rank{rank}.pt")
    _barrier()
    if rank == 0:
        tmp = root / tag / f".{COMPLETE_MARKER}.tmp"
        tmp.write_text(json.dumps({"step": step, "world": engine.world_size}) + "\n", encoding="utf-8")
        tmp.replace(root / tag / COMPLETE_MARKER)
    _barrier()
    logger.info("saved checkpoint %s", root / tag)
    return root / tag


def find_latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder in RUN_DIR (highest step with a COMPLETE marker), or None."""
    root = run_dir / CHECKPOINTS_DIR
    if not root.is_dir():
        return None
    found = []
    for child in root.iterdir():
        match = _TAG.match(child.name)
        if match and (child / COMPLETE_MARKER).exists():
            found.append((int(match.group(1)), child))
    return max(found)[1] if found else None


def load_checkpoint(engine: Any, ckpt: Path, rank: int) -> dict[str, Any]:
    """Restore a checkpoint saved by `save_checkpoint` into `engine` and this rank's RNGs; return the client state.

    Raises:
        CheckpointError: the checkpoint is incomplete, written by a different number of ranks, or does not match the
            model's trainable parameters.
    """
    marker = ckpt / COMPLETE_MARKER
    if not marker.exists():
        raise CheckpointError(
            f"{ckpt} has no {COMPLETE_MARKER} marker: it is incomplete; delete it to resume earlier"
        )
    saved_world = int(json.loads(marker.read_text(encoding="utf-8"))["world"])
    if saved_world != engine.world_size:
        raise CheckpointError(
            f"{ckpt} was written by {saved_world} rank(s), this run has {engine.world_size}: resume with "
            f"--nproc {saved_world} (on several nodes: --nnodes x --nproc = {saved_world}; the data order depends on "
            "the world size)"
        )
    try:
        path, client = engine.load_checkpoint(
            str(ckpt.parent), tag=ckpt.name, load_module_strict=False,
            load_optimizer_states=True, load_lr_scheduler_states=True,
        )  # fmt: skip
    except (RuntimeError, KeyError, ValueError, OSError) as exc:
        raise CheckpointError(
            f"cannot load {ckpt} into this model ({exc}); was it written by another config?"
        ) from exc
    if path is None or client is None:
        raise CheckpointError(f"DeepSpeed found no checkpoint in {ckpt}")
    rng_file = ckpt / f"rng_rank{rank}.pt"
    if rng_file.exists():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    logger.info("resumed from %s (step %s)", ckpt, client.get("step"))
    return dict(client)


def checkpoint_tensor_names(ckpt: Path) -> dict[str, int]:
    """Every tensor stored in a checkpoint folder's model/optimizer files: {dotted name: numel} (for audits/tests)."""
    out: dict[str, int] = {}

    def walk(prefix: str, obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            out[prefix] = int(obj.numel())
        elif isinstance(obj, dict):
            for key, value in obj.items():
                walk(f"{prefix}.{key}" if prefix else str(key), value)
        elif isinstance(obj, list | tuple):
            for i, value in enumerate(obj):
                walk(f"{prefix}.{i}", value)

    for file in sorted(ckpt.glob("*.pt")):
        if file.name.startswith("rng_rank"):
            continue
        walk(file.stem, torch.load(file, map_location="cpu", weights_only=False))
    return out


def export_adapter(model: Any, run_dir: Path, rank: int, shapes: dict[str, torch.Size] | None = None) -> Path:
    """Write RUN_DIR/final/ (adapter.safetensors + fusion_config.json via `model.save_adapter`) atomically.

    Every rank must call this: under ZeRO-3 the trainable parameters are gathered first (the frozen base is not
    needed: its fingerprint was taken when the model was built). `shapes` gives the logical shape of parameters
    that training viewed differently (0-dim gates held as (1,)).
    """
    final = run_dir / FINAL_DIR
    named = list(model.fusion_named_parameters())
    with gathered([p for _, p in named]):
        if rank == 0:
            state = {name: param.detach().to("cpu", copy=True) for name, param in named}
            for name, shape in (shapes or {}).items():
                state[name] = state[name].reshape(shape)
            tmp = run_dir / f".{FINAL_DIR}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_adapter(tmp, state_dict=state)
            old = run_dir / f".{FINAL_DIR}.old"
            if final.exists():
                final.replace(old)
            tmp.replace(final)
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final
