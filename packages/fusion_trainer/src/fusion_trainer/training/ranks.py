"""A rank's view of the job it belongs to: the collective timeout, a lost peer, the shared RUN_DIR.

On one node a failed rank is stopped by the launcher with its siblings; across nodes the other nodes' ranks learn it
only from their collectives: at once when the connection closes (the machine or process died), after
`dist_timeout_s` when the peer falls silent (a stopped process, a network partition). Either way the rank fails with
one `TrainingError` naming the newest checkpoint and `--resume`, and its launcher stops the node.
"""

from __future__ import annotations

import datetime
import re
import socket
import uuid
from pathlib import Path
from typing import Any

import torch

from fusion_trainer.errors import ConfigError, TrainingError

from .checkpoint import find_latest_checkpoint

__all__ = ["check_shared_run_dir", "lost_ranks_error", "raised_by_a_collective", "set_collective_timeout"]


def set_collective_timeout(seconds: float) -> datetime.timedelta:
    """Make `seconds` the timeout of every process group this process creates, DeepSpeed's own included; return it
    (for `init_distributed`).

    DeepSpeed runs ZeRO's collectives on groups it creates with `new_group()`, which take torch's default timeout
    (30 minutes for gloo), not the one given to `init_distributed`; torch reads that default from these two module
    attributes each time it creates a group. Measured: without this, a rank whose peer on another node was stopped
    (SIGSTOP) waited in a ZeRO-2 collective for more than 10 minutes with `dist_timeout_s: 15`.
    """
    from torch.distributed import distributed_c10d

    timeout = datetime.timedelta(seconds=seconds)
    distributed_c10d.default_pg_timeout = timeout
    if hasattr(distributed_c10d, "default_pg_nccl_timeout"):
        distributed_c10d.default_pg_nccl_timeout = timeout
    return timeout


def raised_by_a_collective(exc: BaseException) -> bool:
    """True for torch's DistError and for the RuntimeError gloo raises from inside torch.distributed (a closed
    connection, a timeout)."""
    if isinstance(exc, torch.distributed.DistError):
        return True
    tb, last = exc.__traceback__, ""
    while tb is not None:
        last, tb = tb.tb_frame.f_code.co_filename, tb.tb_next
    return "torch/distributed/" in last.replace("\\", "/")


def lost_ranks_error(exc: BaseException, run_dir: Path, rank: int, world: int) -> TrainingError:
    """The error of a rank whose collective failed: another rank (on this node or another) stopped, or the network
    between them did (torch raises DistError: a closed connection at once, silence after `dist_timeout_s`)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    detail = re.sub(r"^\[[^\]]*\]\s*", "", text).split(". This is typically")[0]  # gloo's source position, advice
    ckpt = find_latest_checkpoint(run_dir)
    return TrainingError(
        f"rank {rank} of {world} lost contact with the other ranks ({detail}): a rank on this or another node "
        f"stopped (see its log) or the network between the nodes failed; restart every node's command with "
        f"--resume (newest checkpoint: {ckpt or 'none'})"
    )


def check_shared_run_dir(run_dir: Path, rank: int, world: int) -> None:
    """Every rank must see the RUN_DIR rank 0 writes (checkpoints are one folder written by all ranks).

    Rank 0 writes a fresh token into RUN_DIR; each rank reads it back and the answers are gathered, so a node whose
    `out` is a local folder of its own fails at start, on every rank, with the same message.

    Raises:
        ConfigError: some rank cannot read the token.
    """
    if world == 1:
        return
    token = [uuid.uuid4().hex if rank == 0 else None]
    torch.distributed.broadcast_object_list(token, src=0)
    marker = run_dir / ".shared-check"
    if rank == 0:
        tmp = run_dir / ".shared-check.tmp"
        tmp.write_text(str(token[0]), encoding="utf-8")
        tmp.replace(marker)
    torch.distributed.barrier()
    try:
        sees = marker.read_text(encoding="utf-8") == token[0]
    except OSError:
        sees = False
    views: list[Any] = [None] * world
    torch.distributed.all_gather_object(views, (socket.gethostname(), sees))
    blind = [f"rank {r} on {host}" for r, (host, ok) in enumerate(views) if not ok]
    if blind:
        raise ConfigError(
            f"out: {run_dir} is not shared by every rank ({', '.join(blind)} cannot read what rank 0 wrote there): "
            "the ranks of a job of several nodes write one checkpoint folder together, so mount one file system at "
            "the same path on every node (NFS, Lustre, a ReadWriteMany volume) and pass it as --out"
        )
