"""Synthetic MERRA-2 granules (`merra2-text synth`): real file format, plausible and coherent weather.

Every value is a function of absolute (time, lat, lon) and the seed only, so a sub-region of a synthetic file equals
the synthetic file of that sub-region, bit for bit. The weather is a climatology (latitude gradient, terrain, land and
sea, seasonal and diurnal cycles by local solar time) plus travelling systems with compact support: extratropical
lows and highs moving west to east with gradient-wind circulations, warm moist sectors and frontal rain, severe
storms, tropical cyclones, convective cells and slow-moving heat-wave ridges. Moisture, pressure and winds are
derived from one another (dew point <= temperature, QV2M from dew point and PS, PS from SLP and terrain height).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from climate_text_schema import FILL_VALUE, KNOWN_VARIABLES

from merra2_text_data.errors import ConfigError
from merra2_text_data.regions import Region, grid_points
from merra2_text_data.source.granules import COLLECTIONS, VERSION, granule_name

__all__ = ["FLX_VARIABLES", "SLV_VARIABLES", "synthetic_stream", "write_synthetic_granules"]

logger = logging.getLogger(__name__)

SLV_VARIABLES = ("T2M", "T2MDEW", "QV2M", "U10M", "V10M", "SLP", "PS", "TQV", "TS", "T850",
                 "U2M", "V2M", "T10M", "QV10M", "U850", "V850", "T500", "H500")  # fmt: skip
"""Variables written to synthetic M2T1NXSLV granules."""
FLX_VARIABLES = ("PRECTOTCORR", "PRECTOT")
"""Variables written to synthetic M2T1NXFLX granules."""
_BY_COLLECTION = {"M2T1NXSLV": SLV_VARIABLES, "M2T1NXFLX": FLX_VARIABLES}

_RE, _OMEGA, _G, _RD, _RHO = 6.371e6, 7.292e-5, 9.80665, 287.04, 1.2
_EPOCH = datetime(1980, 1, 1)
_YEAR_D, _JUL15_D = 365.2422, 196.0
_SLOT_OFFSET = 10_000_000


def synthetic_stream(day: date) -> str:
    """The stream number used in synthetic file names: 100 (1980-91), 200 (-2000), 300 (-2010), 400 after."""
    return "100" if day.year < 1992 else "200" if day.year < 2001 else "300" if day.year < 2011 else "400"


@dataclass(frozen=True)
class _Family:
    """A kind of travelling weather system (ranges are drawn uniformly; latitude is absolute, both hemispheres)."""

    slot_h: float
    rate: float
    lat: tuple[float, float]
    life_h: tuple[float, float]
    amp_pa: tuple[float, float]
    radius_km: tuple[float, float]
    speed_ms: tuple[float, float]
    drift_ms: float
    temp_k: float
    moist: float
    rain: float
    seasonal: bool
    convective: bool = False


# fmt: off
_FAMILIES = (
    # slot_h, rate, |lat|, life_h, amp_pa, radius_km, speed_ms, drift, temp_k, moist, rain, seasonal, convective
    _Family(6, 3.0, (30, 70), (48, 144), (-3000, -800), (900, 1800), (8, 16), 1.5, 0.0, 0.15, 3e-4, False),  # lows
    _Family(6, 2.0, (25, 60), (72, 192), (500, 1800), (1200, 2200), (4, 10), 0.0, 0.0, -0.15, 0.0, False),  # highs
    _Family(24, 1.5, (25, 55), (96, 240), (400, 1200), (1000, 1800), (0, 3), 0.0, 10.0, -0.2, 0.0, True),  # heat
    _Family(24, 0.4, (35, 65), (36, 72), (-5000, -3000), (700, 1200), (12, 20), 2.0, 0.0, 0.2, 1e-3, False),  # storms
    _Family(24, 0.25, (10, 25), (72, 192), (-6000, -2500), (400, 700), (-6, -3), 2.0, 0.0, 0.2, 4e-3, True),  # TCs
    _Family(3, 40.0, (0, 45), (2, 8), (-300, -100), (150, 350), (-6, 10), 0.0, -1.5, 0.1, 5e-3, True, True),  # cells
)
# fmt: on


# Crude real geography (lat, lon, half-height, half-width in degrees, value) so that land, deserts and mountains sit
# roughly where they are on Earth; smooth random waves add detail.
_CONTINENTS = ((48, -100, 22, 32, 1), (22, -102, 8, 9, 1), (72, -40, 10, 16, 1), (-12, -60, 22, 16, 1),
               (-40, -68, 15, 6, 1), (50, 15, 12, 25, 1), (52, 95, 22, 52, 1), (24, 50, 10, 16, 1),
               (22, 78, 12, 9, 1), (18, 102, 10, 9, 1), (12, 18, 18, 28, 1), (-14, 26, 16, 13, 1),
               (-25, 134, 11, 18, 1), (-84, 0, 16, 400, 1))  # fmt: skip
_RANGES = ((44, -112, 14, 7, 1800), (33, 88, 6, 15, 4200), (-22, -68, 24, 3, 3000), (-82, 60, 10, 400, 2600),
           (46, 10, 2, 5, 1500), (40, 45, 4, 10, 1200))  # fmt: skip


def _season(lat_sign: np.ndarray | float, t_days: np.ndarray | float) -> np.ndarray:
    """Local summer factor in 0..1 (1 at mid-July in the north, mid-January in the south)."""
    return np.asarray(0.5 + 0.5 * lat_sign * np.cos(2 * np.pi * (np.asarray(t_days) - _JUL15_D) / _YEAR_D))


_SYSTEM_FIELDS = ("tb", "life", "lat", "lon", "amp", "rad", "u", "v", "temp", "moist", "rain", "conv")


def _systems(seed: int, t_first: float, t_last: float) -> dict[str, np.ndarray]:
    """All systems alive at some hour of t_first..t_last (hours since 1980-01-01), drawn per (family, time slot)."""
    cols: dict[str, list[np.ndarray]] = {k: [] for k in _SYSTEM_FIELDS}
    for index, fam in enumerate(_FAMILIES):
        first = int(np.floor((t_first - fam.life_h[1]) / fam.slot_h))
        for slot in range(first, int(np.floor(t_last / fam.slot_h)) + 1):
            rng = np.random.default_rng([seed, index, slot + _SLOT_OFFSET])
            n = int(rng.poisson(fam.rate))
            if n == 0:
                continue
            r = rng.random((n, 9))
            sign = np.where(r[:, 0] < 0.5, -1.0, 1.0)
            tb = (slot + r[:, 1]) * fam.slot_h
            lat = sign * (fam.lat[0] + (fam.lat[1] - fam.lat[0]) * r[:, 2])
            scale = 0.2 + 0.8 * _season(sign, tb / 24.0) if fam.seasonal else np.ones(n)
            pick = {"tb": tb, "life": fam.life_h[0] + (fam.life_h[1] - fam.life_h[0]) * r[:, 3],
                    "lat": np.radians(lat), "lon": np.radians(-180.0 + 360.0 * r[:, 4]),
                    "amp": (fam.amp_pa[0] + (fam.amp_pa[1] - fam.amp_pa[0]) * r[:, 5]) * scale,
                    "rad": 1e3 * (fam.radius_km[0] + (fam.radius_km[1] - fam.radius_km[0]) * r[:, 6]),
                    "u": fam.speed_ms[0] + (fam.speed_ms[1] - fam.speed_ms[0]) * r[:, 7],
                    "v": sign * fam.drift_ms * r[:, 8], "temp": fam.temp_k * scale,
                    "moist": np.full(n, fam.moist), "rain": fam.rain * scale,
                    "conv": np.full(n, float(fam.convective))}  # fmt: skip
            for key, value in pick.items():
                cols[key].append(np.broadcast_to(np.asarray(value, dtype=np.float64), (n,)))
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in cols.items()}


@dataclass
class _Waves:
    """Sums of K smooth waves on the sphere: static maps (omega = 0) or travelling anomalies."""

    cos: np.ndarray  # (K, nlat, nlon)
    sin: np.ndarray
    amp: np.ndarray  # (K,)
    omega: np.ndarray  # (K,) radians per hour

    def at(self, hours: np.ndarray) -> np.ndarray:
        out = np.zeros((hours.size, *self.cos.shape[1:]))
        for k in range(self.amp.size):
            c = (self.amp[k] * np.cos(self.omega[k] * hours))[:, None, None]
            s = (self.amp[k] * np.sin(self.omega[k] * hours))[:, None, None]
            out += self.cos[k] * c + self.sin[k] * s
        return out


def _waves(seed: int, key: int, lat: np.ndarray, lon: np.ndarray, k: int, n: tuple[float, float], std: float,
           period_d: tuple[float, float] | None) -> _Waves:  # fmt: skip
    rng = np.random.default_rng([seed, 1000 + key])
    w = rng.normal(size=(k, 3))
    w /= np.sqrt((w**2).sum(axis=1))[:, None]
    wn = n[0] + (n[1] - n[0]) * rng.random(k)
    phase = 2 * np.pi * rng.random(k)
    omega = np.zeros(k) if period_d is None else 2 * np.pi / (24.0 * rng.uniform(*period_d, size=k))
    cl, sl = np.cos(lat)[:, None], np.sin(lat)[:, None]
    x, y, z = cl * np.cos(lon)[None, :], cl * np.sin(lon)[None, :], sl + 0.0 * lon[None, :]
    theta = np.stack([wn[i] * (w[i, 0] * x + w[i, 1] * y + w[i, 2] * z) + phase[i] for i in range(k)])
    return _Waves(np.cos(theta), np.sin(theta), np.full(k, std * np.sqrt(2.0 / k)), omega)


class _World:
    """The static fields of the synthetic planet on one grid, and the hourly weather on it."""

    def __init__(self, seed: int, lat_deg: np.ndarray, lon_deg: np.ndarray) -> None:
        self.seed, self.lat_deg, self.lon_deg = seed, lat_deg, lon_deg
        self.lat, self.lon = np.radians(lat_deg), np.radians(lon_deg)
        lat, lon = self.lat, self.lon
        static = {name: _waves(seed, i, lat, lon, k, n, 1.0, None).at(np.zeros(1))[0]
                  for i, (name, k, n) in enumerate((("land", 10, (1.5, 4.0)), ("mountain", 16, (3.0, 9.0)),
                                                    ("humid", 10, (2.0, 6.0)), ("bias", 6, (2.0, 5.0))))}  # fmt: skip
        continents = sum(self._blobs(_CONTINENTS, 6.0), np.zeros((lat.size, lon.size)))
        self.land = np.clip(continents + 0.25 * static["land"], 0.0, 1.0)
        ranges = sum(self._blobs(_RANGES, 3.0), np.zeros((lat.size, lon.size)))
        relief = 250.0 + 900.0 * np.maximum(0.0, static["mountain"]) ** 1.6
        self.z = np.minimum(4800.0, self.land**2 * (relief + ranges))
        s2 = np.sin(lat)[:, None] ** 2
        desert = self.land * np.exp(-(((np.abs(lat_deg)[:, None] - 24.0) / 9.0) ** 2))
        self.rh_base = 0.80 - 0.22 * self.land - 0.30 * desert + 0.06 * static["humid"]
        self.bias = np.clip(1.0 + 0.15 * static["bias"], 0.6, 1.4)
        self.t_mean = 300.0 - 29.0 * s2 - 18.0 * s2**2 - 0.0065 * self.z
        self.sign = np.where(lat_deg < 0, -1.0, 1.0)[:, None]
        sin_abs = np.abs(np.sin(lat))[:, None]
        self.t_amp = (3.0 * np.tanh(lat_deg / 10.0)[:, None] + 22.0 * self.sign * sin_abs**1.5) * (
            0.45 + 0.55 * self.land
        )
        ab = np.abs(lat_deg)[:, None]
        self.slp_clim = (
            101325.0
            + 600.0 * np.exp(-(((ab - 32.0) / 10.0) ** 2))
            - 1200.0 * np.exp(-(((ab - 62.0) / 10.0) ** 2))
        )
        self.u_bg = -6.0 * np.exp(-(((ab - 14.0) / 10.0) ** 2)) + 8.0 * np.exp(-(((ab - 45.0) / 12.0) ** 2))
        self.u_bg = self.u_bg - 3.0 * np.exp(-(((ab - 75.0) / 8.0) ** 2))
        self.v_bg = -2.0 * np.tanh(lat_deg / 8.0)[:, None] * np.exp(-((lat_deg[:, None] / 25.0) ** 2))
        f = 2 * _OMEGA * np.sin(lat)
        self.f = np.where(lat_deg < 0, -1.0, 1.0) * np.maximum(
            np.abs(f), 2 * _OMEGA * np.sin(np.radians(10.0))
        )
        self.anom = {name: _waves(seed, 10 + i, lat, lon, 12, (4.0, 10.0), std, (3.0, 12.0))
                     for i, (name, std) in enumerate((("T", 2.0), ("P", 250.0), ("RH", 0.06), ("U", 1.5),
                                                      ("V", 1.5)))}  # fmt: skip

    def _blobs(self, table: tuple[tuple[float, ...], ...], sharp: float) -> list[np.ndarray]:
        """Smooth elliptical features (lat, lon, half-height, half-width in degrees, value): e.g. continents."""
        out = []
        for lat_c, lon_c, a, b, value in table:
            dlon = np.mod(self.lon_deg - lon_c + 180.0, 360.0) - 180.0
            d = np.sqrt(((self.lat_deg[:, None] - lat_c) / a) ** 2 + (dlon[None, :] / b) ** 2)
            out.append(value / (1.0 + np.exp(-sharp * (1.0 - d))))
        return out

    def _near(self, hours: np.ndarray, sys: dict[str, np.ndarray]) -> np.ndarray:
        """Indices of the systems alive during `hours` that come near the grid (a generous vectorised pre-filter;
        `_accumulate` still applies the exact support test, so skipping the others changes no value)."""
        alive = np.flatnonzero((sys["tb"] < hours[-1]) & (sys["tb"] + sys["life"] > hours[0]))
        tb, life = sys["tb"][alive, None], sys["life"][alive, None]
        on = ((hours - tb) / life > 0.0) & ((hours - tb) / life < 1.0)
        dt_s = (hours - tb) * 3600.0
        latc = sys["lat"][alive, None] + sys["v"][alive, None] * dt_s / _RE
        lonc = sys["lon"][alive, None] + sys["u"][alive, None] * dt_s / (
            _RE * np.cos(np.clip(latc, -1.48, 1.48))
        )
        reach = 1.05 * sys["rad"][alive, None]
        lat_ok = (latc + reach / _RE >= self.lat[0] - 0.01) & (latc - reach / _RE <= self.lat[-1] + 0.01)
        gap = np.abs(np.mod(self.lon[None, None, :] - lonc[:, :, None] + np.pi, 2 * np.pi) - np.pi).min(
            axis=2
        )
        lon_ok = _RE * np.cos(np.clip(latc, -1.48, 1.48)) * gap < reach
        return alive[(on & lat_ok & lon_ok).any(axis=1)]

    def _accumulate(self, hours: np.ndarray, sys: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        shape = (hours.size, self.lat.size, self.lon.size)
        acc = {k: np.zeros(shape) for k in ("P", "U", "V", "T", "RH", "R", "C")}
        for i in self._near(hours, sys):
            age = (hours - sys["tb"][i]) / sys["life"][i]
            on = np.flatnonzero((age > 0.0) & (age < 1.0))
            if on.size == 0:
                continue
            t0, t1 = on[0], on[-1] + 1
            dt_s = (hours[t0:t1] - sys["tb"][i]) * 3600.0
            latc = np.clip(sys["lat"][i] + sys["v"][i] * dt_s / _RE, -1.48, 1.48)
            lonc = sys["lon"][i] + sys["u"][i] * dt_s / (_RE * np.cos(latc))
            rad = sys["rad"][i]
            span = rad / _RE
            r0, r1 = np.searchsorted(self.lat, [latc.min() - span, latc.max() + span])
            if r0 >= r1:
                continue
            dx = (
                _RE
                * np.cos(latc)[:, None]
                * (np.mod(self.lon[None, :] - lonc[:, None] + np.pi, 2 * np.pi) - np.pi)
            )
            reach = np.flatnonzero((np.abs(dx) < rad).any(axis=0))
            if reach.size == 0:
                continue
            c0, c1 = (
                reach[0],
                reach[-1] + 1,
            )  # outside rows r0:r1 and columns c0:c1 the system adds exact zeros
            dy = _RE * (self.lat[None, r0:r1] - latc[:, None])
            dx3, dy3 = dx[:, None, c0:c1], dy[:, :, None]
            q = (dx3**2 + dy3**2) / rad**2
            one = np.where(q < 1.0, 1.0 - q, 0.0)
            env = np.sin(np.pi * age[t0:t1])[:, None, None]
            amp = sys["amp"][i] * env
            shape_b, slope = one**3, -3.0 * one**2
            f = self.f[None, r0:r1, None]
            vg_x = amp * slope * 2.0 * dx3 / rad**2 / (_RHO * f)  # v from dp/dx
            ug_y = -amp * slope * 2.0 * dy3 / rad**2 / (_RHO * f)
            speed = np.sqrt(ug_y**2 + vg_x**2)
            dist = np.sqrt(q) * rad
            limit = 2.0 / (
                1.0 + np.sqrt(1.0 + 4.0 * speed / (np.abs(f) * dist + 1.0))
            )  # gradient-wind reduction
            ug, vg = ug_y * limit, vg_x * limit
            sgn = self.sign[None, r0:r1, :]
            sl = (slice(t0, t1), slice(r0, r1), slice(c0, c1))
            acc["P"][sl] += amp * shape_b
            acc["U"][sl] += ug
            acc["V"][sl] += vg
            acc["T"][sl] += 4.0 * np.tanh(vg * sgn / 10.0) * shape_b + sys["temp"][i] * env * one
            acc["RH"][sl] += sys["moist"][i] * env * shape_b + 0.1 * np.tanh(vg * sgn / 10.0) * shape_b
            rain = sys["rain"][i] * env * shape_b**2 * (1.0 + 0.6 * np.tanh(2.0 * dx3 / rad))
            acc["C" if sys["conv"][i] else "R"][sl] += rain
        return acc

    def day(self, day: date, systems: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The 24 hourly means of `day` (stamped HH:30) of every synthetic variable, float64 (time, lat, lon)."""
        h0 = (datetime(day.year, day.month, day.day) - _EPOCH).total_seconds() / 3600.0 + 0.5
        hours = h0 + np.arange(24.0)
        acc = self._accumulate(hours, systems)
        cosph = np.cos(2 * np.pi * (hours / 24.0 - _JUL15_D) / _YEAR_D)[:, None, None]
        lst = np.mod((hours % 24.0)[:, None] + self.lon_deg[None, :] / 15.0, 24.0)[:, None, :]
        shape_d = np.cos(2 * np.pi * (lst - 15.0) / 24.0)
        daylight = np.clip(np.cos(self.lat[None, :, None] - 0.409 * cosph), 0.1, 1.0)
        d_amp = (1.0 + 5.0 * self.land) * (0.55 + 0.45 * (1.0 - self.rh_base)) * daylight
        diurnal = d_amp * shape_d
        t_nod = self.t_mean + self.t_amp * cosph + acc["T"] + self.anom["T"].at(hours)
        t2m = np.clip(t_nod + diurnal, 180.0, 330.0)
        rh = np.clip(
            self.rh_base + acc["RH"] + self.anom["RH"].at(hours) - 0.12 * self.land * shape_d, 0.06, 0.97
        )
        tc = t2m - 273.15
        gamma = np.log(rh) + 17.625 * tc / (243.04 + tc)
        td_c = 243.04 * gamma / (17.625 - gamma)
        slp = np.clip(self.slp_clim + acc["P"] + self.anom["P"].at(hours), 87000.0, 108500.0)
        ps = slp * np.exp(-_G * self.z / (_RD * (t_nod + 0.00325 * self.z)))
        e = 610.94 * np.exp(17.625 * td_c / (243.04 + td_c))
        qv2m = 0.622 * e / (ps - 0.378 * e)
        t850 = np.clip(t_nod + 0.0065 * self.z - 9.5 + 0.1 * diurnal, 200.0, 320.0)
        t500 = np.clip(t850 - 24.0 - 6.0 * np.sin(self.lat)[None, :, None] ** 2, 190.0, 290.0)
        t_sl = t_nod + 0.0065 * self.z
        h500 = (
            _RD / _G * ((t_sl + t850) / 2 * np.log(slp / 85000.0) + (t850 + t500) / 2 * np.log(850.0 / 500.0))
        )
        ascent = np.clip(-acc["P"] / 1500.0, 0.0, 1.0)
        tqv = np.clip(qv2m * ps / _G / 3.6 * (1.0 + 0.25 * ascent), 0.1, 98.0)
        ug, vg = acc["U"] + self.anom["U"].at(hours), acc["V"] + self.anom["V"].at(hours)
        ca, sa = np.cos(np.radians(25.0)), np.sin(np.radians(25.0)) * self.sign[None]
        gust = 1.0 + 0.15 * self.land * shape_d
        u10 = np.clip(0.7 * (ug * ca - vg * sa) * gust + self.u_bg, -90.0, 90.0)
        v10 = np.clip(0.7 * (ug * sa + vg * ca) * gust + self.v_bg, -90.0, 90.0)
        hum = np.clip((rh - 0.35) / 0.5, 0.0, 1.4) * np.clip(qv2m / 0.01, 0.15, 2.0)
        warm = np.clip((t2m - 283.0) / 15.0, 0.0, 1.5) * (1.0 + 0.8 * self.land * shape_d)
        prec = np.clip(
            acc["R"] * hum + acc["C"] * hum * warm + 2e-5 * np.clip((rh - 0.9) / 0.07, 0.0, 1.0), 0.0, 0.08
        )
        return {"T2M": t2m, "T2MDEW": np.minimum(td_c + 273.15, t2m), "QV2M": qv2m, "QV10M": 0.985 * qv2m,
                "U10M": u10, "V10M": v10, "U2M": 0.72 * u10, "V2M": 0.72 * v10, "SLP": slp, "PS": ps,
                "TS": np.clip(t2m + 0.8 * diurnal * (0.3 + 0.7 * self.land) + 0.8 * (1 - self.land), 180.0, 345.0),
                "T10M": t2m - 0.15 - 0.15 * diurnal, "T850": t850, "T500": t500, "H500": np.clip(h500, 4200, 6300),
                "U850": np.clip(1.5 * self.u_bg + ug, -140.0, 140.0), "V850": np.clip(vg + self.v_bg, -140.0, 140.0),
                "TQV": tqv, "PRECTOT": prec, "PRECTOTCORR": prec * self.bias}  # fmt: skip


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
    world = _World(seed, lat, lon)
    t_first = (datetime(start.year, start.month, start.day) - _EPOCH).total_seconds() / 3600.0
    t_last = (datetime(end.year, end.month, end.day) - _EPOCH).total_seconds() / 3600.0 + 24.0
    systems = _systems(seed, t_first, t_last)
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
