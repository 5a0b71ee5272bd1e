"""open_dataset resolves every reference form, on a local folder and on a real S3 protocol server (moto)."""

from __future__ import annotations

import re
from pathlib import Path

import fsspec
import pytest
from climate_text_schema import (
    SCHEMA_VERSION,
    DatasetNotFoundError,
    ManifestError,
    ReferenceError_,
    SchemaVersionError,
    open_dataset,
    parse_reference,
)

from .helpers import write_version

V1 = "a1b2c3d4e5f60718"
V2 = "ffee00112233aabb"


def _forms(dataset_url: str, version: str) -> list[str]:
    vurl = f"{dataset_url}/versions/{version}"
    return [
        vurl,
        f"{vurl}/",
        f"{vurl}/manifest.json",
        f"{dataset_url}@latest",
        f"{dataset_url}@{version}",
        f"{dataset_url}@{version[:6]}",
    ]


def _check_all_forms(dataset_url: str) -> None:
    fs, _ = fsspec.core.url_to_fs(dataset_url)
    write_version(fs, dataset_url, V1, tag=None)
    write_version(fs, dataset_url, V2, tag="latest")
    for ref in _forms(dataset_url, V2):
        ds = open_dataset(ref)
        assert ds.version == V2, ref
        assert ds.version_url.rstrip("/").endswith(f"versions/{V2}")
        urls = ds.shard_urls("train")
        assert len(urls) == 1 and urls[0].endswith(f"versions/{V2}/shards/train-000000.tar")
        with fsspec.open(urls[0], "rb") as fh:
            assert len(fh.read()) == ds.manifest.shards[0].bytes
    assert open_dataset(f"{dataset_url}@{V1}").version == V1


def test_all_forms_local(tmp_path: Path) -> None:
    _check_all_forms(str(tmp_path / "conus"))


def test_all_forms_file_url(tmp_path: Path) -> None:
    _check_all_forms(f"file://{tmp_path}/conus")


def test_all_forms_s3(s3_bucket: str) -> None:
    _check_all_forms(f"{s3_bucket}/merra2-text/conus")


def test_unknown_tag_lists_what_exists(tmp_path: Path) -> None:
    fs = fsspec.filesystem("file")
    ds = str(tmp_path / "conus")
    write_version(fs, ds, V1)
    with pytest.raises(DatasetNotFoundError) as info:
        open_dataset(f"{ds}@stable")
    assert "'stable'" in str(info.value) and "latest" in str(info.value) and V1 in str(info.value)


def test_missing_dataset_and_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="no dataset at"):
        open_dataset(f"{tmp_path}/nothing@latest")
    fs = fsspec.filesystem("file")
    ds = str(tmp_path / "conus")
    vurl = write_version(fs, ds, V1)
    fs.rm(f"{vurl}/manifest.json")
    with pytest.raises(DatasetNotFoundError, match="did not finish"):
        open_dataset(vurl)
    with pytest.raises(DatasetNotFoundError, match="is a dataset folder"):
        open_dataset(ds)


def test_schema_version_from_the_future_is_refused(tmp_path: Path) -> None:
    fs = fsspec.filesystem("file")
    ds = str(tmp_path / "conus")
    write_version(fs, ds, V1, schema_version="2.0")
    with pytest.raises(SchemaVersionError, match=rf"schema_version 2.0.*supports {re.escape(SCHEMA_VERSION)}"):
        open_dataset(f"{ds}@latest")


def test_newer_minor_version_is_read(tmp_path: Path) -> None:
    fs = fsspec.filesystem("file")
    ds = str(tmp_path / "conus")
    write_version(fs, ds, V1, schema_version="1.7")
    assert open_dataset(f"{ds}@latest").version == V1


def test_damaged_manifest(tmp_path: Path) -> None:
    fs = fsspec.filesystem("file")
    ds = str(tmp_path / "conus")
    vurl = write_version(fs, ds, V1)
    fs.pipe_file(f"{vurl}/manifest.json", b"{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        open_dataset(vurl)


@pytest.mark.parametrize("ref", ["", "  ", "root/@latest", "root/name@", "root/a@b@c"])
def test_malformed_references(ref: str) -> None:
    with pytest.raises(ReferenceError_):
        parse_reference(ref)


def test_parse_forms() -> None:
    assert parse_reference("s3://b/x/conus@latest").dataset_url == "s3://b/x/conus"
    assert parse_reference("s3://b/x/conus@latest").selector == "latest"
    assert (
        parse_reference("s3://b/x/conus/versions/ab/manifest.json").version_url
        == "s3://b/x/conus/versions/ab"
    )
    assert parse_reference("/data/conus/versions/ab/").version_url == "/data/conus/versions/ab"
