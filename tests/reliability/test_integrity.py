"""Integrity and trust (issue 16): no unverified byte is trained on, no published version changes, no file of the
project is a pickle to run.

Each test is a hole found on main before this suite existed, reproduced the way a new user or a hostile writer of the
store or of a run directory would: a wrong checksum on the last shard of a pass, a crafted `rng_rank0.pt`, a shard
path `../../OUTSIDE/evil.tar`, a tag holding a path, a manifest copied into another version's folder, a second build of
a committed version, two builds of one version at once, a same-size corrupt granule, a GranuleUR with `../`, a store
that ignores `If-None-Match`, ... What each one guarantees (and what not) is in docs/reliability.md, "Threat model".
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import shutil
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import pytest
import torch
from climate_text_schema import (
    Manifest,
    ManifestError,
    ReferenceError_,
    ShardInfo,
    open_dataset,
)
from fsspec.implementations.memory import MemoryFileSystem
from fusion_trainer.data.stream import (
    DEFAULT_PROMPT,
    ClimateTextStream,
    epoch_samples,
    open_shards,
    render_prompt,
)
from fusion_trainer.errors import CheckpointError, DataError
from fusion_trainer.training.checkpoint import checkpoint_tensor_names, load_checkpoint
from merra2_text_data.errors import ConfigError, CredentialsError, GranuleError, PublishError, StoreError
from merra2_text_data.source.cmr import _granule_from_umm
from merra2_text_data.source.fetch import Granule, download_granules

from .conftest import BBOX, DATASET, START, build_config, cli, granule, republish_shard, rewrite_manifest

NAME = "MERRA2_400.tavg1_2d_slv_Nx.20190101.nc4"


class _Boom:
    """Unpickling this object creates a marker file: proof that a pickle was (or never was) executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def _manifest(vdir: Path) -> dict[str, Any]:
    return json.loads((vdir / "manifest.json").read_text())


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


# --- 1. a shard is checked whole before any of its samples is handed out ----------------------------------------------


def _keys_of(vdir: Path, shard: str) -> set[str]:
    index = pd.read_parquet(vdir / "index.parquet")
    return set(index.loc[index["shard"] == shard, "key"])


@pytest.mark.parametrize(
    "mode",
    [
        "eval",
        "train, shuffle_buffer 1",
        "skip_bad_samples, shuffle_buffer 1",
        "lanes 2",
        "eval, verify off: size",
    ],
)
def test_no_sample_of_a_shard_that_fails_its_checks_reaches_a_batch(
    dataset: tuple[Path, str], tokenizer: Any, mode: str
) -> None:
    """The last train shard's sha256 (or size) in the manifest is wrong. An evaluation pass, a training pass with
    `shuffle_buffer<=1`, `--skip-bad-samples` and lanes all used to hand out its samples before the check, and a pass
    cut at its n-th sample never ran the check at all. Now: DataError naming the shard before any of its samples."""
    vdir, ref = dataset
    manifest = _manifest(vdir)
    bad = [s for s in manifest["shards"] if s["split"] == "train"][-1]
    if mode.endswith("size"):
        bad["bytes"] += 512
    else:
        bad["sha256"] = hashlib.sha256(b"another shard").hexdigest()
    rewrite_manifest(vdir, manifest)
    bad_keys = _keys_of(vdir, bad["path"])
    assert bad_keys
    ds = open_shards(ref)
    options: dict[str, Any] = {
        "eval": {"train": False},
        "train, shuffle_buffer 1": {"shuffle_buffer": 1},
        "skip_bad_samples, shuffle_buffer 1": {"shuffle_buffer": 1, "skip_bad_samples": True},
        "lanes 2": {"lanes": 2, "shuffle_buffer": 1},
        "eval, verify off: size": {"train": False, "verify": False},
    }[mode]
    stream = ClimateTextStream(ds, "train", tokenizer, prompt=render_prompt(DEFAULT_PROMPT, ds), micro_batch=1,
                               max_length=256, seed=1, **options)  # fmt: skip
    seen: list[str] = []
    says = "bytes where the manifest lists" if mode.endswith("size") else "sha256"
    with pytest.raises(DataError, match=rf"{bad['path']} fails its checks .*{says}"):
        it = iter(stream)
        for _ in range(stream.batches_per_epoch):
            seen += next(it)["keys"]
    assert not set(seen) & bad_keys, "a sample of the shard that fails its checks reached a batch"


def test_generate_and_eval_readers_get_no_sample_of_a_damaged_first_shard(dataset: tuple[Path, str]) -> None:
    """`fusion-generate` and the evaluation sections read `epoch_samples(shuffle=False)`: a flipped byte in the last
    array of the first shard used to let its first samples through (the check ran at the shard's end)."""
    vdir, ref = dataset
    path = vdir / "shards" / "train-000000.tar"
    data = bytearray(path.read_bytes())
    data[data.rindex(b"\x93NUMPY") + 300] ^= 0x01  # inside the last array's values: it still decodes
    path.write_bytes(bytes(data))
    samples = epoch_samples(open_shards(ref), "train", epoch=0, rank=0, world=1, seed=0, shuffle=False)
    with pytest.raises(DataError, match=r"train-000000\.tar fails its checks .*sha256"):
        next(samples)


def test_a_shard_is_bounded_by_the_contract(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dataset: tuple[Path, str]
) -> None:
    """A reader holds a whole shard in memory to check it first: the contract bounds a shard at MAX_SHARD_BYTES,
    which the builder's config, the builder's writer and every manifest reader enforce."""
    from climate_text_schema import MAX_SHARD_BYTES, SampleError, SampleMeta
    from merra2_text_data import BuildConfig
    from merra2_text_data.store import shards as writer
    from merra2_text_data.store.shards import SampleRecord, write_shard

    with pytest.raises(ConfigError, match="largest shard"):
        BuildConfig.from_options(region=BBOX, start="2019-01-01", end="2019-01-02", shard_size="2GiB")
    good = {"path": "shards/train-000000.tar", "split": "train", "samples": 1, "sha256": "0" * 64}
    with pytest.raises(ValueError, match="less than or equal"):
        ShardInfo.model_validate({**good, "bytes": MAX_SHARD_BYTES + 1})
    vdir, _ = dataset
    monkeypatch.setattr(writer, "MAX_SHARD_BYTES", 4096)
    meta = SampleMeta.model_validate(json.loads(_sample_meta(vdir)[0]))
    record = SampleRecord(key=meta.key, array=np.zeros((24, 4, 4, 5), np.float32), text="t", meta=meta)
    with pytest.raises(SampleError, match="largest shard"):
        write_shard(fsspec.filesystem("file"), str(tmp_path / "v"), "train", 0, [record])
    assert not (tmp_path / "v" / "shards").exists() or not list((tmp_path / "v" / "shards").iterdir())


def _sample_meta(vdir: Path) -> list[str]:
    """The .json members of the first shard."""
    import tarfile

    with tarfile.open(vdir / "shards" / "train-000000.tar") as tar:
        out = []
        for info in tar.getmembers():
            if info.name.endswith(".json"):
                handle = tar.extractfile(info)
                assert handle is not None
                out.append(handle.read().decode())
        return out


# --- 2. a checkpoint never runs code ----------------------------------------------------------------------------------


def _checkpoint(tmp_path: Path) -> Path:
    ckpt = tmp_path / "run" / "checkpoints" / "step1"
    ckpt.mkdir(parents=True)
    (ckpt / "COMPLETE").write_text(json.dumps({"step": 1, "world": 1}))
    return ckpt


def _write_checksums(ckpt: Path) -> None:
    """What a hostile writer of the run directory can do too: list every file's sha256 in CHECKSUMS.json."""
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in ckpt.iterdir()
             if p.name not in ("COMPLETE", "CHECKSUMS.json")}  # fmt: skip
    (ckpt / "CHECKSUMS.json").write_text(json.dumps({"sha256": files}))


class _PickleLoadingEngine:
    """Stands for DeepSpeed: its checkpoint engine unpickles with torch.load(weights_only=False)."""

    world_size = 1

    def __init__(self, ckpt: Path) -> None:
        self.ckpt = ckpt
        self.checkpoint_engine = SimpleNamespace()
        self.checkpoint_engine.load = lambda path, map_location=None: torch.load(
            path, map_location=map_location, weights_only=False
        )
        self.calls = 0

    def load_checkpoint(self, *args: Any, **kwargs: Any) -> tuple[str, dict[str, Any]]:
        self.calls += 1
        self.checkpoint_engine.load(str(self.ckpt / "mp_rank_00_model_states.pt"), map_location="cpu")
        return str(self.ckpt), {"step": 1}


def test_a_crafted_rng_state_never_runs(tmp_path: Path) -> None:
    """A crafted `rng_rank0.pt` ran its payload on every `--resume` (torch.load(weights_only=False)). RNG states are
    JSON now; an old `.pt` one is never loaded (a warning says so), even when CHECKSUMS.json lists it."""
    marker = tmp_path / "RAN"
    ckpt = _checkpoint(tmp_path)
    torch.save({"module": {"w": torch.zeros(2)}}, ckpt / "mp_rank_00_model_states.pt")
    torch.save({"python": _Boom(marker)}, ckpt / "rng_rank0.pt")
    _write_checksums(ckpt)
    with contextlib.suppress(Exception):
        load_checkpoint(_PickleLoadingEngine(ckpt), ckpt, rank=0)
    assert not marker.exists(), "the crafted RNG state ran its payload"
    (ckpt / "rng_rank0.json").write_text('{"python": "not a state"}')
    _write_checksums(ckpt)
    with pytest.raises(CheckpointError, match=r"rng_rank0\.json is not an RNG state"):
        load_checkpoint(_PickleLoadingEngine(ckpt), ckpt, rank=0)


def test_deepspeed_files_are_read_without_running_code(tmp_path: Path) -> None:
    """DeepSpeed's loader unpickles its files with weights_only=False; a crafted model-states file listed in a
    rewritten CHECKSUMS.json ran its payload. Now DeepSpeed's loads go through torch.load(weights_only=True) (plus
    DeepSpeed's few settings classes), and `checkpoint_tensor_names` too."""
    marker = tmp_path / "RAN"
    ckpt = _checkpoint(tmp_path)
    torch.save({"module": {"w": torch.zeros(2)}, "x": _Boom(marker)}, ckpt / "mp_rank_00_model_states.pt")
    _write_checksums(ckpt)
    with contextlib.suppress(Exception):
        checkpoint_tensor_names(ckpt)
    assert not marker.exists(), "checkpoint_tensor_names ran a payload"
    with pytest.raises(CheckpointError, match="not plain tensors"):
        load_checkpoint(_PickleLoadingEngine(ckpt), ckpt, rank=0)
    assert not marker.exists(), "DeepSpeed's loader ran a payload"


def test_a_changed_or_added_checkpoint_file_is_refused_before_loading(tmp_path: Path) -> None:
    """Files are checked against CHECKSUMS.json (written at save, before COMPLETE) before DeepSpeed reads any."""
    ckpt = _checkpoint(tmp_path)
    torch.save({"module": {"w": torch.zeros(2)}}, ckpt / "mp_rank_00_model_states.pt")
    engine = _PickleLoadingEngine(ckpt)
    with pytest.raises(CheckpointError, match="no CHECKSUMS.json"):
        load_checkpoint(engine, ckpt, rank=0)
    _write_checksums(ckpt)
    torch.save({"module": {"w": torch.ones(2)}}, ckpt / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt changed since it was saved"):
        load_checkpoint(engine, ckpt, rank=0)
    _write_checksums(ckpt)
    (ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"dropped in")
    with pytest.raises(CheckpointError, match="not in CHECKSUMS.json"):
        load_checkpoint(engine, ckpt, rank=0)
    assert engine.calls == 0, "DeepSpeed read a file before it was verified"


# --- 3. manifests and tags are data, never paths ----------------------------------------------------------------------


def test_a_shard_path_outside_the_contract_is_never_opened(dataset: tuple[Path, str], tmp_path: Path) -> None:
    vdir, ref = dataset
    outside = tmp_path / "OUTSIDE"
    outside.mkdir()
    shutil.copy(vdir / "shards" / "train-000000.tar", outside / "evil.tar")
    manifest = _manifest(vdir)
    manifest["shards"][0]["path"] = os.path.relpath(outside / "evil.tar", vdir)  # ../../../OUTSIDE/evil.tar
    rewrite_manifest(vdir, manifest)
    with pytest.raises(DataError, match=r"is not shards/train-<NNNNNN>\.tar"):
        open_shards(ref)
    res = cli("verify", ref)
    assert res.exit_code == 1 and "is not shards/train-<NNNNNN>.tar" in res.stderr, res.output


def test_a_tag_holding_a_path_is_refused(dataset: tuple[Path, str], tmp_path: Path) -> None:
    """A tag's text used to be joined to the versions folder as is: `../../../OUTSIDE` opened another tree."""
    vdir, _ = dataset
    root = vdir.parents[2]
    shutil.copytree(vdir, tmp_path / "OUTSIDE")  # a complete version elsewhere, which the old reader opened
    tags = root / DATASET / "tags"
    (tags / "latest").write_text(os.path.relpath(tmp_path / "OUTSIDE", root / DATASET / "versions") + "\n")
    with pytest.raises(ReferenceError_, match="not a version id"):
        open_dataset(f"{root / DATASET}@latest")
    with pytest.raises(ReferenceError_, match="malformed"):
        open_dataset(f"{root / DATASET}@..")
    res = cli("verify", f"{root / DATASET}@latest")
    assert res.exit_code != 0 and "not a version id" in res.stderr, res.output


def test_a_manifest_in_another_versions_folder_is_refused(dataset: tuple[Path, str]) -> None:
    vdir, _ = dataset
    other = vdir.parent / ("0" * 20)
    shutil.copytree(vdir, other)
    with pytest.raises(ManifestError, match="names version .* but lies in folder"):
        open_dataset(str(other))


def test_files_changed_after_publishing_are_detected(dataset: tuple[Path, str]) -> None:
    """The manifest records the sha256 of index.parquet, quarantine.parquet and README.md, and the sibling
    manifest.json.sha256 records the manifest's: a change to any of them is named by readers and `verify`."""
    vdir, ref = dataset
    assert set(_manifest(vdir)["files"]) == {"index.parquet", "quarantine.parquet", "README.md"}
    index = pd.read_parquet(vdir / "index.parquet")
    index.loc[0, "text"] = "a caption nobody wrote"
    index.to_parquet(vdir / "index.parquet", index=False)
    with (vdir / "README.md").open("a") as fh:
        fh.write("\nan edit\n")
    with pytest.raises(ManifestError, match="index.parquet: its sha256 .* is not the manifest's"):
        open_dataset(ref).read_index()
    res = cli("verify", ref)
    assert res.exit_code == 1 and "index.parquet" in res.stderr and "README.md" in res.stderr, res.output
    manifest = _manifest(vdir)
    manifest["normalization"]["T2M"]["mean"] += 10.0  # the manifest itself, its digest left as published
    (vdir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    with pytest.raises(ManifestError, match=r"is not the .* of manifest\.json\.sha256"):
        open_dataset(ref)


# --- 4. a published version never changes -----------------------------------------------------------------------------


def _published(vdir: Path) -> dict[str, bytes]:
    return {p.relative_to(vdir).as_posix(): p.read_bytes() for p in sorted(vdir.rglob("*")) if p.is_file()}


def _commit_args(
    vdir: Path, raw: dict[str, Any], created_at: str, card: str
) -> tuple[Any, str, Manifest, pd.DataFrame, pd.DataFrame, str]:
    """commit_version's arguments for the version in `vdir`: its manifest `raw` with another `created_at` (so
    another build's manifest), its index and quarantine, and `card`."""
    from merra2_text_data.fs import url_to_fs

    fs, url = url_to_fs(str(vdir.parents[1]))
    manifest = Manifest.model_validate({**raw, "created_at": created_at, "files": None})
    return (fs, url, manifest, pd.read_parquet(vdir / "index.parquet"), pd.read_parquet(vdir / "quarantine.parquet"),
            card)  # fmt: skip


def test_a_second_build_of_a_committed_version_rewrites_nothing(dataset: tuple[Path, str]) -> None:
    """A second commit of a committed version id overwrote index.parquet and README.md (the create-only manifest
    write only logged INFO). Now it raises before any write and the published bytes stay as they were."""
    from merra2_text_data.store.publish import commit_version

    vdir, ref = dataset
    before = _published(vdir)
    fs, url, manifest, index, quarantine, _ = _commit_args(
        vdir, _manifest(vdir), "2030-01-01T00:00:00+00:00", "# another card\n"
    )
    index.loc[0, "text"] = "another caption"
    with pytest.raises(PublishError, match="already committed"):
        commit_version(fs, url, manifest, index, quarantine, "# another card\n")
    assert _published(vdir) == before
    assert cli("verify", ref).exit_code == 0


def test_two_concurrent_commits_of_one_version_one_wins_the_other_fails_cleanly(
    dataset: tuple[Path, str],
) -> None:
    from merra2_text_data.store.publish import commit_version

    vdir, _ = dataset
    saved = _manifest(vdir)
    for name in (
        "manifest.json",
        "manifest.json.sha256",
    ):  # the version's shards are written, nothing committed
        (vdir / name).unlink(missing_ok=True)
    barrier = threading.Barrier(2)
    outcome: dict[str, Any] = {}

    def build(who: str) -> None:
        args = _commit_args(vdir, saved, f"2030-01-0{1 if who == 'a' else 2}T00:00:00+00:00", f"# {who}\n")
        barrier.wait()
        try:
            outcome[who] = commit_version(*args)
        except PublishError as exc:
            outcome[who] = exc

    threads = [threading.Thread(target=build, args=(w,)) for w in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    failed = [w for w, r in outcome.items() if isinstance(r, PublishError)]
    assert len(outcome) == 2 and len(failed) == 1, outcome
    [winner] = set(outcome) - set(failed)
    ds = open_dataset(str(vdir))
    assert (vdir / "README.md").read_text() == f"# {winner}\n"
    ds.read_index()  # every file matches the winner's manifest
    assert ds.read_file("README.md") == f"# {winner}\n".encode()
    assert cli("verify", str(vdir)).exit_code == 0
    assert not list(vdir.rglob("*.tmp-*")) and not (vdir.parents[1] / "staging").exists()


def test_write_create_only_leaves_no_temp_file_when_the_write_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from merra2_text_data.fs import write_create_only

    fs = fsspec.filesystem("file")
    real = fs.pipe_file

    def disk_full(path: str, data: bytes, **kwargs: Any) -> None:
        real(path, data[:3], **kwargs)  # part of it reached the disk
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fs, "pipe_file", disk_full)
    with pytest.raises(StoreError, match="No space left"):
        write_create_only(fs, str(tmp_path / "manifest.json"), b"{}" * 100)
    assert list(tmp_path.iterdir()) == []


class _Store(MemoryFileSystem):
    """An in-memory S3-like store; `honours` says whether a create-only PUT of an existing key is refused."""

    protocol = ("s3",)
    honours = True

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        if mode == "create" and self.honours and self.exists(path):
            raise FileExistsError(path)
        super().pipe_file(path, value, **kwargs)


class _IgnoringStore(_Store):
    honours = False


def test_a_store_that_ignores_if_none_match_is_refused_before_a_commit() -> None:
    """Some S3-compatible stores accept If-None-Match and ignore it: a manifest would be replaced silently. A probe
    write, once per bucket, detects it."""
    from merra2_text_data.fs import write_create_only

    good = _Store(skip_instance_cache=True)
    assert write_create_only(good, "s3://good-bucket/ds/m.json", b"1") is True
    assert write_create_only(good, "s3://good-bucket/ds/m.json", b"2") is False
    assert good.cat_file(good._strip_protocol("s3://good-bucket/ds/m.json")) == b"1"
    assert not [k for k in good.store if ".merra2-text-probe" in k], "the probe object was left behind"
    bad = _IgnoringStore(skip_instance_cache=True)
    with pytest.raises(PublishError, match="ignores conditional writes"):
        write_create_only(bad, "s3://ignoring-bucket/ds/m.json", b"1")
    assert not bad.exists(bad._strip_protocol("s3://ignoring-bucket/ds/m.json"))


# --- 5. granules: checksums from CMR are checked, names are not paths -------------------------------------------------


def _granule(source: Path, checksum: str | None) -> Granule:
    return Granule(
        "M2T1NXSLV", dt.date(2019, 1, 1), "400", NAME, str(source), source.stat().st_size, checksum
    )


@pytest.mark.parametrize("algorithm", ["MD5", "SHA-256"])
def test_a_granule_whose_checksum_differs_is_never_used(tmp_path: Path, algorithm: str) -> None:
    """A same-size corruption, or a `.part` left by an older file, passed the size check. Now the CMR checksum
    (MD5 or SHA-256) is checked: a wrong one is retried from scratch, then named; the right one is accepted."""
    source = tmp_path / "remote" / NAME
    source.parent.mkdir()
    source.write_bytes(b"granule bytes " * 100)
    name = "md5" if algorithm == "MD5" else "sha256"
    right = hashlib.new(name, source.read_bytes()).hexdigest()
    cache = tmp_path / "cache"
    with pytest.raises(GranuleError, match=f"its {algorithm} is {right} where the CMR record lists"):
        download_granules(
            [_granule(source, f"{algorithm}:{'0' * len(right)}")], cache, retries=1, backoff_s=0
        )
    assert not list(cache.rglob(NAME)), "a granule with a wrong checksum was kept"
    part = cache / "M2T1NXSLV" / "2019" / f"{NAME}.part"
    part.write_bytes(b"an older file " * 100)  # same size, other bytes: what a resumed download would keep
    [done] = download_granules([_granule(source, f"{algorithm}:{right}")], cache, backoff_s=0)
    assert Path(done.url).read_bytes() == source.read_bytes()


def test_a_cached_granule_damaged_in_place_is_downloaded_again(tmp_path: Path) -> None:
    source = tmp_path / "remote" / NAME
    source.parent.mkdir()
    source.write_bytes(b"granule bytes " * 100)
    granule = _granule(source, f"MD5:{hashlib.md5(source.read_bytes()).hexdigest()}")
    [done] = download_granules([granule], tmp_path / "cache")
    cached = Path(done.url)
    cached.write_bytes(b"x" * cached.stat().st_size)  # same size
    [again] = download_granules([granule], tmp_path / "cache")
    assert Path(again.url).read_bytes() == source.read_bytes()


def test_a_local_granule_rewritten_in_place_builds_another_version(
    granules: Path, tmp_path: Path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder listing gives a granule's name and size only: a file rewritten in place with the same size (other
    values) planned under the old version id, so the build found it "already committed" and published nothing new.
    Now the plan hashes the bytes of local and fsspec granules (SHA-256, kept in the cache by size and mtime or
    ETag): the id changes with the content, an S3 copy of the same files plans the same id, and an unchanged file is
    not read again."""
    from merra2_text_data.pipeline import plan_build
    from merra2_text_data.source import digests as granule_digests

    out = tmp_path / "out"
    first = plan_build(build_config(granules, out))
    assert all(s.checksum and s.checksum.startswith("SHA256:") for s in first.sources)
    path = granule(granules, START)
    assert next(s for s in first.sources if s.file == path.name).checksum == (
        f"SHA256:{hashlib.sha256(path.read_bytes()).hexdigest()}")  # fmt: skip

    reads: list[str] = []
    real = granule_digests.file_digest
    monkeypatch.setattr(granule_digests, "file_digest", lambda url: reads.append(url) or real(url))
    assert plan_build(build_config(granules, out)).version == first.version
    assert reads == [], "unchanged granules were hashed again"

    data = bytearray(path.read_bytes())
    data[-200] ^= 0xFF  # same size, other bytes
    path.write_bytes(bytes(data))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000_000))
    changed = plan_build(build_config(granules, out))
    assert reads == [str(path)], "only the rewritten granule is hashed again"
    assert changed.version != first.version

    fs = fsspec.filesystem("s3")
    fs.put(str(granules), f"{s3_bucket}/granules", recursive=True)
    remote = plan_build(build_config(f"{s3_bucket}/granules", out))
    assert remote.version == changed.version, "an S3 copy of the same granules plans another version"
    off = plan_build(build_config(granules, out, overrides=["source.hash_granules=false"]))
    assert all(s.checksum is None for s in off.sources)


def test_a_granule_ur_naming_a_path_is_refused(tmp_path: Path) -> None:
    record = {"umm": {
        "GranuleUR": f"M2T1NXSLV.5.12.4:../../../evil/{NAME}",
        "RelatedUrls": [{"Type": "GET DATA", "URL": f"https://data.example/{NAME}"}],
        "DataGranule": {"ArchiveAndDistributionInformation": [{"Name": NAME, "SizeInBytes": 10}]},
    }}  # fmt: skip
    with pytest.raises(GranuleError, match="names a path"):
        _granule_from_umm(record, "M2T1NXSLV")
    sneaky = Granule("M2T1NXSLV", dt.date(2019, 1, 1), "400", f"../../../{NAME}", "/nowhere", 10)
    with pytest.raises(GranuleError, match="outside the cache"):
        download_granules([sneaky], tmp_path / "cache")
    assert not (tmp_path / NAME).exists()


def test_the_earthdata_token_only_travels_over_https(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from merra2_text_data.source.download import _refuse_plain_http_redirect

    monkeypatch.setenv("EARTHDATA_TOKEN", "MARKER-TOKEN")
    record = {"umm": {
        "GranuleUR": f"M2T1NXSLV.5.12.4:{NAME}",
        "RelatedUrls": [{"Type": "GET DATA", "URL": f"http://data.example/{NAME}"}],
        "DataGranule": {"ArchiveAndDistributionInformation": [{"Name": NAME, "SizeInBytes": 10}]},
    }}  # fmt: skip
    with pytest.raises(GranuleError, match="plain http only"):
        _granule_from_umm(record, "M2T1NXSLV")
    plain = Granule("M2T1NXSLV", dt.date(2019, 1, 1), "400", NAME, f"http://data.example/{NAME}", 10)
    with pytest.raises(CredentialsError, match="plain http") as info:
        download_granules([plain], tmp_path / "cache")  # before any login, so no token is ever sent
    assert "MARKER-TOKEN" not in str(info.value)
    redirect = SimpleNamespace(is_redirect=True, headers={"Location": "http://plain.example/x?token=1"},
                               url="https://data.example/x")  # fmt: skip
    with pytest.raises(CredentialsError, match="redirects to plain http"):
        _refuse_plain_http_redirect(redirect)


# --- 6. smaller holes -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["pickle", "pyd"])
def test_a_member_outside_the_contract_is_refused_by_the_trainer_as_by_verify(
    dataset: tuple[Path, str], tokenizer: Any, suffix: str
) -> None:
    """The trainer silently dropped `<key>.pickle` / `<key>.pyd` members that `merra2-text verify` rejects: one rule
    (`member_suffix_problem`) for both now."""
    vdir, ref = dataset
    shard = "shards/train-000000.tar"

    def add_member(members: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
        key = members[0][0].split(".", 1)[0]
        return [*members[:3], (f"{key}.{suffix}", b"payload"), *members[3:]]

    republish_shard(vdir, shard, add_member)
    res = cli("verify", ref)
    assert res.exit_code == 1 and f".{suffix}' is not <key>.{{climate.npy,txt,json}}" in res.stderr, (
        res.output
    )
    ds = open_shards(ref)
    stream = ClimateTextStream(ds, "train", tokenizer, prompt=render_prompt(DEFAULT_PROMPT, ds), micro_batch=1,
                               max_length=256, seed=1, train=False)  # fmt: skip
    with pytest.raises(DataError, match=rf"\.{suffix}' is not <key>\.\{{climate\.npy,txt,json\}}"):
        list(stream)


def test_credentials_in_urls_never_reach_an_error_or_the_run_config(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`s3://user:pw@host/...` and `https://user:pw@...` appeared in error lines and in RUN_DIR/config.yaml."""
    from fusion_trainer.config import TrainConfig
    from fusion_trainer.training.steps import prepare_run_dir

    url = "file://user:SECRET-PW@localhost/nothing/ds@latest"
    res = cli("verify", url)
    assert res.exit_code != 0 and "user:***@localhost" in res.stderr and "SECRET-PW" not in res.output
    config = TrainConfig.load({"shards": url, "model": str(tiny_model_dir), "out": str(tmp_path / "run")})
    run_dir = prepare_run_dir(config, rank=0)
    text = (run_dir / "config.yaml").read_text()
    assert "SECRET-PW" not in text and "file://user:***@localhost/nothing/ds@latest" in text
    from fusion_trainer.cli_support import fail

    fail(DataError(f"--shards {url}: cannot read the dataset"))  # fusion-train's one error line
    assert "SECRET-PW" not in capsys.readouterr().err


# --- the bad inputs above, counted (docs/reliability.md quotes this figure) --------------------------------------------


def test_the_suite_counts_its_fault_classes() -> None:
    """Every hole of issue 16 has at least one test here; this test only keeps the list in docs/reliability.md in
    step with the file (a renamed or removed test fails it)."""
    doc = (Path(__file__).parents[2] / "docs" / "reliability.md").read_text()
    names = [n for n in globals() if n.startswith("test_") and n != "test_the_suite_counts_its_fault_classes"]
    missing = [n for n in names if n not in doc]
    assert not missing, f"docs/reliability.md does not list {missing}"
