"""Build configuration: the sections (`config_sections`) composed into `BuildConfig`, and how it is loaded.

A config comes from YAML (`pipelines/*.yaml`), from CLI flags, or from Python. Every problem is collected and raised
once as a `ConfigError` whose message names each YAML key (`subset.years`, `sample.window`, ...).

`BuildConfig.resolved()` is the canonical dict that goes into the manifest and the version digest: it holds only what
changes the data (never `out`, `cache`/`cache_dir`, `workers`, `scheduler`, `quiet`, `allow_gaps`, `allow_partial_days`,
`hash_granules` or `strict`).

The section models are defined in `merra2_text_data.config.sections` and re-exported here: import them from this
module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from merra2_text_data.errors import ConfigError

from .sections import (
    ERA5_FIRST_YEAR,
    FIRST_YEAR,
    PublishConfig,
    RunConfig,
    SampleConfig,
    Section,
    ShardConfig,
    SourceConfig,
    SubsetConfig,
    parse_size,
    record_of,
)

__all__ = [
    "ERA5_FIRST_YEAR",
    "FIRST_YEAR",
    "BuildConfig",
    "PublishConfig",
    "RunConfig",
    "SampleConfig",
    "ShardConfig",
    "SourceConfig",
    "SubsetConfig",
    "parse_size",
    "record_of",
]


class BuildConfig(Section):
    """Everything a build needs. `resolved()` is the canonical, data-defining part.

    Examples:
        >>> cfg = BuildConfig.from_options(region="-105,35,-95,45", years="2019", source="/data/merra2")
        >>> cfg.subset.period()
        (datetime.date(2019, 1, 1), datetime.date(2019, 12, 31))
    """

    source: SourceConfig = Field(default_factory=SourceConfig)
    subset: SubsetConfig
    sample: SampleConfig = Field(default_factory=SampleConfig)
    shard: ShardConfig = Field(default_factory=ShardConfig)
    publish: PublishConfig = Field(default_factory=PublishConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @model_validator(mode="after")
    def _source_variables(self) -> BuildConfig:
        """An ERA5 build without `subset.variables` reads ERA5's default set, not MERRA-2's."""
        from merra2_text_data.source.era5 import ERA5_DEFAULT_VARIABLES, is_era5

        if is_era5(self.source.source) and "variables" not in self.subset.model_fields_set:
            self.subset.variables = list(ERA5_DEFAULT_VARIABLES)
        return self

    @model_validator(mode="after")
    def _run_ok(self) -> BuildConfig:
        if self.run.workers and self.run.scheduler:
            raise ValueError(
                f"run.workers={self.run.workers} and run.scheduler={self.run.scheduler!r} exclude each other"
            )
        return self

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> BuildConfig:
        """Validate a nested dict, raising one ConfigError that names every bad key. The years and dates are checked
        against the record of the source (`record_of`: ERA5 from 1940, MERRA-2 from 1980)."""
        source = data.get("source")
        record = record_of(source.get("source") or "earthaccess") if isinstance(source, dict) else record_of("")
        try:
            return cls.model_validate(data, context={"record": record})
        except ValidationError as exc:
            raise ConfigError(_format_errors(exc, where)) from exc

    @classmethod
    def from_options(cls, overrides: list[str] | None = None, **options: Any) -> BuildConfig:
        """Build from flat CLI-style options (`region=`, `years=`, `window=`, ...; None means unset).

        Args:
            overrides: `a.b=v` strings applied last.
            **options: flat option names, see `FLAT_KEYS`.
        """
        data: dict[str, Any] = {}
        _apply_flat(data, options)
        _apply_overrides(data, overrides or [])
        return cls.from_dict(data, where="options")

    @classmethod
    def from_yaml(
        cls, path: str | Path, overrides: list[str] | None = None, options: dict[str, Any] | None = None
    ) -> BuildConfig:
        """Load a YAML build config, then apply flat `options` (CLI flags) and `a.b=v` overrides.

        Raises:
            ConfigError: the file is missing or not YAML, or any key is invalid (all are listed).
        """
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except FileNotFoundError as exc:
            raise ConfigError(
                f"config file {path} does not exist; give a path such as pipelines/build-demo.yaml"
            ) from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(
                f"config file {path} must hold a mapping of sections, found {type(raw).__name__}"
            )
        _apply_flat(raw, options or {})
        _apply_overrides(raw, overrides or [])
        return cls.from_dict(raw, where=str(path))

    # ---- derived values -----------------------------------------------------------------------------------------
    def dataset_name(self) -> str:
        """The dataset name: `publish.name`, else the named region, else `bbox`."""
        if self.publish.name:
            return self.publish.name
        from merra2_text_data.regions import REGIONS

        region = self.subset.parsed_region
        if region.name in REGIONS:
            return region.name
        return "bbox" + "_".join(f"{v:g}" for v in region.bbox)

    def resolved(self) -> dict[str, Any]:
        """The canonical dict of everything that defines the data (manifest `config`, version digest)."""

        region = self.subset.parsed_region
        start, end = self.subset.period()
        return {
            "name": self.dataset_name(),
            "region": {"name": region.name, "bbox": [float(x) for x in region.bbox]},
            "start": start.isoformat(),
            "end": end.isoformat(),
            "variables": list(self.subset.variables),
            "window": self.sample.window,
            "stride": self.sample.stride or self.sample.window,
            "time_step": self.sample.time_step,
            "tile": self.sample.tile,
            **({"edge_tiles": self.sample.edge_tiles} if self.sample.tile else {}),
            "val_fraction": self.sample.val_fraction,
            "test_fraction": self.sample.test_fraction,
            "val_years": sorted(self.sample.val_years),
            "test_years": sorted(self.sample.test_years),
            "seed": self.sample.seed,
            **({"holdout_tiles": self.sample.holdout_tiles} if self.sample.holdout_tiles else {}),
            "events": [Path(p).name for p in self.sample.events],
            "text_table": Path(self.sample.text_table).name if self.sample.text_table else None,
            "shard_size": self.shard.shard_size,
        }


_SECTIONS: dict[str, type[Section]] = {
    "source": SourceConfig, "subset": SubsetConfig, "sample": SampleConfig, "shard": ShardConfig,
    "publish": PublishConfig, "run": RunConfig,
}  # fmt: skip
FLAT_KEYS: dict[str, str] = {
    field: f"{section}.{field}" for section, model in _SECTIONS.items() for field in model.model_fields
}
"""Flat option (CLI flag) name -> nested YAML key."""


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = data
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[last] = value


def _apply_flat(data: dict[str, Any], options: dict[str, Any]) -> None:
    unknown = sorted(set(options) - set(FLAT_KEYS))
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(FLAT_KEYS))}")
    for name, value in options.items():
        if value is not None:
            _set(data, FLAT_KEYS[name], value)
    # --years and --start/--end from the command line replace each other's YAML values
    subset = data.get("subset")
    if isinstance(subset, dict):
        if options.get("years") is not None:
            subset.pop("start", None)
            subset.pop("end", None)
        elif options.get("start") is not None or options.get("end") is not None:
            subset.pop("years", None)


def _apply_overrides(data: dict[str, Any], overrides: list[str]) -> None:
    bad = [o for o in overrides if "=" not in o or not o.partition("=")[0].strip()]
    if bad:
        raise ConfigError(
            f"override(s) {', '.join(map(repr, bad))} are not KEY=VALUE; write e.g. sample.window=2d"
        )
    for item in overrides:
        key, _, text = item.partition("=")
        key = key.strip()
        value = yaml.safe_load(text) if text.strip() else None
        _set(data, FLAT_KEYS.get(key, key), value)


def _format_errors(exc: ValidationError, where: str) -> str:
    lines = [f"{where}: {exc.error_count()} problem(s) in the build config:"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key; see pipelines/build-demo.yaml for the known keys"
        elif err["type"] == "missing":
            msg = "required; set it in the YAML or on the command line"
        given = err.get("input")
        shown = (
            f" (given {given!r})"
            if err["type"] not in ("missing", "model_type") and not isinstance(given, dict)
            else ""
        )
        lines.append(f"  - {key}: {msg}{shown}")
    return "\n".join(lines)
