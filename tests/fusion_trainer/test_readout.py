"""The readout (fusion_trainer.model.readout): the stats head's reading of the window as a text line the LM copies from."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from climate_text_schema.caption_reading import parse_caption_numbers
from climate_text_schema.captions import caption_quantities
from fusion_trainer import ConfigError, FusionConfig, FusionModel
from fusion_trainer.config import TrainConfig
from fusion_trainer.model.readout import insert_tokens, readout_values, render_readout
from fusion_trainer.model.tiny import make_tiny_model

VARIABLES = ["T2M", "U10M", "V10M", "SLP", "PRECTOT"]
NORM = {"T2M": {"mean": 285.0, "std": 10.0}, "U10M": {"mean": 0.0, "std": 5.0}, "V10M": {"mean": 0.0, "std": 5.0},
        "SLP": {"mean": 101300.0, "std": 900.0}, "PRECTOT": {"mean": 3e-5, "std": 1e-4}}  # fmt: skip


def test_the_line_states_the_captions_quantities_in_its_units() -> None:
    stats = {"T2M": {"mean": 280.15, "min": 275.25, "max": 285.55}, "U10M": {"mean": -3.0, "min": -5, "max": 1},
             "V10M": {"mean": 4.0, "min": 0, "max": 6}, "SLP": {"mean": 101850.0, "min": 0, "max": 0},
             "PRECTOT": {"mean": 5e-5, "min": 0, "max": 1e-4}}  # fmt: skip
    line = render_readout(caption_quantities(stats, 3600.0))
    assert line == ("Readout: temperature 7.0 °C, ranging from 2.1 °C to 12.4 °C; wind 5.0 m/s from the southeast; pressure "
                    "1018.5 hPa; precipitation 0.2 mm.\n")  # fmt: skip
    assert render_readout({}) == "Readout: none.\n"
    calm = render_readout({"wind_speed_m_s": 0.02, "wind_dir_deg": 90.0})
    assert "wind 0.0 m/s with no prevailing direction" in calm


def test_values_are_denormalised_predictions() -> None:
    pred = torch.zeros(1, 5, 3)
    pred[0, 0] = torch.tensor([0.5, -1.0, 2.0])  # T2M: 290, 275, 305 K
    values = readout_values(pred, VARIABLES, NORM, 3600.0)[0]
    assert values["t2m_mean_c"] == pytest.approx(16.85) and values["t2m_max_c"] == pytest.approx(31.85)
    assert values["precip_mm"] == pytest.approx(3e-5 * 3600)


def test_insert_tokens_keeps_every_original_token_and_maps_it() -> None:
    ids = torch.tensor([[1, 2, 3, 4, 0], [1, 2, 5, 0, 0]])
    mask = (ids != 0).long()
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, -100, 5, -100, -100]])
    new, new_mask, new_labels, pos = insert_tokens(ids, mask, labels, torch.tensor([2, 2]), [[9], [8, 7]], pad_id=0)
    assert new[0, :5].tolist() == [1, 2, 9, 3, 4] and new[1, :5].tolist() == [1, 2, 8, 7, 5]
    assert new_mask.sum(dim=1).tolist() == [5, 5]
    assert new_labels is not None and new_labels[0, :5].tolist() == [-100, -100, -100, 3, 4]
    assert (new.gather(1, pos)[mask.bool()] == ids[mask.bool()]).all()  # every real token where the map says


def _model(tmp_path: Path) -> FusionModel:
    folder = make_tiny_model("llama", tmp_path / "tiny")
    cfg = FusionConfig(fusion="prefix", readout=True, n_prefix_tokens=2, d_encoder=32, encoder_heads=4,
                       encoder_depth=1, variables=VARIABLES, normalization=NORM, window="1h")  # fmt: skip
    return FusionModel.from_base(folder, cfg, dtype=torch.float32)


def test_the_readout_reads_the_window_and_follows_a_shift(tmp_path: Path) -> None:
    model = _model(tmp_path)
    assert model.config.stats_head and model.encoder.stats_head is not None and model.encoder.stats_head.direct
    g = torch.Generator().manual_seed(0)
    climate = torch.randn(2, 1, 5, 11, 15, generator=g)
    head = model.encoder.stats_head
    tokens = model.encoder.encode(climate)
    line = model.readout_texts(head(tokens.tokens, climate))[0]
    warm = climate.clone()
    warm[:, :, 0] += 0.3  # +3 K in normalised T2M units (std 10)
    shifted = model.readout_texts(head(model.encoder.encode(warm).tokens, warm))[0]
    t0 = float(line.split("temperature ")[1].split(" °C")[0])
    t1 = float(shifted.split("temperature ")[1].split(" °C")[0])
    assert t1 - t0 == pytest.approx(3.0, abs=0.11)  # the head starts as the window's own mean: slope 1
    texts = model.generate(climate, "Describe:\n", max_new_tokens=4, seed=0)
    assert len(texts) == 2


def test_the_readout_needs_the_prefix_variant() -> None:
    with pytest.raises(ConfigError, match="readout: true needs fusion: prefix"):
        FusionConfig(fusion="xattn", readout=True, n_variables=2)


def test_parse_of_a_copied_readout_is_the_caption() -> None:
    """The sentence the LM is trained to write from the line states the same numbers."""
    values = {"t2m_mean_c": 7.04, "t2m_min_c": 2.1, "t2m_max_c": 12.4, "slp_hpa": 1018.5}
    caption = "The area-weighted mean 2 m temperature was 7.0 °C, ranging from 2.1 °C to 12.4 °C."
    assert parse_caption_numbers(caption)["t2m_mean_c"] == float(render_readout(values).split("temperature ")[1][:3])


@pytest.mark.parametrize("logits", ["all", "none"])
def test_readout_stats_write_the_line_and_the_head_still_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logits: str
) -> None:
    """`forward(readout_stats=S)` (training with `readout_truth`) writes the line from S: the same loss as a head that
    predicted S, while `.climate_stats` stays the head's own prediction, which the stats loss trains."""
    model = _model(tmp_path)
    tok = model.tokenizer
    assert tok is not None
    g = torch.Generator().manual_seed(1)
    climate = torch.randn(2, 1, 5, 11, 15, generator=g)
    enc = tok(["Describe: it was 7.0 °C.", "Describe: 12.4 °C"], return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    labels[:, :3] = -100
    truth = torch.randn(2, 5, 3, generator=g)
    args = (enc["input_ids"], enc["attention_mask"], climate)
    with torch.no_grad():
        own = model(*args, labels=labels, logits=logits)
        forced = model(*args, labels=labels, logits=logits, readout_stats=truth)
        head = model.encoder.stats_head
        assert head is not None
        monkeypatch.setattr(head, "forward", lambda *a, **k: truth)
        as_if = model(*args, labels=labels, logits=logits)
    assert model.readout_texts(truth) != model.readout_texts(own.climate_stats)  # the two lines differ
    assert forced.loss is not None and as_if.loss is not None and own.loss is not None
    assert float(forced.loss) == pytest.approx(float(as_if.loss), rel=1e-6)
    assert abs(float(forced.loss) - float(own.loss)) > 1e-5  # a random tiny LM: the line moves the loss a little
    assert torch.equal(forced.climate_stats, own.climate_stats)


def test_readout_truth_needs_the_readout_and_the_stats_loss(tmp_path: Path) -> None:
    base = {"shards": "x", "model": "m", "out": str(tmp_path), "readout_truth": True}
    with pytest.raises(ConfigError, match="readout_truth: true needs fusion.readout: true"):
        TrainConfig.load({**base, "stats_loss_weight": 1.0})
    with pytest.raises(ConfigError, match="stats_loss_weight > 0"):
        TrainConfig.load({**base, "fusion": {"fusion": "prefix", "readout": True}})
    assert TrainConfig.load({**base, "fusion": {"fusion": "prefix", "readout": True}, "stats_loss_weight": 1.0})


@pytest.mark.parametrize("truth", [False, True])
def test_a_training_step_passes_the_true_statistics_with_readout_truth(tmp_path: Path, truth: bool) -> None:
    """`micro_step` hands the batch's stats to the model as `readout_stats` only with `readout_truth: true`, and the
    stats loss still compares the head's own prediction with them."""
    from fusion_trainer.training.steps import micro_step

    seen: dict[str, object] = {}
    head_says = torch.zeros(2, 5, 3)

    class Engine:
        device = torch.device("cpu")

        def __call__(self, **kwargs: object) -> object:
            seen.update(kwargs)
            return type("Out", (), {"loss": torch.tensor(1.0), "climate_stats": head_says})()

        def backward(self, loss: torch.Tensor) -> None:
            seen["loss"] = float(loss)

        def step(self) -> None:
            pass

    stats = torch.ones(2, 5, 3)
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3, dtype=torch.long),
             "labels": torch.ones(2, 3, dtype=torch.long), "climate_x": torch.zeros(2, 1, 5, 4, 4), "stats": stats,
             "keys": ["a", "b"]}  # fmt: skip
    config = TrainConfig.load({"shards": "x", "model": "m", "out": str(tmp_path), "stats_loss_weight": 1.0,
                               "fusion": {"fusion": "prefix", "readout": True}, "readout_truth": truth})  # fmt: skip
    micro_step(Engine(), batch, config, None, 0, 0, None)  # type: ignore[arg-type]
    assert (seen["readout_stats"] is not None) == truth
    if truth:
        assert torch.equal(seen["readout_stats"], stats)  # type: ignore[arg-type]
    assert seen["loss"] == pytest.approx(1.0 + 0.5)  # the head's zeros against the stats' ones: Huber 0.5


def test_a_bf16_model_writes_the_true_line_unrounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In bf16 the head's predictions are bf16, the true statistics are not: the line is written from them as given
    (a cast to the head's dtype would move its last digits off the caption's)."""
    model = _model(tmp_path).bfloat16()  # the whole model, as DeepSpeed's bf16 engine casts it
    assert model.tokenizer is not None
    g = torch.Generator().manual_seed(2)
    climate = torch.randn(2, 1, 5, 11, 15, generator=g).bfloat16()
    enc = model.tokenizer(["Describe: 7.0 °C.", "Describe: 1.4 °C"], return_tensors="pt", padding=True)
    truth = torch.randn(2, 5, 3, generator=g)
    assert model.readout_texts(truth) != model.readout_texts(truth.bfloat16()), "bf16 should move a digit here"
    written: list[list[int]] = []
    original = model.readout_ids
    monkeypatch.setattr(model, "readout_ids", lambda stats: written.extend(original(stats)) or original(stats))
    with torch.no_grad():
        model(enc["input_ids"], enc["attention_mask"], climate, labels=enc["input_ids"], logits="none",
              readout_stats=truth)  # fmt: skip
    tok = model.tokenizer
    assert [tok.decode(ids) for ids in written] == [tok.decode(tok(t)["input_ids"]) for t in model.readout_texts(truth)]
