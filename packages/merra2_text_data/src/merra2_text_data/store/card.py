"""The dataset card (`README.md` of a version): what, where, when, variables, counts, coverage, how it was built and
how to read it, after Hugging Face YAML front matter (license, task, size, sources, configs, features), so a
version folder can be uploaded as a Hub dataset as it is."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import yaml
from climate_text_schema import Manifest, hub_configs, sample_features

from merra2_text_data.regions import Region
from merra2_text_data.samples.coverage import compute_coverage

__all__ = ["LICENSES", "front_matter", "make_card", "size_category"]

LICENSES: dict[str, dict[str, str]] = {
    "merra2": {
        "license": "other",
        "license_name": "nasa-earthdata-open-data",
        "license_link": "https://www.earthdata.nasa.gov/learn/use-data/data-use-policy",
    },
    "era5": {"license": "cc-by-4.0"},
    "synthetic": {"license": "unknown"},
}
"""The card's license by the manifest's `source_kind`: MERRA-2 is NASA open data (free and open, no restrictions;
acknowledge NASA GMAO), ERA5 is Copernicus data under CC-BY-4.0; synthetic fields carry no upstream license."""

_SOURCE_DATASETS = {
    "M2T1NXSLV": "NASA GMAO MERRA-2 M2T1NXSLV 5.12.4 (doi:10.5067/VJAFPLI1CSIV)",
    "M2T1NXFLX": "NASA GMAO MERRA-2 M2T1NXFLX 5.12.4 (doi:10.5067/7MCPBJ41Y0K6)",
    "era5": "ECMWF ERA5 hourly data on single levels (doi:10.24381/cds.adbb2d47)",
    "noaa-storm-events": "NOAA NCEI Storm Events Database",
}
_SIZES = [(10**3, "n<1K"), (10**4, "1K<n<10K"), (10**5, "10K<n<100K"), (10**6, "100K<n<1M"), (10**7, "1M<n<10M"),
          (10**8, "10M<n<100M"), (10**9, "100M<n<1B")]  # fmt: skip


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


def _coverage(index: pd.DataFrame, grid: tuple[Sequence[float] | np.ndarray, Sequence[float] | np.ndarray] | None) -> list[str]:
    if grid is not None:
        return compute_coverage(index, *grid).describe()
    s, n = float(index["lat_min"].min()), float(index["lat_max"].max())
    return [f"- Covered by the samples: lat {s:g} to {n:g}, lon {float(index['lon_min'].min()):g} to"
            f" {float(index['lon_max'].max()):g} (grid-point centres)"]  # fmt: skip


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
        hours = ", at the window's time of day" if clim.get("time_of_day") else ""
        lines += ["", f"Captions state the {', '.join(clim['variables'])} anomaly against a day-of-year climatology of"
                  f" the samples ({clim['period']}, +-{clim['half_width_days']} days{hours}, at least {clim['min_years']}"
                  " years per date); the index holds it as `T2M_clim` and `T2M_anom`."]  # fmt: skip
    return lines


def size_category(n: int) -> str:
    """The Hub's `size_categories` bucket of `n` samples (`n<1K`, `1K<n<10K`, ...)."""
    for bound, label in _SIZES:
        if n < bound:
            return label
    return "n>1B"


def _source_datasets(manifest: Manifest, kind: str) -> list[str]:
    extra = manifest.model_extra or {}
    if kind == "synthetic":
        out = ["original"]
    elif kind == "merra2":
        collections = sorted({s.granule.split(".", 1)[0] for s in manifest.sources if "." in s.granule})
        out = [_SOURCE_DATASETS.get(c, c) for c in collections] or ["NASA GMAO MERRA-2"]
    else:
        out = [_SOURCE_DATASETS.get(kind, kind)]
    kinds = {src.get("kind") for src in extra.get("text_sources") or []}
    if "noaa-storm-events" in kinds:
        out.append(_SOURCE_DATASETS["noaa-storm-events"])
    return out


def front_matter(manifest: Manifest) -> dict[str, Any]:
    """The card's Hugging Face metadata: license (from the manifest's `source_kind`), task, size, sources, tags,
    `configs` (each split's shard glob) and `dataset_info` (the features of a sample, the split sizes)."""
    kind = str((manifest.model_extra or {}).get("source_kind") or "merra2")
    total = sum(manifest.splits.values())
    return {
        "pretty_name": f"{manifest.name} climate-text pairs ({manifest.version})",
        **LICENSES.get(kind, {"license": "unknown"}),
        "language": ["en"],
        "task_categories": ["text-generation"],
        "size_categories": [size_category(total)],
        "source_datasets": _source_datasets(manifest, kind),
        "tags": ["climate", "weather", "reanalysis", "webdataset", "synthetic" if kind == "synthetic" else kind],
        "configs": hub_configs(manifest),
        "dataset_info": {
            "features": sample_features(manifest.variable_names),
            "splits": [{"name": s, "num_examples": int(n)} for s, n in manifest.splits.items() if n],
        },
    }


def make_card(
    manifest: Manifest,
    index: pd.DataFrame,
    region: Region,
    grid: tuple[Sequence[float] | np.ndarray, Sequence[float] | np.ndarray] | None = None,
) -> str:
    """Write the dataset card of a version.

    Args:
        manifest: the version's manifest (counts, variables, shards, normalisation, sources, config).
        index: the index table (time coverage, the samples' bounding boxes and an example caption).
        region: the region the dataset was built for.
        grid: the region's grid-point latitudes and longitudes; with them the card states which grid points no
            sample covers (without them, only the covered box in degrees).

    Returns:
        Markdown text, starting with YAML front matter (`front_matter`).
    """
    m = manifest
    extra = m.model_extra or {}
    west, south, east, north = region.bbox
    first, last = index["time_start"].min(), index["time_end"].max()
    total = sum(m.splits.values())
    meta = yaml.safe_dump(front_matter(m), sort_keys=False, allow_unicode=True, width=1000)
    lines = [
        "---",
        meta.rstrip("\n"),
        "---",
        f"# {m.name} @ {m.version}",
        "",
        *_provenance(extra, index),
        "",
        "## What",
        f"- Region asked for: {region.describe()} (W {west:g}, S {south:g}, E {east:g}, N {north:g}; bounds"
        " inclusive); what the samples cover is under Coverage",
        f"- Period: {first.isoformat()} to {last.isoformat()} (UTC)",
        f"- Window: {m.window} per sample, time step {m.time_step}, tile {m.config.get('tile') or 'whole region'}",
        f"- Samples: {total} ({', '.join(f'{s} {n}' for s, n in m.splits.items())}); quarantined: {m.quarantined}",
        f"- Shards: {len(m.shards)} ({sum(s.bytes for s in m.shards):,} bytes)",
        f"- Schema version: {m.schema_version}; built by {m.builder.package} {m.builder.version} at {m.created_at}",
        "",
        "## Coverage",
        *_coverage(index, grid),
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
        "With Hugging Face `datasets`, this folder loads as it is (the front matter declares its splits and"
        ' features): `load_dataset("<this folder>", split="train")`. Plain `webdataset`, pyarrow on'
        " `index.parquet` and `s3://` streaming: see docs/datasets.md of merra2-fusion.",
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
