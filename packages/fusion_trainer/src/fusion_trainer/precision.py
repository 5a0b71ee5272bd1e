"""Which float precision a run computes in: bf16 where the hardware runs it fast, else fp32 (`bf16: auto`).

bf16 halves the memory of the frozen base and is several times faster where the hardware has bf16 units (NVIDIA
Ampere and later, Intel CPUs with AVX512-BF16 or AMX). Elsewhere it can be ruinous: on an AMD EPYC with AVX2 only, a
bf16 matmul ran at 1.2 GFLOP/s against 60 in fp32, and a demo that trains in 5.5 s per step in fp32 logged no step in
12 minutes in bf16. So `auto` decides per machine:

- CUDA: bf16 if `torch.cuda.is_bf16_supported()`, else fp32.
- CPU: fp32 if oneDNN reports no bf16 support (no AVX512-BF16/AMX/AVX512 core, e.g. AVX2-only CPUs); otherwise a short
  timed probe (a square matmul in each precision, about 0.1 s in all) picks bf16 only if it runs at least
  `CPU_BF16_MIN_RATIO` of the fp32 rate (CPUs that emulate bf16 on AVX512 without bf16 instructions are slower in
  bf16 than in fp32).

The environment variable `FUSION_CPU_BF16` (`yes` / `no`) overrides the CPU's answer, e.g. to run on a CPU with bf16
as a machine without it would (`FUSION_CPU_BF16=no make demo`).
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import time
from dataclasses import dataclass
from typing import Literal

import torch

from .errors import ConfigError

__all__ = [
    "CPU_BF16_MIN_RATIO",
    "ENV_CPU_BF16",
    "CpuProbe",
    "Precision",
    "cpu_model",
    "machine_name",
    "probe_cpu",
    "resolve_precision",
]

logger = logging.getLogger(__name__)

CPU_BF16_MIN_RATIO = 0.8
"""On a CPU, bf16 is chosen only if its matmul rate is at least this fraction of the fp32 rate."""

ENV_CPU_BF16 = "FUSION_CPU_BF16"
"""`yes` / `no`: take this as the CPU's bf16 answer instead of probing it."""

BF16Setting = bool | Literal["auto"]


@dataclass(frozen=True)
class CpuProbe:
    """What the CPU does in bf16: oneDNN's support flag and, when supported, the measured matmul rates."""

    model: str
    onednn_bf16: bool
    fp32_gflops: float | None = None
    bf16_gflops: float | None = None
    forced: str | None = None

    @property
    def fast_bf16(self) -> bool:
        """True when bf16 is worth using on this CPU (see the module docstring)."""
        if self.forced is not None:
            return self.forced == "yes"
        if not self.onednn_bf16 or not self.fp32_gflops or self.bf16_gflops is None:
            return False
        return self.bf16_gflops >= CPU_BF16_MIN_RATIO * self.fp32_gflops

    def describe(self) -> str:
        """One line: the CPU, and why bf16 is or is not used on it."""
        if self.forced is not None:
            return f"CPU {self.model}: {ENV_CPU_BF16}={self.forced} (probe skipped)"
        if not self.onednn_bf16:
            return f"CPU {self.model}: no bf16 instructions (oneDNN reports no AVX512-BF16/AMX support)"
        return (
            f"CPU {self.model}: matmul {self.bf16_gflops:.0f} GFLOP/s in bf16 vs {self.fp32_gflops:.0f} in fp32 "
            f"(bf16 needs at least {CPU_BF16_MIN_RATIO:.0%} of fp32)"
        )


@dataclass(frozen=True)
class Precision:
    """The precision a run uses and why."""

    bf16: bool
    reason: str

    @property
    def dtype(self) -> torch.dtype:
        """torch.bfloat16 or torch.float32."""
        return torch.bfloat16 if self.bf16 else torch.float32

    @property
    def name(self) -> str:
        """`bf16` or `fp32`."""
        return "bf16" if self.bf16 else "fp32"


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), for logs and benchmark records."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_name() -> str:
    """The device this process computes on, for reports: the GPU's name, or the CPU's model and the CPUs it may use."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu_model()}, {cpus} CPUs"


def _onednn_bf16() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _matmul_gflops(dtype: torch.dtype, n: int = 384, budget_s: float = 0.05) -> float:
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    a @ b  # warm-up (oneDNN primitive creation)
    reps, start = 0, time.perf_counter()
    while True:
        a @ b
        reps += 1
        elapsed = time.perf_counter() - start
        if elapsed >= budget_s:
            return 2 * n**3 * reps / elapsed / 1e9


@functools.cache
def probe_cpu() -> CpuProbe:
    """Probe this CPU once per process (cached): oneDNN's bf16 flag, then the timed matmul when it is set.

    Raises:
        ConfigError: `FUSION_CPU_BF16` holds something other than yes/no.
    """
    forced = os.environ.get(ENV_CPU_BF16, "").strip().lower() or None
    if forced is not None:
        if forced not in ("yes", "no"):
            raise ConfigError(f"{ENV_CPU_BF16}={forced!r}: write yes or no, or unset it to probe the CPU")
        return CpuProbe(cpu_model(), onednn_bf16=forced == "yes", forced=forced)
    supported = _onednn_bf16()
    if not supported:
        return CpuProbe(cpu_model(), onednn_bf16=False)
    return CpuProbe(cpu_model(), True, _matmul_gflops(torch.float32), _matmul_gflops(torch.bfloat16))


def resolve_precision(setting: BF16Setting | str, device: torch.device | str | None = None) -> Precision:
    """Turn the `bf16` setting (True, False or "auto") into the precision to use on `device`.

    Args:
        setting: `TrainConfig.bf16`.
        device: where the model runs (default: CUDA when available, else the CPU).

    Returns:
        The choice and its reason (printed when training starts).

    Raises:
        ConfigError: an unknown setting.
    """
    if setting is True or setting is False:
        return Precision(bool(setting), f"bf16: {str(setting).lower()} in the config")
    if setting != "auto":
        raise ConfigError(f"bf16: {setting!r} is not true, false or auto")
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        ok = bool(torch.cuda.is_bf16_supported())
        return Precision(ok, f"bf16: auto on {name}: {'bf16 supported' if ok else 'no bf16 support'}")
    probe = probe_cpu()
    return Precision(probe.fast_bf16, f"bf16: auto on {probe.describe()}")
