"""Scaling benchmark of `merra2-text build` on a dask cluster: 1 and 2 worker processes, everything on S3.

A local moto S3 server (a real S3 protocol endpoint, in this process) holds the synthetic granules (the source),
the cache and the output. Every measured run is a fresh child process (`bench/_child.py`) that starts a `LocalCluster`
of N single-threaded worker processes, waits for them, then times `build(--scheduler ADDRESS --source s3://...
--cache s3://... --out s3://...)` to its end (plan, the per-day cube tasks, the shard tasks, the commit; cluster
start-up not counted), with a fresh cache and output each time. Runs alternate 1, 2, 1, 2, ... so that a change in
the machine's load hits both. Throughput is in granule-days per second (days of source data, all collections of a
day, built per second); the ratio is the median over the repeats of (2 workers / the 1-worker run just before), so
that a job starting on the machine mid-benchmark skews one pair, not the figure (best-of-N of each is printed too).
The load average is printed before and after each run: the ratio only means something on an otherwise idle machine.

    build 2 workers / 1 worker (granule-days/s)   target >= 1.6

`--global-day` measures what one worker spends on one *global* day (the input of the cost model in
docs/performance.md): a fresh child runs, in its one process with a local cache and output, the cube task of one day
of synthetic global granules (both collections, the 11 default variables) and then the build's shard tasks for that
day (16x16 tiles, daily windows at hourly resolution), timing each stage and counting the bytes read and written.

Usage:
    python bench/scaling.py                       # 24 days over -125,25,-65,50 (conus), 3 repeats
    python bench/scaling.py --quick --json s.json # 6 days, 1 repeat (bench/run_all.py --quick)
    python bench/scaling.py --global-day          # one worker, one global day (about 2 minutes here)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import resource
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _child import dispatch_child, own_peak_rss_mib, run_child

VARIABLES = "T2M,T2MDEW,QV2M,U10M,V10M,SLP,PS,TQV,TS,T850,PRECTOTCORR"
START = dt.date(2019, 6, 1)
TARGET = 1.6


def _child_build(args: dict[str, Any]) -> None:
    from distributed import Client, LocalCluster
    from merra2_text_data import BuildConfig, build

    end = START + dt.timedelta(days=args["days"] - 1)
    with (
        LocalCluster(n_workers=args["workers"], threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):  # fmt: skip
        client.wait_for_workers(args["workers"])
        cfg = BuildConfig.from_options(region=args["region"], start=str(START), end=str(end), source=args["source"],
                                       variables=VARIABLES, window="1d", time_step="1h", tile=args["tile"],
                                       shard_size=args["shard_size"], out=args["out"], cache=args["cache"],
                                       scheduler=cluster.scheduler_address, quiet=True)  # fmt: skip
        t0 = time.perf_counter()
        ref = build(cfg)
        seconds = time.perf_counter() - t0
    print(json.dumps({"ref": ref, "seconds": seconds, "peak_rss_mib": own_peak_rss_mib()}))


def _child_global_day(args: dict[str, Any]) -> None:
    """One worker's cost of one global day: the cube task, then the shard tasks, in this process."""
    from merra2_text_data import BuildConfig, pipeline
    from merra2_text_data.run import tasks
    from merra2_text_data.run.cube import stage_cube

    day = str(START)
    cfg = BuildConfig.from_options(region="globe", start=day, end=day, source=args["granules"], window="1d",
                                   time_step="1h", tile="16x16", out=args["out"], cache=args["cache"],
                                   quiet=True)  # fmt: skip
    plan = pipeline.plan_build(cfg)
    t0, c0 = time.perf_counter(), time.process_time()
    staged = stage_cube(cfg, plan.granules, plan.region, plan.dataset_url, plan.version)
    cube_s, cube_cpu = time.perf_counter() - t0, time.process_time() - c0
    shard_tasks, samples = pipeline._plan_tasks(plan, staged.skeleton)
    t0, c0 = time.perf_counter(), time.process_time()
    receipts = [tasks.run_task(t, staged.source.narrow(t.days), cfg, plan.dataset_url, plan.version, {}, None)
                for t in shard_tasks]  # fmt: skip
    shard_s, shard_cpu = time.perf_counter() - t0, time.process_time() - c0
    granule_bytes = sum(g.size or 0 for g in plan.granules)
    store_bytes = sum(f.stat().st_size for f in Path(args["cache"], "zarr", "days").rglob("*") if f.is_file())
    print(json.dumps({
        "variables": len(cfg.subset.variables), "samples": len(samples), "shard_tasks": len(shard_tasks),
        "granule_bytes": granule_bytes, "day_store_bytes": store_bytes,
        "shard_bytes": sum(r["shard"]["bytes"] for r in receipts if r["shard"]),
        "cube_s": cube_s, "cube_cpu_s": cube_cpu, "shards_s": shard_s, "shards_cpu_s": shard_cpu,
        "peak_rss_mib": own_peak_rss_mib(),
    }))  # fmt: skip


def _global_day(work: Path) -> dict[str, Any]:
    from merra2_text_data.regions import parse_region
    from merra2_text_data.source.synth import write_synthetic_granules

    folder = work / "granules-globe-1d"
    if not folder.exists():
        tmp = work / ".tmp-granules-globe-1d"
        shutil.rmtree(tmp, ignore_errors=True)
        write_synthetic_granules(tmp, parse_region("globe"), START, START, seed=1)
        tmp.rename(folder)
    shutil.rmtree(work / "globe-out", ignore_errors=True)
    shutil.rmtree(work / "globe-cache", ignore_errors=True)
    run = run_child(__file__, "global_day", {"granules": str(folder), "out": str(work / "globe-out"),
                                             "cache": str(work / "globe-cache")})  # fmt: skip
    return {**run.result, "wall_s": run.wall_s, "load": os.getloadavg()[0]}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _s3(work: Path, region: str, days: int) -> tuple[Any, str]:
    """Start moto, point the AWS environment at it, upload the granules; returns (server, source URL)."""
    import boto3
    import s3fs
    from merra2_text_data.regions import parse_region
    from merra2_text_data.source.synth import write_synthetic_granules
    from moto.server import ThreadedMotoServer

    folder = work / f"granules-{days}d"
    if not folder.exists():
        tmp = work / f".tmp-granules-{days}d"
        shutil.rmtree(tmp, ignore_errors=True)
        write_synthetic_granules(tmp, parse_region(region), START, START + dt.timedelta(days=days - 1), seed=1)
        tmp.rename(folder)
    port = _free_port()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto logs every request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")  # fmt: skip
    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket="bench")
    fs = s3fs.S3FileSystem()
    for path in sorted(folder.rglob("*.nc4")):
        fs.put_file(str(path), f"s3://bench/granules/{path.name}")
    return server, "s3://bench/granules"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--days", type=int, default=24, help="days of source data per build")
    parser.add_argument("--region", default="-125,25,-65,50", help="W,S,E,N")
    parser.add_argument("--tile", default="17x16", help="LATxLON grid points (17 divides the region's 51 rows)")
    parser.add_argument("--shard-size", default="8MB", help="target shard size (a few shard tasks per worker)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per worker count (best one counts)")
    parser.add_argument("--work", default=None, help="work folder for the granules (kept; default: temporary)")
    parser.add_argument("--quick", action="store_true", help="--days 6 --repeats 1")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--global-day", action="store_true", help="one worker's cost of one global day, only")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.child:
        dispatch_child({"build": _child_build, "global_day": _child_global_day}, opts.child)
        return
    if opts.global_day:
        work = Path(opts.work or tempfile.mkdtemp(prefix="merra2-scaling-"))
        work.mkdir(parents=True, exist_ok=True)
        figures = _global_day(work)
        print(json.dumps(figures, indent=2))
        if opts.json is not None:
            opts.json.write_text(json.dumps(figures, indent=2))
        return
    if opts.quick:
        opts.days, opts.repeats = 6, 1
    work = Path(opts.work or tempfile.mkdtemp(prefix="merra2-scaling-"))
    work.mkdir(parents=True, exist_ok=True)
    server, source = _s3(work, opts.region, opts.days)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    runs: list[dict[str, Any]] = []
    try:
        for repeat in range(opts.repeats):
            for workers in (1, 2):
                prefix = f"s3://bench/r{repeat}-w{workers}"
                load_before = os.getloadavg()
                cpu_before = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
                run = run_child(__file__, "build", {"workers": workers, "days": opts.days, "region": opts.region,
                                                    "tile": opts.tile, "shard_size": opts.shard_size,
                                                    "source": source, "out": f"{prefix}/out",
                                                    "cache": f"{prefix}/cache"}, env=env)  # fmt: skip
                cpu_after = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
                s3_cpu, build_cpu = (a.ru_utime + a.ru_stime - b.ru_utime - b.ru_stime
                                     for a, b in zip(cpu_after, cpu_before, strict=True))  # fmt: skip
                record = {"workers": workers, "repeat": repeat, "seconds": run.result["seconds"],
                          "s3_server_cpu_s": s3_cpu, "build_cpu_s": build_cpu,
                          "granule_days_per_s": opts.days / run.result["seconds"], "wall_s": run.wall_s,
                          "client_peak_rss_mib": run.peak_rss_mib, "load_before": load_before[0],
                          "load_after": os.getloadavg()[0], "ref": run.result["ref"]}  # fmt: skip
                runs.append(record)
                print(f"workers {workers} run {repeat + 1}: {record['seconds']:7.2f} s  "
                      f"{record['granule_days_per_s']:6.3f} granule-days/s  client peak RSS "
                      f"{record['client_peak_rss_mib']:.0f} MiB  CPU s: build {build_cpu:.1f}, S3 server "
                      f"{s3_cpu:.1f}  load {record['load_before']:.2f} -> "
                      f"{record['load_after']:.2f}", flush=True)  # fmt: skip
    finally:
        server.stop()
    versions = {r["ref"].rsplit("@", 1)[1] for r in runs}
    if len(versions) != 1:
        raise SystemExit(f"the runs built different versions: {sorted(versions)}")
    best = {w: max(r["granule_days_per_s"] for r in runs if r["workers"] == w) for w in (1, 2)}
    pairs = [b["granule_days_per_s"] / a["granule_days_per_s"] for a, b in zip(runs[::2], runs[1::2], strict=True)]
    ratio = statistics.median(pairs)
    loads = [r["load_before"] for r in runs] + [r["load_after"] for r in runs]
    print(f"machine: {os.cpu_count()} CPU(s), python {sys.version.split()[0]}; region {opts.region}, tile {opts.tile}, "
          f"{len(VARIABLES.split(','))} variables, {opts.days} days; granules, cache and output on moto S3")  # fmt: skip
    print(f"best: 1 worker {best[1]:.3f}, 2 workers {best[2]:.3f} granule-days/s (best-of ratio {best[2] / best[1]:.2f}); "
          f"per-pair ratios {', '.join(f'{p:.2f}' for p in pairs)}")  # fmt: skip
    verdict = "PASS" if ratio >= TARGET else "MISS"
    print(f"{'build 2 workers / 1 worker (granule-days/s)':<46} {ratio:8.2f}  target >= {TARGET:g}  {verdict}")
    print(f"load average during the runs: {min(loads):.2f} .. {max(loads):.2f} (1-minute)")
    if opts.json is not None:
        figures = {"build 2 workers / 1 worker (granule-days/s)": ratio}  # the median pair
        opts.json.write_text(json.dumps({"runs": runs, "figures": figures, "pairs": pairs, "best": best, "days": opts.days,
                                         "region": opts.region, "load": [min(loads), max(loads)]}, indent=2))  # fmt: skip
    if opts.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
