"""Training across nodes without ssh: `fusion-train --nnodes 2 --node-rank 0|1 --nproc 1` twice on this machine
(127.0.0.1, CPU, ZeRO-2) forms one 2-rank job equal to `--nproc 2` on one node; a lost node fails the job in bounded
time; `--resume` on both continues with the same step numbering; the launch flags and commands."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from fusion_trainer.training.launch import NodeLayout, build_launch_command, free_port
from safetensors.numpy import load_file

BIN = Path(sys.executable).parent
TINY = ["--set", "fusion.d_encoder=32", "--set", "fusion.encoder_heads=4", "--set", "fusion.n_heads=4",
        "--set", "max_length=160", "--set", "log_every=1", "--no-bf16", "--no-progress"]  # fmt: skip


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", **extra)
    return env


def _common(ref: str, model: Path, out: Path, *extra: str) -> list[str]:
    return ["--shards", ref, "--model", str(model), "--out", str(out), "--zero", "2", "--micro-batch", "2",
            "--lr", "1e-2", *TINY, *extra]  # fmt: skip


def _start_nodes(args: list[str], logs: Path, port: int, nnodes: int = 2) -> list[subprocess.Popen[bytes]]:
    """One `fusion-train` per node, each in its own session (a node: its launcher and ranks) and with a
    PyTorchJob-style environment (RANK = node rank, WORLD_SIZE = nodes), which the node flags must override. Their
    temporary files go under `logs`: a launcher the tests SIGKILL cannot remove its hostfile."""
    procs = []
    for node in range(nnodes):
        env = _env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(node), WORLD_SIZE=str(nnodes),
                   TMPDIR=str(logs))  # fmt: skip
        flags = ["--nproc", "1", "--nnodes", str(nnodes), "--node-rank", str(node), "--master-addr", "127.0.0.1",
                 "--master-port", str(port)]  # fmt: skip
        with (logs / f"node{node}.log").open(
            "w"
        ) as sink:  # a file, not a pipe: a full pipe would stall a rank
            procs.append(subprocess.Popen([str(BIN / "fusion-train"), *args, *flags], env=env, stdout=sink,
                                          stderr=subprocess.STDOUT, start_new_session=True))  # fmt: skip
    return procs


def _wait_all(procs: list[subprocess.Popen[bytes]], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    finally:
        _kill(procs)


def _kill(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _records(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _records(run / "metrics.jsonl") if "split" not in r}


def _keys(run: Path, rank: int) -> list[tuple[int, list[str]]]:
    return [(r["step"], r["keys"]) for r in _records(run / "samples" / f"rank{rank}.jsonl")]


@pytest.fixture(scope="module")
def one_node(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> tuple[str, Path]:
    """The reference: `--nproc 2` on one node, 8 steps, checkpoints every 2 (dataset, run folder)."""
    from .conftest import write_dataset

    root = tmp_path_factory.mktemp("nodes")
    ref = write_dataset(str(root / "data"))
    run = root / "one-node"
    args = _common(ref, tiny_model_dir, run, "--steps", "8", "--save-every", "2", "--nproc", "2")
    done = subprocess.run([str(BIN / "fusion-train"), *args], env=_env(), capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(_losses(run)) == list(range(1, 9))
    return ref, run


def _same_as_one_node(run: Path, reference: Path) -> None:
    losses, expected = _losses(run), _losses(reference)
    assert sorted(losses) == list(range(1, 9)), "steps 1..8, each logged once"
    for step, loss in expected.items():
        assert losses[step] == pytest.approx(loss, abs=1e-5), f"step {step}: {losses[step]} != {loss}"
    for rank in (0, 1):  # the same data lanes and equal steps per rank as on one node
        expected_keys = dict(_keys(reference, rank))
        assert sorted(expected_keys) == list(range(1, 9))
        for step, keys in _keys(run, rank):  # a step redone after a kill saw the same samples both times
            assert keys == expected_keys[step], f"rank {rank} step {step}: other samples"
    ours, theirs = (
        load_file(run / "final" / "adapter.safetensors"),
        load_file(reference / "final" / "adapter.safetensors"),
    )
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():
        assert abs(ours[name] - value).max() < 1e-5, name


@pytest.mark.slow
def test_two_nodes_are_one_job_equal_to_one_node_and_resume(
    one_node: tuple[str, Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Acceptance: two node commands (one rank each) form one 2-rank job; stopped at step 4 (checkpointed) and
    resumed on both nodes, the job numbers its steps on and ends with the losses, sample keys and adapter of
    `--nproc 2` on one node."""
    ref, reference = one_node
    run = tmp_path / "two-nodes"
    args = _common(ref, tiny_model_dir, run, "--steps", "8", "--save-every", "2")
    codes = _wait_all(_start_nodes([*args, "--set", "stop_at_step=4"], tmp_path, free_port()), timeout=600)
    assert codes == [0, 0], [(tmp_path / f"node{n}.log").read_text()[-3000:] for n in (0, 1)]
    assert sorted(_losses(run)) == [1, 2, 3, 4] and (run / "checkpoints" / "step4" / "COMPLETE").exists()
    assert (run / "checkpoints" / "step4" / "rng_rank1.json").exists(), "rank 1 (node 1) wrote its RNG state"

    codes = _wait_all(_start_nodes([*args, "--resume"], tmp_path, free_port()), timeout=600)
    assert codes == [0, 0], [(tmp_path / f"node{n}.log").read_text()[-3000:] for n in (0, 1)]
    assert [s for s, _ in _keys(run, 1)] == list(range(1, 9)), "resume continues the step numbering"
    _same_as_one_node(run, reference)
    printed = [
        json.loads(x) for x in (tmp_path / "node0.log").read_text().splitlines() if x.startswith('{"run"')
    ]
    assert printed[-1]["step"] == 8 and printed[-1]["frozen_base_unchanged"] is True


@pytest.mark.slow
def test_a_killed_node_fails_the_job_cleanly_then_both_resume(
    one_node: tuple[str, Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Node 1 (its launcher and rank) is SIGKILLed mid-run, as when the machine dies: node 0 exits non-zero within a
    minute with one error naming the lost ranks and the way out (no hang, no traceback); `--resume` on both nodes
    continues from the newest complete checkpoint and ends as the one-node run did."""
    ref, reference = one_node
    run = tmp_path / "killed"
    args = _common(ref, tiny_model_dir, run, "--steps", "8", "--save-every", "2")
    procs = _start_nodes([*args, "--set", "eval_every=0"], tmp_path, free_port())
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and procs[0].poll() is None:
            if (run / "checkpoints" / "step2" / "COMPLETE").exists() and len(_keys(run, 0)) >= 3:
                break
            time.sleep(0.02)
        assert procs[0].poll() is None and procs[1].poll() is None, (
            "the job ended before node 1 could be killed"
        )
        os.killpg(procs[1].pid, signal.SIGKILL)
        killed_at = time.monotonic()
        code = procs[0].wait(timeout=120)
        waited = time.monotonic() - killed_at
    finally:
        _kill(procs)
    log = (tmp_path / "node0.log").read_text()
    assert code != 0 and waited < 60, (code, waited, log[-3000:])
    assert "lost contact with the other ranks" in log and "--resume" in log, log[-3000:]
    assert "error: the 1 rank(s) of node 0 (of 2) failed" in log and "Traceback" not in log, log[-3000:]
    stopped_at = max(s for s, _ in _keys(run, 0))
    assert stopped_at < 8

    codes = _wait_all(_start_nodes([*args, "--resume"], tmp_path, free_port()), timeout=600)
    assert codes == [0, 0], [(tmp_path / f"node{n}.log").read_text()[-3000:] for n in (0, 1)]
    steps = [s for s, _ in _keys(run, 0)]
    start = steps[stopped_at] - 1 if len(steps) > stopped_at else stopped_at
    assert start >= 2 and start % 2 == 0 and steps[-(8 - start) :] == list(range(start + 1, 9)), steps
    _same_as_one_node(run, reference)


@pytest.mark.slow
def test_a_silent_node_fails_the_job_after_dist_timeout(
    one_node: tuple[str, Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Node 1 stops answering without closing its connections (SIGSTOP, as a network partition looks): node 0
    fails after `dist_timeout_s`, also inside DeepSpeed's own ZeRO collectives, instead of waiting 30 minutes."""
    ref, _ = one_node
    run = tmp_path / "silent"
    args = _common(
        ref, tiny_model_dir, run, "--steps", "5000", "--set", "dist_timeout_s=10", "--set", "eval_every=0"
    )
    procs = _start_nodes(args, tmp_path, free_port())
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and len(_keys(run, 0)) < 3 and procs[0].poll() is None:
            time.sleep(0.02)
        assert procs[0].poll() is None, (tmp_path / "node0.log").read_text()[-3000:]
        os.killpg(procs[1].pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        code = procs[0].wait(timeout=120)
        waited = time.monotonic() - stopped_at
    finally:
        _kill(procs)
    log = (tmp_path / "node0.log").read_text()
    assert code != 0 and 9 < waited < 60, (code, waited, log[-3000:])
    assert "lost contact with the other ranks" in log and "Timed out" in log, log[-3000:]


@pytest.mark.slow
def test_a_run_dir_not_shared_by_the_nodes_is_refused_on_every_rank(
    one_node: tuple[str, Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Each node given a folder of its own as --out (as a local disk per node would be): both fail at start with
    the same error naming the rank that cannot see rank 0's RUN_DIR and the way out; nothing is trained."""
    ref, _ = one_node
    port, procs = free_port(), []
    for node in (0, 1):
        args = _common(ref, tiny_model_dir, tmp_path / f"local{node}", "--steps", "4")
        flags = ["--nproc", "1", "--nnodes", "2", "--node-rank", str(node), "--master-addr", "127.0.0.1",
                 "--master-port", str(port)]  # fmt: skip
        procs.append(subprocess.Popen([str(BIN / "fusion-train"), *args, *flags], env=_env(),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True))  # fmt: skip
    try:
        outs = [p.communicate(timeout=300)[0].decode() for p in procs]
    finally:
        _kill(procs)
    for node, out in enumerate(outs):
        assert procs[node].returncode != 0, out[-3000:]
        assert "is not shared by every rank (rank 1 on" in out and "same path on every node" in out, out[
            -3000:
        ]
    assert not (tmp_path / "local0" / "checkpoints").exists()


def test_launch_commands_of_each_layout(tmp_path: Path) -> None:
    """One node: a free local port; N nodes without ssh: a hostfile of N entries, --no_ssh --node_rank R and the
    given rendezvous; a user hostfile without --node-rank goes to the launcher as it is (pdsh starts every node)."""
    one = build_launch_command(2, ["train"], layout=NodeLayout())
    assert one[one.index("--num_nodes") + 1] == "1" and "--no_ssh" not in one and "--hostfile" not in one

    layout = NodeLayout(nnodes=3, node_rank=2, master_addr="10.0.0.1", master_port=29600)
    cmd = build_launch_command(4, ["train", "--config", "c.yaml"], layout=layout, hostfile="/tmp/h")
    assert cmd[cmd.index("--hostfile") + 1] == "/tmp/h" and cmd[cmd.index("--num_nodes") + 1] == "3"
    assert cmd[cmd.index("--num_gpus") + 1] == "4" and cmd[cmd.index("--node_rank") + 1] == "2"
    assert (
        cmd[cmd.index("--master_addr") + 1] == "10.0.0.1" and cmd[cmd.index("--master_port") + 1] == "29600"
    )
    assert "--no_ssh" in cmd and cmd[-4:] == ["fusion_trainer.cli", "train", "--config", "c.yaml"]

    hosts = tmp_path / "hosts"
    hosts.write_text("gpu-a slots=8\ngpu-b slots=8\n")
    pdsh = build_launch_command(8, ["train"], layout=NodeLayout(hostfile=str(hosts)))
    assert (
        pdsh[pdsh.index("--hostfile") + 1] == str(hosts)
        and "--no_ssh" not in pdsh
        and "--node_rank" not in pdsh
    )
    assert pdsh[pdsh.index("--master_port") + 1] == "29500"

    from fusion_trainer.training.launch import _write_hostfile

    written = Path(_write_hostfile(NodeLayout(nnodes=3, node_rank=0, master_addr="h"), 2))
    try:
        assert written.read_text().splitlines() == ["node0 slots=2", "node1 slots=2", "node2 slots=2"]
    finally:
        written.unlink()


@pytest.mark.parametrize(
    ("flags", "messages"),
    [
        (["--nnodes", "2", "--node-rank", "2"], ["--node-rank 2: must be in 0..1", "--master-addr"]),
        (["--nnodes", "2"], ["--nnodes 2 needs --node-rank"]),
        (
            ["--nnodes", "2", "--node-rank", "1", "--master-addr", "h", "--master-port", "70000"],
            ["--master-port 70000"],
        ),
        (["--hostfile", "/nonexistent/hosts"], ["--hostfile /nonexistent/hosts: no such file"]),
    ],
)
def test_wrong_launch_flags_are_one_error(
    dataset_ref: str, tiny_model_dir: Path, tmp_path: Path, flags: list[str], messages: list[str]
) -> None:
    """Every inconsistent launch flag is named in one error before anything starts."""
    out = subprocess.run(
        [str(BIN / "fusion-train"), *_common(dataset_ref, tiny_model_dir, tmp_path / "r", "--steps", "2"), *flags],
        env=_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert all(m in out.stderr for m in messages), out.stderr[-2000:]
    assert not (tmp_path / "r").exists()
