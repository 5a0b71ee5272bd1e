"""The Hugging Face view of a version (hub.py), the sample's fixed keys, and one-line credential messages (storage.py).

The loaders themselves run on a real build in tests/merra2_text_data/test_datasets_recipes.py."""

from __future__ import annotations

import json

import datasets
import pytest
from climate_text_schema import (
    SampleMeta,
    credentials_message,
    hf_features,
    hub_configs,
    parse_manifest,
    sample_features,
)


def _meta(**extra: object) -> SampleMeta:
    return SampleMeta.model_validate(dict(
        key="k-0", split="train", time_start="2019-01-01T00:00:00+00:00", time_end="2019-01-02T00:00:00+00:00",
        region="conus", bbox=[-105.0, 35.0, -95.0, 45.0], variables=["T2M"], units=["K"], lat=[35.0], lon=[-105.0],
        stats={"T2M": {"mean": 280.0, "min": 270.0, "max": 290.0}}, **extra,
    ))  # fmt: skip


def test_every_sample_json_has_the_same_keys() -> None:
    """With or without events and anomalies, a dumped sample carries every field (empty list / null)."""
    bare = _meta().model_dump(mode="json")
    full = _meta(time_step="1h", tile=[0, 1], anomalies={"values": {"T2M": 1.5}, "period": "2018-2020"},
                 events=[{"id": "1", "type": "Hail", "begin": "2019-01-01T12:00:00+00:00"}]).model_dump(mode="json")  # fmt: skip
    assert set(bare) == set(full)
    assert bare["events"] == [] and bare["anomalies"] is None and bare["tile"] is None
    assert full["events"][0]["type"] == "Hail" and full["anomalies"]["values"] == {"T2M": 1.5}


def test_features_name_every_sample_field() -> None:
    [_, _, meta, _, _] = sample_features(["T2M", "U10M"])
    assert meta["name"] == "json"
    assert {f["name"] for f in meta["struct"]} == set(SampleMeta.model_fields)


def test_card_features_are_the_datasets_features() -> None:
    """The YAML form the card writes is exactly what `datasets` reads back, and equals `hf_features`."""
    manifest = parse_manifest(json.dumps(_manifest()))
    from_card = datasets.Features._from_yaml_list(sample_features(manifest.variable_names))  # (it pops names)
    assert from_card == hf_features(manifest)
    assert from_card["json"]["events"] == datasets.List(
        {"id": datasets.Value("string"), "type": datasets.Value("string"), "begin": datasets.Value("string")}
    )
    assert from_card["json"]["stats"]["U10M"]["max"] == datasets.Value("float64")


def test_configs_list_the_splits_with_shards() -> None:
    [config] = hub_configs(parse_manifest(json.dumps(_manifest())))
    assert config == {"config_name": "default", "data_files": [{"split": "train", "path": "shards/train-*.tar"},
                                                               {"split": "test", "path": "shards/test-*.tar"}]}  # fmt: skip


def _manifest() -> dict[str, object]:
    shard = {"samples": 1, "bytes": 10, "sha256": "0" * 64}
    return {
        "schema_version": "1.1", "name": "conus", "version": "abc", "created_at": "2026-01-01T00:00:00Z",
        "builder": {"package": "t", "version": "0"}, "config": {}, "window": "1d", "time_step": "1h",
        "variables": [{"name": "T2M", "units": "K"}, {"name": "U10M", "units": "m s-1"}],
        "splits": {"train": 1, "val": 0, "test": 1}, "normalization": {}, "sources": [], "quarantined": 0,
        "shards": [{"path": "shards/train-000000.tar", "split": "train", **shard},
                   {"path": "shards/test-000000.tar", "split": "test", **shard}],
    }  # fmt: skip


def test_missing_s3_credentials_become_one_line() -> None:
    from botocore.exceptions import NoCredentialsError

    message = credentials_message(NoCredentialsError())
    assert message is not None and "\n" not in message
    assert message.startswith("no credentials for S3 (NoCredentialsError: Unable to locate credentials)")
    assert "AWS_ACCESS_KEY_ID" in message and "AWS_ENDPOINT_URL" in message


def test_credentials_error_is_found_in_the_cause_chain() -> None:
    from botocore.exceptions import PartialCredentialsError

    try:
        try:
            raise PartialCredentialsError(provider="env", cred_var="AWS_SECRET_ACCESS_KEY")
        except PartialCredentialsError as exc:
            raise OSError("listing failed") from exc
    except OSError as outer:
        message = credentials_message(outer)
    assert message is not None and "PartialCredentialsError" in message and "AWS_SECRET_ACCESS_KEY" in message


@pytest.mark.parametrize("exc", [ValueError("no"), FileNotFoundError("x"), KeyError("NoCredentialsError")])
def test_other_errors_are_not_credentials_errors(exc: BaseException) -> None:
    assert credentials_message(exc) is None
