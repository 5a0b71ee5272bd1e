"""Every command line starts fast: `--help` imports none of the heavy libraries (pandas, xarray, dask, pandera,
torch, transformers, DeepSpeed, the S3 stack); they are imported by the commands that use them.

The wall times (before and after, on the project's 2-core machine) are in docs/performance.md, "Start-up and
listings"."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = {"pandas", "pandera", "xarray", "dask", "zarr", "h5py", "pyarrow", "torch", "transformers", "deepspeed",
         "s3fs", "botocore", "aiobotocore", "matplotlib", "webdataset", "datasets"}  # fmt: skip

ENTRY_POINTS = [
    ("merra2_text_data.cli", "main", ["--help"]),
    ("merra2_text_data.cli", "main", ["build", "--help"]),
    ("merra2_text_data.cli", "main", ["versions", "--help"]),
    ("fusion_trainer.cli", "train_main", ["--help"]),
    ("fusion_trainer.cli", "eval_main", ["--help"]),
    ("fusion_trainer.cli", "generate_main", ["--help"]),
    ("fusion_trainer.cli", "base_main", ["--help"]),
    ("fusion_trainer.cli", "model_main", ["--help"]),
]


@pytest.mark.parametrize(("module", "entry", "args"), ENTRY_POINTS, ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_help_imports_no_heavy_library(module: str, entry: str, args: list[str]) -> None:
    code = (
        "import importlib, json, sys\n"
        f"sys.argv = ['prog', *{args!r}]\n"
        f"main = getattr(importlib.import_module({module!r}), {entry!r})\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "sys.stdout.flush()\n"
        "print(json.dumps(sorted({k.split('.')[0] for k in sys.modules})))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60)
    assert "Usage" in out.stdout
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert not loaded & HEAVY, f"{module}:{entry} {' '.join(args)} imports {sorted(loaded & HEAVY)}"
