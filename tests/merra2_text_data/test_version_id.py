"""The version id covers the caption format: the same inputs give the same id, a new `text.TEXT_FORMAT` a new one,
and the manifest records the format in the very `config` that was hashed."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from climate_text_schema import open_dataset
from merra2_text_data import BuildConfig, build, plan_build
from merra2_text_data.errors import MissingDataError
from merra2_text_data.regions import parse_region
from merra2_text_data.samples import text as text_mod
from merra2_text_data.source.synth import write_synthetic_granules
from merra2_text_data.store.publish import compute_version

BBOX = "-100,38,-96,42"
START, END = dt.date(2019, 3, 1), dt.date(2019, 3, 2)


@pytest.fixture(scope="module")
def granules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("granules")
    write_synthetic_granules(out, parse_region(BBOX), START, END, seed=5)
    return out


def _config(granules: Path, out: Path) -> BuildConfig:
    return BuildConfig.from_options(region=BBOX, start=str(START), end=str(END), variables="T2M,U10M,V10M",
                                    source=str(granules), out=str(out), cache_dir=str(out / "cache"),
                                    val_fraction=0.0, test_fraction=0.0, quiet=True)  # fmt: skip


def test_same_inputs_same_id_and_the_text_format_changes_it(
    granules: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = plan_build(_config(granules, tmp_path)).version
    assert plan_build(_config(granules, tmp_path)).version == first
    assert plan_build(_config(granules, tmp_path / "elsewhere")).version == first, "out is not part of the id"

    monkeypatch.setattr(text_mod, "TEXT_FORMAT", f"{text_mod.TEXT_FORMAT}-next")
    changed = plan_build(_config(granules, tmp_path)).version
    assert changed != first
    assert plan_build(_config(granules, tmp_path)).version == changed

    monkeypatch.undo()
    assert plan_build(_config(granules, tmp_path)).version == first


def test_manifest_records_the_text_format_in_the_hashed_config(granules: Path, tmp_path: Path) -> None:
    ref = build(_config(granules, tmp_path / "datasets"))
    manifest = open_dataset(ref).manifest
    assert manifest.config["text_format"] == text_mod.TEXT_FORMAT
    inputs = (manifest.model_extra or {}).get("inputs") or {}
    assert compute_version(manifest.config, manifest.sources, inputs) == manifest.version
    card = (tmp_path / "datasets").glob("*/versions/*/README.md")
    assert f'"text_format": "{text_mod.TEXT_FORMAT}"' in next(card).read_text(encoding="utf-8")


def test_an_unreadable_input_file_names_its_option(granules: Path, tmp_path: Path) -> None:
    base = _config(granules, tmp_path)
    missing = str(tmp_path / "nowhere.csv")
    table = base.model_copy(update={"sample": base.sample.model_copy(update={"text_table": missing})})
    with pytest.raises(MissingDataError, match=r"nowhere\.csv cannot be read .*given to --text-table$"):
        plan_build(table)
    events = base.model_copy(update={"sample": base.sample.model_copy(update={"events": [missing]})})
    with pytest.raises(MissingDataError, match=r"nowhere\.csv cannot be read .*given to --events$"):
        plan_build(events)


def test_a_build_joining_events_names_its_join_rule_in_the_id(granules: Path, tmp_path: Path) -> None:
    """The event join widens tiles by half of each axis's grid step (it used the latitude's on both): a build with
    events records that rule in its hashed config, so its id differs from one made under the old rule."""
    from merra2_text_data.run.plan import data_config

    base = _config(granules, tmp_path)
    assert "event_margins" not in data_config(base, [])
    table = tmp_path / "table.csv"
    table.write_text("key,text\n", encoding="utf-8")
    joined = base.model_copy(update={"sample": base.sample.model_copy(update={"text_table": str(table)})})
    assert data_config(joined, [])["event_margins"] == "per_axis"

