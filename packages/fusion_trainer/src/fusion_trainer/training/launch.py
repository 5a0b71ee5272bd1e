"""Starting ranks: N local processes through the DeepSpeed launcher (on one node or one of several), or the
environment of one process.

`fusion-train --nproc N` re-invokes the same entry point (`python -m fusion_trainer.cli train ...`) under
`python -m deepspeed.launcher.runner --num_gpus N --master_port FREE --no_local_rank --module`; each rank then finds
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT in its environment, exactly as under `deepspeed` or
`torchrun` on a cluster. Measured here: the DeepSpeed launcher starts CPU ranks when DS_ACCELERATOR=cpu (it sets
CUDA_VISIBLE_DEVICES, which the CPU accelerator ignores); we also give each rank OMP_NUM_THREADS = cores / N.
A process started without a launcher sets RANK=0, WORLD_SIZE=1, LOCAL_RANK=0, MASTER_ADDR=127.0.0.1 and a free
MASTER_PORT itself.

Several nodes without ssh (`--nnodes N --node-rank R --master-addr HOST --master-port PORT`): every node runs the
same command with its own R; each starts its K local ranks through the same launcher with `--no_ssh --node_rank R`
and a hostfile of N nodes x K slots written here (the launcher only counts its entries), so node R holds the global
ranks R*K .. R*K+K-1 and the N launchers meet at HOST:PORT. `--hostfile FILE` without `--node-rank` passes the file
to the launcher, which starts every node from this one over pdsh/ssh.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType

import torch

from fusion_trainer.errors import ConfigError

__all__ = [
    "DEFAULT_MASTER_PORT",
    "DistEnv",
    "NodeLayout",
    "build_launch_command",
    "clear_self_env",
    "ensure_dist_env",
    "free_port",
    "launch_local",
    "remove_shm_buffers",
    "stale_build_locks",
    "under_launcher",
]

logger = logging.getLogger(__name__)

_SELF_SET = "FUSION_TRAINER_SELF_LAUNCHED"
_RANK_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", _SELF_SET)

DEFAULT_MASTER_PORT = 29500
"""The rendezvous port of a multi-node job when `--master-port` is not given (torch's and DeepSpeed's default)."""
LOCAL_ADDR = "127.0.0.1"
"""Where the ranks of a one-node job meet (the name DeepSpeed also puts in its shared-memory buffers' names)."""


@dataclass(frozen=True)
class NodeLayout:
    """Where this node's ranks sit in a job of several nodes (the `fusion-train` launch flags).

    The default (one node) is what `--nproc N` alone does. With `nnodes > 1` every node runs the same command with
    its own `node_rank`; `master_addr` is the address of node 0, reachable from every node.
    """

    nnodes: int = 1
    node_rank: int | None = None
    master_addr: str | None = None
    master_port: int | None = None
    hostfile: str | None = None
    """A DeepSpeed hostfile (`host slots=K` lines): with `node_rank` unset, the launcher starts every node over
    pdsh/ssh; with `node_rank` set, it only lists the nodes (no ssh)."""

    @property
    def multi_node(self) -> bool:
        """True when this command launches ranks for a job of more than one node (or from a hostfile)."""
        return self.nnodes > 1 or self.hostfile is not None

    @property
    def no_ssh(self) -> bool:
        """True when each node starts its own ranks (`--node-rank` given), False when the launcher uses ssh."""
        return self.node_rank is not None

    def check(self) -> None:
        """Raise one ConfigError listing every inconsistent launch flag.

        Raises:
            ConfigError: a node rank outside 0..nnodes-1, several nodes without `--master-addr`, a node rank without
                several nodes, a port outside 1..65535, a hostfile that does not exist.
        """
        problems = []
        if self.nnodes < 1:
            problems.append(f"--nnodes {self.nnodes}: must be at least 1")
        if self.node_rank is not None and not 0 <= self.node_rank < max(self.nnodes, 1):
            problems.append(
                f"--node-rank {self.node_rank}: must be in 0..{self.nnodes - 1} (--nnodes {self.nnodes})"
            )
        if self.nnodes > 1 and self.hostfile is None and self.node_rank is None:
            problems.append(
                f"--nnodes {self.nnodes} needs --node-rank R (0..{self.nnodes - 1}, one command per node) or "
                "--hostfile FILE (the launcher starts every node over ssh)"
            )
        if self.no_ssh and self.nnodes > 1 and not self.master_addr:
            problems.append(
                f"--nnodes {self.nnodes} needs --master-addr HOST: the address of node 0, reachable from every node"
            )
        if self.master_port is not None and not 0 < self.master_port < 65536:
            problems.append(f"--master-port {self.master_port}: must be in 1..65535")
        if self.hostfile is not None and not Path(self.hostfile).is_file():
            problems.append(f"--hostfile {self.hostfile}: no such file (lines `HOST slots=K`)")
        if problems:
            raise ConfigError("launch flags:\n" + "\n".join(f"  - {p}" for p in problems))


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
        sock.bind((LOCAL_ADDR, 0))
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
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR=LOCAL_ADDR)
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
        for key in _RANK_KEYS:
            os.environ.pop(key, None)


def _builders_in(folder: Path) -> list[int] | None:
    """Pids of the live processes whose working directory is `folder` or below (a build runs its compiler there);
    None where /proc cannot tell (another OS)."""
    proc = Path("/proc")
    if not (proc / "self" / "cwd").exists():
        return None
    target = folder.resolve()
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = (entry / "cwd").resolve(strict=True)
        except (OSError, RuntimeError):
            continue  # gone, or another user's process
        if cwd == target or target in cwd.parents:
            found.append(int(entry.name))
    return found


def stale_build_locks(max_age_s: float = 600.0) -> list[str]:
    """Lock files of torch C++ extension builds (DeepSpeed compiles its CPU ops on first use) older than `max_age_s`.

    A process killed while building (kill -9, OOM) leaves its `lock` behind and every later process that needs the
    op waits for it forever, silently. The lock records no owner; a lock older than `max_age_s` whose build folder
    no live process works in (torch runs the compiler there) has a dead owner and is removed, with a warning; one
    whose folder is in use, or where /proc cannot tell, is only named in a warning with the way out.

    Returns:
        The stale locks found (removed or not).
    """
    import time

    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    now = time.time()
    stale = []
    for lock in sorted([*root.glob("*/lock"), *root.glob("*/*/lock")]):
        try:
            age = now - lock.stat().st_mtime
        except FileNotFoundError:
            continue
        if age <= max_age_s:
            continue
        stale.append(str(lock))
        builders = _builders_in(lock.parent)
        if builders == []:
            lock.unlink(missing_ok=True)
            logger.warning(
                "removed %s (%.0f minutes old, no process builds in %s): a process killed while compiling a "
                "DeepSpeed/torch extension left it, and this run would have waited for it forever",
                lock, age / 60, lock.parent,
            )  # fmt: skip
            continue
        logger.warning(
            "%s is %.0f minutes old: a process killed while compiling a DeepSpeed/torch extension left it, and "
            "this run will wait for it forever; if no compiler is running%s, delete it",
            lock, age / 60, f" (processes {builders} work in its folder)" if builders else "",
        )  # fmt: skip
    return stale


def build_launch_command(
    nproc: int,
    args: Sequence[str],
    module: str = "fusion_trainer.cli",
    layout: NodeLayout | None = None,
    hostfile: str | None = None,
) -> list[str]:
    """The DeepSpeed launcher command that runs `python -m MODULE *args` on `nproc` ranks of this node.

    Args:
        nproc: ranks per node.
        args: the module's arguments.
        module: the module every rank runs.
        layout: the node layout (default: one node, rendezvous on a free local port).
        hostfile: the hostfile the launcher reads (`layout.hostfile`, or the one `launch_local` writes for a job
            of several nodes without ssh).
    """
    layout = layout or NodeLayout()
    if not layout.multi_node:
        return [
            sys.executable, "-m", "deepspeed.launcher.runner",
            "--num_gpus", str(nproc), "--num_nodes", "1", "--master_addr", LOCAL_ADDR,
            "--master_port", str(layout.master_port or free_port()), "--no_local_rank", "--module", module, *args,
        ]  # fmt: skip
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile or layout.hostfile)]
    cmd += ["--num_gpus", str(nproc)]
    if layout.nnodes > 1:
        cmd += ["--num_nodes", str(layout.nnodes)]
    if layout.master_addr:
        cmd += ["--master_addr", layout.master_addr]
    cmd += ["--master_port", str(layout.master_port or DEFAULT_MASTER_PORT)]
    if layout.no_ssh:
        cmd += ["--no_ssh", "--node_rank", str(layout.node_rank)]
    return [*cmd, "--no_local_rank", "--module", module, *args]


def _write_hostfile(layout: NodeLayout, nproc: int) -> str:
    """A hostfile of `layout.nnodes` entries x `nproc` slots for the launcher's no-ssh mode (it reads only the count
    of entries and slots; the names are placeholders)."""
    fd, path = tempfile.mkstemp(prefix="fusion-hostfile-", suffix=".txt")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.writelines(f"node{i} slots={nproc}\n" for i in range(layout.nnodes))
    return path


def launch_local(
    nproc: int, args: Sequence[str], module: str = "fusion_trainer.cli", layout: NodeLayout | None = None
) -> int:
    """Run `python -m MODULE *args` on `nproc` ranks of this node through the DeepSpeed launcher; return its exit code.

    On a machine without CUDA the ranks use DeepSpeed's CPU accelerator with OMP_NUM_THREADS = cores / nproc.
    The launcher stops every rank of this node when one fails, and exits non-zero; a rank whose peer on another node
    stopped fails in its next collective (the connection closes) or after `dist_timeout_s`. SIGTERM or SIGINT to
    this process is passed on to the launcher, which stops the ranks (what Slurm and Kubernetes send first).

    Args:
        nproc: ranks on this node.
        args: the module's arguments.
        module: the module every rank runs.
        layout: where this node sits in a job of several nodes (default: one node).
    """
    layout = layout or NodeLayout()
    env = dict(os.environ)
    for key in _RANK_KEYS:  # an outer layout (a PyTorchJob's RANK = node rank) must not reach the ranks
        env.pop(key, None)
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    hostfile = _write_hostfile(layout, nproc) if layout.multi_node and layout.hostfile is None else None
    if not layout.multi_node and layout.master_port is None:
        layout = replace(layout, master_port=free_port())  # known here, so its shared memory can be removed after
    try:
        cmd = build_launch_command(nproc, args, module, layout, hostfile)
        where = f"node {layout.node_rank} of {layout.nnodes}: " if layout.no_ssh else ""
        logger.info("launching %s%d local ranks: %s", where, nproc, " ".join(cmd))
        return _run_forwarding_signals(cmd, env)
    finally:
        if hostfile is not None:
            os.unlink(hostfile)
        if not layout.multi_node:
            remove_shm_buffers(LOCAL_ADDR, int(layout.master_port or 0))


SHM_DIR = Path("/dev/shm")


def remove_shm_buffers(addr: str, port: int, folder: Path | None = None) -> list[str]:
    """Remove the shared-memory allreduce buffers DeepSpeed's CPU backend leaves behind for the job that met at
    `addr:port` (`deepspeed_allreduce_buffer_{uid}_{addr}_{port}_{rank}`, about 69 MB of RAM each, one per rank when
    every rank is on this node: DeepSpeed creates them and never unlinks them, so each two-rank run on a CPU kept
    138 MB of /dev/shm until reboot). Called once the ranks have exited; returns the names removed."""
    folder = SHM_DIR if folder is None else folder
    removed = []
    for path in folder.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_*"):
        if path.name.rsplit("_", 1)[-1].isdigit():
            path.unlink(missing_ok=True)
            removed.append(path.name)
    if removed:
        logger.debug("removed DeepSpeed's shared-memory buffers %s", removed)
    return removed


def _run_forwarding_signals(cmd: list[str], env: dict[str, str]) -> int:
    """Run `cmd`; SIGTERM/SIGINT here are passed as SIGTERM to it and every process under it (launcher and ranks:
    the DeepSpeed runner itself does not pass them on in its one-node path)."""
    import psutil

    proc = subprocess.Popen(cmd, env=env)

    def forward(signum: int, _frame: FrameType | None) -> None:
        logger.warning("received signal %d: stopping the ranks of this node", signum)
        try:
            tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for child in reversed(tree):  # the ranks first, so no launcher restarts or waits on them
            try:
                child.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                continue

    main_thread = threading.current_thread() is threading.main_thread()  # handlers can only be set there
    previous = (
        {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)} if main_thread else {}
    )
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
