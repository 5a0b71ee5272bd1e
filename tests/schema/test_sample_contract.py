"""The sample contract: array checks, safe decoding (no pickle), metadata validation, shard names."""

from __future__ import annotations

import io
import json
import pickle

import numpy as np
import pytest
from climate_text_schema import (
    SampleError,
    check_climate_array,
    decode_climate,
    decode_meta,
    decode_text,
    shard_name,
)


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def test_valid_array_has_no_problems() -> None:
    assert check_climate_array(np.zeros((24, 3, 5, 7), dtype=np.float32) + 280, n_variables=3) == []


def test_array_problems_are_each_named() -> None:
    arr = np.zeros((2, 3, 4, 4), dtype=np.float64)
    assert "dtype is float64" in " ".join(check_climate_array(arr))
    arr32 = np.zeros((2, 3, 4, 4), dtype=np.float32)
    arr32[0, 0, 0, 0] = np.nan
    arr32[1, 1, 1, 1] = 1e15
    problems = " ".join(check_climate_array(arr32, n_variables=2))
    assert "1 NaN" in problems and "1 fill values" in problems and "manifest lists 2" in problems
    assert "expected 4" in " ".join(check_climate_array(np.zeros((3, 4), dtype=np.float32)))


def test_pickled_npy_is_refused_not_executed() -> None:
    payload = _npy(np.array([{"x": 1}], dtype=object))
    with pytest.raises(SampleError, match="not a plain numeric"):
        decode_climate(payload, key="k1")


def test_pickle_bytes_are_refused() -> None:
    with pytest.raises(SampleError, match="k2"):
        decode_climate(pickle.dumps([1, 2, 3]), key="k2")


def test_decode_roundtrip_and_text() -> None:
    arr = np.arange(24, dtype=np.float32).reshape(1, 2, 3, 4)
    assert np.array_equal(decode_climate(_npy(arr)), arr)
    assert decode_text("Hello °C".encode()) == "Hello °C"
    with pytest.raises(SampleError, match="empty"):
        decode_text(b"  \n")
    with pytest.raises(SampleError, match="not UTF-8"):
        decode_text(b"\xff\xfe\xfa")


def test_meta_validation() -> None:
    meta = {
        "key": "conus-20190101",
        "split": "train",
        "time_start": "2019-01-01T00:00:00Z",
        "time_end": "2019-01-02T00:00:00Z",
        "region": "conus",
        "bbox": [-105, 35, -95, 45],
        "variables": ["T2M"],
        "units": ["K"],
        "lat": [35.0, 35.5],
        "lon": [-105.0],
        "stats": {"T2M": {"mean": 1.0}},
    }
    assert decode_meta(json.dumps(meta).encode()).key == "conus-20190101"
    with pytest.raises(SampleError, match="not valid JSON"):
        decode_meta(b"{oops")
    with pytest.raises(SampleError, match="split"):
        decode_meta(json.dumps({**meta, "split": "dev"}).encode())
    with pytest.raises(SampleError, match="no dots"):
        decode_meta(json.dumps({**meta, "key": "../../x"}).encode())


def test_shard_names() -> None:
    assert shard_name("train", 3) == "shards/train-000003.tar"
    with pytest.raises(ValueError, match="split"):
        shard_name("dev", 0)
