"""Tiny, independent writers of contract-shaped data for the schema tests (not the builder's code)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from typing import Any

import numpy as np
import pandas as pd
from climate_text_schema import SCHEMA_VERSION

from tests.tar_helpers import tar_bytes


def make_index(n: int = 4, variables: tuple[str, ...] = ("T2M", "U10M")) -> pd.DataFrame:
    start = pd.Timestamp("2019-01-01", tz="UTC") + pd.to_timedelta(np.arange(n), unit="D")
    df = pd.DataFrame(
        {
            "key": [f"conus-2019010{i}" for i in range(n)],
            "split": ["train"] * (n - 1) + ["test"],
            "shard": ["shards/train-000000.tar"] * (n - 1) + ["shards/test-000000.tar"],
            "time_start": start,
            "time_end": start + pd.Timedelta(days=1),
            "region": "conus",
            "lat_min": 35.0,
            "lat_max": 45.0,
            "lon_min": -105.0,
            "lon_max": -95.0,
            "text": [f"Sample {i}: mean 2 m temperature 1.{i} °C." for i in range(n)],
        }
    )
    for v in variables:
        base = 275.0 if v == "T2M" else 3.0
        df[f"{v}_mean"] = base + np.arange(n, dtype=float)
        df[f"{v}_min"] = df[f"{v}_mean"] - 2.0
        df[f"{v}_max"] = df[f"{v}_mean"] + 2.0
    return df


def _put(fs: Any, url: str, data: bytes) -> None:
    fs.makedirs(url.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(url, data)


def write_version(
    fs: Any, dataset_url: str, version: str, tag: str | None = "latest", schema_version: str = SCHEMA_VERSION
) -> str:
    """Write a minimal, contract-shaped version with one train shard; returns the version folder URL."""
    vurl = f"{dataset_url}/versions/{version}"
    arr = np.zeros((2, 1, 3, 4), dtype=np.float32) + 280.0
    npy = io.BytesIO()
    np.save(npy, arr)
    shard = tar_bytes(
        [("k0.climate.npy", npy.getvalue()), ("k0.txt", b"hello"), ("k0.json", b"{}")], tarfile.PAX_FORMAT
    )
    _put(fs, f"{vurl}/shards/train-000000.tar", shard)
    manifest: dict[str, Any] = {
        "schema_version": schema_version,
        "name": dataset_url.rsplit("/", 1)[-1],
        "version": version,
        "created_at": "2026-01-01T00:00:00Z",
        "builder": {"package": "tests", "version": "0"},
        "config": {},
        "variables": [{"name": "T2M", "units": "K"}],
        "window": "1d",
        "time_step": "1h",
        "splits": {"train": 1},
        "shards": [
            {
                "path": "shards/train-000000.tar",
                "split": "train",
                "samples": 1,
                "bytes": len(shard),
                "sha256": hashlib.sha256(shard).hexdigest(),
            }
        ],
        "normalization": {"T2M": {"mean": 280.0, "std": 1.0}},
        "sources": [],
        "quarantined": 0,
    }
    _put(fs, f"{vurl}/manifest.json", json.dumps(manifest).encode())
    if tag:
        _put(fs, f"{dataset_url}/tags/{tag}", version.encode())
    return vurl
