"""Fixtures of the trainer tests: a contract-shaped synthetic dataset (written here, independently of the builder)
and the tokenizer of the tiny random causal LM (`tiny_model_dir`, shared with the reliability suite through
tests/conftest.py).

The captions state numbers computed from each climate array (mean 2 m temperature, mean wind speed), so a fusion
model can learn them and its loss falls.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import pytest
from climate_text_schema import SCHEMA_VERSION, validate_index

from tests.tar_helpers import tar_bytes
from tests.tiny_model import TINY_FUSION as TINY_FUSION  # the trainer tests import it from here

VARIABLES = (("T2M", "K", 283.0, 8.0), ("U10M", "m s-1", 2.0, 4.0), ("V10M", "m s-1", -1.0, 4.0))
SHAPE = (2, 3, 4, 5)  # (time, variable, lat, lon)
LAT = [35.0, 35.5, 36.0, 36.5]
LON = [-100.0, -99.375, -98.75, -98.125, -97.5]


def _caption(array: np.ndarray) -> str:
    t2m = float(array[:, 0].mean()) - 273.15
    wind = float(np.hypot(array[:, 1], array[:, 2]).mean())
    return f"Mean 2 m temperature {t2m:.1f} °C, mean wind speed {wind:.1f} m/s."


def write_dataset(
    root: str,
    name: str = "synth",
    shards: dict[str, list[int]] | None = None,
    seed: int = 0,
    schema_version: str = SCHEMA_VERSION,
) -> str:
    """Write one contract-shaped version under `root/name` (any fsspec URL) and tag it latest.

    Args:
        root: local folder or fsspec URL.
        name: dataset name.
        shards: samples per shard of each split (default: train 3 shards of 8, 6 and 6; val 2 of 4; test 1 of 4).
        seed: random seed of the climate arrays.
        schema_version: written into the manifest.

    Returns:
        The reference `root/name@latest`.
    """
    shards = shards or {"train": [8, 6, 6], "val": [4, 4], "test": [4]}
    rng = np.random.default_rng(seed)
    fs, _ = fsspec.core.url_to_fs(root)

    def put(url: str, data: bytes) -> None:
        path = fs._strip_protocol(url)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, data)

    version = hashlib.sha256(f"{name}/{seed}/{shards}/{schema_version}".encode()).hexdigest()[:16]
    vurl = f"{root.rstrip('/')}/{name}/versions/{version}"
    rows: list[dict[str, Any]] = []
    shard_infos: list[dict[str, Any]] = []
    train_arrays: list[np.ndarray] = []
    start = pd.Timestamp("2019-01-01", tz="UTC")
    day = 0
    for split, sizes in shards.items():
        for number, size in enumerate(sizes):
            rel = f"shards/{split}-{number:06d}.tar"
            members: list[tuple[str, bytes]] = []
            for _ in range(size):
                key = f"synth-{split}-{day:05d}"
                base = np.array([m for _, _, m, _ in VARIABLES], dtype=np.float32)[None, :, None, None]
                scale = np.array([s for _, _, _, s in VARIABLES], dtype=np.float32)[None, :, None, None]
                offset = rng.normal(size=(1, len(VARIABLES), 1, 1)).astype(np.float32)
                array = (base + scale * (offset + 0.2 * rng.normal(size=SHAPE))).astype(np.float32)
                if split == "train":
                    train_arrays.append(array)
                text = _caption(array)
                t0 = start + pd.Timedelta(days=day)
                stats = {
                    v: {"mean": float(array[:, i].mean()), "min": float(array[:, i].min()),
                        "max": float(array[:, i].max())}
                    for i, (v, _, _, _) in enumerate(VARIABLES)
                }  # fmt: skip
                meta = {
                    "key": key, "split": split, "time_start": t0.isoformat(),
                    "time_end": (t0 + pd.Timedelta(days=1)).isoformat(), "region": "synth",
                    "bbox": [LON[0], LAT[0], LON[-1], LAT[-1]], "variables": [v for v, *_ in VARIABLES],
                    "units": [u for _, u, _, _ in VARIABLES], "lat": LAT, "lon": LON, "stats": stats,
                }  # fmt: skip
                npy = io.BytesIO()
                np.save(npy, array)
                members += [
                    (f"{key}.climate.npy", npy.getvalue()),
                    (f"{key}.txt", text.encode()),
                    (f"{key}.json", json.dumps(meta).encode()),
                ]
                row: dict[str, Any] = {
                    "key": key, "split": split, "shard": rel, "time_start": t0, "time_end": t0 + pd.Timedelta(days=1),
                    "region": "synth", "lat_min": LAT[0], "lat_max": LAT[-1], "lon_min": LON[0], "lon_max": LON[-1],
                    "text": text,
                }  # fmt: skip
                for v, s in stats.items():
                    row.update({f"{v}_mean": s["mean"], f"{v}_min": s["min"], f"{v}_max": s["max"]})
                rows.append(row)
                day += 1
            data = tar_bytes(members, tarfile.USTAR_FORMAT)
            put(f"{vurl}/{rel}", data)
            shard_infos.append(
                {
                    "path": rel,
                    "split": split,
                    "samples": size,
                    "bytes": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                }
            )
    index = validate_index(pd.DataFrame(rows), [v for v, *_ in VARIABLES])
    buf = io.BytesIO()
    index.to_parquet(buf)
    put(f"{vurl}/index.parquet", buf.getvalue())
    train = np.stack(train_arrays)  # (N, T, V, H, W)
    manifest = {
        "schema_version": schema_version, "name": name, "version": version, "created_at": "2026-01-01T00:00:00Z",
        "builder": {"package": "tests.fusion_trainer", "version": "0"}, "config": {"seed": seed},
        "variables": [{"name": v, "units": u, "long_name": v, "collection": "M2T1NXSLV"} for v, u, _, _ in VARIABLES],
        "window": "1d", "time_step": "12h", "splits": {k: sum(v) for k, v in shards.items()}, "shards": shard_infos,
        "normalization": {
            v: {"mean": float(train[:, :, i].mean()), "std": float(train[:, :, i].std())}
            for i, (v, _, _, _) in enumerate(VARIABLES)
        },
        "sources": [], "quarantined": 0,
    }  # fmt: skip
    put(f"{vurl}/manifest.json", json.dumps(manifest, indent=2).encode())
    put(f"{root.rstrip('/')}/{name}/tags/latest", version.encode())
    return f"{root.rstrip('/')}/{name}@latest"


def open_stream(ref: str, tokenizer: Any, *, seed: int, **kw: Any) -> Any:
    """A `ClimateTextStream` of `ref` (split `train` unless `split=`) with the default prompt, micro-batch 2 and
    max_length 256; any other keyword goes to the stream."""
    from fusion_trainer.data.stream import DEFAULT_PROMPT, ClimateTextStream, open_shards, render_prompt

    ds = open_shards(ref)
    opts: dict[str, Any] = dict(
        prompt=render_prompt(DEFAULT_PROMPT, ds), micro_batch=2, max_length=256, seed=seed
    )
    opts.update(kw)
    return ClimateTextStream(ds, opts.pop("split", "train"), tokenizer, **opts)


@pytest.fixture
def make_dataset(tmp_path: Path) -> Callable[..., str]:
    """A factory: `make_dataset(root=None, **kw)` writes a version (default under tmp_path) and returns its REF."""

    def make(root: str | None = None, **kw: Any) -> str:
        return write_dataset(root or str(tmp_path / "data"), **kw)

    return make


@pytest.fixture
def dataset_ref(make_dataset: Callable[..., str]) -> str:
    """The default synthetic dataset: train 3 shards (8, 6, 6 samples), val 2 x 4, test 1 x 4."""
    return make_dataset()


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir: Path) -> Any:
    """The tiny model's tokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(autouse=True)
def _cpu_deepspeed(cpu_deepspeed: None) -> None:
    """Every trainer test runs DeepSpeed on the CPU, one thread per process (`cpu_deepspeed`, tests/conftest.py)."""


@pytest.fixture
def make_config(tmp_path: Path, dataset_ref: str, tiny_model_dir: Path) -> Callable[..., Any]:
    """A factory of TrainConfig for fast CPU runs on the default dataset: `make_config(out_name, **overrides)`."""
    from fusion_trainer.config import TrainConfig

    def make(name: str = "run", **kw: Any) -> TrainConfig:
        values: dict[str, Any] = dict(
            shards=dataset_ref, model=str(tiny_model_dir), out=str(tmp_path / name), zero=2, steps=20,
            micro_batch=4, lr=1e-2, bf16=False, log_every=1, fusion=dict(TINY_FUSION), max_length=160,
        )  # fmt: skip
        values.update(kw)
        return TrainConfig(**values)

    return make
