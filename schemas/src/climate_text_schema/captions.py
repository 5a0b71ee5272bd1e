"""The caption format (CONTRACT section 7): what a caption states and how it is written (`caption_reading` reads it
back with patterns derived from the templates here).

The builder writes captions with these functions, the trainer trains on and scores them with the same functions, so
the format exists once. `TEXT_FORMAT` is part of every dataset version id (the manifest's `config.text_format`); a
reader refuses a format it does not know (`check_text_format`).

Every number is computed from a sample's statistics (`{V: {"mean", "min", "max"}}`, physical units) by
`caption_quantities` and written with ONE decimal, `-` for negatives, never `-0.0`:

| key | quantity | written as | from |
| --- | --- | --- | --- |
| `t2m_mean_c`, `t2m_min_c`, `t2m_max_c` | mean / min / max 2 m temperature | `N.N °C` | T2M mean / min / max, K - 273.15 |
| `dewpoint_c` | mean dew point | `N.N °C` | T2MDEW mean |
| `qv_g_kg` | mean specific humidity | `N.N g/kg` | QV2M mean x 1000 |
| `wind_speed_m_s`, `wind_dir_deg` | speed and direction of the MEAN VECTOR | `N.N m/s from the <16-point compass>` | U10M mean, V10M mean; meteorological: where it blows FROM; `with no prevailing direction` when the speed rounds to 0.0 (then no direction) |
| `slp_hpa` | mean sea-level pressure | `N.N hPa` | SLP mean / 100 |
| `precip_mm` | area-mean precipitation total | `N.N mm` | PRECTOTCORR (MERRA-2) or PRECTOT (ERA5) mean, kg m-2 s-1 = mm s-1, x window seconds |
| `t2m_anomaly_c` | temperature anomaly | `N.N °C warmer/colder than the YYYY-YYYY average for the date` | T2M mean minus a day-of-year climatology (multi-year builds) |
| `wind_component_max_m_s`, `precip_peak_mm_day` | extremes, after `Notable:` | see `EXTREMES` | max abs U10M/V10M; precipitation max x 86400 |

`wind_dir_deg` is read back as the centre of the compass point (0 = from the north, 90 = from the east). Each
sample's caption uses one of `N_TEMPLATES` phrasings, picked from the SHA-256 of its key (stable across runs);
`parse_caption_numbers` reads all of them. Reported events come last, after `Reported events:`, and are never parsed
(their narratives hold free numbers). A model is trained on `caption_target(text, form)`: the whole caption, or its
number sentences rewritten in template 0's phrasing (`canonical_caption`), numbers copied verbatim.
"""

from __future__ import annotations

import hashlib
import math
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from .errors import ContractError

__all__ = [
    "CAPTION_FORMS",
    "COMPASS",
    "EXTREMES",
    "FACETS",
    "KNOWN_TEXT_FORMATS",
    "N_TEMPLATES",
    "NUMBER_FACETS",
    "PRECIP_VARIABLES",
    "QUANTITIES",
    "TEMPLATES",
    "TEXT_FORMAT",
    "Quantity",
    "caption_quantities",
    "check_text_format",
    "compass_direction",
    "example_caption",
    "format_number",
    "notable_extremes",
    "precip_variable",
    "quantities_from_index",
    "render_facet",
    "template_index",
    "wind_from_degrees",
]

TEXT_FORMAT = "2"
"""The version of the caption format written by `merra2-text` now. 2: PRECTOT (ERA5) captions precipitation too and
the format lives here, in the contract. Bump it with any change that changes a caption for the same inputs."""

KNOWN_TEXT_FORMATS: tuple[str, ...] = ("1", "2")
"""Caption formats this module reads (1 and 2 share every sentence; 1 had no PRECTOT)."""

COMPASS = (
    "north", "north-northeast", "northeast", "east-northeast", "east", "east-southeast", "southeast",
    "south-southeast", "south", "south-southwest", "southwest", "west-southwest", "west", "west-northwest",
    "northwest", "north-northwest",
)  # fmt: skip
PRECIP_VARIABLES = ("PRECTOTCORR", "PRECTOT")
"""Precipitation variables a caption states, in order of preference (MERRA-2's bias-corrected one first)."""


@dataclass(frozen=True)
class Quantity:
    """One number a caption can state."""

    key: str
    label: str
    unit: str
    kind: str = "linear"
    """How it is scored: `linear` (absolute error), `circular` (degrees, error on the circle), `precip` (>= 0,
    heavy-tailed: error in log space and hit rates)."""


QUANTITIES: dict[str, Quantity] = {
    q.key: q
    for q in (
        Quantity("t2m_mean_c", "mean 2 m temperature", "°C"),
        Quantity("t2m_min_c", "minimum 2 m temperature", "°C"),
        Quantity("t2m_max_c", "maximum 2 m temperature", "°C"),
        Quantity("dewpoint_c", "mean dew point", "°C"),
        Quantity("qv_g_kg", "mean specific humidity", "g/kg"),
        Quantity("wind_speed_m_s", "mean-vector 10 m wind speed", "m/s"),
        Quantity("wind_dir_deg", "mean-vector 10 m wind direction (from)", "°", "circular"),
        Quantity("slp_hpa", "mean sea-level pressure", "hPa"),
        Quantity("precip_mm", "area-mean precipitation total", "mm", "precip"),
    )
}
"""The quantities of a caption's number sentences (what is trained and scored), in caption order."""

HEAT_C, COLD_C, WIND_MS, HEAVY_MM_DAY = 35.0, -20.0, 20.0, 50.0

TEMPLATES: tuple[dict[str, str], ...] = (
    {
        "intro": "Weather over {region} {dates}.",
        "temp": "The area-weighted mean 2 m temperature was {t_mean} °C, ranging from {t_min} °C to {t_max} °C.",
        "anom": "That is {anom} °C {sign} than the {period} average for the date.",
        "dew": "The mean dew point was {dew} °C.",
        "q": "Mean specific humidity was {q} g/kg.",
        "wind": "The mean 10 m wind vector was {ws} m/s {dirp}.",
        "slp": "Mean sea-level pressure was {slp} hPa.",
        "precip": "Precipitation totalled {pr} mm on area average.",
    },
    {
        "intro": "{Dates}, {region}:",
        "temp": "2 m temperatures averaged {t_mean} °C (area-weighted), between {t_min} °C and {t_max} °C.",
        "anom": "This was {anom} °C {sign} than the {period} average for the date.",
        "dew": "Dew point averaged {dew} °C.",
        "q": "Specific humidity averaged {q} g/kg.",
        "wind": "Mean wind vector at 10 m: {ws} m/s {dirp}.",
        "slp": "Sea-level pressure averaged {slp} hPa.",
        "precip": "Area-mean precipitation: {pr} mm.",
    },
    {
        "intro": "Conditions in {region} {dates}:",
        "temp": "mean 2 m temperature {t_mean} °C (area-weighted; minimum {t_min} °C, maximum {t_max} °C);",
        "anom": "{anom} °C {sign} than the {period} average for the date;",
        "dew": "dew point {dew} °C;",
        "q": "specific humidity {q} g/kg;",
        "wind": "10 m mean wind vector {ws} m/s {dirp};",
        "slp": "sea-level pressure {slp} hPa;",
        "precip": "area-mean precipitation total {pr} mm;",
    },
)
"""The phrasings, facet -> format string. `dirp` is the wind direction phrase, `sign` warmer|colder."""
N_TEMPLATES = len(TEMPLATES)
FACETS = ("temp", "anom", "dew", "q", "wind", "slp", "precip")
"""The sentences after the intro, in caption order."""
NUMBER_FACETS = ("temp", "dew", "q", "wind", "slp", "precip")
"""The sentences whose numbers are properties of the window itself (the anomaly also needs a climatology)."""
EXTREMES = {
    "heat": "extreme heat (maximum 2 m temperature {t_max} °C)",
    "cold": "extreme cold (minimum 2 m temperature {t_min} °C)",
    "wind": "strong winds (a 10 m wind component reached {wmax} m/s)",
    "rain": "heavy precipitation (peak rate {peak} mm/day)",
}
FIELD_KEYS = {
    "t_mean": "t2m_mean_c", "t_min": "t2m_min_c", "t_max": "t2m_max_c", "dew": "dewpoint_c", "q": "qv_g_kg",
    "ws": "wind_speed_m_s", "slp": "slp_hpa", "pr": "precip_mm", "anom": "t2m_anomaly_c",
    "wmax": "wind_component_max_m_s", "peak": "precip_peak_mm_day",
}  # fmt: skip
"""Template field -> quantity key."""
CAPTION_FORMS: dict[str, tuple[str, ...] | None] = {
    "full": None,
    "numbers": NUMBER_FACETS,
    "temperature": ("temp",),
}
"""Caption forms a model can be trained on: the facets kept, in template 0's phrasing (None: the whole caption)."""


def check_text_format(found: Any, where: str = "dataset") -> str:
    """Return the dataset's caption format if this reader knows it; raise otherwise.

    Raises:
        ContractError: an unknown format (a newer builder): upgrade climate-text-schema, or rebuild.
    """
    text = str(found) if found is not None else "1"  # datasets written before the key existed used format 1
    if text not in KNOWN_TEXT_FORMATS:
        raise ContractError(
            f"{where} was captioned in text format {text!r}; this reader knows {', '.join(KNOWN_TEXT_FORMATS)}: "
            "upgrade climate-text-schema (and the trainer) to a release that reads it, or rebuild the dataset"
        )
    return text


def format_number(x: float) -> str:
    """A caption number: one decimal, never `-0.0`."""
    text = f"{x:.1f}"
    return "0.0" if text == "-0.0" else text


def template_index(key: str) -> int:
    """The phrasing a sample key gets (stable: from its SHA-256)."""
    return hashlib.sha256(key.encode("utf-8")).digest()[0] % N_TEMPLATES


def wind_from_degrees(u: float, v: float) -> float:
    """The direction (degrees, 0 = north, clockwise) the wind (u eastward, v northward) blows FROM."""
    return (270.0 - math.degrees(math.atan2(v, u))) % 360.0


def compass_direction(u: float, v: float) -> str:
    """16-point compass word of the direction the wind blows FROM."""
    return COMPASS[int((wind_from_degrees(u, v) + 11.25) // 22.5) % 16]


def precip_variable(names: Iterable[str]) -> str | None:
    """The precipitation variable a caption states among `names` (`PRECIP_VARIABLES` order), or None."""
    present = set(names)
    return next((v for v in PRECIP_VARIABLES if v in present), None)


_TO_CAPTION_UNITS = {
    ("K", "C"): lambda x: x - 273.15, ("degC", "C"): lambda x: x, ("°C", "C"): lambda x: x,
    ("Pa", "hPa"): lambda x: x / 100.0, ("hPa", "hPa"): lambda x: x,
    ("kg kg-1", "g/kg"): lambda x: x * 1000.0, ("g kg-1", "g/kg"): lambda x: x,
    ("m s-1", "m/s"): lambda x: x, ("m/s", "m/s"): lambda x: x,
    ("kg m-2 s-1", "mm/s"): lambda x: x, ("mm s-1", "mm/s"): lambda x: x,
}  # fmt: skip
_TARGET = {"T2M": "C", "T2MDEW": "C", "SLP": "hPa", "QV2M": "g/kg", "U10M": "m/s", "V10M": "m/s",
           "PRECTOTCORR": "mm/s", "PRECTOT": "mm/s"}  # fmt: skip
_CONTRACT_UNITS = {"T2M": "K", "T2MDEW": "K", "SLP": "Pa", "QV2M": "kg kg-1", "U10M": "m s-1", "V10M": "m s-1",
                   "PRECTOTCORR": "kg m-2 s-1", "PRECTOT": "kg m-2 s-1"}  # fmt: skip


def _convert(value: float, var: str, unit: str | None) -> float:
    unit = (unit or _CONTRACT_UNITS[var]).strip()
    try:
        return float(_TO_CAPTION_UNITS[(unit, _TARGET[var])](value))
    except KeyError as exc:
        raise ContractError(f"{var} is in units {unit!r}; captions understand {_CONTRACT_UNITS[var]!r}") from exc


def caption_quantities(
    stats: Mapping[str, Mapping[str, float]], seconds: float, units: Mapping[str, str] | None = None
) -> dict[str, float]:
    """The exact (unrounded) quantities a caption states about a window, from its statistics.

    Args:
        stats: `{V: {"mean", "min", "max"}}` in physical units; absent variables leave their quantities out.
        seconds: the window's length (precipitation total = mean rate x seconds).
        units: `{V: units}` when they are not the contract's.

    Returns:
        The keys of `QUANTITIES` whose variables are present (`wind_dir_deg` only when the speed does not round to
        0.0), plus `wind_component_max_m_s` and `precip_peak_mm_day` (for the `Notable:` extremes).

    Raises:
        ContractError: units a caption cannot convert.
    """
    units = units or {}

    def get(var: str, which: str) -> float:
        return _convert(float(stats[var][which]), var, units.get(var))

    out: dict[str, float] = {}
    if "T2M" in stats:
        out.update(t2m_mean_c=get("T2M", "mean"), t2m_min_c=get("T2M", "min"), t2m_max_c=get("T2M", "max"))
    if "T2MDEW" in stats:
        out["dewpoint_c"] = get("T2MDEW", "mean")
    if "QV2M" in stats:
        out["qv_g_kg"] = get("QV2M", "mean")
    if "U10M" in stats and "V10M" in stats:
        u, v = get("U10M", "mean"), get("V10M", "mean")
        out["wind_speed_m_s"] = math.hypot(u, v)
        if format_number(out["wind_speed_m_s"]) != "0.0":
            out["wind_dir_deg"] = wind_from_degrees(u, v)
        out["wind_component_max_m_s"] = max(abs(get(c, w)) for c in ("U10M", "V10M") for w in ("min", "max"))
    if "SLP" in stats:
        out["slp_hpa"] = get("SLP", "mean")
    precip = precip_variable(stats)
    if precip is not None:
        out["precip_mm"] = get(precip, "mean") * seconds
        out["precip_peak_mm_day"] = get(precip, "max") * 86400.0
    return out


def _direction_phrase(values: Mapping[str, float]) -> str:
    if format_number(values["wind_speed_m_s"]) == "0.0" or "wind_dir_deg" not in values:
        return "with no prevailing direction"
    return f"from the {COMPASS[int((values['wind_dir_deg'] + 11.25) // 22.5) % 16]}"


def render_facet(facet: str, values: Mapping[str, Any], template: int = 0) -> str | None:
    """One sentence of a caption in a template's phrasing, or None when its quantities are absent.

    Args:
        facet: one of `FACETS` (or `intro`, which needs `region` and `dates` in `values`).
        values: quantity keys -> numbers (formatted here), plus `anomaly_period` for `anom`, `region`/`dates` for
            `intro`.
        template: the phrasing.
    """
    tpl = TEMPLATES[template][facet]
    fields: dict[str, str] = {}
    for _, name, _, _ in string.Formatter().parse(tpl):
        if name is None:
            continue
        if name in FIELD_KEYS:
            key = FIELD_KEYS[name]
            if key not in values:
                return None
            fields[name] = format_number(abs(values[key]) if name == "anom" else values[key])
        elif name == "dirp":
            if "wind_speed_m_s" not in values:
                return None
            fields[name] = _direction_phrase(values)
        elif name == "sign":
            fields[name] = "warmer" if values["t2m_anomaly_c"] >= 0 else "colder"
        elif name == "period":
            fields[name] = str(values["anomaly_period"])
        elif name == "Dates":
            fields[name] = str(values["dates"])[:1].upper() + str(values["dates"])[1:]
        else:
            fields[name] = str(values[name])
    return tpl.format(**fields)


def notable_extremes(values: Mapping[str, float]) -> list[str]:
    """The `Notable:` phrases a caption ends its numbers with (thresholds on the rounded numbers)."""
    rounded = {k: float(format_number(v)) for k, v in values.items() if isinstance(v, int | float)}
    out = []
    if "t2m_max_c" in rounded and rounded["t2m_max_c"] > HEAT_C:
        out.append(EXTREMES["heat"].format(t_max=format_number(values["t2m_max_c"])))
    if "t2m_min_c" in rounded and rounded["t2m_min_c"] < COLD_C:
        out.append(EXTREMES["cold"].format(t_min=format_number(values["t2m_min_c"])))
    if "wind_component_max_m_s" in rounded and rounded["wind_component_max_m_s"] > WIND_MS:
        out.append(EXTREMES["wind"].format(wmax=format_number(values["wind_component_max_m_s"])))
    if "precip_peak_mm_day" in rounded and rounded["precip_peak_mm_day"] > HEAVY_MM_DAY:
        out.append(EXTREMES["rain"].format(peak=format_number(values["precip_peak_mm_day"])))
    return out


def example_caption(norm: Mapping[str, tuple[float, float]], window_seconds: float = 86400.0) -> str:
    """A caption in template 0's phrasing whose numbers are the train means, for one-shot prompts.

    Args:
        norm: {variable: (mean, std)} of the train split in the contract's units (the manifest's normalization); the
            example's temperature range is mean -/+ one std of T2M.
        window_seconds: the sample span, to turn the mean precipitation rate into a total.

    Returns:
        The number sentences for the variables present, or "" if none is.
    """
    stats = {v: {"mean": m, "min": m - s, "max": m + s} for v, (m, s) in norm.items()}
    values = caption_quantities(stats, window_seconds)
    return " ".join(s for f in NUMBER_FACETS if (s := render_facet(f, values)) is not None)


def quantities_from_index(index: pd.DataFrame) -> pd.DataFrame:
    """The quantities of each sample computed from index statistics, exactly as its caption states them (unrounded).

    Returns:
        A frame indexed by sample key with one column per available `QUANTITIES` key (`wind_dir_deg` is NaN where
        the mean wind rounds to 0.0 m/s) and a `split` column when the index has one.

    Raises:
        ContractError: the index has no `key` column.
    """
    if "key" not in index.columns:
        raise ContractError(f"index has no 'key' column (columns: {list(index.columns)[:12]}...)")
    out = pd.DataFrame(index=pd.Index(index["key"].astype(str).to_numpy(), name="key"))
    cols = set(index.columns)

    def col(name: str) -> np.ndarray:
        return np.asarray(index[name], dtype=np.float64)

    if {"T2M_mean", "T2M_min", "T2M_max"} <= cols:
        for stat in ("mean", "min", "max"):
            out[f"t2m_{stat}_c"] = col(f"T2M_{stat}") - 273.15
    if "T2MDEW_mean" in cols:
        out["dewpoint_c"] = col("T2MDEW_mean") - 273.15
    if "QV2M_mean" in cols:
        out["qv_g_kg"] = col("QV2M_mean") * 1000.0
    if {"U10M_mean", "V10M_mean"} <= cols:
        u, v = col("U10M_mean"), col("V10M_mean")
        speed = np.hypot(u, v)
        out["wind_speed_m_s"] = speed
        direction = np.mod(270.0 - np.degrees(np.arctan2(v, u)), 360.0)
        out["wind_dir_deg"] = np.where(np.round(speed, 1) < 0.05, np.nan, direction)
    if "SLP_mean" in cols:
        out["slp_hpa"] = col("SLP_mean") / 100.0
    precip = precip_variable(c.removesuffix("_mean") for c in cols if c.endswith("_mean"))
    if precip is not None and {"time_start", "time_end"} <= cols:
        seconds = (pd.to_datetime(index["time_end"]) - pd.to_datetime(index["time_start"])).dt.total_seconds()
        out["precip_mm"] = col(f"{precip}_mean") * seconds.to_numpy(dtype=np.float64)
    if "split" in cols:
        out["split"] = index["split"].astype(str).to_numpy()
    return out
