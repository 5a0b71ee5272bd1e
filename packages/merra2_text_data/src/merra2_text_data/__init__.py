"""merra2_text_data: NASA MERRA-2 reanalysis to validated climate-text pairs in versioned WebDataset shards.

Examples:
    >>> from merra2_text_data import BuildConfig, build
    >>> cfg = BuildConfig.from_options(region="-105,35,-95,45", start="2019-01-01", end="2019-01-05",
    ...                                source="granules/", out="./datasets")  # doctest: +SKIP
    >>> build(cfg)  # doctest: +SKIP
    '/abs/datasets/bbox-105_35_-95_45@9c1e...'
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    BuildError,
    ConfigError,
    CredentialsError,
    GranuleError,
    Merra2TextError,
    MissingDataError,
    PublishError,
    SampleValidationError,
    VerifyError,
)
from .version import __version__

if TYPE_CHECKING:
    from .config.build import (
        BuildConfig,
        PublishConfig,
        RunConfig,
        SampleConfig,
        ShardConfig,
        SourceConfig,
        SubsetConfig,
    )
    from .pipeline import build, plan_build
    from .regions import REGIONS, Region, parse_region
    from .store.versions import (
        DiffReport,
        GcReport,
        VerifyReport,
        VersionInfo,
        diff,
        gc,
        list_versions,
        tag,
        verify,
    )


_LAZY = {
    **dict.fromkeys(
        ("BuildConfig", "PublishConfig", "RunConfig", "SampleConfig", "ShardConfig", "SourceConfig", "SubsetConfig"),
        "config.build",
    ),
    **dict.fromkeys(("build", "plan_build"), "pipeline"),
    **dict.fromkeys(("REGIONS", "Region", "parse_region"), "regions"),
    **dict.fromkeys(
        ("DiffReport", "GcReport", "VerifyReport", "VersionInfo", "diff", "gc", "list_versions", "tag", "verify"),
        "store.versions",
    ),
}
"""Names imported on first use: the builder's modules pull in pandas, xarray and dask, which `--help` never needs."""

__all__ = [
    "REGIONS",
    "BuildConfig",
    "BuildError",
    "ConfigError",
    "CredentialsError",
    "DiffReport",
    "GcReport",
    "GranuleError",
    "Merra2TextError",
    "MissingDataError",
    "PublishConfig",
    "PublishError",
    "Region",
    "RunConfig",
    "SampleConfig",
    "SampleValidationError",
    "ShardConfig",
    "SourceConfig",
    "SubsetConfig",
    "VerifyError",
    "VerifyReport",
    "VersionInfo",
    "__version__",
    "build",
    "diff",
    "gc",
    "list_versions",
    "parse_region",
    "plan_build",
    "tag",
    "verify",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'merra2_text_data' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
