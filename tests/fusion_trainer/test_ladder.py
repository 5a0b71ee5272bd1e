"""The baseline ladder (fusion_trainer.evaluation.baselines) on a hand-made index, and the interventions' arithmetic."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from climate_text_schema.captions import caption_quantities, render_facet
from fusion_trainer.errors import ConfigError, ModelError
from fusion_trainer.evaluation.baselines import fit_ridge, ladder, location_of, predict_ridge
from fusion_trainer.evaluation.interventions import (
    apply_intervention,
    intervention_report,
    parse_intervention,
    permute_grid,
)
from fusion_trainer.scores import best_constant, cluster_bootstrap, errors, hit_rates, train_constant

T0 = pd.Timestamp("2026-03-25T00:00", tz="UTC")


def _index() -> pd.DataFrame:
    """Two tiles (lon 0 and lon 90) x 6 hourly slots 6 h apart; train the first 4 slots, test the last 2, and a
    third tile seen only in test (in tile row 0, like tile t00x00)."""
    rows = []
    for step in range(6):
        start = T0 + pd.Timedelta(hours=6 * step)
        for tile, lon, base in (("t00x00", 0.0, 280.0), ("t00x01", 90.0, 300.0), ("t00x02", 180.0, 290.0)):
            if tile == "t00x02" and step < 4:
                continue
            t = base + step  # warms by 1 K a slot
            rows.append({
                "key": f"r-{start:%Y%m%dT%H%M}-{tile}", "split": "train" if step < 4 else "test",
                "time_start": start, "time_end": start + pd.Timedelta(hours=1), "lat_min": 0.0, "lat_max": 10.0,
                "lon_min": lon, "lon_max": lon + 10.0, "T2M_mean": t, "T2M_min": t - 2, "T2M_max": t + 2,
                "SLP_mean": 101000.0 + 100 * step, "U10M_mean": 3.0, "V10M_mean": 4.0, "PRECTOT_mean": 1e-4 * step,
            })  # fmt: skip
    return pd.DataFrame(rows)


def test_each_rung_on_a_hand_made_index() -> None:
    index = _index()
    test = index[index["split"] == "test"]["key"].tolist()
    true = index.set_index("key").loc[test, "T2M_mean"].to_numpy() - 273.15
    out = ladder(index, test, {"fused": {"t2m_mean_c": true.copy()}})
    t2m = out["quantities"]["t2m_mean_c"]
    # train mean of the 8 train values (280..283 and 300..303 K): 291.5 K
    assert t2m["train_mean"]["mae"] == pytest.approx(np.abs(true - (291.5 - 273.15)).mean())
    # location: tile means 281.5 / 301.5 K; the unseen tile t00x02 falls back to its row (both tiles): 291.5
    assert t2m["location"]["mae"] == pytest.approx(3.0)
    # persistence: the same tile's previous slot, 1 K colder (t00x02 has no earlier slot at its first test time)
    assert t2m["persistence"]["mae"] == pytest.approx(1.0) and t2m["persistence"]["n"] == 5
    assert t2m["fused"]["mae"] == pytest.approx(0.0, abs=1e-9)
    assert t2m["best_constant"]["mae"] > 0 and out["windows"] == 2 and out["samples"] == 6
    lo, hi = t2m["location"]["ci95"]
    assert lo <= t2m["location"]["mae"] <= hi
    assert out["quantities"]["wind_dir_deg"]["kind"] == "circular"
    assert out["quantities"]["wind_dir_deg"]["train_mean"]["mae"] == pytest.approx(0.0, abs=1e-6)
    assert location_of(index).loc[test[0]] == "t00x00"


def test_every_rung_is_scored_on_the_samples_the_model_stated() -> None:
    """A caption that does not state a quantity leaves that sample out of every rung of it, not only the model's:
    the goal compares the model and the climatology on the same samples (the unseen tile's hard case here)."""
    index = _index()
    test = index[index["split"] == "test"]["key"].tolist()
    true = index.set_index("key").loc[test, "T2M_mean"].to_numpy() - 273.15
    stated = true.copy()
    stated[[k.endswith("t00x02") for k in test]] = np.nan  # the model says nothing for the unseen tile
    out = ladder(index, test, {"fused": {"t2m_mean_c": stated}, "ridge": {"t2m_mean_c": true + 1.0}})
    t2m = out["quantities"]["t2m_mean_c"]
    assert t2m["fused"]["n"] == t2m["location"]["n"] == t2m["train_mean"]["n"] == t2m["ridge"]["n"] == 4
    kept = np.isfinite(stated)
    assert t2m["train_mean"]["mae"] == pytest.approx(np.abs(true[kept] - (291.5 - 273.15)).mean())
    assert t2m["persistence"]["n"] == 4 and t2m["ridge"]["mae"] == pytest.approx(1.0)
    assert out["quantities"]["t2m_min_c"]["location"]["n"] == 6  # a quantity without a fused rung: every sample


def test_location_hour_uses_local_solar_time() -> None:
    index = _index()
    test = index[index["split"] == "test"]["key"].tolist()
    row = ladder(index, test, {})["quantities"]["t2m_mean_c"]
    # local hour = UTC + lon / 15 (tile centres): each trained tile has one train slot per 6-hour bin, and a test slot
    # a day later falls into the bin of the slot 4 steps (4 K) colder; the unseen tile falls back to its row (2.5, 3.5)
    assert row["location_hour"]["mae"] == pytest.approx((4 * 4.0 + 2.5 + 3.5) / 6)


def test_ridge_reads_a_linear_readout_exactly() -> None:
    from climate_text_schema.captions import quantities_from_index

    rng = np.random.default_rng(0)
    n = 300
    index = pd.DataFrame({
        "key": [f"k{i}" for i in range(n)], "split": ["train"] * 200 + ["val"] * 50 + ["test"] * 50,
        "time_start": T0, "time_end": T0 + pd.Timedelta(hours=1), "T2M_mean": 280 + 10 * rng.normal(size=n),
        "T2M_min": 270.0, "T2M_max": 300.0, "SLP_mean": 101000 + 500 * rng.normal(size=n),
        "U10M_mean": rng.normal(size=n), "V10M_mean": rng.normal(size=n), "PRECTOT_mean": 1e-4 * rng.random(n),
    })  # fmt: skip
    truth = quantities_from_index(index)
    x = rng.normal(size=(n, 8))
    x[:, 0], x[:, 1] = index["T2M_mean"] / 10.0, index["SLP_mean"] / 100.0  # the window holds the answers linearly
    x[:, 2], x[:, 3] = index["U10M_mean"], index["V10M_mean"]
    keys = index["key"].tolist()
    fit = fit_ridge(x[:200], truth, keys[:200], x[200:250], keys[200:250])
    pred = predict_ridge(fit, x[250:])
    assert np.abs(pred["t2m_mean_c"] - truth.loc[keys[250:], "t2m_mean_c"].to_numpy()).max() < 0.3  # of a 10 K spread
    assert np.abs(pred["slp_hpa"] - truth.loc[keys[250:], "slp_hpa"].to_numpy()).max() < 0.5  # of a 5 hPa spread
    assert np.median(errors(pred["wind_dir_deg"], truth.loc[keys[250:], "wind_dir_deg"].to_numpy(), "circular")) < 5
    assert fit["alpha"] <= 0.1  # chosen on val: the least shrinkage fits a linear readout best


def test_scores_by_kind() -> None:
    assert errors(np.array([350.0]), np.array([10.0]), "circular")[0] == pytest.approx(20.0)
    assert errors(np.array([np.e - 1]), np.array([0.0]), "precip")[0] == pytest.approx(1.0)
    assert errors(np.array([train_constant(np.array([350.0, 10.0]), "circular")]), np.array([0.0]), "circular")[0] < 1e-9
    assert best_constant(np.array([1.0, 2.0, 9.0]), "linear") == 2.0
    assert hit_rates(np.array([0.0, 0.5, 2.0]), np.array([0.0, 0.04, 3.0])) == {"0.1mm": pytest.approx(2 / 3), "1mm": 1.0}
    # the truth as the caption writes it: 0.07 mm is "0.1 mm", 0.96 is "1.0": their exact copies hit both thresholds
    assert hit_rates(np.array([0.1, 1.0, 0.0]), np.array([0.07, 0.96, 0.04])) == {"0.1mm": 1.0, "1mm": 1.0}
    lo, hi = cluster_bootstrap(np.array([1.0, 1.0, 3.0, 3.0]), ["a", "a", "b", "b"])
    assert 1.0 <= lo <= 2.0 <= hi <= 3.0


# ---- interventions ---------------------------------------------------------------------------------------------------
VARIABLES = ["T2M", "U10M", "V10M", "SLP"]


def _windows(n: int = 4) -> np.ndarray:
    rng = np.random.default_rng(1)
    x = np.zeros((n, 1, 4, 3, 5), dtype=np.float32)
    x[:, :, 0] = 280 + rng.normal(size=(n, 1, 3, 5))
    x[:, :, 1] = 2 + rng.normal(size=(n, 1, 3, 5))
    x[:, :, 2] = 1 + rng.normal(size=(n, 1, 3, 5))
    x[:, :, 3] = 101000 + 100 * rng.normal(size=(n, 1, 3, 5))
    return x


def _reader(windows: np.ndarray) -> list[str]:
    """A perfect reader: the caption sentences of each window's own (plain) statistics."""
    out = []
    for w in windows:
        stats = {v: {"mean": float(w[:, i].mean()), "min": float(w[:, i].min()), "max": float(w[:, i].max())}
                 for i, v in enumerate(VARIABLES)}  # fmt: skip
        values = caption_quantities(stats, 3600.0)
        out.append(" ".join(s for f in ("temp", "wind", "slp") if (s := render_facet(f, values)) is not None))
    return out


def test_shifts_and_the_permutation_do_what_they_say() -> None:
    x = _windows()
    warm = apply_intervention(x, VARIABLES, parse_intervention("T2M=+3", VARIABLES))
    assert np.allclose(warm[:, :, 0] - x[:, :, 0], 3.0) and np.array_equal(warm[:, :, 1:], x[:, :, 1:])
    windy = apply_intervention(x, VARIABLES, parse_intervention("WIND=+2", VARIABLES))
    speed = np.hypot(x[:, :, 1].mean(axis=(1, 2, 3)), x[:, :, 2].mean(axis=(1, 2, 3)))
    new = np.hypot(windy[:, :, 1].mean(axis=(1, 2, 3)), windy[:, :, 2].mean(axis=(1, 2, 3)))
    assert np.allclose(new - speed, 2.0, atol=1e-4)
    moved = permute_grid(x, seed=0)
    assert not np.array_equal(moved, x)
    for stat in (np.min, np.max, np.mean):
        assert np.allclose(stat(moved, axis=(3, 4)), stat(x, axis=(3, 4)), rtol=1e-6)
    # rows stay rows: every row keeps its values, so the captions' cos(latitude)-weighted mean is exactly unchanged
    assert np.array_equal(np.sort(moved, axis=-1), np.sort(x, axis=-1))


def test_a_wind_shift_moves_the_captions_weighted_mean_vector_by_its_delta() -> None:
    """At 49-59 N with the wind growing northwards, the area-weighted mean vector (the caption's) and the plain one
    differ: given the rows' latitudes the shift moves the weighted one by exactly the delta (before: 0.93 of it)."""
    from fusion_trainer.evaluation.interventions import row_weights

    x = _windows(2)
    x[:, :, 1] = np.linspace(2.0, 12.0, 3)[None, None, :, None]  # U10M by row, south to north
    x[:, :, 2] = 0.5
    lats = np.tile(np.array([49.0, 54.0, 59.0]), (2, 1))
    weights = row_weights(lats, x.shape)

    def weighted_speed(w: np.ndarray) -> np.ndarray:
        u = np.einsum("bthw,bh->b", w[:, :, 1].astype(np.float64), weights) / (w.shape[1] * w.shape[-1])
        v = np.einsum("bthw,bh->b", w[:, :, 2].astype(np.float64), weights) / (w.shape[1] * w.shape[-1])
        return np.hypot(u, v)

    shift = parse_intervention("WIND=+2", VARIABLES)
    assert np.allclose(weighted_speed(apply_intervention(x, VARIABLES, shift, lats)) - weighted_speed(x), 2.0, atol=1e-4)
    plain = weighted_speed(apply_intervention(x, VARIABLES, shift)) - weighted_speed(x)
    assert np.all(np.abs(plain - 2.0) > 0.05)  # the plain mean vector's shift misses the caption's by over 2.5 %
    permuted = permute_grid(x, seed=1)  # T2M varies within rows: its weighted mean is kept, not by chance
    before = np.einsum("bthw,bh->b", x[:, :, 0].astype(np.float64), weights)
    assert not np.array_equal(permuted[:, :, 0], x[:, :, 0])
    assert np.allclose(np.einsum("bthw,bh->b", permuted[:, :, 0].astype(np.float64), weights), before, rtol=1e-12)
    for bad, match in (("T2M", "VARIABLE=\\+DELTA"), ("TQV=+1", "not one of"), ("U10M=+1", "no caption number")):
        with pytest.raises(ConfigError, match=match):
            parse_intervention(bad, VARIABLES)


def test_a_reader_has_slope_one_and_a_lookup_slope_zero() -> None:
    x = _windows()
    shifts = [parse_intervention(t, VARIABLES) for t in ("T2M=-3", "T2M=+3", "SLP=+500", "WIND=+2")]
    clusters = ["a", "a", "b", "b"]
    reads = intervention_report(_reader, x, VARIABLES, clusters, shifts)
    assert reads["slopes"]["T2M"]["median"] == pytest.approx(1.0, abs=0.05)
    assert reads["slopes"]["SLP"]["median"] == pytest.approx(1.0, abs=0.05)  # hPa per hPa
    assert reads["slopes"]["WIND"]["median"] == pytest.approx(1.0, abs=0.06)
    assert reads["permute"]["t2m_mean_c"]["mean_change"] == pytest.approx(0.0, abs=0.06)
    frozen = _reader(x)  # a lookup: each window's caption whatever its values (the variants follow each other)
    lookup = intervention_report(lambda w: [frozen[i % len(x)] for i in range(len(w))], x, VARIABLES, clusters, shifts)
    assert lookup["slopes"]["T2M"]["median"] == pytest.approx(0.0) and lookup["samples"] == 4


def test_the_variants_are_described_in_whole_calls_of_at_most_max_windows() -> None:
    x = _windows()
    shifts = [parse_intervention(t, VARIABLES) for t in ("T2M=-3", "T2M=+3", "SLP=+500", "WIND=+2")]
    calls: list[int] = []

    def counted(windows: np.ndarray) -> list[str]:
        calls.append(len(windows))
        return _reader(windows)

    together = intervention_report(counted, x, VARIABLES, ["a", "a", "b", "b"], shifts)
    assert calls == [24]  # the windows as they are, four shifts and the permutation: 6 x 4 windows, one call
    calls.clear()
    apart = intervention_report(counted, x, VARIABLES, ["a", "a", "b", "b"], shifts, max_windows=9)
    assert calls == [8, 8, 8]  # two variants a call
    assert apart == together
    with pytest.raises(ModelError, match="3 texts for 24 windows"):
        intervention_report(lambda w: _reader(w)[:3], x, VARIABLES, ["a", "a", "b", "b"], shifts)
