"""Load: a build with 4 dask workers over a few hundred sample-days written to S3, then a 2-rank training and a
`merra2-text verify` reading that same S3 version at the same time. No errors, no corrupted samples (verify after
passes, every key trained on is in the index, the ranks see disjoint samples at every step), and no secret in any
output (the run uses the marker credentials of test_secrets).
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
from pathlib import Path

import pytest
from climate_text_schema import open_dataset
from merra2_text_data.regions import parse_region
from merra2_text_data.source.synth import write_synthetic_granules

from .conftest import BBOX, BIN, TINY_TRAIN, VARIABLES, last_json, run_tool, tool_env
from .test_secrets import MARKERS, _leaks

DAYS = 60
TILE = "2x2"  # the 5 x 4 box in 2 x 2 tiles; the northern row, a partial tile, is dropped: 4 samples a day


@pytest.mark.slow
def test_four_dask_workers_build_then_two_ranks_train_while_verify_reads(
    tmp_path: Path, tiny_model_dir: Path, s3_bucket: str, s3_endpoint: str
) -> None:
    start = dt.date(2019, 3, 1)
    end = start + dt.timedelta(days=DAYS - 1)
    write_synthetic_granules(tmp_path / "granules", parse_region(BBOX), start, end, seed=11)
    env = tool_env(**MARKERS, AWS_ENDPOINT_URL=s3_endpoint, AWS_ACCESS_KEY_ID="testing", HOME=str(tmp_path))
    root = f"{s3_bucket}/merra2-text"
    built = run_tool("merra2-text", "build", "--source", str(tmp_path / "granules"), f"--region={BBOX}",
                     "--start", str(start), "--end", str(end), "--variables", VARIABLES, "--tile", TILE,
                     "--shard-size", "120KB", "--workers", "4", "--out", root, "--cache-dir", str(tmp_path / "cache"),
                     "-q", env=env, timeout=600)  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    ref = built.stdout.strip().splitlines()[-1]
    ds = open_dataset(ref)
    assert sum(ds.manifest.splits.values()) + ds.manifest.quarantined == 4 * DAYS, ds.manifest.splits
    assert ds.manifest.array_shape == [24, len(VARIABLES.split(",")), 2, 2]
    assert len(ds.manifest.shards_of("train")) >= 4

    run = tmp_path / "run"
    with (tmp_path / "train.log").open("w") as sink:
        train = subprocess.Popen([str(BIN / "fusion-train"), "--shards", ref, "--model", str(tiny_model_dir),
                                  "--out", str(run), "--nproc", "2", "--steps", "12", "--save-every", "6",
                                  "--no-progress", *TINY_TRAIN], env=env, stdout=sink, stderr=subprocess.STDOUT)  # fmt: skip
        verifies = [run_tool("merra2-text", "verify", ref, env=env, timeout=600) for _ in range(2)]
        assert train.wait(timeout=900) == 0, (tmp_path / "train.log").read_text()[-3000:]
    for res in verifies:
        assert res.returncode == 0 and res.stdout.startswith("ok: "), res.stderr[-3000:]
    after = run_tool("merra2-text", "verify", ref, env=env, timeout=600)
    assert after.returncode == 0, after.stderr[-3000:]

    log = (tmp_path / "train.log").read_text()
    assert last_json(log)["step"] == 12
    keys = set(ds.read_index()["key"])
    steps: dict[int, list[set[str]]] = {}
    for rank in (0, 1):
        for line in (run / "samples" / f"rank{rank}.jsonl").read_text().splitlines():
            record = json.loads(line)
            assert set(record["keys"]) <= keys
            steps.setdefault(record["step"], []).append(set(record["keys"]))
    assert sorted(steps) == list(range(1, 13))
    assert all(len(ks) == 2 and not (ks[0] & ks[1]) for ks in steps.values()), (
        "ranks shared a sample in a step"
    )

    leaks = _leaks("the build output", built.stdout + built.stderr) + _leaks("the training log", log)
    for res in [*verifies, after]:
        leaks += _leaks("a verify output", res.stdout + res.stderr)
    assert not leaks, leaks
