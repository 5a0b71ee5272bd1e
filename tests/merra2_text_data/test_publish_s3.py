"""Versions on the real S3 protocol (a moto server): publish, resolve, verify, idempotence, streaming, fault injection."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec
import pytest
import s3fs
from climate_text_schema import decode_climate, decode_meta, open_dataset
from merra2_text_data.errors import PublishError
from merra2_text_data.store.versions import gc, list_versions, verify

_spec = importlib.util.spec_from_file_location(
    "_publish_helpers", Path(__file__).with_name("test_publish.py")
)
assert _spec is not None and _spec.loader is not None
_helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_helpers)
publish_fake: Callable[..., str] = _helpers.publish_fake


def _s3() -> s3fs.S3FileSystem:
    s3fs.S3FileSystem.clear_instance_cache()
    return s3fs.S3FileSystem()


def test_publish_list_resolve_verify_on_s3(s3_bucket: str) -> None:
    root = f"{s3_bucket}/merra2-text/conus"
    version = publish_fake(root)
    fs = _s3()
    bucket_path = root.removeprefix("s3://")
    assert fs.cat_file(f"{bucket_path}/tags/latest").decode().strip() == version
    ds = open_dataset(f"{root}@latest")
    assert ds.version == version
    assert ds.shard_urls("train") == [f"{root}/versions/{version}/shards/train-000000.tar"]
    [info] = list_versions(root)
    assert info.id == version and info.samples == 4 and info.tags == ["latest"]
    report = verify(f"{root}@latest")
    assert report.ok, report.problems
    assert not fs.exists(f"{bucket_path}/staging")


def test_republish_writes_nothing_new(s3_bucket: str) -> None:
    root = f"{s3_bucket}/ds/conus"
    v1 = publish_fake(root)
    fs = _s3()
    manifest = f"{root.removeprefix('s3://')}/versions/{v1}/manifest.json"
    etag, modified = fs.info(manifest)["ETag"], fs.info(manifest)["LastModified"]
    with pytest.raises(PublishError, match="already committed"):  # a second commit of that id: refused
        publish_fake(root)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = _s3()
    assert fs.info(manifest)["ETag"] == etag and fs.info(manifest)["LastModified"] == modified
    assert [v.id for v in list_versions(root)] == [v1]


def test_flipped_byte_fails_verify_naming_the_shard(s3_bucket: str) -> None:
    root = f"{s3_bucket}/ds/conus"
    version = publish_fake(root)
    fs = _s3()
    path = f"{root.removeprefix('s3://')}/versions/{version}/shards/test-000000.tar"
    data = bytearray(fs.cat_file(path))
    data[1000] ^= 0x01
    fs.pipe_file(path, bytes(data))
    report = verify(f"{root}@latest")
    assert not report.ok
    assert [p.split(":")[0] for p in report.problems] == ["shards/test-000000.tar"], report.problems


def test_stream_shards_back_with_webdataset(s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import webdataset as wds

    root = f"{s3_bucket}/ds/conus"
    publish_fake(root)
    ds = open_dataset(f"{root}@latest")

    def open_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> Any:
        return fsspec.open(url, mode).open()

    monkeypatch.setitem(wds.gopen_schemes, "s3", open_s3)
    seen = {}
    for sample in wds.WebDataset(ds.shard_urls(), shardshuffle=False, empty_check=False):
        key = sample["__key__"]
        array = decode_climate(sample["climate.npy"], key)
        meta = decode_meta(sample["json"], key)
        seen[key] = (array.shape, meta.split, sample["txt"].decode())
    assert len(seen) == 4 and {s[1] for s in seen.values()} == {"train", "test"}
    assert all(shape == (24, 1, 3, 4) for shape, _, _ in seen.values())
    assert all("°C" in text for _, _, text in seen.values())


@pytest.mark.parametrize("fail_at", [2, 4])
def test_failed_write_leaves_no_version_and_rerun_completes(
    s3_bucket: str, monkeypatch: pytest.MonkeyPatch, fail_at: int
) -> None:
    """Writes: 1-2 shards, 3 index, 4 quarantine, 5 card, 6 manifest, 7 tag. Fail at write N, then rerun."""
    root = f"{s3_bucket}/ds/conus"
    original = s3fs.S3FileSystem._pipe_file
    calls = {"n": 0}

    async def flaky(self: s3fs.S3FileSystem, path: str, data: bytes, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise OSError(f"injected failure writing {path}")
        return await original(self, path, data, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_pipe_file", flaky)
    with pytest.raises(OSError, match="injected failure"):
        publish_fake(root)
    fs = _s3()
    bucket_path = root.removeprefix("s3://")
    assert not fs.exists(f"{bucket_path}/tags/latest")
    assert fs.glob(f"{bucket_path}/versions/*/manifest.json") == []
    with pytest.raises(Exception, match="no tag or version|no dataset"):
        open_dataset(f"{root}@latest")
    assert gc(root).orphans  # the dead build's objects are visible to gc

    monkeypatch.setattr(s3fs.S3FileSystem, "_pipe_file", original)
    version = publish_fake(root)
    assert open_dataset(f"{root}@latest").version == version
    assert verify(f"{root}@latest").ok
    assert gc(root).orphans == []


def test_the_conditional_write_probe_stays_in_the_datasets_prefix(
    s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Credentials limited to a prefix (here: any write outside it is refused) can publish: the probe that the store
    honours If-None-Match is written in the folder of the object it guards, once per folder, and removed."""
    from collections import Counter

    from merra2_text_data import fs as fs_mod
    from merra2_text_data.fs import write_create_only

    monkeypatch.setattr(fs_mod, "_CONDITIONAL_OK", set())
    root = f"{s3_bucket}/team/ds/conus"
    prefix = f"{root.removeprefix('s3://')}/"
    original = s3fs.S3FileSystem._pipe_file
    probes: list[str] = []

    async def scoped(self: s3fs.S3FileSystem, path: str, data: bytes, *args: Any, **kwargs: Any) -> Any:
        path = str(path).lstrip("/")
        if ".merra2-text-probe" in path:
            probes.append(path)
        if not path.startswith(prefix):
            raise PermissionError(f"AccessDenied: PutObject on {path}")
        return await original(self, path, data, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_pipe_file", scoped)
    version = publish_fake(root)
    assert probes and all(p.startswith(prefix) for p in probes), probes
    assert set(Counter(probes).values()) == {2}  # each probe written twice (the second refused), each folder once
    folders = [p.rsplit("/", 1)[0] for p in dict.fromkeys(probes)]
    assert len(folders) == len(set(folders)) and f"{prefix}versions/{version}" in folders
    fs = _s3()
    assert not [p for p in fs.find(s3_bucket.removeprefix("s3://")) if ".merra2-text-probe" in p]
    n = len(probes)
    assert write_create_only(fs, f"{root}/versions/{version}/extra.json", b"{}") and len(probes) == n
