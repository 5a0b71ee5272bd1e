"""Checkpoints of a run: DeepSpeed state of the trainable part, data position, RNG states, and the final adapter.

Layout: `RUN_DIR/checkpoints/step<N>/` holds DeepSpeed's files (saved with `exclude_frozen_parameters=True`, so never
the frozen base), `rng_rank<R>.json` per rank (plain JSON, never a pickle), `CHECKSUMS.json` (the sha256 of every file,
checked before a resume loads any of them) and `COMPLETE` (written last by rank 0: a checkpoint exists if and only if
its marker exists). DeepSpeed's files are torch pickles: they are read with `torch.load(weights_only=True)` (plus
DeepSpeed's few plain settings classes, `safe_torch_load`), never with DeepSpeed's own `weights_only=False`. `RUN_DIR/final/` holds the adapter (`model.save_adapter`).

ZeRO-3 parameter gathering lives only in this module (`deepspeed.zero.GatheredParameters`).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib
import json
import logging
import pickle
import random
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fusion_trainer.errors import CheckpointError

__all__ = [
    "CHECKPOINTS_DIR",
    "CHECKSUMS_FILE",
    "COMPLETE_MARKER",
    "FINAL_DIR",
    "checkpoint_tensor_names",
    "export_adapter",
    "find_latest_checkpoint",
    "frozen_digest",
    "gathered",
    "load_checkpoint",
    "safe_torch_load",
    "save_checkpoint",
    "verify_checksums",
]

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
COMPLETE_MARKER = "COMPLETE"
CHECKSUMS_FILE = "CHECKSUMS.json"
"""sha256 of every file of a checkpoint folder, written by rank 0 before COMPLETE; checked before a resume loads."""
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


def _tensor_text(t: torch.Tensor) -> str:
    return base64.b64encode(t.to("cpu").contiguous().numpy().tobytes()).decode("ascii")


def _text_tensor(text: Any) -> torch.Tensor:
    if not isinstance(text, str):
        raise ValueError("a generator state is not base64 text")
    return torch.frombuffer(bytearray(base64.b64decode(text, validate=True)), dtype=torch.uint8).clone()


def _rng_state() -> dict[str, Any]:
    """Every RNG state of this process as plain JSON (never a pickle): Python's, numpy's, torch's, CUDA's."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "format": 1,
        "python": {"version": int(version), "state": [int(w) for w in words], "gauss": gauss},
        "numpy": {"kind": str(kind), "keys": [int(k) for k in keys], "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "torch": _tensor_text(torch.get_rng_state()),
    }  # fmt: skip
    if torch.cuda.is_available():
        state["cuda"] = [_tensor_text(t) for t in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `_rng_state`; raises ValueError/KeyError/TypeError on a state of another shape."""
    py, npy = state["python"], state["numpy"]
    gauss = py["gauss"]
    if gauss is not None and not isinstance(gauss, float):
        raise ValueError("python.gauss is not a float")
    random.setstate((int(py["version"]), tuple(int(w) for w in py["state"]), gauss))
    np.random.set_state((str(npy["kind"]), np.array(npy["keys"], dtype=np.uint32), int(npy["pos"]),
                         int(npy["has_gauss"]), float(npy["cached_gaussian"])))  # fmt: skip
    torch.set_rng_state(_text_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_text_tensor(t) for t in state["cuda"]])


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _write_checksums(folder: Path) -> None:
    """`CHECKSUMS.json`: the sha256 of every file of a checkpoint folder, written before its COMPLETE marker."""
    files = {
        p.relative_to(folder).as_posix(): _file_sha256(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in (COMPLETE_MARKER, CHECKSUMS_FILE) and not p.name.startswith(".")
    }
    tmp = folder / f".{CHECKSUMS_FILE}.tmp"
    tmp.write_text(json.dumps({"sha256": files}, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(folder / CHECKSUMS_FILE)


def verify_checksums(folder: Path) -> None:
    """Check every file of a checkpoint folder against its `CHECKSUMS.json` before anything of it is loaded.

    DeepSpeed's own files are pickles (its loader unpickles them, `torch.load(weights_only=False)`); this check makes
    sure they are the files this run wrote: none changed, none added, none missing.

    Raises:
        CheckpointError: no CHECKSUMS.json, or a file that differs from it, is missing or is not listed.
    """
    listing = folder / CHECKSUMS_FILE
    try:
        recorded = json.loads(listing.read_text(encoding="utf-8"))["sha256"]
        if not isinstance(recorded, dict):
            raise TypeError("sha256 is not a mapping")
    except FileNotFoundError as exc:
        raise CheckpointError(
            f"{folder} has no {CHECKSUMS_FILE} (written before checkpoints recorded their checksums, or altered): its "
            "files cannot be verified and are not loaded; resume from a newer checkpoint or start a new run"
        ) from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{listing} is damaged ({exc}): the checkpoint is not loaded") from exc
    present = {
        p.relative_to(folder).as_posix(): p
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in (COMPLETE_MARKER, CHECKSUMS_FILE) and not p.name.startswith(".")
    }
    problems = []
    for name in sorted(set(present) - set(recorded)):
        problems.append(f"{name} is not in {CHECKSUMS_FILE} (added after the save)")
    for name, digest in sorted(recorded.items()):
        if name not in present:
            problems.append(f"{name} is missing")
        elif _file_sha256(present[name]) != digest:
            problems.append(f"{name} changed since it was saved")
    if problems:
        raise CheckpointError(
            f"{folder} fails its checksums ({'; '.join(problems[:5])}): it is not loaded (a changed checkpoint file "
            "could run code when unpickled); resume from another checkpoint or restore the folder from a copy"
        )


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
    rng = root / tag / f".rng_rank{rank}.json.tmp"
    rng.write_text(json.dumps(_rng_state()) + "\n", encoding="utf-8")
    rng.replace(root / tag / f"rng_rank{rank}.json")
    _barrier()
    if rank == 0:
        _write_checksums(root / tag)
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
    verify_checksums(ckpt)
    try:
        with _safe_deepspeed_loads(engine):
            path, client = engine.load_checkpoint(
                str(ckpt.parent), tag=ckpt.name, load_module_strict=False,
                load_optimizer_states=True, load_lr_scheduler_states=True,
            )  # fmt: skip
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{ckpt} holds an object that is not plain tensors and settings ({exc}); it is not loaded (unpickling "
            "it could run code): resume from another checkpoint"
        ) from exc
    except (RuntimeError, KeyError, ValueError, OSError) as exc:
        raise CheckpointError(
            f"cannot load {ckpt} into this model ({exc}); was it written by another config?"
        ) from exc
    if path is None or client is None:
        raise CheckpointError(f"DeepSpeed found no checkpoint in {ckpt}")
    rng_file = ckpt / f"rng_rank{rank}.json"
    if rng_file.exists():
        try:
            _set_rng_state(json.loads(rng_file.read_text(encoding="utf-8")))
        except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as exc:
            raise CheckpointError(
                f"{rng_file} is not an RNG state this trainer wrote ({exc}); not resuming"
            ) from exc
    elif (ckpt / f"rng_rank{rank}.pt").exists():
        logger.warning("%s: rng_rank%d.pt is a pickle (checkpoints before RNG states were JSON) and is never loaded; "
                       "the random generators start from the run's seed", ckpt, rank)  # fmt: skip
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
        walk(file.stem, safe_torch_load(file))
    return out


def safe_torch_load(path: str | Path, map_location: Any = "cpu") -> Any:
    """`torch.load(weights_only=True)` that also admits the few plain settings classes DeepSpeed stores in its
    checkpoints (enums, loss-scaler settings); anything else is refused with `pickle.UnpicklingError`, never run."""
    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


def _deepspeed_safe_globals() -> list[Any]:
    """The non-tensor classes DeepSpeed's checkpoints hold (plain data: no code runs when they are rebuilt)."""
    found: list[Any] = []
    for module, name in _DEEPSPEED_GLOBALS:
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return found


_DEEPSPEED_GLOBALS: tuple[tuple[str, str], ...] = (
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),  # an IntEnum
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),  # a few numbers
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),  # a dataclass of two ints
)
"""(module, name) of the settings classes found in DeepSpeed's checkpoint files (ZeRO 0-3, fp32/bf16/fp16), by
`torch.serialization.get_unsafe_globals_in_checkpoint`; rebuilding them runs no code of the file's choosing."""


@contextlib.contextmanager
def _safe_deepspeed_loads(engine: Any) -> Iterator[None]:
    """Make DeepSpeed's checkpoint engine read with `safe_torch_load` (it calls torch.load(weights_only=False))."""
    ckpt_engine = getattr(engine, "checkpoint_engine", None)
    if ckpt_engine is None:
        yield
        return
    ckpt_engine.load = lambda path, map_location=None: safe_torch_load(path, map_location)
    try:
        yield
    finally:
        del ckpt_engine.load


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
            shutil.rmtree(old, ignore_errors=True)  # a run killed before removing it left one: replace would fail
            if final.exists():
                final.replace(old)
            tmp.replace(final)
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final
