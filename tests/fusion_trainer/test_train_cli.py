"""The command lines: fusion-train (dry run, errors, 2 ranks through the DeepSpeed launcher, resume), fusion-eval and
fusion-generate on the result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from fusion_trainer.training.checkpoint import checkpoint_tensor_names

BIN = Path(sys.executable).parent
TINY = ["--set", "fusion.d_encoder=32", "--set", "fusion.encoder_heads=4", "--set", "fusion.n_heads=4",
        "--set", "max_length=160"]  # fmt: skip


def _run(tool: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    return subprocess.run([str(BIN / tool), *args], capture_output=True, text=True, timeout=timeout, env=env)


def _last_json(stdout: str) -> Any:
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


def test_dry_run_prints_config_and_sizes(dataset_ref: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    out = _run("fusion-train", "--shards", dataset_ref, "--model", str(tiny_model_dir), "--out", str(tmp_path / "r"),
               "--fusion", "add", "--zero", "3", "--dry-run", *TINY)  # fmt: skip
    assert out.returncode == 0, out.stderr
    config_text, _, sizes = out.stdout.partition("---\n")
    resolved = yaml.safe_load(config_text)
    assert resolved["zero"] == 3 and resolved["fusion"]["fusion"] == "add" and resolved["max_length"] == 160
    assert "trainable parameters:" in sizes and "memory" in sizes
    assert not (tmp_path / "r").exists(), "a dry run writes nothing"


def test_dry_run_sizes_the_model_training_builds(dataset_ref: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    """The stats loss adds the stats head: the dry run must count it, as training does (one FusionConfig builder)."""
    import re

    counts = []
    for weight in ("0", "1"):
        out = _run("fusion-train", "--shards", dataset_ref, "--model", str(tiny_model_dir), "--out",
                   str(tmp_path / "r"), "--fusion", "prefix", "--set", f"stats_loss_weight={weight}", "--dry-run",
                   *TINY)  # fmt: skip
        assert out.returncode == 0, out.stderr
        counts.append(int(re.search(r"trainable parameters: ([\d,]+)", out.stdout)[1].replace(",", "")))  # type: ignore[index]
    assert counts[1] > counts[0], f"stats head not counted: {counts}"


@pytest.mark.parametrize(
    ("flags", "extra", "message"),
    [
        ({"--shards": "/nonexistent/data/x@latest"}, [], "/nonexistent/data/x@latest"),
        ({"--model": "/nonexistent/model"}, [], "/nonexistent/model"),
        ({"--micro-batch": "3"}, ["--set", "global_batch=8"], "global_batch 8"),
        ({"--zero": "7"}, [], "zero"),
    ],
)
def test_errors_exit_non_zero_with_one_message(
    dataset_ref: str,
    tiny_model_dir: Path,
    tmp_path: Path,
    flags: dict[str, str],
    extra: list[str],
    message: str,
) -> None:
    args = {"--shards": dataset_ref, "--model": str(tiny_model_dir), "--out": str(tmp_path / "r"), **flags}
    out = _run(
        "fusion-train",
        *[a for pair in args.items() for a in pair],
        *extra,
        "--no-bf16",
        "--steps",
        "2",
        *TINY,
    )
    assert out.returncode == 1
    assert message in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("scheme", ["file://", "s3://bucket"])
def test_nproc_launch_takes_out_as_a_local_folder(
    dataset_ref: str, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scheme: str
) -> None:
    """`--nproc N` wrote its launch config under Path(out): ./file:/... for a file:// out, ./s3:/... for an s3:// one
    (which the ranks then refused); the launcher now strips file:// and refuses other schemes before writing."""
    from fusion_trainer.cli import train_app
    from fusion_trainer.training import launch
    from typer.testing import CliRunner

    launched: list[list[str]] = []

    def fake_launch(nproc: int, args: list[str], layout: Any = None) -> int:
        launched.append(args)
        assert Path(args[args.index("--config") + 1]).is_file()
        return 0

    monkeypatch.setattr(launch, "launch_local", fake_launch)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    run = tmp_path / "run"
    result = CliRunner().invoke(train_app, ["--shards", dataset_ref, "--model", str(tiny_model_dir), "--out",
                                            f"{scheme}{run}", "--nproc", "2", "--no-bf16", *TINY])  # fmt: skip
    assert list(cwd.iterdir()) == [], "nothing is written under the working folder"
    if scheme == "file://":
        assert result.exit_code == 0, result.output
        assert launched and Path(launched[0][launched[0].index("--config") + 1]).parent == run
    else:
        assert result.exit_code == 1 and "must be a local folder" in result.output and not launched


def test_eval_and_generate_refuse_an_unfinished_run(dataset_ref: str, tmp_path: Path) -> None:
    out = _run("fusion-eval", "--run", str(tmp_path), "--shards", dataset_ref)
    assert out.returncode == 1 and "config.yaml" in out.stderr and "Traceback" not in out.stderr


def _shm_buffers() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*")}


def test_the_launcher_removes_only_its_jobs_shared_memory_buffers(tmp_path: Path) -> None:
    from fusion_trainer.training.launch import remove_shm_buffers

    uid = os.getuid()
    names = [f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_4242_0", f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_4242_1",
             f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_42420_0", f"deepspeed_allreduce_buffer_{uid + 1}_127.0.0.1_4242_0",
             f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_4242_x"]  # fmt: skip
    for name in names:
        (tmp_path / name).write_bytes(b"0")
    assert sorted(remove_shm_buffers("127.0.0.1", 4242, tmp_path)) == names[:2]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[2:])


@pytest.mark.slow
def test_two_ranks_zero2_train_resume_eval_generate(
    dataset_ref: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Acceptance: --zero 2 --nproc 2 --steps 50 finishes with falling loss; --resume continues it."""
    run = tmp_path / "run"
    common = ["--shards", dataset_ref, "--model", str(tiny_model_dir), "--out", str(run), "--zero", "2",
              "--nproc", "2", "--micro-batch", "2", "--no-bf16", "--lr", "1e-2", "--eval-every", "25", *TINY]  # fmt: skip
    shm_before = _shm_buffers()
    first = _run("fusion-train", *common, "--steps", "50")
    assert first.returncode == 0, first.stderr[-3000:]
    assert _shm_buffers() <= shm_before, "DeepSpeed's shared-memory buffers of the run were left in /dev/shm"
    summary = _last_json(first.stdout)
    assert summary["step"] == 50 and summary["frozen_base_unchanged"] is True

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "split" not in r]
    assert len(losses) == 50 // 10 and losses[-1] < losses[0] - 0.05, losses
    assert [r["step"] for r in records if r.get("split") == "val"] == [25, 50]

    # both ranks ran the same steps; within every epoch (5 steps: 10 samples per rank) they saw disjoint samples
    per_rank = [
        [json.loads(x) for x in (run / "samples" / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)
    ]
    assert [s["step"] for s in per_rank[0]] == [s["step"] for s in per_rank[1]] == list(range(1, 51))
    for epoch in range(10):
        # a rank whose shards hold fewer samples than its share repeats some of its own, never the other's
        keys = [[k for s in rank[epoch * 5 : epoch * 5 + 5] for k in s["keys"]] for rank in per_rank]
        assert len(keys[0]) == len(keys[1]) == 10 and not set(keys[0]) & set(keys[1])

    ckpt = run / "checkpoints" / "step50"
    assert (ckpt / "rng_rank0.json").exists() and (ckpt / "rng_rank1.json").exists()
    assert (ckpt / "CHECKSUMS.json").exists() and not list(ckpt.glob("rng_rank*.pt"))
    names = checkpoint_tensor_names(ckpt)
    leaked = [n for n in names if ".module.lm." in n and "fusion_block" not in n and "lora_" not in n]
    assert not leaked and any(".module.encoder." in n for n in names), (
        "the trainable part only, never the base"
    )

    resumed = _run("fusion-train", *common, "--steps", "60", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _last_json(resumed.stdout)["step"] == 60
    steps = [json.loads(x)["step"] for x in (run / "samples" / "rank0.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 61)), "resume continues the step numbering"

    evaluated = _run("fusion-eval", "--run", str(run), "--shards", dataset_ref, "--split", "test")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    result = json.loads(evaluated.stdout)
    assert result["split"] == "test" and result["fused"]["samples"] == 4
    assert result["fused"]["loss"] < result["base"]["loss"], (
        "the trained fusion beats the frozen base on captions"
    )
    assert result["loss_delta"] == pytest.approx(result["base"]["loss"] - result["fused"]["loss"])

    out_file = tmp_path / "gen.jsonl"
    generated = _run("fusion-generate", "--run", str(run), "--shards", dataset_ref, "--limit", "3",
                     "--max-new-tokens", "8", "--out", str(out_file))  # fmt: skip
    assert generated.returncode == 0, generated.stderr[-3000:]
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [r["key"] for r in rows] == [
        "synth-test-00028",
        "synth-test-00030",
        "synth-test-00031",
    ]  # spread over 4 (linspace 0, 1.5, 3 rounds to 0, 2, 3)
    assert all(
        r["reference"].startswith("Mean 2 m temperature") and isinstance(r["generated"], str) for r in rows
    )
