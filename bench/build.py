"""Benchmark of `merra2-text build` on synthetic MERRA-2 granules (a script, not a timed test).

Every measured run is a fresh child process (`bench/_child.py`: its own peak RSS, VmHWM from /proc, else
`os.wait4`), with a fresh output and cache:

- `read`: merely read the same regional subset with plain xarray (open each granule, cut the box, load);
- `build 1x` / `build 2x` / `build 4x`: the full build (zarr cache, samples, captions, validation, shards, index,
  manifest) over N, 2N and 4N days;
- `naive`: (run alternately with `build 1x`, `--repeats` pairs, the figure the median pair ratio) the per-day script a
  researcher would write (open each daily file, subset, loop the samples, np.save
  + a caption .txt per sample);
- `workers 1` / `workers 2`: the 4x build on a LocalCluster of 1 and 2 workers.

It prints each figure with its target and PASS/MISS:

    build 1x / read          <= 2.0
    build 4x / build 1x      <= 4.4   (time)
    peak RSS 4x / 1x         <= 1.3

Usage:
    python bench/build.py                        # default: 8 and 32 days, region -105,30,-90,45, tile 8x8
    python bench/build.py --days 4 --no-workers  # quicker
    python bench/build.py --quick --json b.json  # 2 days, no worker runs; figures as JSON too (bench/run_all.py)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _child import dispatch_child, own_peak_rss_mib, run_child

VARIABLES = "T2M,T2MDEW,QV2M,U10M,V10M,SLP,PS,TQV,TS,T850,PRECTOTCORR"
START = dt.date(2019, 6, 1)


def _import_readers(xr: Any) -> None:
    """What `xr.open_dataset(engine="h5netcdf")` imports and discovers on first use (h5netcdf, h5py, xarray's backend
    entry points), done before the timer like the build child's imports: both sides time work, not imports."""
    import h5netcdf  # noqa: F401
    import h5py  # noqa: F401

    xr.backends.list_engines()


def _child_read(args: dict[str, Any]) -> None:
    import numpy as np
    import xarray as xr

    _import_readers(xr)
    t0 = time.perf_counter()
    w, s, e, n = (float(x) for x in args["region"].split(","))
    slv = args["variables"].split(",")
    total = 0
    for path in sorted(Path(args["granules"]).glob("MERRA2_*.nc4")):
        with xr.open_dataset(path, engine="h5netcdf") as ds:
            names = [v for v in slv if v in ds.data_vars]
            cut = ds[names].sel(lat=slice(s, n), lon=slice(w, e)).load()
            total += sum(int(np.isfinite(cut[v].values).sum()) for v in names)
    print(
        json.dumps({"values": total, "seconds": time.perf_counter() - t0, "peak_rss_mib": own_peak_rss_mib()})
    )


def _child_naive(args: dict[str, Any]) -> None:
    """What a researcher writes first: a loop over days, one sample per tile, npy + txt files."""
    import numpy as np
    import xarray as xr

    _import_readers(xr)
    t0 = time.perf_counter()
    w, s, e, n = (float(x) for x in args["region"].split(","))
    names = args["variables"].split(",")
    out = Path(args["out"])
    out.mkdir(parents=True, exist_ok=True)
    days = sorted({p.name.split(".")[2] for p in Path(args["granules"]).glob("MERRA2_*.nc4")})
    count = 0
    for day in days:
        parts = []
        for path in sorted(Path(args["granules"]).glob(f"MERRA2_*.{day}.nc4")):
            with xr.open_dataset(path, engine="h5netcdf") as ds:
                keep = [v for v in names if v in ds.data_vars]
                parts.append(ds[keep].sel(lat=slice(s, n), lon=slice(w, e)).load())
        cube = xr.merge(parts)
        arr = np.stack([cube[v].values for v in names], axis=1).astype(np.float32)  # (T, V, lat, lon)
        for iy in range(0, arr.shape[2] - 7, 8):
            for ix in range(0, arr.shape[3] - 7, 8):
                tile = arr[:, :, iy : iy + 8, ix : ix + 8]
                key = f"{day}-{iy:02d}-{ix:02d}"
                np.save(out / f"{key}.npy", tile)
                t2m = float(tile[:, 0].mean()) - 273.15
                (out / f"{key}.txt").write_text(f"On {day} the mean 2 m temperature was {t2m:.1f} °C.\n")
                count += 1
    print(
        json.dumps(
            {"samples": count, "seconds": time.perf_counter() - t0, "peak_rss_mib": own_peak_rss_mib()}
        )
    )


def _child_build(args: dict[str, Any]) -> None:
    # imported up front so that import time is not counted as work (nor is the naive script's: `_import_readers`):
    # the build's own modules and the libraries they load lazily (zarr for the regional cache, pandera for the index)
    import distributed  # noqa: F401
    import merra2_text_data.pipeline  # noqa: F401
    import pandera.pandas  # noqa: F401
    import zarr  # noqa: F401
    from merra2_text_data import BuildConfig, build

    t0 = time.perf_counter()
    end = START + dt.timedelta(days=args["days"] - 1)
    cfg = BuildConfig.from_options(region=args["region"], start=str(START), end=str(end), source=args["granules"],
                                   variables=args["variables"], window="1d", time_step="1h", tile=args["tile"],
                                   out=args["out"], cache_dir=args["cache"], workers=args.get("workers") or None,
                                   quiet=True)  # fmt: skip
    ref = build(cfg)
    print(json.dumps({"ref": ref, "seconds": time.perf_counter() - t0, "peak_rss_mib": own_peak_rss_mib()}))


def _run(kind: str, args: dict[str, Any]) -> tuple[float, float, float]:
    """Run one measured child; returns (work seconds after imports, wall seconds, peak RSS in MiB) of that child."""
    run = run_child(__file__, kind, args)
    return float(run.result["seconds"]), run.wall_s, run.peak_rss_mib


def _granules(folder: Path, region: str, days: int) -> Path:
    from merra2_text_data.regions import parse_region
    from merra2_text_data.source.synth import write_synthetic_granules

    target = folder / f"granules-{days}d"
    if not target.exists():
        tmp = folder / f".tmp-granules-{days}d"
        shutil.rmtree(tmp, ignore_errors=True)
        write_synthetic_granules(
            tmp, parse_region(region), START, START + dt.timedelta(days=days - 1), seed=1
        )
        tmp.rename(target)
    return target


def _line(name: str, value: float, target: float | None = None, unit: str = "") -> str:
    verdict = "" if target is None else f"  target <= {target:g}  {'PASS' if value <= target else 'MISS'}"
    return f"{name:<34} {value:8.2f}{unit}{verdict}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--days", type=int, default=8, help="days of the 1x run (the 4x run has four times as many)"
    )
    parser.add_argument("--region", default="-105,30,-90,45", help="W,S,E,N")
    parser.add_argument("--tile", default="8x8")
    parser.add_argument("--work", default=None, help="work folder (kept; default: a temporary one)")
    parser.add_argument("--no-workers", action="store_true", help="skip the --workers 1/2 runs")
    parser.add_argument("--repeats", type=int, default=3, help="build 1x / naive 1x pairs (median kept)")
    parser.add_argument("--quick", action="store_true", help="--days 2 --no-workers --repeats 2")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.quick:
        opts.days, opts.no_workers, opts.repeats = 2, True, 2
    if opts.child:
        dispatch_child({"read": _child_read, "build": _child_build, "naive": _child_naive}, opts.child)
        return
    work = Path(opts.work or tempfile.mkdtemp(prefix="merra2-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    base = {"region": opts.region, "variables": VARIABLES, "tile": opts.tile}
    g1, g4 = _granules(work, opts.region, opts.days), _granules(work, opts.region, 4 * opts.days)
    runs: dict[str, tuple[float, float, float]] = {}

    def fresh(name: str) -> dict[str, str]:
        for sub in ("out", "cache"):
            shutil.rmtree(work / name / sub, ignore_errors=True)
        return {"out": str(work / name / "out"), "cache": str(work / name / "cache")}

    _run("read", {**base, "granules": str(g4)})  # warm the page cache: every run then reads warm files
    runs["read 1x"] = _run("read", {**base, "granules": str(g1)})
    # build 1x and the naive script 1x side by side: alternating, so that the machine's load hits both; the figure
    # is the median of the pair ratios
    pairs_1x: list[float] = []
    loads_1x: list[float] = []
    for r in range(opts.repeats):
        loads_1x.append(os.getloadavg()[0])
        b = _run("build", {**base, "granules": str(g1), "days": opts.days, **fresh("b1")})
        n = _run("naive", {**base, "granules": str(g1), **fresh("n1")})
        pairs_1x.append(b[0] / n[0])
        print(f"pair {r}: build 1x {b[0]:.2f} s, naive 1x {n[0]:.2f} s, ratio {b[0] / n[0]:.2f}, load "
              f"{loads_1x[-1]:.2f}", flush=True)  # fmt: skip
        if r == 0 or b[0] < runs["build 1x"][0]:
            runs["build 1x"] = b
        if r == 0 or n[0] < runs["naive 1x"][0]:
            runs["naive 1x"] = n
    g2 = _granules(work, opts.region, 2 * opts.days)
    runs["build 2x"] = _run("build", {**base, "granules": str(g2), "days": 2 * opts.days, **fresh("b2")})
    runs["build 4x"] = _run("build", {**base, "granules": str(g4), "days": 4 * opts.days, **fresh("b4")})
    runs["naive 4x"] = _run("naive", {**base, "granules": str(g4), **fresh("n4")})
    if not opts.no_workers:
        for n in (1, 2):
            runs[f"build 4x, workers {n}"] = _run(
                "build", {**base, "granules": str(g4), "days": 4 * opts.days, "workers": n, **fresh(f"w{n}")}
            )
    print(f"machine: {os.cpu_count()} CPU(s), python {sys.version.split()[0]}; region {opts.region}, tile "
          f"{opts.tile}, {len(VARIABLES.split(','))} variables, 1x = {opts.days} days; work folder {work}")  # fmt: skip
    for name, (seconds, wall, rss) in runs.items():
        print(
            f"{name:<34} {seconds:8.2f} s work  {wall:8.2f} s wall (with imports)   peak RSS {rss:8.1f} MiB"
        )
    print(_line("build 1x / read 1x (time)", runs["build 1x"][0] / runs["read 1x"][0], 2.0))
    print(_line("build 2x / build 1x (time)", runs["build 2x"][0] / runs["build 1x"][0]))
    print(_line("build 4x / build 1x (time)", runs["build 4x"][0] / runs["build 1x"][0], 4.4))
    print(_line("build 2x / build 1x (peak RSS)", runs["build 2x"][2] / runs["build 1x"][2]))
    print(_line("build 4x / build 1x (peak RSS)", runs["build 4x"][2] / runs["build 1x"][2], 1.3))
    ratio_1x = statistics.median(pairs_1x)
    print(_line("build 1x / naive 1x (time, median pair)", ratio_1x, 1.0))
    print(_line("build 4x / naive 4x (time)", runs["build 4x"][0] / runs["naive 4x"][0], 1.0))
    if not opts.no_workers:
        print(
            _line(
                "workers 1 / workers 2 (time, 4x)",
                runs["build 4x, workers 1"][0] / runs["build 4x, workers 2"][0],
            )
        )
    if opts.json is not None:
        figures = {
            "build 1x / read 1x (time)": runs["build 1x"][0] / runs["read 1x"][0],
            "build 1x / naive 1x (time)": ratio_1x,
            "build 4x / naive 4x (time)": runs["build 4x"][0] / runs["naive 4x"][0],
            "build 4x / build 1x (time)": runs["build 4x"][0] / runs["build 1x"][0],
            "build 4x / build 1x (peak RSS)": runs["build 4x"][2] / runs["build 1x"][2],
        }
        runs_out = {k: {"work_s": v[0], "wall_s": v[1], "peak_rss_mib": v[2]} for k, v in runs.items()}
        record = {"runs": runs_out, "figures": figures, "days": opts.days, "pairs 1x": pairs_1x,
                  "loadavg 1x pairs": loads_1x, "loadavg_at_end": list(os.getloadavg())}  # fmt: skip
        if not opts.no_workers:
            record["workers 2 / workers 1 (throughput, 4x)"] = (
                runs["build 4x, workers 1"][0] / runs["build 4x, workers 2"][0]
            )
        opts.json.write_text(json.dumps(record, indent=2))
    if opts.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
