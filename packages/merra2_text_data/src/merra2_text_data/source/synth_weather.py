"""The synthetic weather behind `synth.py`'s granules: every field a function of absolute (time, lat, lon) and the seed.

A climatology (latitude gradient, terrain, land and sea, seasonal and diurnal cycles by local solar time) plus
travelling systems with compact support (`draw_systems`: lows and highs, severe storms, tropical cyclones, convective
cells, heat-wave ridges); `World.day` evaluates one day of every variable on a grid. `synth.py` writes the files.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime

import numpy as np

_RE, _OMEGA, _G, _RD, _RHO = 6.371e6, 7.292e-5, 9.80665, 287.04, 1.2
EPOCH = datetime(1980, 1, 1)
_YEAR_D, _JUL15_D = 365.2422, 196.0
_SLOT_OFFSET = 10_000_000


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


def draw_systems(seed: int, t_first: float, t_last: float) -> dict[str, np.ndarray]:
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


class World:
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
        h0 = (datetime(day.year, day.month, day.day) - EPOCH).total_seconds() / 3600.0 + 0.5
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
