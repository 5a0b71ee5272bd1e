"""The dataset card (`README.md` of a version): what, where, when, variables, counts, how it was built and how to read it."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd
from climate_text_schema import Manifest

from .regions import Region

__all__ = ["make_card"]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


_MERRA2 = (
    "Climate-text pairs from NASA MERRA-2 reanalysis (hourly single-level diagnostics, GMAO, doi:10.5067/VJAFPLI1CSIV"
    " and doi:10.5067/7MCPBJ41Y0K6 for the flux collection), each sample a climate window with a caption that quotes"
    " its own statistics."
)
_SYNTHETIC = (
    "**The climate fields are SYNTHETIC**: written by `merra2-text synth` in the MERRA-2 file format (plausible,"
    " coherent weather for tests and demos), *not* NASA MERRA-2 reanalysis. Do not use them to study the real"
    " atmosphere. Each sample is a climate window with a caption that quotes its own statistics."
)


_ERA5 = (
    "Climate-text pairs from ECMWF ERA5 reanalysis (single levels), each sample one hourly slot of a tile with a"
    " caption that quotes its own statistics: instantaneous fields at the slot's end, precipitation accumulated over"
    " the slot."
)


def _provenance(extra: dict[str, Any], index: pd.DataFrame) -> list[str]:
    kind = extra.get("source_kind")
    lines = [_SYNTHETIC if kind == "synthetic" else _ERA5 if kind == "era5" else _MERRA2]
    if extra.get("attribution"):
        lines += ["", str(extra["attribution"])]
    for src in extra.get("text_sources") or []:
        n = int((index["n_events"] > 0).sum()) if "n_events" in index.columns else 0
        lines += ["", f"Event text from `{src['file']}`: {src['description']}. {n} of {len(index)} samples carry"
                  " event text (index columns `n_events`, `event_types`); it is appended after `Reported events:`."]  # fmt: skip
    clim = extra.get("climatology")
    if clim:
        lines += ["", f"Captions state the {', '.join(clim['variables'])} anomaly against a day-of-year climatology of"
                  f" the samples ({clim['period']}, +-{clim['half_width_days']} days, at least {clim['min_years']}"
                  " years per date); the index holds it as `T2M_clim` and `T2M_anom`."]  # fmt: skip
    return lines


def make_card(manifest: Manifest, index: pd.DataFrame, region: Region) -> str:
    """Write the dataset card of a version.

    Args:
        manifest: the version's manifest (counts, variables, shards, normalisation, sources, config).
        index: the index table (time coverage and an example caption).
        region: the region the dataset covers.

    Returns:
        Markdown text.
    """
    m = manifest
    extra = m.model_extra or {}
    west, south, east, north = region.bbox
    first, last = index["time_start"].min(), index["time_end"].max()
    total = sum(m.splits.values())
    lines = [
        f"# {m.name} @ {m.version}",
        "",
        *_provenance(extra, index),
        "",
        "## What",
        f"- Region: {region.describe()} (W {west:g}, S {south:g}, E {east:g}, N {north:g}; bounds inclusive)",
        f"- Period: {first.isoformat()} to {last.isoformat()} (UTC)",
        f"- Window: {m.window} per sample, time step {m.time_step}, tile {m.config.get('tile') or 'whole region'}",
        f"- Samples: {total} ({', '.join(f'{s} {n}' for s, n in m.splits.items())}); quarantined: {m.quarantined}",
        f"- Shards: {len(m.shards)} ({sum(s.bytes for s in m.shards):,} bytes)",
        f"- Schema version: {m.schema_version}; built by {m.builder.package} {m.builder.version} at {m.created_at}",
        "",
        "## Variables (array axis 1, in this order)",
        *_table(
            ["name", "units", "long name", "collection", "train mean", "train std"],
            [
                [
                    v.name,
                    v.units,
                    v.long_name,
                    v.collection,
                    f"{m.normalization[v.name].mean:.6g}" if v.name in m.normalization else "",
                    f"{m.normalization[v.name].std:.6g}" if v.name in m.normalization else "",
                ]
                for v in m.variables
            ],
        ),  # fmt: skip
        "",
        "## Layout",
        "Each sample is `<key>.climate.npy` (float32 `[time, variable, lat, lon]`, physical units, lat south to north,"
        " lon west to east, no NaN or fill values), `<key>.txt` (the caption) and `<key>.json` (metadata and"
        " statistics). `index.parquet` has one row per sample with the cos-latitude weighted mean, min and max of every"
        " variable; `quarantine.parquet` lists rejected samples with the reason.",
        "",
        "## Example caption",
        f"> {index['text'].iloc[0]}",
        "",
        "## Read it",
        "```python",
        "from climate_text_schema import open_dataset",
        f'ds = open_dataset("<out>/{m.name}@{m.version}")',
        'urls = ds.shard_urls("train")',
        "```",
        "Check it with `merra2-text verify <out>/" + f"{m.name}@{m.version}`.",
        "",
        "## How it was built",
        "```json",
        json.dumps(m.config, indent=2, sort_keys=True),
        "```",
        f"Source granules: {len(m.sources)} (listed in manifest.json `sources`)."
        + (f" Parent version: {m.parent}." if m.parent else ""),
        "",
    ]
    return "\n".join(lines)
