"""Training metrics: metrics.jsonl, the one-line-per-interval log, throughput, peak memory and MFU.

MFU is model FLOPs per second over the device's peak: per token the frozen LM costs ~4 x its parameters (forward, and
the backward pass through it to reach the fusion layers) and the trainable part ~6 x its parameters. The peak is known
for a few GPUs (dense bf16); on the CPU MFU is null.
"""

from __future__ import annotations

import json
import logging
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "PEAK_BF16_FLOPS",
    "MetricsLog",
    "RunClock",
    "Throughput",
    "device_peak_flops",
    "flops_per_token",
    "log_rank_zero",
    "peak_memory_bytes",
    "process_rank",
    "read_metrics",
    "repair_jsonl_tail",
]

logger = logging.getLogger(__name__)

PEAK_BF16_FLOPS: dict[str, float] = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
}
"""Dense bf16 tensor-core peaks (FLOP/s) per device, matched as a substring of the CUDA device name."""


def process_rank() -> int:
    """This process's rank in the default process group (0 when there is none)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return int(torch.distributed.get_rank())
    return 0


def log_rank_zero(log: logging.Logger, msg: str, *args: Any, level: int = logging.INFO) -> None:
    """Log `msg` on rank 0 only (asks the process group for the rank; no global state)."""
    if process_rank() == 0:
        log.log(level, msg, *args)


def device_peak_flops(device: torch.device) -> float | None:
    """The bf16 peak of `device` if it is a known GPU, else None (CPU, unknown GPU)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for model, peak in PEAK_BF16_FLOPS.items():
        if model in name:
            return peak
    return None


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory so far: allocated GPU memory on CUDA, the process's peak RSS on the CPU."""
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def flops_per_token(n_trainable: int, n_frozen: int) -> float:
    """Model FLOPs per trained token: 6 x trainable + 4 x frozen parameters (see the module docstring)."""
    return 6.0 * n_trainable + 4.0 * n_frozen


class Throughput:
    """Samples and tokens counted between two `rate()` calls (wall clock)."""

    def __init__(self) -> None:
        self._t0 = time.perf_counter()
        self.samples = 0
        self.tokens = 0

    def add(self, samples: int, tokens: int) -> None:
        """Count one step's samples and tokens (all ranks)."""
        self.samples += samples
        self.tokens += tokens

    def rate(self) -> tuple[float, float]:
        """(samples/s, tokens/s) since the last call; resets the counters."""
        now = time.perf_counter()
        dt = max(now - self._t0, 1e-9)
        out = (self.samples / dt, self.tokens / dt)
        self._t0, self.samples, self.tokens = now, 0, 0
        return out


class RunClock:
    """Wall time per step of this run (from its first step, evaluations and checkpoints included) and the time left.

    Args:
        start_step: the step the run starts after (0, or the checkpoint's step on resume).
        last_step: the step it stops at.
    """

    def __init__(self, start_step: int, last_step: int) -> None:
        self._t0 = time.perf_counter()
        self.start_step, self.last_step = start_step, last_step
        self._reported = False

    def seconds_per_step(self, step: int) -> float | None:
        """Mean seconds per step so far (None before the first step)."""
        done = step - self.start_step
        return (time.perf_counter() - self._t0) / done if done > 0 else None

    def eta(self, step: int) -> float | None:
        """Estimated seconds from `step` to the last step at the rate so far."""
        per_step = self.seconds_per_step(step)
        return None if per_step is None else per_step * (self.last_step - step)

    def first_report(self, step: int) -> bool:
        """True once: at the first logged step after the start (when the estimate is first printed)."""
        if self._reported or step <= self.start_step:
            return False
        self._reported = True
        return True


class MetricsLog:
    """Appends one JSON object per record to RUN_DIR/metrics.jsonl (rank 0 only), and optionally to TensorBoard.

    Args:
        run_dir: the run folder.
        enabled: write at all (True on rank 0).
        tensorboard: also write TensorBoard scalars to RUN_DIR/tensorboard (needs the tensorboard package).
    """

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = False) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self._tb: Any = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                from .errors import ConfigError

                raise ConfigError(
                    "tensorboard: true needs the tensorboard package: pip install tensorboard"
                ) from exc
            self._tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (flushed at once, so a crash loses nothing already logged)."""
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=False) + "\n")
        if self._tb is not None:
            step = int(record.get("step", 0))
            prefix = "val" if record.get("split") == "val" else "train"
            for key, value in record.items():
                if isinstance(value, int | float) and not isinstance(value, bool) and key != "step":
                    self._tb.add_scalar(f"{prefix}/{key}", value, step)

    def truncate_after(self, step: int) -> None:
        """On resume from the checkpoint of `step`: keep the records of steps up to it only (the later ones are
        redone and logged again) and drop a line a killed run left half written. Atomic (temp file, rename)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [r for r in _complete_records(self.path) if int(r.get("step", 0)) <= step]
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(json.dumps(r, sort_keys=False) + "\n" for r in kept), encoding="utf-8")
        tmp.replace(self.path)

    def close(self) -> None:
        """Flush TensorBoard."""
        if self._tb is not None:
            self._tb.close()


def _complete_records(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL file; a last line without its newline (a write cut by a kill) is left out."""
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    complete, torn = lines[:-1], lines[-1]
    if torn.strip():
        logger.warning(
            "%s: ignoring a last line cut short (%d characters), left by a killed run", path, len(torn)
        )
    return [json.loads(line) for line in complete if line.strip()]


def repair_jsonl_tail(path: Path) -> None:
    """Cut a last line left half written by a killed process, so appending starts on a fresh line."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as fh:
            fh.truncate(data.rfind(b"\n") + 1)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Read RUN_DIR/metrics.jsonl (empty list when absent; a last line cut short by a kill is left out)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return _complete_records(path)
