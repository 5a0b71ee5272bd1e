"""Bad input to training: each a clear error naming the offending value (dataset, model, schema, shard, batch)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from fusion_trainer.config import TrainConfig
from fusion_trainer.data.stream import open_shards
from fusion_trainer.errors import ConfigError, DataError, ModelError, TrainingError
from fusion_trainer.training.train import train


def _version_dir(ref: str) -> Path:
    return Path(open_shards(ref).version_url)


def test_a_dataset_that_does_not_exist(make_config: Callable[..., TrainConfig], tmp_path: Path) -> None:
    missing = f"{tmp_path}/nowhere/conus@latest"
    with pytest.raises(DataError, match="nowhere/conus@latest"):
        train(make_config(shards=missing))


def test_a_model_path_that_does_not_exist(make_config: Callable[..., TrainConfig], tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no-such-model"):
        train(make_config(model=str(tmp_path / "no-such-model")))


def test_a_schema_version_from_the_future(
    make_config: Callable[..., TrainConfig], make_dataset: Callable[..., str]
) -> None:
    ref = make_dataset(name="future", schema_version="2.0")
    with pytest.raises(DataError, match=r"schema_version 2\.0.*upgrade"):
        train(make_config(shards=ref))


def test_a_truncated_shard_is_named(make_config: Callable[..., TrainConfig], dataset_ref: str) -> None:
    shard = _version_dir(dataset_ref) / "shards" / "train-000001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(DataError, match="train-000001.tar"):
        train(make_config(steps=10))


def test_a_shard_that_fails_its_checksum_is_named(
    make_config: Callable[..., TrainConfig], dataset_ref: str
) -> None:
    shard = _version_dir(dataset_ref) / "shards" / "train-000002.tar"
    data = bytearray(shard.read_bytes())
    at = data.index(b"Mean 2 m temperature")  # same length, other text: only the checksum can tell
    data[at : at + 4] = b"MEAN"
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"train-000002\.tar.*sha256"):
        train(make_config(steps=10))


def test_checksums_can_be_skipped(make_config: Callable[..., TrainConfig], dataset_ref: str) -> None:
    shard = _version_dir(dataset_ref) / "shards" / "train-000002.tar"
    data = bytearray(shard.read_bytes())
    at = data.index(b"Mean 2 m temperature")
    data[at : at + 4] = b"MEAN"
    shard.write_bytes(bytes(data))
    assert train(make_config(steps=6, verify_shards=False)).step == 6


def test_a_micro_batch_that_does_not_fit(make_config: Callable[..., TrainConfig]) -> None:
    with pytest.raises(ConfigError, match=r"global_batch 16 != micro_batch 4 x grad_accum 1 x world 1 = 4"):
        train(make_config(global_batch=16))
    with pytest.raises(ConfigError, match=r"micro_batch 32 does not fit split 'train': 20 sample"):
        train(make_config(micro_batch=32))


def test_config_problems_are_listed_together() -> None:
    with pytest.raises(ConfigError) as info:
        TrainConfig.load({"shards": "x", "model": "m", "out": "o", "zero": 5, "lr": -1, "bogus": 1,
                          "fusion": {"fusion": "nope"}})  # fmt: skip
    text = str(info.value)
    for key in ("zero", "lr", "bogus"):
        assert key in text
    with pytest.raises(ConfigError, match="fusion"):
        TrainConfig.load({"shards": "x", "model": "m", "out": "o", "fusion": {"fusion": "nope"}})


def test_seed_and_betas_are_refused_outside_what_numpy_and_adamw_take() -> None:
    """A seed above 2**32 - 1 (np.random.seed) or a beta outside [0, 1) (AdamW) was accepted, then raised a traceback
    after config.yaml was written."""
    base = {"shards": "x", "model": "m", "out": "o"}
    with pytest.raises(ConfigError, match=r"- seed: .*4294967295 \(got 4294967296\)"):
        TrainConfig.load({**base, "seed": 2**32})
    with pytest.raises(ConfigError, match=r"- betas\.0: .*less than 1 \(got 1\.0\)\n  - betas\.1: .*\(got -0\.5\)"):
        TrainConfig.load({**base, "betas": [1.0, -0.5]})
    config = TrainConfig.load({**base, "seed": 2**32 - 1, "betas": [0.0, 0.999]})
    assert (config.seed, config.betas) == (2**32 - 1, (0.0, 0.999))


def test_set_overrides_and_yaml(tmp_path: Path) -> None:
    path = tmp_path / "train.yaml"
    path.write_text("shards: a\nmodel: b\nout: c\nfusion:\n  fusion: add\n")
    cfg = TrainConfig.from_yaml(path, ["lr=3e-4", "fusion.d_encoder=64"], steps=7)
    assert cfg.lr == 3e-4 and cfg.fusion.fusion == "add" and cfg.fusion.d_encoder == 64 and cfg.steps == 7
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        TrainConfig.from_yaml(path, ["lr"])


def test_nan_loss_stops_with_step_keys_and_checkpoint(
    make_config: Callable[..., TrainConfig], dataset_ref: str
) -> None:
    manifest_path = _version_dir(dataset_ref) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["normalization"]["T2M"]["std"] = 1e-38  # normalised values overflow to inf -> NaN loss
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(TrainingError, match=r"at step 1 .*synth-train-\d+.*last good checkpoint: none"):
        train(make_config(steps=4))


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).resolve().parents[2] / "pipelines").glob("train-*.yaml"))
)
def test_every_train_pipeline_is_a_valid_config(path: Path) -> None:
    from fusion_trainer.config import FusionConfig

    config = TrainConfig.from_yaml(path)
    FusionConfig(**config.fusion.model_dump(), n_variables=11)
    config.deepspeed_config(world=config.nproc)  # the global batch checks out
    assert config.steps >= config.warmup_steps


def test_the_pipelines_folder_has_the_three_train_configs() -> None:
    names = {p.name for p in (Path(__file__).resolve().parents[2] / "pipelines").glob("train-*.yaml")}
    assert {"train-tiny.yaml", "train-smollm2.yaml", "train-llama3-8b.yaml"} <= names


def test_fusion_settings_are_typed_and_the_model_config_is_built_once() -> None:
    import yaml
    from fusion_trainer.config import FusionSettings

    raw = {"shards": "x", "model": "m", "out": "o", "stats_loss_weight": 0.5,
           "fusion": {"fusion": "prefix", "d_encoder": 64, "encoder_heads": 4}}  # fmt: skip
    cfg = TrainConfig.load(raw)
    assert isinstance(cfg.fusion, FusionSettings) and cfg.fusion.n_prefix_tokens == 32
    norm = {"T2M": {"mean": 280.0, "std": 10.0}, "U10M": {"mean": 0.0, "std": 5.0}}
    model_config = cfg.fusion_config(["T2M", "U10M"], norm, "1h")
    assert (model_config.n_variables, model_config.d_encoder, model_config.window) == (2, 64, "1h")
    assert model_config.stats_head  # from stats_loss_weight, in training and --dry-run alike
    assert TrainConfig.load(yaml.safe_load(cfg.to_yaml())).fusion == cfg.fusion  # RUN_DIR/config.yaml round trip
    with pytest.raises(ConfigError, match=r"fusion: encoder_heads: 3 does not divide d_encoder=64"):
        TrainConfig.load({**raw, "fusion": {"d_encoder": 64, "encoder_heads": 3}})
    with pytest.raises(ConfigError, match=r"fusion.variables: Extra inputs are not permitted"):
        TrainConfig.load({**raw, "fusion": {"variables": ["T2M"]}})  # the dataset gives them
