"""Deterministic WebDataset shards: bytes, rolling by size, atomic writes, and the checking reader."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import fsspec
import numpy as np
import pytest
from climate_text_schema import SampleError, SampleMeta
from merra2_text_data.fs import write_atomic
from merra2_text_data.store.shards import (
    SampleRecord,
    estimate_sample_bytes,
    iter_shard,
    pack_by_size,
    read_shard,
    shard_bytes,
    write_shard,
    write_shards,
)

from tests.tar_helpers import tar_bytes


def _record(i: int, shape: tuple[int, int, int, int] = (2, 2, 3, 4)) -> SampleRecord:
    rng = np.random.default_rng(i)
    array = (280.0 + rng.standard_normal(shape)).astype(np.float32)
    key = f"conus-2019010{i % 10}-{i:03d}"
    meta = SampleMeta(
        key=key, split="train", time_start="2019-01-01T00:00:00Z", time_end="2019-01-02T00:00:00Z", region="conus",
        bbox=[-105.0, 35.0, -95.0, 45.0], variables=["T2M", "U10M"], units=["K", "m s-1"],
        lat=[35.0, 35.5, 36.0], lon=[-105.0, -104.375, -103.75, -103.125],
        stats={"T2M": {"mean": float(array[:, 0].mean()), "min": float(array[:, 0].min()), "max": 1e3},
               "U10M": {"mean": 0.0, "min": 0.0, "max": 0.0}},
    )  # fmt: skip
    return SampleRecord(key=key, array=array, text=f"Sample {i}: 7.1 °C on average.", meta=meta)


def test_same_samples_same_bytes_and_layout() -> None:
    records = [_record(i) for i in range(3)]
    a, keys = shard_bytes(records)
    b, _ = shard_bytes([_record(i) for i in range(3)])
    assert a == b and hashlib.sha256(a).hexdigest() == hashlib.sha256(b).hexdigest()
    assert keys == [r.key for r in records]
    with tarfile.open(fileobj=io.BytesIO(a)) as tar:
        members = tar.getmembers()
        assert [m.name for m in members[:3]] == [
            f"{keys[0]}.climate.npy",
            f"{keys[0]}.txt",
            f"{keys[0]}.json",
        ]
        assert {(m.mtime, m.uid, m.gid, m.mode) for m in members} == {(0, 0, 0, 0o644)}
        arr = np.load(io.BytesIO(tar.extractfile(members[0]).read()), allow_pickle=False)  # type: ignore[union-attr]
        np.testing.assert_array_equal(arr, records[0].array)
        meta = json.loads(tar.extractfile(members[2]).read())  # type: ignore[union-attr]
        assert meta["key"] == keys[0] and meta["variables"] == ["T2M", "U10M"]
    assert len(a) % tarfile.RECORDSIZE == 0


def test_write_rolls_at_shard_size_and_reads_back(tmp_path: Path) -> None:
    fs = fsspec.filesystem("file")
    records = [_record(i, (24, 2, 8, 8)) for i in range(7)]
    limit = len(shard_bytes(records[:2])[0]) + 100
    written = write_shards(fs, str(tmp_path), "train", iter(records), shard_size=limit, first_number=3)
    n = len(written)
    assert n >= 3 and [info.path for info, _ in written] == [
        f"shards/train-{k:06d}.tar" for k in range(3, 3 + n)
    ]
    assert sum(info.samples for info, _ in written) == 7
    assert [k for _, keys in written for k in keys] == [r.key for r in records]
    done = 0
    for info, keys in written:
        done += len(keys)
        if done < len(records):  # a shard closes only when the next sample would not fit
            assert len(shard_bytes(records[done - len(keys) : done + 1])[0]) > limit
        path = tmp_path / info.path
        assert info.bytes == path.stat().st_size <= limit
        assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        content = read_shard(fs, str(path), n_variables=2)
        assert content.keys == keys and content.sha256 == info.sha256 and content.bytes == info.bytes
    assert not list(tmp_path.rglob("*.tmp-*"))


def test_estimate_and_pack_match_real_sizes() -> None:
    rec = _record(0, (24, 2, 8, 8))
    real = len(shard_bytes([rec])[0])
    est = estimate_sample_bytes(rec.array.shape) + 2 * 512
    assert est >= real - tarfile.RECORDSIZE and est < real + 10_000
    assert pack_by_size([100, 100, 100, 5000, 100], shard_size=1100) == [[0], [1], [2], [3], [4]]
    assert pack_by_size([100] * 5, shard_size=1024 + 250) == [[0, 1], [2, 3], [4]]


def test_write_atomic_leaves_old_file_when_write_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs = fsspec.filesystem("file")
    target = tmp_path / "x" / "a.bin"
    write_atomic(fs, str(target), b"old")

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(fs, "mv", boom)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(fs, str(target), b"new")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.bin"]


def _tar(members: dict[str, bytes]) -> io.BytesIO:
    return io.BytesIO(tar_bytes(members.items(), tarfile.PAX_FORMAT))


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("../evil.txt", "is a path"),
        ("/abs.txt", "is a path"),
        ("dir/k.txt", "is a path"),
        ("k.exe", "is not <key>"),
    ],
)
def test_reader_rejects_bad_member_names(name: str, match: str) -> None:
    with pytest.raises(SampleError, match=match):
        list(iter_shard(_tar({name: b"x"}), "bad.tar"))


def test_reader_rejects_pickle_and_incomplete_samples() -> None:
    good, _ = shard_bytes([_record(0)])
    samples = list(iter_shard(io.BytesIO(good), "good.tar", n_variables=2))
    assert len(samples) == 1 and samples[0]["climate"].dtype == np.float32
    with pytest.raises(SampleError, match="2 variables"):
        list(iter_shard(io.BytesIO(good), "good.tar", n_variables=3))
    npy = io.BytesIO()
    np.save(npy, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    rec = _record(1)
    meta = json.dumps(rec.meta.model_dump()).encode()
    with pytest.raises(SampleError, match="not a plain numeric"):
        list(iter_shard(_tar({f"{rec.key}.climate.npy": npy.getvalue(), f"{rec.key}.txt": b"t",
                               f"{rec.key}.json": meta}), "p.tar"))  # fmt: skip
    with pytest.raises(SampleError, match="lacks member"):
        list(iter_shard(_tar({f"{rec.key}.txt": b"t", f"{rec.key}.json": meta}), "p.tar"))


def test_write_shard_rejects_float64_and_key_mismatch(tmp_path: Path) -> None:
    fs = fsspec.filesystem("file")
    rec = _record(0)
    bad = SampleRecord(key=rec.key, array=rec.array.astype(np.float64), text=rec.text, meta=rec.meta)
    with pytest.raises(SampleError, match="float32"):
        write_shard(fs, str(tmp_path), "train", 0, [bad])
    other = SampleRecord(key="other", array=rec.array, text=rec.text, meta=rec.meta)
    with pytest.raises(SampleError, match="metadata names key"):
        write_shard(fs, str(tmp_path), "train", 0, [other])
    assert not (tmp_path / "shards").exists() or not list((tmp_path / "shards").iterdir())
