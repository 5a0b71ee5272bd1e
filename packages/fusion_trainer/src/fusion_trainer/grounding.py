"""Grounding: the numbers of generated captions against the index statistics, and the number tokens of a vocabulary.

The caption format (what a caption states, its phrasings, the parser, the caption forms a model trains on) is the
contract's, `climate_text_schema.captions`: the builder writes with it and this package reads with it, so the format
exists once. The names below are re-exported from there for the trainer's modules.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from climate_text_schema import ContractError
from climate_text_schema import caption_reading as _reading
from climate_text_schema import captions as _captions
from climate_text_schema.caption_reading import parse_caption_numbers
from climate_text_schema.captions import CAPTION_FORMS

from .errors import DataError
from .scores import best_constant, errors, hit_rates, train_constant

__all__ = [
    "CAPTION_FORMS",
    "QUANTITIES",
    "baseline_values",
    "caption_target",
    "consistency",
    "example_caption",
    "faithfulness",
    "number_token_mask",
    "parse_caption_numbers",
    "truth_from_index",
]

logger = logging.getLogger(__name__)

QUANTITIES: dict[str, str] = {k: f"{q.label} ({q.unit})" for k, q in _captions.QUANTITIES.items()}
"""The quantities read back from captions and scored, with their display names."""


def caption_target(text: str, form: str = "full") -> str:
    """The caption in one of `CAPTION_FORMS` (`climate_text_schema.caption_reading.caption_target`).

    Raises:
        DataError: an unknown form.
    """
    try:
        return _reading.caption_target(text, form)
    except ContractError as exc:
        raise DataError(str(exc)) from exc


def truth_from_index(index: pd.DataFrame) -> pd.DataFrame:
    """The scored quantities of each sample from the index statistics (`captions.quantities_from_index`).

    Raises:
        DataError: the index has no `key` column.
    """
    try:
        return _captions.quantities_from_index(index)
    except ContractError as exc:
        raise DataError(str(exc)) from exc


def example_caption(norm: Mapping[str, tuple[float, float]], window: str | None = None) -> str:
    """A caption whose numbers are the train means, for one-shot prompts (`captions.example_caption`).

    Args:
        norm: {variable: (mean, std)} of the train split (the manifest's normalization).
        window: the sample span (e.g. "6h"), to turn the mean precipitation rate into a total; None: a day.
    """
    seconds = pd.Timedelta(window).total_seconds() if window else 86400.0
    return _captions.example_caption(norm, seconds)


def baseline_values(truth: pd.DataFrame, split: str = "train") -> dict[str, float]:
    """What a model that ignores the climate would say for each quantity, from `split` (`scores.train_constant`:
    the mean; the circular mean of directions; the log-space mean of precipitation)."""
    rows = truth[truth["split"] == split] if "split" in truth.columns else truth
    if rows.empty:
        raise DataError(f"the index has no {split!r} samples to compute the mean baseline from")
    return {
        q: train_constant(rows[q].to_numpy(dtype=np.float64), _captions.QUANTITIES[q].kind)
        for q in QUANTITIES
        if q in rows.columns
    }


def _corr(a: np.ndarray, b: np.ndarray) -> float | None:
    if len(a) < 3 or float(np.std(a)) == 0.0 or float(np.std(b)) == 0.0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def consistency(generated: Mapping[str, str]) -> dict[str, Any]:
    """Of the outputs that state all three temperatures: how many, and the fraction with min <= mean <= max."""
    parsed = {k: parse_caption_numbers(t) for k, t in generated.items()}
    triples = [p for p in parsed.values() if {"t2m_min_c", "t2m_mean_c", "t2m_max_c"} <= set(p)]
    ok = sum(p["t2m_min_c"] <= p["t2m_mean_c"] <= p["t2m_max_c"] for p in triples)
    return {"outputs": len(triples), "consistent_fraction": ok / len(triples) if triples else None}


def faithfulness(
    generated: Mapping[str, str],
    truth: pd.DataFrame,
    baseline: Mapping[str, float],
    min_parsed: float = 0.5,
) -> dict[str, dict[str, Any]]:
    """Numeric faithfulness of generated captions, per quantity, against the index statistics.

    Errors follow each quantity's kind (`scores.errors`: absolute; the angle for wind direction; log1p space for
    precipitation, which also gets hit rates at 0.1 and 1 mm). A sample whose true value is undefined (the direction
    of a calm mean wind) is not scored for that quantity.

    Args:
        generated: sample key -> generated text.
        truth: `truth_from_index` (indexed by key).
        baseline: `baseline_values` (from the train split).
        min_parsed: the fraction of outputs a quantity must be parsed from to count as grounded.

    Returns:
        {quantity: {"kind", "n", "parsed", "parsed_fraction", "mae", "baseline_mae", "baseline_mae_all",
        "best_constant_mae", "corr", "distinct_outputs", "beats_baseline", "beats_best_constant", "grounded",
        "median_error", "gross_fraction" (, "hit_rates", "baseline_hit_rates")}}: `mae` (the mean error of the kind)
        over the parsed outputs, `median_error` their median error, `gross_fraction` the share of them whose error is
        larger than `baseline_mae` (worse than saying the train mean would be on average: a miscopied number, where
        the mean error is decided by a few such outputs), `baseline_mae` of the train constant over the SAME samples,
        `baseline_mae_all` over every scored sample; `best_constant_mae` is the error of the best single value in
        hindsight, which no output that ignores the climate can beat. `beats_baseline`: at least `min_parsed` of the
        outputs parse and `mae < baseline_mae`; `grounded`: that and `mae < best_constant_mae` too. `_consistency`:
        the fraction of outputs with min <= mean <= max temperature.

    Raises:
        DataError: a generated key is not in the index.
    """
    missing = [k for k in generated if k not in truth.index]
    if missing:
        raise DataError(f"generated keys not in the dataset index: {missing[:5]} ({len(missing)} in all)")
    parsed = {k: parse_caption_numbers(t) for k, t in generated.items()}
    out: dict[str, dict[str, Any]] = {}
    for q, spec in _captions.QUANTITIES.items():
        if q not in truth.columns or q not in baseline:
            continue
        finite = np.isfinite(truth[q].to_numpy(dtype=np.float64))
        valid = set(truth.index[finite])
        scored = [k for k in generated if k in valid]
        n = len(scored)
        keys = [k for k in scored if q in parsed[k]]
        all_true = truth.loc[scored, q].to_numpy(dtype=np.float64)
        pred = np.array([parsed[k][q] for k in keys], dtype=np.float64)
        true = truth.loc[keys, q].to_numpy(dtype=np.float64) if keys else np.zeros(0)
        kind = spec.kind
        errs = errors(pred, true, kind)
        mae = float(errs.mean()) if keys else None
        base = np.full_like(true, baseline[q])
        base_mae = float(errors(base, true, kind).mean()) if keys else None
        const_mae = float(errors(np.full_like(true, best_constant(true, kind)), true, kind).mean()) if keys else None
        fraction = len(keys) / n if n else 0.0
        beats = bool(mae is not None and base_mae is not None and fraction >= min_parsed and mae < base_mae)
        beats_const = bool(
            mae is not None and const_mae is not None and fraction >= min_parsed and mae < const_mae
        )
        row: dict[str, Any] = {
            "kind": kind,
            "n": n,
            "parsed": len(keys),
            "parsed_fraction": fraction,
            "mae": mae,
            "baseline_mae": base_mae,
            "baseline_mae_all": float(errors(np.full_like(all_true, baseline[q]), all_true, kind).mean()) if n else None,
            "best_constant_mae": const_mae,
            "corr": _corr(pred, true) if kind == "linear" else None,
            "distinct_outputs": int(len(np.unique(pred))),
            "beats_baseline": beats,
            "beats_best_constant": beats_const,
            "grounded": beats and beats_const,
            "median_error": float(np.median(errs)) if keys else None,
            "gross_fraction": float((errs > base_mae).mean()) if keys and base_mae is not None else None,
        }
        if kind == "precip":
            row["hit_rates"] = hit_rates(pred, true)
            row["baseline_hit_rates"] = hit_rates(base, true)
        out[q] = row
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
