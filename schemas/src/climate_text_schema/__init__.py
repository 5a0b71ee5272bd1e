"""climate_text_schema: the contract shared by merra2_text_data (writer) and fusion_trainer (reader).

It holds the dataset layout, the pandera schema of the index, the sample and manifest contract, and `open_dataset`,
which resolves a dataset reference on any fsspec store. It never imports torch.

The pandas/pandera/fsspec-backed names (`open_dataset`, the index schema, storage helpers) are imported on first
use, so `import climate_text_schema` (and every command line's `--help`) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    ContractError,
    DatasetNotFoundError,
    IndexValidationError,
    ManifestError,
    ReferenceError_,
    SampleError,
    SchemaVersionError,
    quiet_session_teardown,
    redact_credentials,
    redact_log_records,
)
from .hashing import READ_SIZE, HashingReader
from .hub import hf_features, hub_configs, sample_features
from .layout import (
    INDEX_FILE,
    MANIFEST_DIGEST_FILE,
    MANIFEST_FILE,
    MAX_SHARD_BYTES,
    QUARANTINE_FILE,
    README_FILE,
    SPLITS,
    is_shard_name,
    is_version_id,
    join_url,
    shard_name,
    tag_url,
    tags_url,
    version_url,
    versions_url,
)
from .manifest import (
    DIGEST_FILES,
    SCHEMA_VERSION,
    BuilderInfo,
    Manifest,
    NormStats,
    ShardInfo,
    SourceInfo,
    VariableInfo,
    check_schema_version,
    parse_manifest,
)
from .sample import (
    ARRAY_DIMS,
    ARRAY_DTYPE,
    CLIMATE_MEMBER,
    META_MEMBER,
    SAMPLE_MEMBERS,
    TEXT_MEMBER,
    SampleAnomalies,
    SampleEvent,
    SampleMeta,
    check_climate_array,
    check_sample_key,
    decode_climate,
    decode_meta,
    decode_text,
    member_suffix_problem,
)
from .variables import DEFAULT_VARIABLES, FILL_VALUE, KNOWN_VARIABLES, VariableSpec, variable_spec

if TYPE_CHECKING:
    from .caption_reading import canonical_caption, caption_target, parse_caption_numbers
    from .captions import QUANTITIES, TEXT_FORMAT, caption_quantities, check_text_format
    from .index import BASE_COLUMNS, index_schema, stat_columns, validate_index, variables_in_index
    from .reference import (
        OpenedDataset,
        format_tag,
        open_dataset,
        parse_reference,
        parse_tag,
        resolve_version_url,
    )
    from .storage import OBJECT_STORE_PROTOCOLS, credentials_message, register_webdataset_fsspec

__version__ = "1.0.0"

_LAZY = {
    "QUANTITIES": "captions",
    "TEXT_FORMAT": "captions",
    "caption_quantities": "captions",
    "check_text_format": "captions",
    "canonical_caption": "caption_reading",
    "caption_target": "caption_reading",
    "parse_caption_numbers": "caption_reading",
    "BASE_COLUMNS": "index",
    "index_schema": "index",
    "stat_columns": "index",
    "validate_index": "index",
    "variables_in_index": "index",
    "OpenedDataset": "reference",
    "format_tag": "reference",
    "parse_tag": "reference",
    "open_dataset": "reference",
    "parse_reference": "reference",
    "resolve_version_url": "reference",
    "OBJECT_STORE_PROTOCOLS": "storage",
    "credentials_message": "storage",
    "register_webdataset_fsspec": "storage",
}

__all__ = [
    "QUANTITIES",
    "TEXT_FORMAT",
    "canonical_caption",
    "caption_quantities",
    "caption_target",
    "check_text_format",
    "parse_caption_numbers",
    "ARRAY_DIMS",
    "ARRAY_DTYPE",
    "BASE_COLUMNS",
    "CLIMATE_MEMBER",
    "DEFAULT_VARIABLES",
    "DIGEST_FILES",
    "FILL_VALUE",
    "INDEX_FILE",
    "KNOWN_VARIABLES",
    "MANIFEST_DIGEST_FILE",
    "MANIFEST_FILE",
    "MAX_SHARD_BYTES",
    "OBJECT_STORE_PROTOCOLS",
    "META_MEMBER",
    "QUARANTINE_FILE",
    "READ_SIZE",
    "README_FILE",
    "SAMPLE_MEMBERS",
    "SCHEMA_VERSION",
    "SPLITS",
    "TEXT_MEMBER",
    "BuilderInfo",
    "ContractError",
    "DatasetNotFoundError",
    "HashingReader",
    "IndexValidationError",
    "Manifest",
    "ManifestError",
    "NormStats",
    "OpenedDataset",
    "ReferenceError_",
    "SampleAnomalies",
    "SampleError",
    "SampleEvent",
    "SampleMeta",
    "SchemaVersionError",
    "ShardInfo",
    "SourceInfo",
    "VariableInfo",
    "VariableSpec",
    "check_climate_array",
    "check_sample_key",
    "check_schema_version",
    "credentials_message",
    "decode_climate",
    "decode_meta",
    "decode_text",
    "hf_features",
    "hub_configs",
    "index_schema",
    "format_tag",
    "is_shard_name",
    "is_version_id",
    "join_url",
    "member_suffix_problem",
    "open_dataset",
    "parse_manifest",
    "parse_reference",
    "parse_tag",
    "redact_credentials",
    "quiet_session_teardown",
    "redact_log_records",
    "register_webdataset_fsspec",
    "resolve_version_url",
    "sample_features",
    "shard_name",
    "stat_columns",
    "tag_url",
    "tags_url",
    "validate_index",
    "variable_spec",
    "variables_in_index",
    "version_url",
    "versions_url",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'climate_text_schema' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
