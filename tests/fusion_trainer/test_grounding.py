"""Grounding metrics: caption number parsing (the documented formats), compact captions, truth from the index,
the train-mean baseline, faithfulness verdicts, number tokens, and the shuffled-climate grounding gain."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from fusion_trainer.errors import DataError
from fusion_trainer.evaluation.core import _derangement, grounding_gain
from fusion_trainer.grounding import (
    baseline_values,
    caption_target,
    consistency,
    example_caption,
    faithfulness,
    number_token_mask,
    parse_caption_numbers,
    truth_from_index,
)

from tests.tiny_model import TINY_FUSION

# one caption per template, written by hand from the documented formats (text.py's module docstring)
T0 = (
    "Weather over part of the contiguous United States (the area 24.0°N to 31.5°N, 125.0°W to 113.8°W) from "
    "1 January 2019 00:00 to 1 January 2019 06:00 UTC. The area-weighted mean 2 m temperature was 17.5 °C, ranging "
    "from 11.9 °C to 20.3 °C. That is 1.2 °C colder than the 1991-2020 average for the date. The mean dew point was "
    "11.0 °C. Mean specific humidity was 8.2 g/kg. The mean 10 m wind vector was 1.1 m/s from the southeast. Mean "
    "sea-level pressure was 1021.8 hPa. Precipitation totalled 0.0 mm on area average."
)
T1 = (
    "From 1 January 2019 00:00 to 1 January 2019 06:00 UTC, part of the contiguous United States (the area 24.0°N "
    "to 31.5°N, 105.0°W to 95.6°W): 2 m temperatures averaged -10.3 °C (area-weighted), between -14.7 °C and "
    "-4.9 °C. Dew point averaged -18.1 °C. Specific humidity averaged 0.9 g/kg. Mean wind vector at 10 m: 8.1 m/s "
    "from the west-southwest. Sea-level pressure averaged 1014.4 hPa. Area-mean precipitation: 2.5 mm. Reported "
    "events: Hail near X on 1 January 2019: 1.75 inch hail, 60 mph winds."
)
T2 = (
    "Conditions in the Sahel on 2 March 2019: mean 2 m temperature 30.2 °C (area-weighted; minimum 21.0 °C, "
    "maximum 38.4 °C); dew point 5.0 °C; specific humidity 5.6 g/kg; 10 m mean wind vector 0.0 m/s with no "
    "prevailing direction; sea-level pressure 1009.9 hPa; area-mean precipitation total 0.3 mm. Notable: extreme "
    "heat (maximum 2 m temperature 38.4 °C)."
)


def test_parse_every_template() -> None:
    assert parse_caption_numbers(T0) == {
        "t2m_mean_c": 17.5, "t2m_min_c": 11.9, "t2m_max_c": 20.3, "dewpoint_c": 11.0, "qv_g_kg": 8.2,
        "wind_speed_m_s": 1.1, "wind_dir_deg": 135.0, "slp_hpa": 1021.8, "precip_mm": 0.0, "t2m_anomaly_c": -1.2,
    }  # fmt: skip
    p1 = parse_caption_numbers(T1)
    assert (p1["t2m_mean_c"], p1["t2m_min_c"], p1["t2m_max_c"]) == (-10.3, -14.7, -4.9)
    assert (p1["wind_speed_m_s"], p1["slp_hpa"], p1["precip_mm"]) == (8.1, 1014.4, 2.5)
    assert p1["wind_dir_deg"] == 247.5  # west-southwest
    p2 = parse_caption_numbers(T2)
    assert (p2["t2m_mean_c"], p2["wind_speed_m_s"], p2["slp_hpa"], p2["precip_mm"]) == (
        30.2,
        0.0,
        1009.9,
        0.3,
    )
    assert "wind_dir_deg" not in p2  # a calm mean wind has no direction

def test_parse_ignores_events_and_free_text() -> None:
    # numbers in events or in sentences that do not follow a template are never read
    assert parse_caption_numbers("Reported events: The mean dew point was 3.0 °C.") == {}
    assert parse_caption_numbers("It was about 12 degrees and windy.") == {}
    assert parse_caption_numbers("Mean sea-level pressure was 1012.0 hPa.") == {"slp_hpa": 1012.0}


def test_the_numbers_form_keeps_every_quantity_in_one_phrasing() -> None:
    for text in (T0, T1, T2):
        short = caption_target(text, "numbers")
        assert len(short) < len(text)
        assert "Reported events" not in short and "United States" not in short and "Notable" not in short
        full, kept = parse_caption_numbers(text), parse_caption_numbers(short)
        assert {k: v for k, v in full.items() if k != "t2m_anomaly_c"} == kept  # every window quantity, verbatim
        assert short.startswith("The area-weighted mean 2 m temperature was") and short.endswith(".")
    assert caption_target("  no numbers here ", "numbers") == "no numbers here"
    with pytest.raises(DataError, match="caption form 'poem'"):
        caption_target(T0, "poem")


def test_consistency_counts_min_mean_max_order() -> None:
    ok = "The area-weighted mean 2 m temperature was 5.0 °C, ranging from 1.0 °C to 9.0 °C."
    bad = "The area-weighted mean 2 m temperature was 5.0 °C, ranging from 6.0 °C to 9.0 °C."
    assert consistency({"a": ok, "b": bad, "c": "nothing"}) == {"outputs": 2, "consistent_fraction": 0.5}


def test_example_caption_parses_back_to_train_means() -> None:
    norm = {"T2M": (280.15, 5.0), "U10M": (3.0, 1.0), "V10M": (4.0, 1.0), "SLP": (101500.0, 900.0),
            "PRECTOTCORR": (2e-5, 1e-5)}  # fmt: skip
    text = example_caption(norm, "6h")
    got = parse_caption_numbers(text)
    assert got == {"t2m_mean_c": 7.0, "t2m_min_c": 2.0, "t2m_max_c": 12.0, "wind_speed_m_s": 5.0,
                   "wind_dir_deg": 225.0, "slp_hpa": 1015.0, "precip_mm": 0.4}  # fmt: skip
    assert "from the southwest" in text  # u=3 (eastward), v=4 (northward): from 216.9°, nearest SW
    assert example_caption({}) == ""


def _index() -> pd.DataFrame:
    t0 = pd.Timestamp("2019-01-01", tz="UTC")
    rows = []
    for i, split in enumerate(["train", "train", "train", "test", "test"]):
        rows.append({
            "key": f"k{i}", "split": split, "time_start": t0, "time_end": t0 + pd.Timedelta(hours=6),
            "T2M_mean": 273.15 + 10 * i, "T2M_min": 270.0 + 10 * i, "T2M_max": 280.0 + 10 * i,
            "U10M_mean": 3.0, "V10M_mean": -4.0, "SLP_mean": 101000.0 + 100 * i, "PRECTOTCORR_mean": 1e-5 * i,
        })  # fmt: skip
    return pd.DataFrame(rows)


def test_truth_and_baseline_from_index() -> None:
    truth = truth_from_index(_index())
    assert truth.loc["k2", "t2m_mean_c"] == pytest.approx(20.0)
    assert truth.loc["k1", "wind_speed_m_s"] == pytest.approx(5.0)
    assert truth.loc["k3", "slp_hpa"] == pytest.approx(1013.0)
    assert truth.loc["k4", "precip_mm"] == pytest.approx(4e-5 * 6 * 3600)
    assert "dewpoint_c" not in truth.columns  # T2MDEW absent: its quantity is left out
    base = baseline_values(truth, "train")
    assert base["t2m_mean_c"] == pytest.approx(10.0)  # the train keys only (0, 10, 20)
    with pytest.raises(DataError, match="'val'"):
        baseline_values(truth, "val")


def test_faithfulness_rewards_right_numbers_and_not_the_mean() -> None:
    truth = truth_from_index(_index())
    base = baseline_values(truth, "train")
    right = {k: f"The area-weighted mean 2 m temperature was {truth['t2m_mean_c'].to_dict()[k]:.1f} °C, ranging from "
                f"0.0 °C to 1.0 °C." for k in ("k3", "k4")}  # fmt: skip
    good = faithfulness(right, truth, base)["t2m_mean_c"]
    assert good["mae"] == pytest.approx(0.0, abs=0.051) and good["baseline_mae"] == pytest.approx(25.0)
    assert good["beats_baseline"] and good["parsed_fraction"] == 1.0
    mean_only = {k: "The area-weighted mean 2 m temperature was 10.0 °C, ranging from 0.0 °C to 1.0 °C."
                 for k in ("k3", "k4")}  # fmt: skip
    assert faithfulness(mean_only, truth, base)["t2m_mean_c"]["beats_baseline"] is False
    assert good["grounded"] and good["best_constant_mae"] == pytest.approx(5.0)  # median 35 of (30, 40)
    # a constant at the test split's level beats the train mean but never the best constant: not grounded
    level = {k: "The area-weighted mean 2 m temperature was 35.0 °C, ranging from 0.0 °C to 1.0 °C."
             for k in ("k3", "k4")}  # fmt: skip
    shifted = faithfulness(level, truth, base)["t2m_mean_c"]
    assert shifted["beats_baseline"] and not shifted["beats_best_constant"] and not shifted["grounded"]
    assert shifted["distinct_outputs"] == 1
    assert good["median_error"] == pytest.approx(0.0, abs=0.051) and good["gross_fraction"] == 0.0
    # one miscopied number (a dropped digit: 4.0 for 40.0) decides the mean error; the median and the gross share
    # say it is one output
    slip = {k: f"The area-weighted mean 2 m temperature was {truth['t2m_mean_c'].to_dict()[k]:.1f} °C, ranging from "
               f"0.0 °C to 1.0 °C." for k in ("k2", "k3")}  # fmt: skip
    slip["k4"] = "The area-weighted mean 2 m temperature was 4.0 °C, ranging from 0.0 °C to 1.0 °C."
    one = faithfulness(slip, truth, base)["t2m_mean_c"]
    assert one["mae"] == pytest.approx(12.0, abs=0.05) and one["median_error"] == pytest.approx(0.0, abs=0.051)
    assert one["baseline_mae"] == pytest.approx(20.0)  # the train mean 10 against 20, 30, 40
    assert one["gross_fraction"] == pytest.approx(1 / 3)  # |4 - 40| = 36 > 20: that one output only
    # right numbers in too few outputs do not count
    sparse = {"k3": right["k3"], "k4": "nonsense", "k0": "nonsense"}
    m = faithfulness(sparse, truth, base)["t2m_mean_c"]
    assert m["parsed"] == 1 and m["parsed_fraction"] == pytest.approx(1 / 3) and m["beats_baseline"] is False
    assert m["mae"] is not None and m["corr"] is None
    with pytest.raises(DataError, match="not in the dataset index"):
        faithfulness({"nope": "x"}, truth, base)


def test_number_token_mask(tokenizer: Any) -> None:
    mask = number_token_mask(tokenizer)
    ids = tokenizer("temperature 17.5 °C", add_special_tokens=False)["input_ids"]
    flags = [bool(mask[i]) for i in ids]
    digit_tokens = [tokenizer.convert_ids_to_tokens(i) for i, f in zip(ids, flags, strict=True) if f]
    assert any(flags) and not all(flags)
    assert all(any(c.isdigit() for c in t) for t in digit_tokens)


def test_derangement_moves_every_sample_within_its_group() -> None:
    other = _derangement([[0, 1, 2, 3], [4, 5], [6]], seed=3)
    assert all(other[i] != i for i in range(6)) and other[6] == 6
    assert {other[i] for i in range(4)} == {0, 1, 2, 3} and {other[4], other[5]} == {4, 5}


class _Tok:
    """Token 0..9 are the digits; 10 and 11 are words."""

    def __len__(self) -> int:
        return 12

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [str(i) if i < 10 else f"w{i}" for i in ids]


class _Model(torch.nn.Module):
    """Predicts each label token exactly when `reads` (from the climate mean), else uniformly."""

    def __init__(self, reads: bool) -> None:
        super().__init__()
        self.reads, self.tokenizer = reads, _Tok()

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, climate: torch.Tensor, labels: Any = None
    ) -> Any:
        b, n = input_ids.shape
        logits = torch.zeros(b, n, 12)
        if self.reads:
            digit = climate.flatten(1).mean(1).round().long().clamp(0, 9)  # the "number" this climate says
            logits[torch.arange(b), :, digit] = 10.0
        return SimpleNamespace(logits=logits)


def _batches() -> list[dict[str, Any]]:
    out = []
    for start in (0, 4):
        digits = torch.arange(start, start + 4)
        climate = digits.float().view(4, 1, 1, 1, 1).expand(4, 1, 1, 2, 2).contiguous()
        ids = torch.stack([torch.tensor([11, int(d), int(d)]) for d in digits])
        labels = ids.clone()
        labels[:, 0] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
                    "climate_x": climate, "keys": [f"s{int(d)}" for d in digits]})  # fmt: skip
    return out


@pytest.mark.parametrize("reads", [True, False])
def test_grounding_gain_separates_reading_from_ignoring(reads: bool) -> None:
    fn: Callable[..., dict[str, Any]] = grounding_gain
    result = fn(_Model(reads), _batches(), torch.device("cpu"))
    assert result["samples"] == 8 and result["caption"]["tokens"] == 16 and result["numbers"]["tokens"] == 16
    if reads:
        assert result["caption"]["gain"] > 5.0 and result["numbers"]["gain"] > 5.0
        assert result["uses_climate"] is True
    else:
        assert result["caption"]["gain"] == pytest.approx(0.0, abs=1e-9)
        assert result["uses_climate"] is False
    assert np.isfinite(result["caption"]["own"])


def test_a_sample_without_another_window_counts_nowhere() -> None:
    """A sample alone in its group has no other window: scored against its own it would add a difference of exactly
    0 and dilute the gain (65 of the demo's 96 same-place samples did), so it is left out and counted."""
    group = {f"s{i}": "a" if i < 7 else "b" for i in range(8)}
    alone = grounding_gain(_Model(True), _batches(), torch.device("cpu"), group_of=group.__getitem__)
    assert (alone["samples"], alone["unswapped"]) == (7, 1)
    assert alone["caption"]["tokens"] == 14 and alone["caption"]["gain"] > 5.0
    every = grounding_gain(_Model(True), _batches(), torch.device("cpu"))
    assert every["unswapped"] == 0 and every["samples"] == 8
    # given partners: only s2 gets another window (digit 6's); its gain is the whole figure
    six = torch.full((1, 1, 2, 2), 6.0)
    given = grounding_gain(_Model(True), _batches(), torch.device("cpu"),
                           partners=lambda keys: {k: six if k == "s2" else None for k in keys})  # fmt: skip
    assert (given["samples"], given["unswapped"], given["caption"]["tokens"]) == (1, 7, 2)
    assert given["caption"]["own"] < 1e-3 < 5.0 < given["caption"]["shuffled"]
    with pytest.raises(DataError, match="swapped in for s0 has shape"):
        grounding_gain(_Model(True), _batches(), torch.device("cpu"),
                       partners=lambda keys: {k: torch.zeros(1, 1, 3, 3) for k in keys})  # fmt: skip


def test_same_place_partners_come_from_the_whole_split_at_another_time() -> None:
    from fusion_trainer.evaluation.sections import same_place_partners

    rows = [("test", "2026-03-31T00:00", "t00x01"), ("test", "2026-03-31T07:00", "t00x01"),
            ("test", "2026-03-31T14:00", "t00x01"), ("test", "2026-03-31T00:00", "t00x02"),
            ("train", "2026-03-30T00:00", "t00x02"), ("test", "2026-03-31T07:00", "t00x03"),
            ("test", "2026-03-25T07:00", "t00x03")]  # fmt: skip
    index = pd.DataFrame({
        "key": [f"r-{pd.Timestamp(t):%Y%m%dT%H%M}-{tile}" for _, t, tile in rows], "split": [s for s, _, _ in rows],
        "time_start": [pd.Timestamp(t) for _, t, _ in rows], "lat_min": 0.0, "lon_min": 0.0,
    })  # fmt: skip
    keys = ["r-20260331T0000-t00x01", "r-20260331T0000-t00x02", "r-20260331T0700-t00x03"]
    got = same_place_partners(index, "test", keys, seed=0)
    assert got[keys[0]] in {"r-20260331T0700-t00x01", "r-20260331T1400-t00x01"}
    assert got[keys[1]] is None  # its only other time is in train
    assert got[keys[2]] == "r-20260325T0700-t00x03"  # not a scored sample itself: any time of the split
    assert got == same_place_partners(index, "test", keys, seed=0)
    assert {same_place_partners(index, "test", keys[:1], seed=s)[keys[0]] for s in range(20)} == {
        "r-20260331T0700-t00x01", "r-20260331T1400-t00x01"}


@pytest.mark.parametrize("position", ["after_prompt", "start"])
def test_grounding_gain_sees_the_climate_of_a_prefix_model(
    dataset_ref: str, tiny_model_dir: Path, tokenizer: Any, position: str
) -> None:
    # a fresh prefix model's soft tokens depend on the climate, so the caption's loss must change with it; scoring
    # without labels once put an after-prompt prefix behind the caption, where it changed nothing (gain exactly 0)
    from fusion_trainer import FusionConfig, FusionModel
    from fusion_trainer.data.stream import ClimateTextStream, open_shards

    ds = open_shards(dataset_ref)
    torch.manual_seed(0)
    config = FusionConfig(**{**TINY_FUSION, "fusion": "prefix", "prefix_position": position,
                             "variables": ds.manifest.variable_names})  # fmt: skip
    model = FusionModel.from_base(tiny_model_dir, config, dtype=torch.float32).eval()
    stream = ClimateTextStream(
        ds, "val", tokenizer, prompt="Describe:", micro_batch=4, max_length=160, train=False
    )
    result = grounding_gain(model, stream, torch.device("cpu"))
    assert result["caption"]["own"] != pytest.approx(result["caption"]["shuffled"], abs=1e-6)


def test_weighted_loss_is_plain_loss_at_weight_one_and_favours_digits_above() -> None:
    from fusion_trainer.model.fusion_model import caption_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 12)
    labels = torch.tensor([[-100, 3, 10, 4, 11], [-100, -100, 5, 11, -100]])
    plain = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 12), labels[:, 1:].reshape(-1))
    ones = torch.ones(12)
    assert caption_loss(logits, labels, ones).item() == pytest.approx(plain.item(), rel=1e-6)
    assert caption_loss(logits, labels).item() == pytest.approx(plain.item(), rel=1e-6)
    heavy = ones.clone()
    heavy[:10] = 1000.0  # digits dominate: the loss tends to the mean over digit targets (3, 4, 5)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 12), labels[:, 1:].reshape(-1),
                                           ignore_index=-100, reduction="none").view(2, 4)  # fmt: skip
    digits_only = (ce[0, 0] + ce[0, 2] + ce[1, 1]) / 3
    assert caption_loss(logits, labels, heavy).item() == pytest.approx(digits_only.item(), rel=1e-2)


def test_stream_trains_on_the_chosen_caption_form(make_dataset: Callable[..., str], tokenizer: Any) -> None:
    from fusion_trainer.data.stream import ClimateTextStream, open_shards
    from fusion_trainer.errors import ConfigError

    ds = open_shards(make_dataset())
    full = ClimateTextStream(ds, "val", tokenizer, prompt="P:", micro_batch=2, max_length=512, train=False)
    assert full.target_text(T0) == T0
    short = ClimateTextStream(ds, "val", tokenizer, prompt="P:", micro_batch=2, max_length=512, train=False,
                              caption="temperature")  # fmt: skip
    assert short.target_text(T0) == (
        "The area-weighted mean 2 m temperature was 17.5 °C, ranging from 11.9 °C to 20.3 °C."
    )
    with pytest.raises(ConfigError, match="caption 'bogus'"):
        ClimateTextStream(ds, "val", tokenizer, prompt="P:", micro_batch=2, max_length=512, caption="bogus")


def test_caption_target_rewrites_every_template_into_one_phrasing() -> None:
    from fusion_trainer.grounding import caption_target

    t1 = caption_target(T1, "temperature")
    assert t1 == "The area-weighted mean 2 m temperature was -10.3 °C, ranging from -14.7 °C to -4.9 °C."
    for text in (T0, T1, T2):
        numbers = caption_target(text, "numbers")
        assert numbers.startswith("The area-weighted mean 2 m temperature was ")
        assert "Mean sea-level pressure was " in numbers and "Precipitation totalled " in numbers
        full, kept = parse_caption_numbers(text), parse_caption_numbers(numbers)
        assert all(kept[q] == full[q] for q in kept) and set(kept) >= {"dewpoint_c", "qv_g_kg", "wind_speed_m_s"}
    assert "m/s with no prevailing direction." in caption_target(T2, "numbers")
    assert "m/s from the west-southwest." in caption_target(T1, "numbers")
    assert caption_target(T0, "full") == T0
    with pytest.raises(DataError, match="caption form 'x'"):
        caption_target(T0, "x")
