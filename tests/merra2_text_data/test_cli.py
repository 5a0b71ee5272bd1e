"""`merra2-text`: the acceptance command, reference on the last line, verify/tag/versions/diff/gc/inspect, clean errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from climate_text_schema import open_dataset
from merra2_text_data.cli import app
from typer.testing import CliRunner

runner = CliRunner()
REGION = "--region=-105,35,-95,45"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """Synthetic granules and one build through the CLI; returns (granules, out, reference)."""
    root = tmp_path_factory.mktemp("cli")
    granules, out = root / "granules", root / "datasets"
    res = runner.invoke(app, ["synth", "--out", str(granules), REGION, "--start", "2019-01-01", "--end",
                              "2019-01-05", "-q"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert len(list(granules.glob("*.nc4"))) == 10
    res = runner.invoke(app, ["build", "--source", str(granules), REGION, "--start", "2019-01-01", "--end",
                              "2019-01-05", "--window", "1d", "--time-step", "1h", "--out", str(out),
                              "--cache-dir", str(root / "cache"), "--quiet"])  # fmt: skip
    assert res.exit_code == 0, res.output
    return granules, out, res.stdout.strip().splitlines()[-1]


def test_build_prints_the_reference_last(built: tuple[Path, Path, str]) -> None:
    _, out, ref = built
    assert ref.startswith(f"{out}/bbox-105_35_-95_45@")
    ds = open_dataset(ref)
    assert sum(ds.manifest.splits.values()) == 5
    assert (Path(ds.version_url) / "manifest.json").exists()


def test_verify_tag_versions_diff_inspect(built: tuple[Path, Path, str], tmp_path: Path) -> None:
    granules, out, ref = built
    res = runner.invoke(app, ["verify", ref])
    assert res.exit_code == 0 and res.stdout.startswith("ok:"), res.output
    res = runner.invoke(app, ["tag", ref, "paper"])
    assert res.exit_code == 0 and res.stdout.strip().endswith("@paper")
    dataset = ref.rsplit("@", 1)[0]
    res = runner.invoke(app, ["versions", dataset])
    assert res.exit_code == 0 and ref.rsplit("@", 1)[1] in res.stdout and "latest" in res.stdout
    assert "paper" in res.stdout
    res = runner.invoke(app, ["build", "--source", str(granules), REGION, "--start", "2019-01-01", "--end",
                              "2019-01-05", "--out", str(out), "--set", "sample.time_step=3h", "-q",
                              "--cache-dir", str(out.parent / "cache")])  # fmt: skip
    assert res.exit_code == 0, res.output
    ref2 = res.stdout.strip().splitlines()[-1]
    assert ref2 != ref and open_dataset(f"{dataset}@latest").version == ref2.rsplit("@", 1)[1]
    res = runner.invoke(app, ["diff", ref, ref2])
    assert res.exit_code == 0 and "config time_step: '1h' -> '3h'" in res.stdout
    png = tmp_path / "map.png"
    res = runner.invoke(app, ["inspect", f"{dataset}@paper", "--png", str(png)])
    assert res.exit_code == 0, res.output
    assert "°C" in res.stdout and png.stat().st_size > 5000 and png.read_bytes()[:4] == b"\x89PNG"
    res = runner.invoke(app, ["gc", dataset])
    assert res.exit_code == 0 and "0 object(s)" in res.stdout


def test_verify_fails_naming_the_shard(built: tuple[Path, Path, str], tmp_path: Path) -> None:
    import shutil

    _, out, ref = built
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    ref_copy = ref.replace(str(out), str(copy))
    shard = sorted((Path(open_dataset(ref_copy).version_url) / "shards").glob("train-*.tar"))[0]
    data = bytearray(shard.read_bytes())
    data[800] ^= 0x10
    shard.write_bytes(bytes(data))
    res = runner.invoke(app, ["verify", ref_copy])
    assert res.exit_code == 1
    assert f"shards/{shard.name}: sha256" in res.stderr and "Traceback" not in res.output


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["build", "--region=atlantis", "--years", "2019"], 2, "unknown region 'atlantis'"),
        (["build", REGION, "--years", "1975"], 2, "year 1975"),
        (["build", REGION, "--years", "2019", "--tile", "big"], 2, "sample.tile"),
        (
            [
                "build",
                REGION,
                "--start",
                "2019-01-01",
                "--end",
                "2019-01-02",
                "--source",
                "/nonexistent/granules",
            ],
            2,
            "/nonexistent/granules is not an existing folder",
        ),
        (["verify", "/nowhere/conus@latest"], 1, "no dataset at /nowhere/conus"),
        (["build", "--config", "/nowhere.yaml"], 2, "/nowhere.yaml does not exist"),
    ],
)
def test_errors_are_one_clear_message(args: list[str], code: int, needle: str) -> None:
    res = runner.invoke(app, args)
    assert res.exit_code == code, res.output
    assert needle in res.stderr and "Traceback" not in res.output and res.stderr.startswith("error: ")


def test_missing_days_name_the_days_and_the_way_out(built: tuple[Path, Path, str], tmp_path: Path) -> None:
    granules, _, _ = built
    res = runner.invoke(app, ["build", "--source", str(granules), REGION, "--start", "2019-01-04", "--end",
                              "2019-01-07", "--out", str(tmp_path), "-q"])  # fmt: skip
    assert res.exit_code == 1
    assert "2019-01-06..2019-01-07" in res.stderr and "--allow-gaps" in res.stderr


def test_help_teaches_and_entry_point_runs() -> None:
    res = runner.invoke(app, ["build", "--help"])
    assert res.exit_code == 0 and "--region=-105,35,-95,45" in res.stdout and "--set" in res.stdout
    proc = subprocess.run([sys.executable, "-m", "merra2_text_data.cli", "regions"], capture_output=True, text=True,
                          check=True)  # fmt: skip
    assert "conus" in proc.stdout and "-125" in proc.stdout
