"""Grounding: read the numbers back from captions, compare them with the index statistics, and score baselines.

The trainer never imports the dataset builder, so the caption formats are re-implemented here from their documented
description (the builder's `text.py` module docstring): every number is written with one decimal, `-` for negatives,
in one of three phrasings chosen per sample key:

| quantity (key here) | template 0 | template 1 | template 2 |
| --- | --- | --- | --- |
| t2m_mean_c, t2m_min_c, t2m_max_c | `The area-weighted mean 2 m temperature was M °C, ranging from A °C to B °C.` | `2 m temperatures averaged M °C (area-weighted), between A °C and B °C.` | `mean 2 m temperature M °C (area-weighted; minimum A °C, maximum B °C);` |
| dewpoint_c | `The mean dew point was D °C.` | `Dew point averaged D °C.` | `dew point D °C;` |
| qv_g_kg | `Mean specific humidity was Q g/kg.` | `Specific humidity averaged Q g/kg.` | `specific humidity Q g/kg;` |
| wind_speed_m_s | `The mean 10 m wind vector was W m/s from the DIR.` | `Mean wind vector at 10 m: W m/s from the DIR.` | `10 m mean wind vector W m/s from the DIR;` |
| slp_hpa | `Mean sea-level pressure was P hPa.` | `Sea-level pressure averaged P hPa.` | `sea-level pressure P hPa;` |
| precip_mm | `Precipitation totalled R mm on area average.` | `Area-mean precipitation: R mm.` | `area-mean precipitation total R mm;` |

Reported events come after `Reported events:` and are never parsed. `compact_caption` keeps only the sentences that
hold these numbers, verbatim, so a model can be trained on the short form and parsed with the same functions.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd

from .errors import DataError

__all__ = [
    "CAPTION_FORMS",
    "QUANTITIES",
    "baseline_values",
    "canonical_caption",
    "caption_target",
    "compact_caption",
    "example_caption",
    "faithfulness",
    "number_token_mask",
    "parse_caption_numbers",
    "truth_from_index",
]

logger = logging.getLogger(__name__)

QUANTITIES: dict[str, str] = {
    "t2m_mean_c": "mean 2 m temperature (°C)",
    "t2m_min_c": "minimum 2 m temperature (°C)",
    "t2m_max_c": "maximum 2 m temperature (°C)",
    "dewpoint_c": "mean dew point (°C)",
    "qv_g_kg": "mean specific humidity (g/kg)",
    "wind_speed_m_s": "mean-vector 10 m wind speed (m/s)",
    "slp_hpa": "mean sea-level pressure (hPa)",
    "precip_mm": "area-mean precipitation total (mm)",
}
"""The quantities read back from captions and scored, with their display names."""

_N = r"(-?\d+(?:\.\d+)?)"
_DIR = r"(?:from the [a-z\-]+|with no prevailing direction)"
# facet -> (quantity keys in group order, one regex per template)
_FACETS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "temp": (
        ("t2m_mean_c", "t2m_min_c", "t2m_max_c"),
        (
            rf"The area-weighted mean 2 m temperature was {_N} °C, ranging from {_N} °C to {_N} °C\.",
            rf"2 m temperatures averaged {_N} °C \(area-weighted\), between {_N} °C and {_N} °C\.",
            rf"mean 2 m temperature {_N} °C \(area-weighted; minimum {_N} °C, maximum {_N} °C\)[;.]",
        ),
    ),
    "dew": (
        ("dewpoint_c",),
        (rf"The mean dew point was {_N} °C\.", rf"Dew point averaged {_N} °C\.", rf"dew point {_N} °C[;.]"),
    ),
    "q": (
        ("qv_g_kg",),
        (
            rf"Mean specific humidity was {_N} g/kg\.",
            rf"Specific humidity averaged {_N} g/kg\.",
            rf"specific humidity {_N} g/kg[;.]",
        ),
    ),
    "wind": (
        ("wind_speed_m_s",),
        (
            rf"The mean 10 m wind vector was {_N} m/s {_DIR}\.",
            rf"Mean wind vector at 10 m: {_N} m/s {_DIR}\.",
            rf"10 m mean wind vector {_N} m/s {_DIR}[;.]",
        ),
    ),
    "slp": (
        ("slp_hpa",),
        (
            rf"Mean sea-level pressure was {_N} hPa\.",
            rf"Sea-level pressure averaged {_N} hPa\.",
            rf"sea-level pressure {_N} hPa[;.]",
        ),
    ),
    "precip": (
        ("precip_mm",),
        (
            rf"Precipitation totalled {_N} mm on area average\.",
            rf"Area-mean precipitation: {_N} mm\.",
            rf"area-mean precipitation total {_N} mm[;.]",
        ),
    ),
}
_PATTERNS: dict[str, tuple[tuple[str, ...], list[re.Pattern[str]]]] = {
    facet: (keys, [re.compile(p) for p in patterns]) for facet, (keys, patterns) in _FACETS.items()
}
_COMPACT_FACETS = ("temp", "wind", "slp", "precip")
"""The facets `compact_caption` keeps: the numbers the evaluation scores first."""


def _body(text: str) -> str:
    return text.split("Reported events:", 1)[0]


def parse_caption_numbers(text: str) -> dict[str, float]:
    """Read the numbers of a caption (full or compact, any of the three templates) back.

    Args:
        text: a caption, reference or generated; a sentence that does not match a template exactly is skipped.

    Returns:
        The quantities found (keys of `QUANTITIES`); the first match of each wins.

    Examples:
        >>> parse_caption_numbers("Sea-level pressure averaged 1013.2 hPa. Area-mean precipitation: 0.4 mm.")
        {'slp_hpa': 1013.2, 'precip_mm': 0.4}
    """
    body = _body(text)
    out: dict[str, float] = {}
    for keys, patterns in _PATTERNS.values():
        for pattern in patterns:
            match = pattern.search(body)
            if match is None:
                continue
            for key, value in zip(keys, match.groups(), strict=True):
                out.setdefault(key, float(value))
            break
    return out


def compact_caption(text: str, facets: Iterable[str] = _COMPACT_FACETS) -> str:
    """The caption's number sentences only (temperature, wind, pressure, precipitation), verbatim and in order.

    The intro (region, bounding box, dates), the anomaly, dew point, humidity, extremes and reported events are left
    out, which shortens a caption several-fold; every kept sentence still parses with `parse_caption_numbers`. A
    caption with none of the sentences is returned unchanged (stripped).
    """
    body = _body(text)
    found: list[tuple[int, str]] = []
    for facet in facets:
        if facet not in _PATTERNS:
            raise DataError(f"compact caption facet {facet!r} is unknown; use some of {sorted(_PATTERNS)}")
        for pattern in _PATTERNS[facet][1]:
            match = pattern.search(body)
            if match is not None:
                found.append((match.start(), match.group(0)))
                break
    if not found:
        return text.strip()
    sentences = [s for _, s in sorted(found)]
    joined = " ".join(sentences)
    return joined[:-1] + "." if joined.endswith(";") else joined


CAPTION_FORMS: dict[str, tuple[str, ...] | None] = {
    "full": None,
    "numbers": _COMPACT_FACETS,
    "temperature": ("temp",),
}
"""Caption forms a model can be trained on: the facets kept (None: the whole caption)."""


_CANONICAL = {
    "temp": "The area-weighted mean 2 m temperature was {0} °C, ranging from {1} °C to {2} °C.",
    "wind": "The mean 10 m wind vector was {0} m/s {dirp}.",
    "slp": "Mean sea-level pressure was {0} hPa.",
    "precip": "Precipitation totalled {0} mm on area average.",
}
_DIR_PHRASE = re.compile(r"m/s (from the [a-z\-]+|with no prevailing direction)")


def canonical_caption(text: str, facets: Iterable[str] = _COMPACT_FACETS) -> str:
    """The caption's number sentences rewritten in ONE phrasing (template 0's), numbers copied verbatim.

    The builder picks one of three phrasings per sample from a hash of its key, which nothing in the climate can
    predict; a model trained on the raw sentences learns a blend that no template parses. The canonical form keeps
    the same numbers (as written) in a fixed phrasing. A caption without any of the sentences is returned unchanged.
    """
    body = _body(text)
    out: list[str] = []
    for facet in facets:
        if facet not in _CANONICAL:
            raise DataError(f"canonical caption facet {facet!r} is unknown; use some of {sorted(_CANONICAL)}")
        for pattern in _PATTERNS[facet][1]:
            match = pattern.search(body)
            if match is None:
                continue
            dirp = ""
            if facet == "wind":
                found = _DIR_PHRASE.search(match.group(0))
                dirp = found.group(1) if found else "with no prevailing direction"
            out.append(_CANONICAL[facet].format(*match.groups(), dirp=dirp))
            break
    return " ".join(out) if out else text.strip()


def caption_target(text: str, form: str = "full") -> str:
    """The caption in one of `CAPTION_FORMS`: whole, or its number (or temperature) sentences in one phrasing.

    Raises:
        DataError: an unknown form.
    """
    if form not in CAPTION_FORMS:
        raise DataError(f"caption form {form!r} is unknown; use one of {sorted(CAPTION_FORMS)}")
    facets = CAPTION_FORMS[form]
    return text if facets is None else canonical_caption(text, facets)


def truth_from_index(index: pd.DataFrame) -> pd.DataFrame:
    """The scored quantities of each sample computed from the index statistics (units as the captions write them).

    Temperatures K -> °C, wind speed = |(U10M_mean, V10M_mean)|, SLP Pa -> hPa, humidity kg/kg -> g/kg, and
    precipitation = PRECTOTCORR_mean (mm/s) x window seconds. Quantities whose variables are absent are left out.

    Returns:
        A frame indexed by sample key with one column per available quantity and a `split` column.

    Raises:
        DataError: the index has no `key` column.
    """
    if "key" not in index.columns:
        raise DataError(f"index has no 'key' column (columns: {list(index.columns)[:12]}...)")
    out = pd.DataFrame(index=pd.Index(index["key"].astype(str).to_numpy(), name="key"))
    cols = set(index.columns)

    def has(*names: str) -> bool:
        return all(n in cols for n in names)

    values: dict[str, Any] = {}
    if has("T2M_mean", "T2M_min", "T2M_max"):
        values["t2m_mean_c"] = index["T2M_mean"] - 273.15
        values["t2m_min_c"] = index["T2M_min"] - 273.15
        values["t2m_max_c"] = index["T2M_max"] - 273.15
    if has("T2MDEW_mean"):
        values["dewpoint_c"] = index["T2MDEW_mean"] - 273.15
    if has("QV2M_mean"):
        values["qv_g_kg"] = index["QV2M_mean"] * 1000.0
    if has("U10M_mean", "V10M_mean"):
        values["wind_speed_m_s"] = np.hypot(index["U10M_mean"], index["V10M_mean"])
    if has("SLP_mean"):
        values["slp_hpa"] = index["SLP_mean"] / 100.0
    if has("PRECTOTCORR_mean", "time_start", "time_end"):
        seconds = (index["time_end"] - index["time_start"]).dt.total_seconds()
        values["precip_mm"] = index["PRECTOTCORR_mean"] * seconds
    for key, series in values.items():
        out[key] = np.asarray(series, dtype=np.float64)
    if "split" in cols:
        out["split"] = index["split"].astype(str).to_numpy()
    return out


def baseline_values(truth: pd.DataFrame, split: str = "train") -> dict[str, float]:
    """The mean of each quantity over `split` (what a model that ignores the climate would say)."""
    rows = truth[truth["split"] == split] if "split" in truth.columns else truth
    if rows.empty:
        raise DataError(f"the index has no {split!r} samples to compute the mean baseline from")
    return {q: float(rows[q].mean()) for q in QUANTITIES if q in rows.columns}


def _corr(a: np.ndarray, b: np.ndarray) -> float | None:
    if len(a) < 3 or float(np.std(a)) == 0.0 or float(np.std(b)) == 0.0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def faithfulness(
    generated: Mapping[str, str],
    truth: pd.DataFrame,
    baseline: Mapping[str, float],
    min_parsed: float = 0.5,
) -> dict[str, dict[str, Any]]:
    """Numeric faithfulness of generated captions, per quantity, against the index statistics.

    Args:
        generated: sample key -> generated text.
        truth: `truth_from_index` (indexed by key).
        baseline: `baseline_values` (the train-split means).
        min_parsed: the fraction of outputs a quantity must be parsed from to count as grounded.

    Returns:
        {quantity: {"n", "parsed", "parsed_fraction", "mae", "baseline_mae", "baseline_mae_all",
        "best_constant_mae", "corr", "distinct_outputs", "beats_baseline", "beats_best_constant", "grounded"}}:
        `mae` over the parsed outputs, `baseline_mae` of the train mean over the SAME samples, `baseline_mae_all`
        over every sample; `best_constant_mae` is the error of the best single value in hindsight (the median of the
        true values), which no output that ignores the climate can beat, however well it guessed the split's level.
        `beats_baseline`: at least `min_parsed` of the outputs parse and `mae < baseline_mae`; `grounded`: that and
        `mae < best_constant_mae` too.

    Raises:
        DataError: a generated key is not in the index.
    """
    missing = [k for k in generated if k not in truth.index]
    if missing:
        raise DataError(f"generated keys not in the dataset index: {missing[:5]} ({len(missing)} in all)")
    parsed = {k: parse_caption_numbers(t) for k, t in generated.items()}
    out: dict[str, dict[str, Any]] = {}
    n = len(generated)
    for q in QUANTITIES:
        if q not in truth.columns or q not in baseline:
            continue
        keys = [k for k in generated if q in parsed[k]]
        all_true = truth.loc[list(generated), q].to_numpy(dtype=np.float64)
        pred = np.array([parsed[k][q] for k in keys], dtype=np.float64)
        true = truth.loc[keys, q].to_numpy(dtype=np.float64) if keys else np.zeros(0)
        mae = float(np.abs(pred - true).mean()) if keys else None
        base_mae = float(np.abs(baseline[q] - true).mean()) if keys else None
        const_mae = float(np.abs(np.median(true) - true).mean()) if keys else None
        fraction = len(keys) / n if n else 0.0
        beats = bool(mae is not None and base_mae is not None and fraction >= min_parsed and mae < base_mae)
        beats_const = bool(
            mae is not None and const_mae is not None and fraction >= min_parsed and mae < const_mae
        )
        out[q] = {
            "n": n,
            "parsed": len(keys),
            "parsed_fraction": fraction,
            "mae": mae,
            "baseline_mae": base_mae,
            "baseline_mae_all": float(np.abs(baseline[q] - all_true).mean()) if n else None,
            "best_constant_mae": const_mae,
            "corr": _corr(pred, true),
            "distinct_outputs": int(len(np.unique(pred))),
            "beats_baseline": beats,
            "beats_best_constant": beats_const,
            "grounded": beats and beats_const,
        }
    return out


def number_token_mask(tokenizer: Any) -> np.ndarray:
    """A boolean vector over the vocabulary: True for tokens that hold a digit (the caption's number tokens)."""
    size = max(len(tokenizer), int(getattr(tokenizer, "vocab_size", 0) or 0))
    mask = np.zeros(size, dtype=bool)
    for i, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(size)))):
        if token is not None and any(c.isdigit() for c in str(token)):
            mask[i] = True
    if not mask.any():
        logger.warning("the tokenizer has no token with a digit; number-token metrics will be empty")
    return mask


def _f1(x: float) -> str:
    text = f"{x:.1f}"
    return "0.0" if text == "-0.0" else text


def example_caption(norm: Mapping[str, tuple[float, float]], window: str | None = None) -> str:
    """A compact caption (template 0's phrasing) whose numbers are the train means, for one-shot prompts.

    Args:
        norm: {variable: (mean, std)} of the train split in the contract's units (the manifest's normalization);
            the example's range is mean -/+ one std of T2M.
        window: the sample span (e.g. "6h") to turn the mean precipitation rate into a total; None: per day.

    Returns:
        The sentences for the variables present (temperature, wind, pressure, precipitation), or "" if none is.
    """
    parts: list[str] = []
    if "T2M" in norm:
        mean, std = norm["T2M"]
        parts.append(
            f"The area-weighted mean 2 m temperature was {_f1(mean - 273.15)} °C, ranging from "
            f"{_f1(mean - std - 273.15)} °C to {_f1(mean + std - 273.15)} °C."
        )
    if "U10M" in norm and "V10M" in norm:
        u, v = norm["U10M"][0], norm["V10M"][0]
        speed = math.hypot(u, v)
        compass = (
            "north", "north-northeast", "northeast", "east-northeast", "east", "east-southeast", "southeast",
            "south-southeast", "south", "south-southwest", "southwest", "west-southwest", "west", "west-northwest",
            "northwest", "north-northwest",
        )  # fmt: skip
        from_deg = (270.0 - math.degrees(math.atan2(v, u))) % 360.0
        direction = (
            f"from the {compass[int((from_deg + 11.25) // 22.5) % 16]}"
            if _f1(speed) != "0.0"
            else "with no prevailing direction"
        )
        parts.append(f"The mean 10 m wind vector was {_f1(speed)} m/s {direction}.")
    if "SLP" in norm:
        parts.append(f"Mean sea-level pressure was {_f1(norm['SLP'][0] / 100.0)} hPa.")
    if "PRECTOTCORR" in norm:
        seconds = pd.Timedelta(window).total_seconds() if window else 86400.0
        parts.append(f"Precipitation totalled {_f1(norm['PRECTOTCORR'][0] * seconds)} mm on area average.")
    return " ".join(parts)
