"""Synthetic MERRA-2 granules (`merra2-text synth`): real file format, plausible and coherent weather.

Every value is a function of absolute (time, lat, lon) and the seed only, so a sub-region of a synthetic file equals
the synthetic file of that sub-region, bit for bit. The weather is a climatology (latitude gradient, terrain, land and
sea, seasonal and diurnal cycles by local solar time) plus travelling systems with compact support: extratropical
lows and highs moving west to east with gradient-wind circulations, warm moist sectors and frontal rain, severe
storms, tropical cyclones, convective cells and slow-moving heat-wave ridges. Moisture, pressure and winds are
derived from one another (dew point <= temperature, QV2M from dew point and PS, PS from SLP and terrain height).
The weather itself is `synth_weather.py`; this module writes it as granules.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from climate_text_schema import FILL_VALUE, KNOWN_VARIABLES

from merra2_text_data.errors import ConfigError
from merra2_text_data.regions import Region, grid_points
from merra2_text_data.source.granules import COLLECTIONS, VERSION, granule_name
from merra2_text_data.source.synth_weather import EPOCH, World, draw_systems

__all__ = ["FLX_VARIABLES", "SLV_VARIABLES", "synthetic_stream", "write_synthetic_granules"]

logger = logging.getLogger(__name__)

SLV_VARIABLES = ("T2M", "T2MDEW", "QV2M", "U10M", "V10M", "SLP", "PS", "TQV", "TS", "T850",
                 "U2M", "V2M", "T10M", "QV10M", "U850", "V850", "T500", "H500")  # fmt: skip
"""Variables written to synthetic M2T1NXSLV granules."""
FLX_VARIABLES = ("PRECTOTCORR", "PRECTOT")
"""Variables written to synthetic M2T1NXFLX granules."""
_BY_COLLECTION = {"M2T1NXSLV": SLV_VARIABLES, "M2T1NXFLX": FLX_VARIABLES}

def synthetic_stream(day: date) -> str:
    """The stream number used in synthetic file names: 100 (1980-91), 200 (-2000), 300 (-2010), 400 after."""
    return "100" if day.year < 1992 else "200" if day.year < 2001 else "300" if day.year < 2011 else "400"


def _f32(value: float | list[float]) -> np.ndarray:
    return np.asarray(value, dtype=np.float32)


def _text(value: str) -> np.bytes_:
    """A fixed-length ASCII attribute (netCDF NC_CHAR), as in the real granules."""
    return np.bytes_(value.encode("ascii"))


_LIMITS = {
    "vmax": _f32(FILL_VALUE),
    "vmin": _f32(-FILL_VALUE),
    "valid_range": _f32([-FILL_VALUE, FILL_VALUE]),
}
_PACK = {"compression": "gzip", "compression_opts": 2, "shuffle": True}


def _write_granule(path: Path, collection: str, day: date, lat: np.ndarray, lon: np.ndarray,
                   fields: dict[str, np.ndarray], seed: int) -> None:  # fmt: skip
    """Write one netCDF-4/HDF5 granule with h5py: dimension scales lon, time, lat (netCDF dim ids 0, 1, 2 as in
    the real files), chunked gzip float32 variables with the real attributes, then rename into place."""
    spec = COLLECTIONS[collection]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with h5py.File(tmp, "w", libver="earliest") as f:
        f.attrs["_NCProperties"] = _text(
            f"version=2,h5py={h5py.version.version},hdf5={h5py.version.hdf5_version}"
        )
        scales = {}
        coords: list[tuple[str, np.ndarray, dict[str, Any]]] = [
            ("lon", lon, {"long_name": "longitude", "units": "degrees_east"}),
            ("time", np.arange(0, 1440, 60, dtype=np.int32),
             {"long_name": "time", "units": f"minutes since {day:%Y-%m-%d} 00:30:00",
              "time_increment": np.int32(10000), "begin_date": np.int32(int(f"{day:%Y%m%d}")),
              "begin_time": np.int32(3000)}),
            ("lat", lat, {"long_name": "latitude", "units": "degrees_north"}),
        ]  # fmt: skip
        for dimid, (name, values, attrs) in enumerate(coords):
            dset = f.create_dataset(name, data=values, chunks=(values.size,), **_PACK)
            dset.make_scale(name)
            dset.attrs["_Netcdf4Dimid"] = np.int32(dimid)
            for key, value in {**attrs, **_LIMITS}.items():
                dset.attrs[key] = _text(value) if isinstance(value, str) else value
            scales[name] = dset
        chunks = (1, min(91, lat.size), min(144, lon.size))
        for name in _BY_COLLECTION[collection]:
            known = KNOWN_VARIABLES[name]
            var = f.create_dataset(name, data=fields[name].astype(np.float32), chunks=chunks,
                                   fillvalue=np.float32(FILL_VALUE), **_PACK)  # fmt: skip
            for axis, dim in enumerate(("time", "lat", "lon")):
                var.dims[axis].attach_scale(scales[dim])
            var.attrs["_Netcdf4Coordinates"] = np.array([1, 2, 0], dtype=np.int32)
            var.attrs.update({"long_name": _text(known.long_name), "units": _text(known.units),
                              "_FillValue": _f32([FILL_VALUE]), "missing_value": _f32([FILL_VALUE]),
                              "fmissing_value": _f32([FILL_VALUE]), "scale_factor": _f32([1.0]),
                              "add_offset": _f32([0.0]), "standard_name": _text(known.long_name), **_LIMITS})  # fmt: skip
        header: dict[str, str] = {
            "History": f"Synthetic MERRA-2-format granule written by merra2_text_data.source.synth (seed {seed})",
            "Comment": "SYNTHETIC DATA for tests and demos: plausible weather, not NASA MERRA-2 reanalysis",
            "Filename": path.name, "Conventions": "CF-1", "Institution": "merra2_text_data (synthetic)",
            "References": "http://gmao.gsfc.nasa.gov", "Format": "NetCDF-4/HDF-5", "SpatialCoverage": "regional",
            "VersionID": VERSION, "identifier_product_doi_authority": "http://dx.doi.org/",
            "ShortName": collection, "GranuleID": path.name, "ProductionDateTime": f"synthetic, seed {seed}",
            "LongName": spec.title, "Title": spec.title, "SouthernmostLatitude": f"{lat.min():.1f}",
            "NorthernmostLatitude": f"{lat.max():.1f}", "WesternmostLongitude": f"{lon[0]:g}",
            "EasternmostLongitude": f"{lon[-1]:g}", "LatitudeResolution": "0.5", "LongitudeResolution": "0.625",
            "DataResolution": "0.5 x 0.625", "Source": f"merra2_text_data.source.synth seed={seed}",
            "Contact": "http://gmao.gsfc.nasa.gov", "identifier_product_doi": spec.doi,
            "RangeBeginningDate": f"{day:%Y-%m-%d}", "RangeBeginningTime": "00:00:00.000000",
            "RangeEndingDate": f"{day:%Y-%m-%d}", "RangeEndingTime": "23:59:59.000000",
        }  # fmt: skip
        for key, text in header.items():
            f.attrs[key] = _text(text)
    os.replace(tmp, path)


def write_synthetic_granules(
    out_dir: str | Path,
    region: Region,
    start: date,
    end: date,
    seed: int = 0,
    collections: Sequence[str] = ("M2T1NXSLV", "M2T1NXFLX"),
    show_progress: bool = False,
) -> list[Path]:
    """Write one synthetic granule per collection per day, in the real MERRA-2 file format and names.

    Args:
        out_dir: folder for the files (created).
        region: the box to cover (any region, antimeridian included).
        start: first day, inclusive.
        end: last day, inclusive.
        seed: non-negative integer; the same seed gives the same weather everywhere.
        collections: "M2T1NXSLV" and/or "M2T1NXFLX".
        show_progress: show a rich progress bar over days.

    Returns:
        The written paths, sorted by day then collection.

    Raises:
        ConfigError: unknown collection, end before start, negative seed, or a box with no grid point.

    Examples:
        >>> paths = write_synthetic_granules("demo", REGIONS["conus"], date(2020, 1, 1), date(2020, 1, 3))
    """
    unknown = [c for c in collections if c not in _BY_COLLECTION]
    if unknown:
        raise ConfigError(f"synthetic granules exist for {sorted(_BY_COLLECTION)} only, not {unknown}")
    if end < start:
        raise ConfigError(f"end {end} is before start {start}: give an end on or after the start")
    if seed < 0:
        raise ConfigError(f"seed {seed} is negative: use an integer >= 0")
    lat, lon = grid_points(region)
    lon = np.sort(lon)  # the grid's own storage order, as an index-range subsetter writes it
    world = World(seed, lat, lon)
    t_first = (datetime(start.year, start.month, start.day) - EPOCH).total_seconds() / 3600.0
    t_last = (datetime(end.year, end.month, end.day) - EPOCH).total_seconds() / 3600.0 + 24.0
    systems = draw_systems(seed, t_first, t_last)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    days = [start + timedelta(days=i) for i in range((end - start).days + 1)]
    paths: list[Path] = []
    progress = None
    if show_progress:
        from rich.progress import Progress

        progress = Progress()
        progress.start()
        task = progress.add_task("synthetic granules", total=len(days))
    try:
        for day in days:
            fields = world.day(day, systems)
            for collection in collections:
                path = out / granule_name(collection, day, synthetic_stream(day))
                _write_granule(path, collection, day, lat, lon, fields, seed)
                paths.append(path)
            if progress is not None:
                progress.advance(task)
    finally:
        if progress is not None:
            progress.stop()
    logger.info("wrote %d synthetic granules for %s, %s..%s (seed %d) to %s", len(paths), region.name, start, end,
                seed, out)  # fmt: skip
    return paths
