"""Fixtures of the reliability suite: pristine synthetic granules, a real built version, flags of a tiny training run
(on `tiny_model_dir`, tests/conftest.py), and helpers that break things (granules, shards, the store, processes) the
way the real world does.

Every test states the fault, what the user sees and what is preserved (see docs/reliability.md).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from merra2_text_data import BuildConfig
from merra2_text_data.cli import app
from merra2_text_data.regions import parse_region
from merra2_text_data.source.synth import write_synthetic_granules
from typer.testing import CliRunner

from tests.tar_helpers import tar_bytes
from tests.tiny_model import TINY_FUSION_FLAGS

BBOX = "-100,40,-98,42"
"""A small box (5 x 4 MERRA-2 grid points): builds take about a second."""
START, END = dt.date(2019, 1, 1), dt.date(2019, 1, 12)
VARIABLES = "T2M,U10M,V10M,PRECTOTCORR"
"""Three M2T1NXSLV variables and one M2T1NXFLX variable: every build reads both collections."""
DATASET = "bbox-100_40_-98_42"
SHARD_SIZE = "48KB"
"""About three samples of the suite's box per shard (12 days: several train shards)."""
BIN = Path(sys.executable).parent

runner = CliRunner()


def build_args(source: Path | str, out: Path | str, *extra: str, end: dt.date = END) -> list[str]:
    """`merra2-text build` arguments over the suite's box and variables (START..end)."""
    return ["build", "--source", str(source), f"--region={BBOX}", "--start", str(START), "--end", str(end),
            "--variables", VARIABLES, "--shard-size", SHARD_SIZE, "--out", str(out), "-q", *extra]  # fmt: skip


def build_config(source: Path | str, out: Path | str, **options: Any) -> BuildConfig:
    """The same build as a BuildConfig (for in-process builds)."""
    values: dict[str, Any] = dict(region=BBOX, start=str(START), end=str(END), variables=VARIABLES,
                                  source=str(source), out=str(out), quiet=True, shard_size=SHARD_SIZE)  # fmt: skip
    values.update(options)
    return BuildConfig.from_options(**values)


def cli(*args: str) -> Result:
    """Run `merra2-text ARGS` in this process (stdout and stderr captured apart).

    The CLI points the root logger at the stderr it was given; that stream is closed after the call, so the root
    logger's handlers and level are put back.
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        return runner.invoke(app, list(args))
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def tool_env(**extra: str) -> dict[str, str]:
    """The environment of a CLI subprocess: CPU DeepSpeed, one thread, no inherited rank layout."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def run_tool(
    tool: str, *args: str, timeout: int = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run an installed console script (`merra2-text`, `fusion-train`, ...) in a subprocess."""
    return subprocess.run([str(BIN / tool), *args], capture_output=True, text=True, timeout=timeout,
                          env=env or tool_env(), check=False)  # fmt: skip


def last_json(stdout: str) -> Any:
    """The last line of stdout that is a JSON object."""
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


@pytest.fixture
def root_logging() -> Iterator[logging.Logger]:
    """The root logger, its handlers and level put back afterwards: a command line's `setup_logging` leaves a
    handler on this test's (soon closed) captured stderr, which later tests must not inherit."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    yield root
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in saved[0]:
        root.addHandler(handler)
    root.setLevel(saved[1])


@pytest.fixture(scope="session")
def granule_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Pristine synthetic granules (both collections) for START..END. Never modify: copy with `granules`."""
    out = tmp_path_factory.mktemp("granules")
    write_synthetic_granules(out, parse_region(BBOX), START, END, seed=7)
    return out


@pytest.fixture
def granules(granule_source: Path, tmp_path: Path) -> Path:
    """A private copy of the granules that a test may break."""
    folder = tmp_path / "granules"
    shutil.copytree(granule_source, folder)
    return folder


def granule(folder: Path, day: dt.date, collection: str = "slv") -> Path:
    """The file of one day of one collection (`slv` or `flx`) in a granule folder."""
    [path] = folder.glob(f"MERRA2_*.tavg1_2d_{collection}_Nx.{day:%Y%m%d}.nc4")
    return path


@pytest.fixture(scope="session")
def reference_build(granule_source: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A fault-free build of the suite's config (three samples per shard); its version is what every rerun after a
    fault must reach."""
    from merra2_text_data import build

    out = tmp_path_factory.mktemp("reference")
    return build(build_config(granule_source, out))


@pytest.fixture
def dataset(reference_build: str, tmp_path: Path) -> tuple[Path, str]:
    """A private copy of the reference version: (its version folder, its reference `ROOT/NAME@VERSION`)."""
    from climate_text_schema import open_dataset

    src = Path(open_dataset(reference_build).version_url)
    root = tmp_path / "datasets"
    shutil.copytree(src.parents[2], root)
    version = src.name
    return root / DATASET / "versions" / version, f"{root / DATASET}@{version}"


# --- shards ----------------------------------------------------------------------------------------------------------


def read_members(path: Path) -> list[tuple[str, bytes]]:
    """The (name, bytes) members of a tar, in order."""
    with tarfile.open(path) as tar:
        out = []
        for info in tar.getmembers():
            handle = tar.extractfile(info)
            assert handle is not None
            out.append((info.name, handle.read()))
        return out


def republish_shard(
    vdir: Path, shard: str, transform: Callable[[list[tuple[str, bytes]]], list[tuple[str, bytes]]]
) -> None:
    """Rewrite one shard through `transform(members)` and record its new size and sha256 in the manifest: a version
    whose checksums are consistent but whose content is bad (a buggy or hostile writer)."""
    path = vdir / shard
    data = tar_bytes(transform(read_members(path)))
    path.write_bytes(data)
    manifest = json.loads((vdir / "manifest.json").read_text())
    for info in manifest["shards"]:
        if info["path"] == shard:
            info["bytes"], info["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    rewrite_manifest(vdir, manifest)


def rewrite_manifest(vdir: Path, manifest: dict[str, Any]) -> None:
    """Write `manifest` as the version's manifest.json and its sibling digest (`manifest.json.sha256`): what a
    writer who rewrites a version consistently leaves behind (the tags are not touched)."""
    text = json.dumps(manifest, indent=2).encode()
    (vdir / "manifest.json").write_bytes(text)
    (vdir / "manifest.json.sha256").write_text(hashlib.sha256(text).hexdigest() + "\n")


def files_under(*roots: Path) -> list[Path]:
    """Every regular file under the roots."""
    return sorted(p for root in roots if root.exists() for p in root.rglob("*") if p.is_file())


TINY_TRAIN = [*TINY_FUSION_FLAGS, "--set", "max_length=192", "--set", "log_every=1",
              "--no-bf16", "--zero", "2", "--micro-batch", "2", "--lr", "1e-3"]  # fmt: skip
"""`fusion-train` flags of a tiny CPU run on `tiny_model_dir` (tests/conftest.py; hidden size 64)."""


@pytest.fixture(autouse=True)
def _cpu_deepspeed(cpu_deepspeed: None) -> None:
    """Every reliability test runs DeepSpeed on the CPU, one thread per process (`cpu_deepspeed`, tests/conftest.py)."""
