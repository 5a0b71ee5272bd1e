"""The caption format lives once, in the contract: writing and reading agree for every template and quantity."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from climate_text_schema import ContractError
from climate_text_schema import caption_reading as read
from climate_text_schema import captions as cap

STATS = {
    "T2M": {"mean": 283.36, "min": 271.0, "max": 291.2}, "T2MDEW": {"mean": 275.0, "min": 270.0, "max": 280.0},
    "QV2M": {"mean": 0.0052, "min": 0.004, "max": 0.006}, "U10M": {"mean": -3.0, "min": -9.0, "max": 4.0},
    "V10M": {"mean": 4.0, "min": -2.0, "max": 8.0}, "SLP": {"mean": 101234.0, "min": 100000.0, "max": 102000.0},
    "PRECTOT": {"mean": 2.0e-4, "min": 0.0, "max": 1.0e-3},
}  # fmt: skip


def _caption(values: dict[str, float], template: int) -> str:
    return " ".join(s for f in cap.NUMBER_FACETS if (s := cap.render_facet(f, values, template)) is not None)


@pytest.mark.parametrize("template", range(cap.N_TEMPLATES))
def test_every_template_reads_back_what_it_wrote(template: int) -> None:
    values = cap.caption_quantities(STATS, 3600.0)
    got = read.parse_caption_numbers(_caption(values, template))
    for key, spec in cap.QUANTITIES.items():
        if spec.kind == "circular":
            assert got[key] == 135.0  # u -3, v 4: from 143.1°, the south-east point
        else:
            assert got[key] == float(cap.format_number(values[key])), key
    assert values["precip_mm"] == pytest.approx(0.72)  # 2e-4 mm/s over one hour
    assert values["wind_speed_m_s"] == pytest.approx(5.0)


def test_the_caption_api_is_the_packages_top_level() -> None:
    """`climate_text_schema.parse_caption_numbers` (the name docs and issue 14 give) is the one reader."""
    import climate_text_schema as schema

    text = _caption(cap.caption_quantities(STATS, 3600.0), 1)
    assert schema.parse_caption_numbers(text) == read.parse_caption_numbers(text)
    assert schema.parse_caption_numbers(text)["t2m_mean_c"] == 10.2
    assert schema.caption_target is read.caption_target and schema.TEXT_FORMAT == cap.TEXT_FORMAT


def test_precipitation_prefers_the_bias_corrected_variable() -> None:
    both = {**STATS, "PRECTOTCORR": {"mean": 1.0e-4, "min": 0.0, "max": 1.0e-3}}
    assert cap.caption_quantities(both, 3600.0)["precip_mm"] == pytest.approx(0.36)
    assert cap.precip_variable(["T2M", "PRECTOT"]) == "PRECTOT" and cap.precip_variable(["T2M"]) is None


def test_calm_wind_has_no_direction_and_the_canonical_form_keeps_every_quantity() -> None:
    calm = {**STATS, "U10M": {"mean": 0.01, "min": -1, "max": 1}, "V10M": {"mean": 0.02, "min": -1, "max": 1}}
    values = cap.caption_quantities(calm, 3600.0)
    assert "wind_dir_deg" not in values
    text = _caption(values, 2)
    assert "with no prevailing direction" in text
    canonical = read.caption_target(text, "numbers")
    assert canonical.startswith("The area-weighted mean 2 m temperature was 10.2 °C")
    assert read.parse_caption_numbers(canonical) == read.parse_caption_numbers(text)


def test_quantities_from_the_index_equal_the_captions_numbers() -> None:
    t0 = pd.Timestamp("2026-03-25T00:00", tz="UTC")
    row = {"key": "k", "split": "test", "time_start": t0, "time_end": t0 + pd.Timedelta(hours=1)}
    row.update({f"{v}_{s}": x for v, st in STATS.items() for s, x in st.items()})
    truth = cap.quantities_from_index(pd.DataFrame([row]))
    values = cap.caption_quantities(STATS, 3600.0)
    for key in cap.QUANTITIES:
        assert truth.loc["k", key] == pytest.approx(values[key]), key
    assert truth.loc["k", "split"] == "test"
    with pytest.raises(ContractError, match="no 'key' column"):
        cap.quantities_from_index(pd.DataFrame({"x": [1]}))


def test_wind_direction_is_where_it_blows_from() -> None:
    assert cap.wind_from_degrees(0.0, -5.0) == pytest.approx(0.0)  # blowing south: from the north
    assert cap.wind_from_degrees(-5.0, 0.0) == pytest.approx(90.0)  # blowing west: from the east
    assert cap.compass_direction(3.0, 4.0) == "southwest"
    assert math.isclose(cap.wind_from_degrees(1.0, 1.0), 225.0)


def test_unknown_text_formats_are_refused() -> None:
    assert cap.check_text_format("2") == "2" and cap.check_text_format(None) == "1"
    with pytest.raises(ContractError, match="text format '9'.*upgrade climate-text-schema"):
        cap.check_text_format("9", "dataset x")


def test_example_caption_states_the_train_means() -> None:
    norm = {"T2M": (288.15, 5.0), "SLP": (101300.0, 800.0), "PRECTOT": (1e-4, 1e-4)}
    text = cap.example_caption(norm, 3600.0)
    assert read.parse_caption_numbers(text) == {"t2m_mean_c": 15.0, "t2m_min_c": 10.0, "t2m_max_c": 20.0,
                                               "slp_hpa": 1013.0, "precip_mm": 0.4}  # fmt: skip
    calm = cap.quantities_from_index(pd.DataFrame([{"key": "c", "U10M_mean": 0.0, "V10M_mean": 0.0}]))
    assert np.isnan(calm.loc["c", "wind_dir_deg"])
