"""Measured child processes for the benchmark scripts (`bench/build.py`, `bench/train.py`).

Each measured run is a fresh Python process running the same script as `SCRIPT --child KIND ARGS_JSON`; the child
does its work and prints one JSON object as its last line of stdout. The parent times the whole child (wall, imports
included) and reaps it with `os.wait4`.

Peak RSS: a child should report its own (`own_peak_rss_mib`, the kernel's VmHWM) as `"peak_rss_mib"` in its JSON.
`os.wait4`'s ru_maxrss is only the fallback: on Linux a child inherits its parent's peak across fork + exec, so it can
never report less than the parent had.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ChildRun", "dispatch_child", "own_peak_rss_mib", "run_child"]

CHILD_FLAG = "--child"
"""The flag that turns a benchmark script into one measured child: `--child KIND ARGS_JSON`."""


@dataclass(frozen=True)
class ChildRun:
    """What one measured child gave.

    Attributes:
        result: the JSON object of the child's last stdout line.
        wall_s: wall-clock seconds from start to exit, imports included.
        peak_rss_mib: the child's own peak RSS (its `peak_rss_mib`, else `os.wait4`'s ru_maxrss), MiB.
    """

    result: dict[str, Any]
    wall_s: float
    peak_rss_mib: float


def own_peak_rss_mib() -> float:
    """This process's own peak RSS in MiB: VmHWM from /proc, else getrusage's ru_maxrss (KiB on Linux).

    Returns:
        The peak resident set size so far, MiB.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_child(
    script: str | Path,
    kind: str,
    args: Mapping[str, Any],
    env: Mapping[str, str] | None = None,
    stderr_log: Path | None = None,
) -> ChildRun:
    """Run `python SCRIPT --child KIND ARGS_JSON` to its end and measure it.

    Args:
        script: the benchmark script (it must hand `--child` to `dispatch_child`).
        kind: which child function to run.
        args: its arguments (JSON-serialisable).
        env: the child's environment (default: this process's).
        stderr_log: where the child's stderr goes (created with its folder); default: this process's stderr.

    Returns:
        The child's JSON result, its wall time and its peak RSS.

    Raises:
        SystemExit: the child exited non-zero (the message holds the tail of its log, or of its stdout) or printed
            no JSON object last.
    """
    cmd = [sys.executable, str(script), CHILD_FLAG, kind, json.dumps(dict(args))]
    t0 = time.perf_counter()
    if stderr_log is None:
        out, status, usage = _reap(cmd, env, None)
    else:
        stderr_log.parent.mkdir(parents=True, exist_ok=True)
        with stderr_log.open("wb") as err:
            out, status, usage = _reap(cmd, env, err)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    text = out.decode(errors="replace")
    if code:
        where = (
            f"log {stderr_log}:\n{stderr_log.read_text(errors='replace')[-3000:]}"
            if stderr_log
            else text[-2000:]
        )
        raise SystemExit(f"{kind} child failed with exit code {code}; {where}")
    lines = text.strip().splitlines()
    try:
        result = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError) as exc:
        raise SystemExit(
            f"{kind} child printed no JSON result last; its stdout ended: {text[-2000:]!r}"
        ) from exc
    if not isinstance(result, dict):
        raise SystemExit(f"{kind} child's last line is not a JSON object: {lines[-1][:200]!r}")
    rss = result.get("peak_rss_mib") or usage.ru_maxrss / 1024.0  # ru_maxrss: KiB on Linux
    return ChildRun(result=result, wall_s=wall, peak_rss_mib=float(rss))


def _reap(cmd: Sequence[str], env: Mapping[str, str] | None, stderr: Any) -> tuple[bytes, int, Any]:
    """Start `cmd`, read all its stdout and reap it with `os.wait4` (its rusage comes only from there)."""
    proc = subprocess.Popen(
        list(cmd), stdout=subprocess.PIPE, stderr=stderr, env=None if env is None else dict(env)
    )
    assert proc.stdout is not None
    out = proc.stdout.read()
    proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    return out, status, usage


def dispatch_child(children: Mapping[str, Callable[[dict[str, Any]], None]], child: Sequence[str]) -> None:
    """Run the child named by `--child KIND ARGS_JSON` (the child side of `run_child`).

    Args:
        children: `{kind: function(args)}`; the function prints its JSON result as its last stdout line.
        child: the two values of `--child`: the kind and its JSON arguments.

    Raises:
        SystemExit: unknown kind.
    """
    kind, args = child
    if kind not in children:
        raise SystemExit(f"unknown child {kind!r}; known: {', '.join(sorted(children))}")
    children[kind](json.loads(args))
