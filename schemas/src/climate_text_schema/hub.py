"""The Hugging Face view of a dataset version: the `datasets` features of one sample and the card's `configs`.

A version folder is a Hub dataset as it is: its card (`README.md`) starts with YAML front matter whose `configs`
map each split to its shard glob and whose `dataset_info.features` (`sample_features`) declare every member and every
`.json` field, so `datasets` does not have to infer them from the first few samples (it cannot infer the type of
`events` from samples that have none). For `load_dataset("webdataset", data_files=...)`, pass
`features=hf_features(manifest)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .layout import SPLITS
from .manifest import Manifest

__all__ = ["hf_features", "hub_configs", "sample_features"]

_F64 = "float64"


def _value(name: str, dtype: str) -> dict[str, Any]:
    return {"name": name, "dtype": dtype}


def _struct(name: str, fields: list[dict[str, Any]]) -> dict[str, Any]:
    return {"name": name, "struct": fields}


def _per_variable(name: str, variables: Sequence[str], stats: bool) -> dict[str, Any]:
    """A struct with one field per variable: float64, or (stats) a {mean, min, max} struct. Fresh dicts throughout
    (no shared objects, so the YAML dump has no anchors)."""
    if stats:
        return _struct(name, [_struct(v, [_value(s, _F64) for s in ("mean", "min", "max")]) for v in variables])
    return _struct(name, [_value(v, _F64) for v in variables])


def sample_features(variables: Sequence[str]) -> list[dict[str, Any]]:
    """The features of one sample in the Hub's YAML form (the card's `dataset_info.features`).

    Members: `climate.npy` (float32, nested `[time][variable][lat][lon]` lists), `txt`, `json` (every
    `SampleMeta` field; `stats` and `anomalies` have one field per variable), and the `__key__` and `__url__`
    columns that the `webdataset` loader adds.

    Args:
        variables: the version's variables, in manifest order.
    """
    meta = [
        _value("key", "string"),
        _value("split", "string"),
        _value("time_start", "string"),
        _value("time_end", "string"),
        _value("region", "string"),
        {"name": "bbox", "list": _F64},
        {"name": "variables", "list": "string"},
        {"name": "units", "list": "string"},
        {"name": "lat", "list": _F64},
        {"name": "lon", "list": _F64},
        _per_variable("stats", variables, stats=True),
        _value("time_step", "string"),
        {"name": "tile", "list": "int64"},
        _struct(
            "anomalies",
            [_per_variable("values", variables, stats=False), _per_variable("reference", variables, stats=False),
             _value("period", "string")],
        ),  # fmt: skip
        {"name": "events", "list": [_value("id", "string"), _value("type", "string"), _value("begin", "string")]},
    ]
    return [
        {"name": "climate.npy", "list": {"list": {"list": {"list": "float32"}}}},
        _value("txt", "string"),
        _struct("json", meta),
        _value("__key__", "string"),
        _value("__url__", "string"),
    ]


def hub_configs(manifest: Manifest) -> list[dict[str, Any]]:
    """The card's `configs`: one `default` config whose data files are each split's shard glob (splits with shards)."""
    splits = [s for s in SPLITS if manifest.shards_of(s)]
    return [
        {
            "config_name": "default",
            "data_files": [{"split": s, "path": f"shards/{s}-*.tar"} for s in splits],
        }
    ]


def _to_feature(node: Any) -> Any:
    import datasets

    if isinstance(node, str):
        return datasets.Value(node)
    if isinstance(node, list):
        return {f["name"]: _to_feature(f) for f in node}
    if "dtype" in node:
        return datasets.Value(node["dtype"])
    if "list" in node:
        return datasets.List(_to_feature(node["list"]))
    return {f["name"]: _to_feature(f) for f in node["struct"]}


def hf_features(manifest: Manifest) -> Any:
    """`datasets.Features` of this version's samples (for `load_dataset("webdataset", ..., features=...)`).

    Raises:
        ImportError: Hugging Face `datasets` (4 or newer) is not installed.

    Examples:
        >>> from datasets import load_dataset  # doctest: +SKIP
        >>> ds = open_dataset("./datasets/conus@latest")  # doctest: +SKIP
        >>> load_dataset("webdataset", data_files={"train": ds.shard_urls("train")},
        ...              features=hf_features(ds.manifest))  # doctest: +SKIP
    """
    try:
        import datasets
    except ImportError as exc:
        raise ImportError("hf_features needs Hugging Face datasets: pip install 'datasets>=4'") from exc
    return datasets.Features({f["name"]: _to_feature(f) for f in sample_features(manifest.variable_names)})
