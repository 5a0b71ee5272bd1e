"""Fixtures of the merra2_text_data tests: `make_cube`, a factory of tiny MERRA-2-like regional hourly cubes.

The cube has the shape `subset.open_region` returns: dims (time, lat, lon), hourly times stamped at HH:30 UTC,
lat ascending S->N, lon ascending W->E in array order (across the antimeridian the values wrap from 179.375 to -180),
float32 variables in physical units with `units`, `long_name` and `collection` attributes.
The values are deterministic smooth fields (diurnal cycle, latitude gradient) plus seeded noise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from climate_text_schema import DEFAULT_VARIABLES, KNOWN_VARIABLES

NanPatch = tuple[str, slice, slice, slice]
"""(variable, time slice, lat slice, lon slice) set to NaN."""


def _fields(
    hours: np.ndarray, lat: np.ndarray, lon_index: np.ndarray, t2m_offset: float, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Plausible, mutually consistent surface fields of shape (time, lat, lon) in physical units."""
    t = hours[:, None, None]
    la = lat[None, :, None]
    lo = lon_index[None, None, :].astype(float)
    shape = (hours.size, lat.size, lon_index.size)
    noise = rng.standard_normal(shape)
    t2m = 285.0 - 0.6 * (la - 35.0) + 5.0 * np.sin(2 * np.pi * (t - 9.0) / 24.0) + 0.3 * lo + 0.5 * noise
    t2m = t2m + t2m_offset
    dew = t2m - 4.0 - 0.2 * lo
    e = 611.2 * np.exp(17.67 * (dew - 273.15) / (dew - 29.65))  # vapour pressure (Pa)
    slp = 101300.0 + 400.0 * np.sin(2 * np.pi * t / 72.0) - 50.0 * (la - 35.0) + 20.0 * noise
    ps = slp - 9000.0 - 300.0 * lo
    qv = 0.622 * e / (ps - 0.378 * e)
    rain = np.clip(np.sin(2 * np.pi * (t + 3.0 * lo) / 36.0), 0.0, None) * 4e-5
    return {
        "T2M": t2m,
        "T2MDEW": dew,
        "QV2M": qv,
        "U10M": 4.0 + 2.0 * np.cos(2 * np.pi * t / 48.0) + 0.3 * noise,
        "V10M": -2.0 + 0.1 * (la - 35.0) + 0.3 * noise,
        "SLP": slp,
        "PS": ps,
        "TQV": 15.0 + 0.5 * lo + 0.2 * np.abs(noise),
        "TS": t2m + 1.5,
        "T850": t2m - 12.0,
        "PRECTOTCORR": np.broadcast_to(rain, shape),
    }


def build_cube(
    days: int = 3,
    n_lat: int = 9,
    n_lon: int = 12,
    start: str = "2019-01-01",
    south: float = 35.0,
    west: float = -105.0,
    antimeridian: bool = False,
    nan_patches: Sequence[NanPatch] = (),
    variables: Sequence[str] = DEFAULT_VARIABLES,
    t2m_offset: float = 0.0,
    seed: int = 0,
    first_hour: int = 0,
) -> xr.Dataset:
    """A small MERRA-2-like regional cube (see the module docstring). `antimeridian` centres lon on 180 (values wrap)."""
    n_time = days * 24 - first_hour
    time = pd.date_range(
        pd.Timestamp(start) + pd.Timedelta(hours=first_hour, minutes=30), periods=n_time, freq="h"
    )
    lat = south + 0.5 * np.arange(n_lat)
    lon_start = 180.0 - 0.625 * (n_lon // 2) if antimeridian else west
    lon = ((lon_start + 0.625 * np.arange(n_lon) + 180.0) % 360.0) - 180.0
    hours = ((time - pd.Timestamp(start)) / pd.Timedelta(hours=1)).to_numpy(dtype=float)
    fields = _fields(hours, lat, np.arange(n_lon), t2m_offset, np.random.default_rng(seed))
    data_vars: dict[str, Any] = {}
    for name in variables:
        spec = KNOWN_VARIABLES[name]
        values = np.array(fields[name], dtype=np.float32)
        for var, t_sl, la_sl, lo_sl in nan_patches:
            if var == name:
                values[t_sl, la_sl, lo_sl] = np.nan
        data_vars[name] = xr.DataArray(
            values,
            dims=("time", "lat", "lon"),
            attrs={"units": spec.units, "long_name": spec.long_name, "collection": spec.collection},
        )
    return xr.Dataset(
        data_vars,
        coords={
            "time": ("time", time.to_numpy(dtype="datetime64[ns]")),
            "lat": ("lat", lat, {"units": "degrees_north", "long_name": "latitude"}),
            "lon": ("lon", lon, {"units": "degrees_east", "long_name": "longitude"}),
        },
        attrs={"Conventions": "CF-1.7", "title": "MERRA-2-like test cube"},
    )


@pytest.fixture
def make_cube() -> Callable[..., xr.Dataset]:
    """Factory: `make_cube(days=3, n_lat=9, n_lon=12, antimeridian=False, nan_patches=[...], ...)`."""
    return build_cube
