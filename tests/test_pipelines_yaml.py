"""Every build YAML in pipelines/ is a valid BuildConfig (and each can be overridden from the command line)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from merra2_text_data.config.build import BuildConfig

ROOT = Path(__file__).resolve().parents[1]
BUILD_YAMLS = sorted((ROOT / "pipelines").glob("build-*.yaml"))


def test_there_are_build_configs() -> None:
    names = {p.name for p in BUILD_YAMLS}
    assert {"build-demo.yaml", "build-conus.yaml"} <= names


@pytest.mark.parametrize("path", BUILD_YAMLS, ids=lambda p: p.name)
def test_build_yaml_is_valid(path: Path) -> None:
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    cfg = BuildConfig.from_yaml(path)
    assert cfg.subset.region == str(raw["subset"]["region"])
    assert cfg.resolved()["variables"] == cfg.subset.variables
    start, end = cfg.subset.period()
    assert start <= end
    changed = BuildConfig.from_yaml(path, overrides=["sample.window=2d", "sample.time_step=1d"])
    assert changed.sample.window == "2d" and changed.resolved() != cfg.resolved()
