"""Bad shards: each named in a clear error by `merra2-text verify` and by the trainer's data pipeline, or, for a bad
sample in a shard whose checksum is intact and with `skip_bad_samples` (`fusion-train --skip-bad-samples`), skipped,
counted and logged while every rank still gets its full epoch.

Two kinds of damage:
- integrity (truncated tar, flipped bytes): the shard is not what the manifest records. Always an error, with or
  without skipping (its samples may already be in use when the checksum fails at the shard's end; skipping cannot
  undo that).
- a bad sample published with a consistent checksum (a buggy or hostile writer): a member named like a path, a .npy
  holding a pickle, a .json that is not JSON, a sample without its .txt.

Preserved: nothing is written outside the run/dataset folders (no member is ever extracted), no pickle is ever
unpickled (a marker file its unpickling would create never appears), and the dataset itself is left as it is.
"""

from __future__ import annotations

import io
import logging
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fusion_trainer.data.stream import DEFAULT_PROMPT, ClimateTextStream, open_shards, render_prompt
from fusion_trainer.errors import DataError
from fusion_trainer.metrics import read_metrics

from .conftest import TINY_TRAIN, cli, last_json, read_members, republish_shard, run_tool

SHARD = "shards/train-000000.tar"
Members = list[tuple[str, bytes]]


class _Boom:
    """Unpickling this object creates a marker file: proof that a pickle was (or never was) executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def _first_key(members: Members) -> str:
    return members[0][0].split(".", 1)[0]


def _replace(suffix: str, data: bytes | None) -> Callable[[Members], Members]:
    """Replace (or with None drop) one member of the shard's first sample."""

    def transform(members: Members) -> Members:
        key = _first_key(members)
        out: Members = []
        for name, value in members:
            if name == f"{key}.{suffix}":
                if data is not None:
                    out.append((name, data))
            else:
                out.append((name, value))
        return out

    return transform


def _as_path(members: Members) -> Members:
    key = _first_key(members)
    return [
        (name.replace(f"{key}.", "../../x.", 1) if name.startswith(f"{key}.") else name, v)
        for name, v in members
    ]


def _pickled_npy(marker: Path) -> bytes:
    array = np.empty((1,), dtype=object)
    array[0] = _Boom(marker)
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    return buf.getvalue()


def _stream(ref: str, tokenizer: Any, skip: bool = False, rehash: bool = False) -> ClimateTextStream:
    ds = open_shards(ref)
    return ClimateTextStream(ds, "train", tokenizer, prompt=render_prompt(DEFAULT_PROMPT, ds), micro_batch=1,
                             max_length=256, seed=1, skip_bad_samples=skip, rehash=rehash)  # fmt: skip


def _epoch(stream: ClimateTextStream) -> tuple[list[str], int]:
    """One epoch of batches: the keys seen and the skip count the last batch reports."""
    it = iter(stream)
    batches = [next(it) for _ in range(stream.batches_per_epoch)]
    return [k for b in batches for k in b["keys"]], int(batches[-1]["skipped"])


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


# --- integrity: always an error --------------------------------------------------------------------------------------


def _truncate(vdir: Path) -> None:
    path = vdir / SHARD
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])


def _flip(vdir: Path) -> None:
    path = vdir / SHARD
    data = bytearray(path.read_bytes())
    at = data.index(b"\x93NUMPY") + 200  # inside the first array's values: it still decodes
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(("damage", "verify_says", "trainer_says"), [
    (_truncate, "not a readable tar", r"train-000000\.tar (is truncated or corrupt|fails its checks)"),
    (_flip, "sha256", r"train-000000\.tar fails its checks .*sha256"),
])  # fmt: skip
def test_damaged_shards_are_named_and_never_skipped(
    dataset: tuple[Path, str],
    tokenizer: Any,
    damage: Callable[[Path], None],
    verify_says: str,
    trainer_says: str,
) -> None:
    vdir, ref = dataset
    damage(vdir)
    res = cli("verify", ref)
    assert res.exit_code == 1 and res.stderr.startswith("error: ")
    assert f"{SHARD}:" in res.stderr and verify_says in res.stderr, res.stderr
    for skip in (False, True):
        with pytest.raises(DataError, match=trainer_says):
            _epoch(_stream(ref, tokenizer, skip=skip))


def _count_hashes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the size of every sha256 computed (`hashlib` is one module: other hashes are recorded too)."""
    import hashlib

    from fusion_trainer.data import shard_reader as shards

    calls: list[int] = []
    real = hashlib.sha256

    class Counting:
        def __init__(self, data: bytes = b"") -> None:
            self.hash, self.size = real(data), len(data)

        def update(self, data: bytes) -> None:
            self.hash.update(data)
            self.size += len(data)

        def hexdigest(self) -> str:
            calls.append(self.size)
            return self.hash.hexdigest()

    monkeypatch.setattr(shards.hashlib, "sha256", Counting)
    return calls


def _epochs(it: Any, stream: ClimateTextStream, n: int) -> None:
    """Take `n` epochs of batches from `it`, an iterator over `stream`."""
    for _ in range(n * stream.batches_per_epoch):
        next(it)


def _shard_hashes(calls: list[int], stream: ClimateTextStream, reads: int) -> tuple[list[int], list[int]]:
    """(the sizes of the train shards hashed so far, sorted; each train shard's size `reads` times, sorted)."""
    sizes = [s.bytes for s in stream.ds.shards("train")]
    return sorted(n for n in calls if n in sizes), sorted(sizes * reads)


def test_an_unchanged_local_shard_is_hashed_once_per_stream(
    dataset: tuple[Path, str], tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, ref = dataset
    calls = _count_hashes(monkeypatch)
    stream = _stream(ref, tokenizer)
    _epochs(iter(stream), stream, 3)
    hashed, once = _shard_hashes(calls, stream, 1)
    assert hashed == once
    _epoch(_stream(ref, tokenizer))  # a new stream (a new run) hashes again
    hashed, twice = _shard_hashes(calls, stream, 2)
    assert hashed == twice


def test_rehash_hashes_every_read(
    dataset: tuple[Path, str], tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`rehash=True` (`fusion-train --set rehash_shards=true`): a local shard is hashed on every read."""
    _, ref = dataset
    calls = _count_hashes(monkeypatch)
    stream = _stream(ref, tokenizer, rehash=True)
    _epochs(iter(stream), stream, 2)
    hashed, twice = _shard_hashes(calls, stream, 2)
    assert hashed == twice


def test_a_shard_that_changes_while_it_is_read_is_hashed(
    dataset: tuple[Path, str], tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its identity before the read is the one that passed, after the read another: it is hashed again."""
    from fusion_trainer.data import shard_reader as shards

    _, ref = dataset
    calls = _count_hashes(monkeypatch)
    stream = _stream(ref, tokenizer)
    it = iter(stream)
    _epochs(it, stream, 1)
    real = shards._identity
    seen: list[int] = []

    def changing(fh: Any) -> tuple[int, ...]:  # every second call (the one after each read) differs
        seen.append(1)
        return real(fh) if len(seen) % 2 else (*real(fh)[:-1], -1)

    monkeypatch.setattr(shards, "_identity", changing)
    _epochs(it, stream, 1)
    hashed, twice = _shard_hashes(calls, stream, 2)
    assert hashed == twice


def test_a_shard_rewritten_between_epochs_is_caught(
    dataset: tuple[Path, str], tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same size, same modification time (restored), other bytes: the status-change time gives it away."""
    import os

    vdir, ref = dataset
    calls = _count_hashes(monkeypatch)
    stream = _stream(ref, tokenizer)
    it = iter(stream)
    _epochs(it, stream, 1)
    path = vdir / SHARD
    before = path.stat()
    _flip(vdir)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    with pytest.raises(DataError, match=r"train-000000\.tar fails its checks .*sha256"):
        _epochs(it, stream, 1)
    assert before.st_size in calls


def test_a_shard_on_another_filesystem_is_hashed_on_every_read(
    dataset: tuple[Path, str], tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store that is not the local disk downloads the shard again on each read: each read is hashed."""
    import fsspec

    vdir, ref = dataset
    mem = fsspec.filesystem("memory")
    root = f"/verify-{vdir.parent.parent.name}"
    mem.put(str(vdir.parent.parent), root, recursive=True)
    calls = _count_hashes(monkeypatch)
    stream = _stream(f"memory://{root}@{vdir.name}", tokenizer)
    _epochs(iter(stream), stream, 2)
    hashed, twice = _shard_hashes(calls, stream, 2)
    assert hashed == twice
    mem.rm(root, recursive=True)


# --- a bad sample with a consistent checksum: an error, or skipped and counted ---------------------------------------


def _cases(marker: Path) -> dict[str, tuple[Callable[[Members], Members], str, str]]:
    """name: (transform of the shard's members, what verify says, what the trainer says)."""
    return {
        "path": (_as_path, "'../../x.climate.npy' is a path", r"'\.\./\.\./x'.* is a path"),
        "pickle-npy": (
            _replace("climate.npy", _pickled_npy(marker)),
            "not a plain numeric .npy",
            "not a plain numeric",
        ),
        "raw-pickle": (_replace("climate.npy", pickle.dumps(_Boom(marker))), "climate.npy", "climate.npy"),
        "json": (
            _replace("json", b"{not json"),
            "json member is not valid JSON",
            "json member is not valid JSON",
        ),
        "no-txt": (_replace("txt", None), "lacks member(s) txt", r"lacks member\(s\) txt"),
    }


@pytest.mark.parametrize("case", ["path", "pickle-npy", "raw-pickle", "json", "no-txt"])
def test_a_bad_sample_is_named_or_skipped_and_counted(
    dataset: tuple[Path, str], tokenizer: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture, case: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    vdir, ref = dataset
    marker = tmp_path / "UNPICKLED"
    transform, verify_says, trainer_says = _cases(marker)[case]
    bad_key = _first_key(read_members(vdir / SHARD))
    clean_keys, skipped = _epoch(_stream(ref, tokenizer))
    assert skipped == 0 and bad_key in clean_keys
    republish_shard(vdir, SHARD, transform)
    monkeypatch.chdir(
        vdir / "shards"
    )  # a reader that extracted '../../x.*' would write into the version folder

    res = cli("verify", ref)
    assert res.exit_code == 1 and res.stderr.startswith("error: ") and "Traceback" not in res.output
    assert SHARD in res.stderr and verify_says in res.stderr, res.stderr

    if case.endswith("pickle"):  # inspect reads the first sample of the first shard: this one
        shown = cli("inspect", ref)
        assert shown.exit_code == 1 and "not a plain numeric" in shown.stderr, shown.output

    shown_key = "../../x" if case == "path" else bad_key
    with pytest.raises(DataError, match=trainer_says) as info:
        _epoch(_stream(ref, tokenizer))
    assert "train-000000.tar" in str(info.value) and shown_key in str(info.value)

    caplog.set_level(logging.WARNING, logger="fusion_trainer.data.stream")
    stream = _stream(ref, tokenizer, skip=True)
    keys, skipped = _epoch(stream)
    assert skipped == 1 and len(keys) == stream.batches_per_epoch == len(clean_keys), "the epoch stays full"
    assert bad_key not in keys and "../../x" not in keys
    assert any(shown_key in r.getMessage() and "train-000000.tar" in r.getMessage() for r in caplog.records)

    assert not marker.exists(), "a pickle was unpickled"
    assert not list(vdir.parent.glob("x.*")) and not list(vdir.glob("x.*")), "a member was extracted"


def test_fusion_train_names_the_bad_sample_or_skips_it_with_the_flag(
    dataset: tuple[Path, str], tiny_model_dir: Path, tmp_path: Path
) -> None:
    """What the user sees: `fusion-train` stops naming the shard and the sample (exit 1, one message); with
    `--skip-bad-samples` it trains, and the summary and metrics.jsonl count the skipped sample."""
    vdir, ref = dataset
    marker = tmp_path / "UNPICKLED"
    bad_key = _first_key(read_members(vdir / SHARD))
    republish_shard(vdir, SHARD, _replace("climate.npy", _pickled_npy(marker)))
    # 5 steps x 2 samples: the whole train epoch (10 samples), so the bad one is met whatever the order
    args = ["--shards", ref, "--model", str(tiny_model_dir), "--steps", "5", "--no-progress", *TINY_TRAIN]
    failed = run_tool("fusion-train", *args, "--out", str(tmp_path / "stops"))
    assert failed.returncode == 1, failed.stderr[-2000:]
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "train-000000.tar" in errors[0] and bad_key in errors[0], failed.stderr[
        -2000:
    ]
    assert "Traceback" not in failed.stderr

    ok = run_tool("fusion-train", *args, "--out", str(tmp_path / "skips"), "--skip-bad-samples")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert last_json(ok.stdout)["skipped_samples"] == 1 and last_json(ok.stdout)["step"] == 5
    records = [r for r in read_metrics(tmp_path / "skips") if "split" not in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5] and records[-1]["skipped_samples"] == 1
    assert f"skipped bad sample {bad_key!r}" in ok.stderr
    assert not marker.exists()
