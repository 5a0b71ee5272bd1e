"""Starting ranks: N local processes through the DeepSpeed launcher, or the environment of one process.

`fusion-train --nproc N` re-invokes the same entry point (`python -m fusion_trainer.cli train ...`) under
`python -m deepspeed.launcher.runner --num_gpus N --master_port FREE --no_local_rank --module`; each rank then finds
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT in its environment, exactly as under `deepspeed` or
`torchrun` on a cluster. Measured here: the DeepSpeed launcher starts CPU ranks when DS_ACCELERATOR=cpu (it sets
CUDA_VISIBLE_DEVICES, which the CPU accelerator ignores); we also give each rank OMP_NUM_THREADS = cores / N.
A process started without a launcher sets RANK=0, WORLD_SIZE=1, LOCAL_RANK=0, MASTER_ADDR=127.0.0.1 and a free
MASTER_PORT itself.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "DistEnv",
    "build_launch_command",
    "clear_self_env",
    "ensure_dist_env",
    "free_port",
    "launch_local",
    "stale_build_locks",
    "under_launcher",
]

logger = logging.getLogger(__name__)

_SELF_SET = "FUSION_TRAINER_SELF_LAUNCHED"


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job."""

    rank: int
    world: int
    local_rank: int
    launched: bool = True
    """False when this process set its own one-rank layout (no launcher)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def under_launcher() -> bool:
    """True when a launcher (deepspeed, torchrun, slurm wrappers) started this process."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def ensure_dist_env() -> DistEnv:
    """Read the rank layout from the environment, setting a one-process layout when no launcher did.

    Raises:
        ValueError: RANK/WORLD_SIZE/LOCAL_RANK are present but not integers.
    """
    self_set = not under_launcher() or os.environ.get(_SELF_SET) == "1"
    if self_set:
        # a fresh port each time: one process may run several trainings one after the other (tests, notebooks)
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.update(MASTER_PORT=str(free_port()), **{_SELF_SET: "1"})
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError as exc:
        raise ValueError(
            f"RANK={os.environ.get('RANK')!r} WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} "
            f"LOCAL_RANK={os.environ.get('LOCAL_RANK')!r} must be integers (set by the launcher)"
        ) from exc
    return DistEnv(rank=rank, world=world, local_rank=local, launched=not self_set)


def clear_self_env() -> None:
    """Remove the one-rank layout `ensure_dist_env` set (so it does not leak into later code or subprocesses)."""
    if os.environ.get(_SELF_SET) == "1":
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", _SELF_SET):
            os.environ.pop(key, None)


def stale_build_locks(max_age_s: float = 600.0) -> list[str]:
    """Lock files of torch C++ extension builds (DeepSpeed compiles its CPU ops on first use) older than `max_age_s`.

    A process killed while building (kill -9, OOM) leaves its `lock` behind and every later process that needs the
    op waits for it forever, silently. The lock records no owner, so age is the only hint; each one found is logged
    as a warning naming the file and the way out.
    """
    import time
    from pathlib import Path

    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    now = time.time()
    stale = []
    for lock in sorted([*root.glob("*/lock"), *root.glob("*/*/lock")]):
        try:
            age = now - lock.stat().st_mtime
        except FileNotFoundError:
            continue
        if age > max_age_s:
            stale.append(str(lock))
            logger.warning(
                "%s is %.0f minutes old: a process killed while compiling a DeepSpeed/torch extension left it, and "
                "this run will wait for it forever; if no compiler is running, delete it",
                lock,
                age / 60,
            )
    return stale


def build_launch_command(nproc: int, args: Sequence[str], module: str = "fusion_trainer.cli") -> list[str]:
    """The DeepSpeed launcher command that runs `python -m MODULE *args` on `nproc` local ranks."""
    return [
        sys.executable, "-m", "deepspeed.launcher.runner",
        "--num_gpus", str(nproc), "--num_nodes", "1", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), "--no_local_rank", "--module", module, *args,
    ]  # fmt: skip


def launch_local(nproc: int, args: Sequence[str], module: str = "fusion_trainer.cli") -> int:
    """Run `python -m MODULE *args` on `nproc` local ranks through the DeepSpeed launcher; return its exit code.

    On a machine without CUDA the ranks use DeepSpeed's CPU accelerator with OMP_NUM_THREADS = cores / nproc.
    The launcher stops every rank when one fails, and exits non-zero.
    """
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", _SELF_SET):
        env.pop(key, None)
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    cmd = build_launch_command(nproc, args, module)
    logger.info("launching %d local ranks: %s", nproc, " ".join(cmd))
    return subprocess.run(cmd, env=env, check=False).returncode
