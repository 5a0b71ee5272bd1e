"""bench/_child.py, the measured-child runner of bench/build.py and bench/train.py: result, wall time, the child's
own peak RSS (not the parent's), environment, stderr log and failures."""

from __future__ import annotations

import textwrap
from pathlib import Path
from types import ModuleType

import pytest

from tests.script_module import load_script

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def child_mod() -> ModuleType:
    return load_script(BENCH / "_child.py", "_bench_child")


@pytest.fixture
def script(tmp_path: Path) -> Path:
    """A benchmark-shaped script whose children allocate, echo, fail or print no JSON."""
    path = tmp_path / "bench_script.py"
    path.write_text(
        textwrap.dedent(f"""
        import json, os, sys
        sys.path.insert(0, {str(BENCH)!r})
        from _child import dispatch_child, own_peak_rss_mib

        def alloc(args):
            block = bytearray(args["mib"] * 2**20)
            block[::4096] = b"x" * len(block[::4096])
            print("some chatter")
            print(json.dumps({{"seconds": 0.5, "env": os.environ.get("BENCH_X"), "peak_rss_mib": own_peak_rss_mib()}}))

        def fail(args):
            print("stdout before failing")
            print("the reason it failed", file=sys.stderr)
            sys.exit(3)

        def silent(args):
            print("no json here")

        dispatch_child({{"alloc": alloc, "fail": fail, "silent": silent}}, sys.argv[2:4])
        """)
    )
    return path


def test_result_wall_env_and_the_childs_own_peak_rss(
    child_mod: ModuleType, script: Path, tmp_path: Path
) -> None:
    small = child_mod.run_child(script, "alloc", {"mib": 1})
    big = child_mod.run_child(script, "alloc", {"mib": 200}, env={"BENCH_X": "yes", "PATH": "/usr/bin:/bin"})
    assert small.result["seconds"] == 0.5 and small.result["env"] is None and big.result["env"] == "yes"
    assert small.wall_s > 0
    assert big.peak_rss_mib - small.peak_rss_mib > 150, (small, big)
    assert small.peak_rss_mib < 200, "a child reports its own peak, not an inherited one"


def test_failure_names_the_kind_code_and_log_tail(
    child_mod: ModuleType, script: Path, tmp_path: Path
) -> None:
    log = tmp_path / "logs" / "fail.log"
    with pytest.raises(SystemExit, match=r"fail child failed with exit code 3; log .*fail\.log:\nthe reason"):
        child_mod.run_child(script, "fail", {}, stderr_log=log)
    with pytest.raises(SystemExit, match="exit code 3; stdout before failing"):
        child_mod.run_child(script, "fail", {})
    with pytest.raises(SystemExit, match="silent child printed no JSON result last"):
        child_mod.run_child(script, "silent", {})
    with pytest.raises(SystemExit, match="bogus child failed with exit code 1"):
        child_mod.run_child(script, "bogus", {})
    with pytest.raises(SystemExit, match=r"unknown child 'bogus'; known: a, b"):
        child_mod.dispatch_child({"b": print, "a": print}, ["bogus", "{}"])
