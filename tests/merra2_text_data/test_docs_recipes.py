"""The reading recipes of docs/datasets.md, run as the doc writes them (the fenced `recipe=...` blocks are extracted
from the file; only the value of `REF` is replaced) on a small real build: plain webdataset (decode and batch, local
and on S3 through `register_webdataset_fsspec`), Hugging Face `datasets` (by data files and by folder), pyarrow on
index.parquet, and `open_dataset`.

The build: 4 x 5 grid points cut in 2x5 tiles (the tile divides the region, so every sample has one shape), 8 days,
several shards per split, and one reported event in one sample, so most samples have `events: []`."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from climate_text_schema import SampleMeta, open_dataset
from merra2_text_data import BuildConfig, build
from merra2_text_data.regions import parse_region
from merra2_text_data.source.synth import write_synthetic_granules

DOC = Path(__file__).resolve().parents[2] / "docs" / "datasets.md"
RECIPES = {"open_dataset", "webdataset", "webdataset-s3", "datasets", "datasets-folder", "pyarrow"}
BBOX = "-100,40,-97.5,41.5"
"""lat 40..41.5 (4 rows), lon -100..-97.5 (5 columns): 2x5 tiles divide it."""
START, END = dt.date(2019, 1, 1), dt.date(2019, 1, 8)
EVENT = "Drifting snow closed the county road."
_BLOCK = re.compile(r"^```python recipe=(?P<name>[\w-]+)\n(?P<code>.*?)^```$", re.MULTILINE | re.DOTALL)


def _blocks() -> dict[str, str]:
    return {m["name"]: m["code"] for m in _BLOCK.finditer(DOC.read_text(encoding="utf-8"))}


def run_recipe(name: str, ref: str) -> dict[str, Any]:
    """Execute the doc's block `name` with `REF` set to `ref`; returns the names it defined."""
    code, n = re.subn(r'^REF = ".*"$', f"REF = {ref!r}", _blocks()[name], flags=re.MULTILINE)
    assert n == 1, f"recipe {name} must set REF once"
    namespace: dict[str, Any] = {"__name__": f"recipe_{name}"}
    exec(compile(code, f"{DOC.name}:{name}", "exec"), namespace)
    return namespace


def _config(source: Path, out: str, table: Path) -> BuildConfig:
    return BuildConfig.from_options(region=BBOX, start=str(START), end=str(END), variables="T2M,U10M,V10M",
                                    tile="2x5", source=str(source), out=out, text_table=str(table),
                                    shard_size="40KB", quiet=True)  # fmt: skip


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("recipes")
    write_synthetic_granules(root / "granules", parse_region(BBOX), START, END, seed=11)
    table = root / "reports.csv"
    pd.DataFrame({"time": ["2019-01-06T12:00:00Z"], "lat": [41.0], "lon": [-99.0], "event_type": ["Snow report"],
                  "id": ["r1"], "text": [EVENT]}).to_csv(table, index=False)  # fmt: skip
    return root / "granules", table


@pytest.fixture(scope="module")
def ref(inputs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> str:
    return build(_config(inputs[0], str(tmp_path_factory.mktemp("ds")), inputs[1]))


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A private Hugging Face datasets cache, offline."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


@pytest.fixture
def restore_gopen() -> Iterator[None]:
    import webdataset as wds

    saved = dict(wds.gopen_schemes)
    try:
        yield
    finally:
        wds.gopen_schemes.clear()
        wds.gopen_schemes.update(saved)


def test_every_recipe_in_the_doc_is_tested() -> None:
    assert set(_blocks()) == RECIPES


def test_the_build_has_one_shape_and_fixed_json_keys(ref: str) -> None:
    ds = open_dataset(ref)
    assert all(len(ds.shards(s)) >= 1 for s in ds.manifest.splits) and len(ds.shards("train")) >= 2
    index = ds.read_index()
    assert int(index["n_events"].sum()) == 1


def test_open_dataset_recipe(ref: str) -> None:
    ns = run_recipe("open_dataset", ref)
    assert ns["train_urls"] == ns["ds"].shard_urls("train") and len(ns["index"]) == sum(ns["ds"].manifest.splits.values())


def test_webdataset_recipe_decodes_and_batches(ref: str) -> None:
    ns = run_recipe("webdataset", ref)
    climate, texts, metas = ns["climate"], ns["texts"], ns["metas"]
    n_train = ns["ds"].manifest.splits["train"]
    assert isinstance(climate, np.ndarray) and climate.dtype == np.float32
    assert climate.shape == (min(8, n_train), 24, 3, 2, 5)
    assert all(isinstance(t, str) and "°C" in t for t in texts)
    # the builder writes exactly the contract's fields: none that the declared Hugging Face features would drop
    assert all(set(m) == set(SampleMeta.model_fields) for m in metas)
    batches = list(ns["pipeline"])  # every batch of the split stacks (one shape per version)
    assert sum(len(b[1]) for b in batches) == n_train


def test_webdataset_recipe_streams_s3(inputs: tuple[Path, Path], s3_bucket: str, restore_gopen: None) -> None:
    import webdataset as wds

    s3_ref = build(_config(inputs[0], f"{s3_bucket}/merra2-text", inputs[1]))
    assert s3_ref.startswith("s3://")
    url = open_dataset(s3_ref).shard_urls("train")[0]
    with pytest.raises(ValueError, match="gopen"):  # without the handler, plain webdataset cannot open s3://
        next(iter(wds.WebDataset([url], shardshuffle=False, empty_check=False)))
    ns = run_recipe("webdataset-s3", s3_ref)
    climate, text = ns["sample"]
    assert climate.shape == (24, 3, 2, 5) and isinstance(text, str)
    keys = [s["__key__"] for s in wds.WebDataset(ns["ds"].shard_urls("train"), shardshuffle=False)]
    assert len(keys) == ns["ds"].manifest.splits["train"]


def _all_rows(hf: Any) -> list[dict[str, Any]]:
    return [row for split in hf for row in hf[split]]


def test_datasets_recipe_reads_every_field(ref: str, hf_cache: None) -> None:
    ns = run_recipe("datasets", ref)
    hf, ds = ns["hf"], ns["ds"]
    assert {s: hf[s].num_rows for s in hf} == {s: n for s, n in ds.manifest.splits.items() if n}
    first = ns["first"]
    assert np.asarray(first["climate.npy"], dtype=np.float32).shape == (24, 3, 2, 5)
    assert ns["train"][0]["climate.npy"].shape == (24, 3, 2, 5)
    rows = _all_rows(hf)
    with_events = [r for r in rows if r["json"]["events"]]
    assert len(with_events) == 1 and with_events[0]["json"]["events"][0]["type"] == "Snow report"
    assert EVENT in with_events[0]["txt"]
    assert sum(1 for r in rows if r["json"]["events"] == []) == len(rows) - 1
    assert first["json"]["stats"]["T2M"]["mean"] > 200


def test_datasets_recipe_loads_the_folder_by_its_card(ref: str, hf_cache: None) -> None:
    ns = run_recipe("datasets-folder", ref)
    test = ns["test"]
    assert test.num_rows == open_dataset(ref).manifest.splits["test"]
    assert test.features["json"]["events"].feature["type"].dtype == "string"  # declared by the card, not inferred


def test_pyarrow_recipe_selects_from_the_index(ref: str) -> None:
    ns = run_recipe("pyarrow", ref)
    warmest = ns["warmest"]
    n_test = open_dataset(ref).manifest.splits["test"]
    assert len(warmest) == min(3, n_test)
    means = [r["T2M_mean"] for r in warmest]
    assert means == sorted(means, reverse=True) and all(r["shard"].startswith("shards/test-") for r in warmest)
