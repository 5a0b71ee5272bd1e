"""Process death: `kill -9` at random moments.

- The build (`merra2-text build` in a subprocess, SIGKILL after a seeded random delay): a manifest exists only for a
  complete version (it verifies); the rerun ends with the fault-free version, byte for byte, and leaves no staging
  receipts, no temp files and no other version behind.
- A 2-rank training run (`fusion-train --nproc 2`, slow): one rank is killed mid-run; the launcher stops the other
  (no hang); `--resume` continues from the newest complete checkpoint with the same data order and the same losses
  for the steps it redoes, and finishes.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from climate_text_schema import open_dataset
from merra2_text_data.store.versions import gc

from .conftest import BIN, DATASET, TINY_TRAIN, build_args, cli, last_json, run_tool, tool_env


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
from merra2_text_data import cli
from merra2_text_data.store import publish, shards

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


def _records(path: Path) -> list[dict[str, Any]]:
    """The complete JSON lines of a JSONL file (a line torn by the kill is left out)."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _rank_pid(launcher: int, rank: int) -> int | None:
    import psutil

    for child in psutil.Process(launcher).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "fusion_trainer.cli" in " ".join(child.cmdline()):
                return int(child.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


@pytest.mark.slow
def test_kill_9_one_rank_of_a_2_rank_training_then_resume(
    reference_build: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Rank 1 is SIGKILLed after the step-4 checkpoint, mid-run: the launcher stops rank 0 and exits non-zero within a
    minute (no hang on a collective). `--resume` restarts from the newest complete checkpoint: every redone step sees
    the same samples on each rank as before the kill, and has the same loss (same weights, optimizer and data
    position); the run then finishes."""
    run = tmp_path / "run"
    args = ["--shards", reference_build, "--model", str(tiny_model_dir), "--out", str(run), "--nproc", "2",
            "--steps", "30", "--save-every", "4", "--no-progress", "--set", "eval_every=0", *TINY_TRAIN]  # fmt: skip
    log = tmp_path / "killed-run.log"  # a file, not a pipe: a full pipe would stall the ranks
    with log.open("w") as sink:
        proc = subprocess.Popen([str(BIN / "fusion-train"), *args], env=tool_env(), stdout=sink,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            steps = [r["step"] for r in _records(run / "samples" / "rank1.jsonl")]
            if (run / "checkpoints" / "step4" / "COMPLETE").exists() and steps and max(steps) >= 5:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, (
            f"no step 5 after the step-4 checkpoint in 5 minutes: {_records(run / 'samples' / 'rank1.jsonl')}"
        )
        time.sleep(random.Random(0).uniform(0.0, 0.3))
        victim = _rank_pid(proc.pid, 1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("the launcher hung after a rank died")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    err = log.read_text()
    assert proc.returncode != 0 and "error: 2 ranks failed" in err, err[-3000:]
    before = {r: _records(run / "samples" / f"rank{r}.jsonl") for r in (0, 1)}
    losses_before = {m["step"]: m["loss"] for m in _records(run / "metrics.jsonl") if "split" not in m}

    resumed = run_tool("fusion-train", *args, "--resume", timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert last_json(resumed.stdout)["step"] == 30 and (run / "final").is_dir()
    redone: set[int] = set()
    starts: set[int] = set()
    for rank in (0, 1):
        # The resumed run appends to the killed run's log (only a torn last line is cut), so the split point is
        # the killed run's record count, whether or not the resumed run goes back to an earlier step.
        records = _records(run / "samples" / f"rank{rank}.jsonl")
        first, second = records[: len(before[rank])], records[len(before[rank]) :]
        assert first == before[rank]
        start = second[0]["step"] - 1
        starts.add(start)
        assert start >= 4 and start % 4 == 0 and (run / "checkpoints" / f"step{start}" / "COMPLETE").exists()
        assert [r["step"] for r in second] == list(range(start + 1, 31)), (
            "steps are numbered on from the checkpoint"
        )
        old = {r["step"]: r["keys"] for r in first}
        for record in second:
            if record["step"] in old:
                assert record["keys"] == old[record["step"]], (
                    f"rank {rank} step {record['step']}: other samples"
                )
                redone.add(record["step"])
    if not redone:  # the kill came right after a checkpoint, before either rank logged a later step
        assert all(before[r][-1]["step"] <= min(starts) for r in (0, 1)), (
            "steps after the checkpoint were not redone"
        )
    metrics = [m for m in _records(run / "metrics.jsonl") if "split" not in m]
    assert [m["step"] for m in metrics] == list(range(1, 31)), (
        "each step logged once, torn or redone lines dropped"
    )
    for m in metrics:
        if m["step"] in losses_before and m["step"] in redone:
            assert m["loss"] == pytest.approx(losses_before[m["step"]], rel=1e-5), (
                f"step {m['step']}: other loss"
            )


def test_a_build_lock_left_by_a_killed_compile_is_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A process killed while DeepSpeed compiles its CPU op leaves torch's extension `lock`; every later run would
    wait on it forever without a word. fusion-train removes such a lock (older than 10 minutes, no live process
    working in its build folder) and says so; a lock whose folder a live process works in is only named."""
    from fusion_trainer.training.launch import stale_build_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    old = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    fresh = tmp_path / "py311_cpu" / "other_op" / "lock"
    for lock in (old, fresh):
        lock.parent.mkdir(parents=True)
        lock.touch()
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    busy = tmp_path / "py311_cpu" / "busy_op" / "lock"
    busy.parent.mkdir(parents=True)
    busy.touch()
    for lock in (old, busy):
        os.utime(lock, (time.time() - 3600, time.time() - 3600))
    compiler = subprocess.Popen(["sleep", "60"], cwd=busy.parent)  # stands for a compile still running there
    try:
        with caplog.at_level("WARNING", logger="fusion_trainer.training.launch"):
            assert stale_build_locks() == [str(busy), str(old)]
    finally:
        compiler.kill()
        compiler.wait()
    assert not old.exists() and f"removed {old}" in caplog.text
    assert busy.exists() and "delete it" in caplog.text and str(compiler.pid) in caplog.text
    assert fresh.exists() and str(fresh) not in caplog.text
