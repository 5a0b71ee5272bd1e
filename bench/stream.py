"""Streaming benchmark: samples/s of the training data pipeline against the floor and the common alternative.

One dataset is built first (not timed) from synthetic MERRA-2 granules with `merra2_text_data.build` (region
-105,30,-90.625,45.5, 11 variables, `--window 1d --time-step 1h --tile 8x8`: samples of 24 x 11 x 8 x 8 float32 and a
caption), with the regional zarr v3 cache kept. Then, each in the same process, one after the other:

- `ours`: `fusion_trainer.data.stream.ClimateTextStream` (shard shuffle, sha256 check of every shard, shuffle buffer,
  `.npy` decode with allow_pickle=False, contract checks, normalisation with the manifest's statistics, tokenisation
  with the base's tokenizer, padding and label masking, collation) through a torch DataLoader (0 workers, as the
  trainer's default), micro-batch 8;
- `raw tar`: the floor: read the same shards with `tarfile` and touch every member's bytes, nothing else;
- `ours, cold, token ids on disk`: one epoch of a fresh stream (empty in-memory token cache) with `token_cache_dir`
  holding the ids an earlier run wrote (what the first epoch of every run after the first costs);
- `ours, cold, never tokenised`: one epoch of a fresh stream with no token cache anywhere (the very first epoch);
- `ours, token cache off` (not with --quick): the same with `token_cache_mb=0`, so every epoch tokenises every
  caption (what the first epoch of a run, or a dataset too large for the cache, costs);
- `ours, 2 DataLoader workers` (not with --quick): the same with `num_workers=2` (`lanes=1`, the trainer's default:
  both workers read every shard and each builds every other batch);
- `ours, 2 workers, 2 lanes` (not with --quick): `num_workers=2, lanes=2`: each worker reads its own lane's shards;
- `xbatcher`: the common alternative: `xbatcher.BatchGenerator` over the regional zarr cube (the same variables,
  24 x 8 x 8 patches) wrapped in `xbatcher.loaders.torch.MapDataset`, normalised in the DataLoader's transform,
  batch 8. It yields the climate only (no text, no tokens), so it does less than `ours`. The ratio uses the cube
  opened lazily from zarr, as xbatcher's docs do; `xbatcher, cube in memory` (`.load()` first) is shown beside it.

Raw tar, ours (warm) and the two cold pipelines are timed side by side: in each repeat one after the other, so that a
change of the machine's load hits all of them, and each ratio to raw tar is the median over the repeats of the
ratio within a repeat. The others are timed over whole epochs, repeated, median kept. Printed with the targets:
warm ours / raw tar >= 0.9 (0.5 before issue 19), cold >= 0.8, ours / xbatcher >= 2.0; the load average at each
repeat's start is printed and kept in the JSON.

Usage:
    python bench/stream.py                 # 16 days (192 samples), 3 repeats of 5 epochs each
    python bench/stream.py --quick         # the same 16 days, 2 epochs, 3 repeats, without the slower rows

Both sizes time the same 144-sample epochs: at 4 days (24 train samples, 2 ms an epoch), which --quick used until
2026-12-07, a cold epoch was half the stream's set-up for a run (reading the token-cache file 0.7 ms, the prompt's
tokens 0.3 ms), which a real epoch of thousands of samples pays once.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

VARIABLES = "T2M,T2MDEW,QV2M,U10M,V10M,SLP,PS,TQV,TS,T850,PRECTOTCORR"
REGION = "-105,30,-90.625,45.5"  # 32 x 24 grid points: whole 8x8 tiles only (see docs/performance.md)
START = dt.date(2019, 6, 1)
MICRO_BATCH = 8


def build_dataset(
    work: Path, days: int, variables: str = VARIABLES, window: str = "1d", tile: str = "8x8"
) -> tuple[str, Path]:
    """Synthetic granules -> `merra2_text_data.build`; returns (dataset reference, the regional zarr cube).

    The defaults are this benchmark's dataset; bench/train.py's `demo` kind asks for the demo's variables and
    hourly windows (`DEMO_DATASET`)."""
    from merra2_text_data import BuildConfig, build
    from merra2_text_data.regions import parse_region
    from merra2_text_data.source.synth import write_synthetic_granules

    tag = (
        ""
        if (variables, window, tile) == (VARIABLES, "1d", "8x8")
        else f"-{window}-{tile}-{len(variables.split(','))}v"
    )
    granules = work / f"granules-{days}d"
    out, cache = work / f"data-{days}d{tag}", work / f"cache-{days}d{tag}"
    if not granules.exists():
        tmp = work / f".tmp-granules-{days}d"
        shutil.rmtree(tmp, ignore_errors=True)
        end = START + dt.timedelta(days=days - 1)
        write_synthetic_granules(tmp, parse_region(REGION), START, end, seed=1)
        tmp.rename(granules)
    ref_file = work / f"ref-{days}d{tag}.txt"
    if not ref_file.exists():
        end = START + dt.timedelta(days=days - 1)
        cfg = BuildConfig.from_options(region=REGION, start=str(START), end=str(end), source=str(granules),
                                       variables=variables, window=window, time_step="1h", tile=tile,
                                       out=str(out), cache_dir=str(cache), quiet=True)  # fmt: skip
        ref_file.write_text(build(cfg), encoding="utf-8")
    cubes = sorted(cache.glob("**/regional/*.zarr"))
    if not cubes:
        raise SystemExit(f"no regional zarr cube under {cache}: the build kept no cache")
    return ref_file.read_text(encoding="utf-8").strip(), cubes[0]


def tokenizer_for(path: str | None, work: Path) -> tuple[Any, str]:
    """The tokenizer of `path` (a save_pretrained folder), else of the tiny test Llama."""
    from transformers import AutoTokenizer

    if path is None:
        from fusion_trainer.model.tiny import make_tiny_model

        path = str(make_tiny_model("llama", work / "tiny-llama"))
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok, path


def rate(run_epoch: Callable[[], int], epochs: int, repeats: int) -> dict[str, float]:
    """Median samples/s over `repeats` timings of `epochs` epochs (one untimed warm-up epoch first)."""
    run_epoch()
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = sum(run_epoch() for _ in range(epochs))
        rates.append(n / (time.perf_counter() - t0))
    return {"samples_per_s": statistics.median(rates), "min": min(rates), "max": max(rates)}


def cold_epoch(ref: str, tokenizer: Any, cache_dir: Path | None) -> Callable[[], int]:
    """One epoch of a fresh stream (empty in-memory token cache), as the first epoch of a run: with `cache_dir`, the
    caption ids of an earlier run are read from disk (`token_cache_dir`); without, every caption is tokenised."""
    from fusion_trainer.config import DEFAULT_PROMPT_TEMPLATE
    from fusion_trainer.data.stream import ClimateTextStream, open_shards, render_prompt

    ds = open_shards(ref)
    prompt = render_prompt(DEFAULT_PROMPT_TEMPLATE, ds)
    if cache_dir is not None:  # an earlier run's epoch leaves the file
        warm = ClimateTextStream(ds, "train", tokenizer, prompt=prompt, micro_batch=MICRO_BATCH, max_length=512,
                                 token_cache_dir=cache_dir)  # fmt: skip
        it = iter(warm)
        for _ in range(warm.batches_per_epoch + 1):
            next(it)

    def run() -> int:
        stream = ClimateTextStream(ds, "train", tokenizer, prompt=prompt, micro_batch=MICRO_BATCH, max_length=512,
                                   token_cache_dir=cache_dir)  # fmt: skip
        it = iter(stream)
        return sum(int(next(it)["climate_x"].shape[0]) for _ in range(stream.batches_per_epoch))

    return run


def side_by_side(runs: dict[str, Callable[[], int]], epochs: dict[str, int], repeats: int) -> dict[str, Any]:
    """Each pipeline timed in turn, `repeats` times (one untimed warm-up each first), so that the machine's load hits
    all of them alike; the ratios to `raw tar` are taken within each repeat and their median kept."""
    for run in runs.values():
        run()
    per: dict[str, list[float]] = {name: [] for name in runs}
    loads = []
    for _ in range(repeats):
        loads.append(os.getloadavg()[0])
        for name, run in runs.items():
            t0 = time.perf_counter()
            n = sum(run() for _ in range(epochs[name]))
            per[name].append(n / (time.perf_counter() - t0))
    rates = {
        name: {"samples_per_s": statistics.median(r), "min": min(r), "max": max(r)} for name, r in per.items()
    }
    ratios = {
        name: statistics.median(a / b for a, b in zip(r, per["raw tar"], strict=True))
        for name, r in per.items()
        if name != "raw tar"
    }
    return {"rates": rates, "ratios_to_raw": ratios, "loadavg": loads}


def ours_epoch(
    ref: str, tokenizer: Any, workers: int = 0, lanes: int = 1, token_cache_mb: float = 64.0
) -> Callable[[], int]:
    import torch
    from fusion_trainer.config import DEFAULT_PROMPT_TEMPLATE
    from fusion_trainer.data.stream import ClimateTextStream, as_built, open_shards, render_prompt

    ds = open_shards(ref)
    stream = ClimateTextStream(
        ds, "train", tokenizer, prompt=render_prompt(DEFAULT_PROMPT_TEMPLATE, ds), micro_batch=MICRO_BATCH,
        max_length=512, train=True, lanes=lanes, token_cache_mb=token_cache_mb,
    )  # fmt: skip
    per_epoch = stream.batches_per_epoch
    loader = torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=workers, persistent_workers=workers > 0, collate_fn=as_built
    )
    batches = iter(loader)

    def run() -> int:
        n = 0
        for _ in range(per_epoch):
            batch = next(batches)
            n += int(batch["climate_x"].shape[0])
        return n

    return run


def raw_epoch(ref: str) -> Callable[[], int]:
    from climate_text_schema import open_dataset

    ds = open_dataset(ref)
    paths = [ds.fs._strip_protocol(ds.url_of(s.path)) for s in ds.shards("train")]

    def run() -> int:
        members = 0
        for path in paths:
            with open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r|") as tar:
                for info in tar:
                    member = tar.extractfile(info)
                    if member is not None:
                        member.read()
                        members += 1
        return members // 3  # .climate.npy, .txt, .json per sample

    return run


def xbatcher_epoch(ref: str, cube: Path, in_memory: bool = False) -> Callable[[], int]:
    import numpy as np
    import torch
    import xarray as xr
    import xbatcher
    from climate_text_schema import open_dataset
    from xbatcher.loaders.torch import MapDataset

    manifest = open_dataset(ref).manifest
    names = VARIABLES.split(",")
    mean = np.array([manifest.normalization[v].mean for v in names], dtype=np.float32)[None, :, None, None]
    std = np.array([manifest.normalization[v].std for v in names], dtype=np.float32)[None, :, None, None]
    mean_t, std_t = torch.from_numpy(mean), torch.from_numpy(std)
    ds = xr.open_zarr(str(cube), consolidated=False)
    if in_memory:
        ds = ds.load()
    da = ds[names].to_array("variable").transpose("time", "variable", "lat", "lon").astype("float32")
    gen = xbatcher.BatchGenerator(da, input_dims={"time": 24, "lat": 8, "lon": 8})

    def transform(x: xr.DataArray) -> torch.Tensor:
        return (torch.as_tensor(x.values) - mean_t) / std_t  # (T, V, 8, 8)

    dataset = MapDataset(gen, transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=MICRO_BATCH, shuffle=True, num_workers=0)

    def run() -> int:
        n = 0
        for batch in loader:
            n += int(batch.shape[0])
        return n

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--days", type=int, default=16, help="days of synthetic granules (12 samples a day)")
    parser.add_argument("--epochs", type=int, default=5, help="epochs per timing")
    parser.add_argument("--repeats", type=int, default=3, help="timings per pipeline (median kept)")
    parser.add_argument("--model", default=None, help="tokenizer folder (default: the tiny test Llama's)")
    parser.add_argument("--work", default=None, help="work folder (kept; default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--quick", action="store_true", help="2 epochs, 3 repeats, without the slower rows")
    opts = parser.parse_args()
    if opts.quick:
        opts.epochs, opts.repeats = 2, 3
    work = Path(opts.work or tempfile.mkdtemp(prefix="merra2-stream-"))
    work.mkdir(parents=True, exist_ok=True)
    ref, cube = build_dataset(work, opts.days)
    tokenizer, tok_path = tokenizer_for(opts.model, work)
    disk = work / "token-cache"
    shutil.rmtree(disk, ignore_errors=True)
    cold_epochs = max(1, opts.epochs)
    side = side_by_side(
        {
            "raw tar": raw_epoch(ref),
            "ours, warm": ours_epoch(ref, tokenizer),
            "ours, cold, token ids on disk": cold_epoch(ref, tokenizer, disk),
            "ours, cold, never tokenised": cold_epoch(ref, tokenizer, None),
        },
        {"raw tar": opts.epochs, "ours, warm": opts.epochs, "ours, cold, token ids on disk": cold_epochs,
         "ours, cold, never tokenised": cold_epochs},
        opts.repeats,
    )  # fmt: skip
    results = {
        "ours": side["rates"]["ours, warm"],
        **side["rates"],
        "xbatcher": rate(xbatcher_epoch(ref, cube), opts.epochs, opts.repeats),
        "xbatcher, cube in memory": rate(xbatcher_epoch(ref, cube, True), opts.epochs, opts.repeats),
    }
    if not opts.quick:
        results["ours, token cache off"] = rate(
            ours_epoch(ref, tokenizer, token_cache_mb=0), opts.epochs, opts.repeats
        )
        results["ours, 2 DataLoader workers"] = rate(ours_epoch(ref, tokenizer, 2), opts.epochs, opts.repeats)
        results["ours, 2 workers, 2 lanes"] = rate(
            ours_epoch(ref, tokenizer, 2, 2), opts.epochs, opts.repeats
        )
    ratios = {
        "ours / raw tar": side["ratios_to_raw"]["ours, warm"],
        "ours / xbatcher": results["ours"]["samples_per_s"] / results["xbatcher"]["samples_per_s"],
    }
    summary = {
        "stream warm ours/raw": side["ratios_to_raw"]["ours, warm"],
        "stream cold ours/raw": side["ratios_to_raw"]["ours, cold, token ids on disk"],
        "stream cold ours/raw (never tokenised)": side["ratios_to_raw"]["ours, cold, never tokenised"],
        "stream loadavg": side["loadavg"],
    }
    print(f"dataset {ref} ({opts.days} days); tokenizer {tok_path}; micro-batch {MICRO_BATCH}; "
          f"{opts.epochs} epochs x {opts.repeats} repeats")  # fmt: skip
    for name, r in results.items():
        print(f"{name:<32} {r['samples_per_s']:10.1f} samples/s  (min {r['min']:.1f}, max {r['max']:.1f})")
    for (name, value), target in zip(ratios.items(), (0.5, 2.0), strict=True):
        print(f"{name:<32} {value:10.2f}  target >= {target:g}  {'PASS' if value >= target else 'MISS'}")
    for name, target in (("stream warm ours/raw", 0.9), ("stream cold ours/raw", 0.8),
                         ("stream cold ours/raw (never tokenised)", 0.8)):  # fmt: skip
        value = summary[name]
        print(f"{name:<40} {value:6.2f}  target >= {target:g}  {'PASS' if value >= target else 'MISS'}")
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (1, 5, 15 min) at the end; at each repeat's start "
          f"{[round(x, 2) for x in side['loadavg']]}")  # fmt: skip
    if opts.json is not None:
        record = {"rates": results, "ratios": ratios, "summary": summary, "days": opts.days,
                  "loadavg_at_end": list(load)}  # fmt: skip
        opts.json.write_text(json.dumps(record, indent=2))
    if opts.work is None:
        shutil.rmtree(work, ignore_errors=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
