"""Process death: `kill -9` at random moments.

- The build (`merra2-text build` in a subprocess, SIGKILL after a seeded random delay): a manifest exists only for a
  complete version (it verifies); the rerun ends with the fault-free version, byte for byte, and leaves no staging
  receipts, no temp files and no other version behind.
- A 2-rank training run (`fusion-train --nproc 2`, slow): one rank is killed mid-run; the launcher stops the other
  (no hang); `--resume` continues from the newest complete checkpoint with the same data order and the same losses
  for the steps it redoes, and finishes.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from climate_text_schema import open_dataset
from merra2_text_data.versions import gc

from .conftest import DATASET, build_args, cli, tool_env


def _temps(*roots: Path) -> list[Path]:
    return sorted(
        p
        for root in roots
        if root.exists()
        for p in root.rglob("*")
        if ".tmp-" in p.name or p.name.endswith(".tmp")
    )


def _build_process(args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "merra2_text_data.cli", *args], env=tool_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip


@pytest.fixture(scope="module")
def build_seconds(granule_source: Path, tmp_path_factory: pytest.TempPathFactory) -> float:
    """How long the whole build takes as a subprocess here (interpreter start included): the span to kill in."""
    root = tmp_path_factory.mktemp("timed")
    started = time.monotonic()
    assert (
        _build_process(build_args(granule_source, root / "out", "--cache-dir", str(root / "cache"))).wait()
        == 0
    )
    return time.monotonic() - started


def _phase(out: Path, cache: Path) -> str:
    receipts = len(list(out.glob(f"{DATASET}/staging/*/*.json")))
    shards = len(list(out.glob(f"{DATASET}/versions/*/shards/*.tar")))
    manifest = bool(list(out.glob(f"{DATASET}/versions/*/manifest.json")))
    cached = bool(list(cache.glob("zarr/regional/*.zarr")))
    return f"cache written {cached}, {shards} shard(s), {receipts} receipt(s), manifest {manifest}"


_KILL_AT_WRITE = """
import os, signal, sys
from merra2_text_data import cli, publish, shards

at, after, count = int(sys.argv[1]), sys.argv[2] == "after", [0]


def killing(write):
    def wrapper(*args, **kwargs):
        count[0] += 1
        if count[0] == at and not after:
            os.kill(os.getpid(), signal.SIGKILL)
        result = write(*args, **kwargs)
        if count[0] == at and after:
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    return wrapper


shards.write_atomic = publish.write_atomic = killing(shards.write_atomic)
publish.write_create_only = killing(publish.write_create_only)
sys.argv = ["merra2-text", *sys.argv[3:]]
cli.main()
"""
"""Runs `merra2-text ARGS` and SIGKILLs itself right before (or after) its Nth write to the store: every shard,
receipt, index, quarantine table, card, manifest and tag goes through `write_atomic` / `write_create_only`."""


# seeds of the `write` mode picked so the kills cover both phases: a shard or receipt (3, 5), after the index (9), after
# the card (17), right before and right after the manifest (29, 30), before the tag (6)
@pytest.mark.parametrize(("mode", "seed"), [("delay", 0), ("delay", 1), ("delay", 2), ("write", 3), ("write", 5),
                                            ("write", 9), ("write", 17), ("write", 29), ("write", 30), ("write", 6)])  # fmt: skip
def test_kill_9_the_build_at_a_random_moment_then_rerun(
    granule_source: Path, tmp_path: Path, reference_build: str, build_seconds: float, mode: str, seed: int
) -> None:
    """`delay`: SIGKILL after a random fraction of the build's run time (mostly lands in start-up, reading and the
    zarr cache). `write`: the build SIGKILLs itself right before or after a random one of its writes to the store
    (shards, receipts, index, card, manifest, tag): the commit phase is too short to hit by time."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = build_args(granule_source, out, "--cache-dir", str(cache))
    rng = random.Random(seed)
    if mode == "delay":
        proc = _build_process(args)
        try:
            proc.wait(timeout=rng.uniform(0.3, 1.0) * build_seconds)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
    else:
        writes = (
            2 * len(open_dataset(reference_build).manifest.shards) + 5
        )  # shard + receipt per task, 5 commits
        at, when = rng.randint(1, writes), rng.choice(["before", "after"])
        mode = f"write {at}/{writes} ({when})"
        proc = subprocess.Popen([sys.executable, "-c", _KILL_AT_WRITE, str(at), when, *args], env=tool_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    code = proc.wait()
    assert mode == "delay" or code == -signal.SIGKILL, f"{mode}: the build was not killed (exit {code})"
    killed = f"{mode} {seed}: exit {code}, {_phase(out, cache)}"
    print(killed)
    for manifest in out.glob(f"{DATASET}/versions/*/manifest.json"):  # a manifest means a complete version
        ref = f"{manifest.parent.parent.parent}@{manifest.parent.name}"
        assert cli("verify", ref).exit_code == 0, (
            f"{ref} has a manifest but does not verify (killed={killed})"
        )

    res = cli(*args)
    assert res.exit_code == 0, res.output
    ref = res.stdout.strip().splitlines()[-1]
    clean = open_dataset(reference_build).manifest
    got = open_dataset(ref).manifest
    assert got.version == clean.version, f"another version ({killed})"
    assert [(s.path, s.sha256) for s in got.shards] == [(s.path, s.sha256) for s in clean.shards]
    assert cli("verify", ref).exit_code == 0
    root = out / DATASET
    assert sorted(p.name for p in (root / "versions").iterdir()) == [clean.version]
    assert not (root / "staging").exists(), "staging receipts left behind"
    assert _temps(out, cache) == [], f"temp files left behind ({killed})"
    assert gc(str(root)).orphans == []
