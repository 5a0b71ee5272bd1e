"""Bad granules: each is a clear error naming the file, or the documented handling (ignore, pick 401, quarantine with
the reason), never a silent misread. Every build here runs through `merra2-text build` as a user would.

Preserved in every case: the source files are left as they are, nothing is published for a failed build (no manifest,
no tag), versions published before stay intact, and after the file is fixed the rerun gives the fault-free version.
"""

from __future__ import annotations

import datetime as dt
import faulthandler
import re
import shutil
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import pytest
from climate_text_schema import decode_climate, open_dataset
from merra2_text_data.regions import parse_region
from merra2_text_data.source.synth import write_synthetic_granules

from .conftest import BBOX, DATASET, START, build_args, cli, granule, read_members

DAY2, DAY3 = START + dt.timedelta(days=1), START + dt.timedelta(days=2)
_SCALE_ATTRS = ("CLASS", "NAME", "REFERENCE_LIST", "DIMENSION_LIST", "_Netcdf4Dimid", "_Netcdf4Coordinates")


def _nothing_published(out: Path) -> None:
    assert not list(out.glob(f"{DATASET}/versions/*/manifest.json")), (
        "a failed build must not commit a version"
    )
    assert not (out / DATASET / "tags").exists()


def _fails_naming(res: object, *needles: str) -> str:
    assert res.exit_code == 1, res.output  # type: ignore[attr-defined]
    err = res.stderr  # type: ignore[attr-defined]
    assert err.startswith("error: ") and "Traceback" not in res.output, err  # type: ignore[attr-defined]
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    return str(err)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _version(ref: str) -> str:
    return ref.strip().splitlines()[-1].rsplit("@", 1)[1]


def _samples(ref: str) -> dict[str, np.ndarray]:
    ds = open_dataset(ref)
    out = {}
    for shard in ds.manifest.shards:
        for name, data in read_members(Path(ds.url_of(shard.path))):
            if name.endswith(".climate.npy"):
                out[name.split(".", 1)[0]] = decode_climate(data)
    return out


def test_truncated_granule_names_the_file_and_keeps_published_versions(
    granules: Path, tmp_path: Path, reference_build: str
) -> None:
    out = tmp_path / "out"
    first = cli(*build_args(granules, out, end=START + dt.timedelta(days=3)))  # a version published earlier
    assert first.exit_code == 0, first.output
    victim = granule(granules, DAY2)
    good = victim.read_bytes()
    victim.write_bytes(good[: len(good) // 2])
    before = _snapshot(granules)
    res = cli(*build_args(granules, out))
    _fails_naming(res, victim.name, "truncated or corrupt", "download it again")
    assert _snapshot(granules) == before, "the build must not touch its sources"
    versions = list(out.glob(f"{DATASET}/versions/*/manifest.json"))
    assert [p.parent.name for p in versions] == [_version(first.stdout)], "only the earlier version exists"
    assert open_dataset(f"{out / DATASET}@latest").version == _version(first.stdout)
    assert cli("verify", f"{out / DATASET}@latest").exit_code == 0

    victim.write_bytes(good)  # fixed: the rerun gives the fault-free version
    again = cli(*build_args(granules, out))
    assert again.exit_code == 0, again.output
    assert _version(again.stdout) == _version(reference_build)


def _middle_chunk(path: Path) -> tuple[str, int, int]:
    """(variable, byte offset, size) of the stored chunk of a variable the build reads nearest the file's middle."""
    middle = path.stat().st_size // 2
    with h5py.File(path) as f:
        spans = [
            (name, int(info.byte_offset), int(info.size))
            for name in ("T2M", "U10M", "V10M")
            for info in (f[name].id.get_chunk_info(i) for i in range(f[name].id.get_num_chunks()))
        ]
    return min(spans, key=lambda span: abs(span[1] - middle))


def test_hdf5_corruption_in_the_middle_names_the_file(granules: Path, tmp_path: Path) -> None:
    victim = granule(granules, DAY2)
    _, offset, size = _middle_chunk(victim)
    data = bytearray(victim.read_bytes())
    assert 0.3 * len(data) < offset < 0.7 * len(data)
    for i in range(offset + size // 3, offset + size // 3 + 16):
        data[i] ^= 0xFF
    victim.write_bytes(bytes(data))
    res = cli(*build_args(granules, tmp_path / "out"))
    _fails_naming(res, victim.name, "truncated or corrupt")
    _nothing_published(tmp_path / "out")


def _offsets(data: bytes) -> list[int]:
    """Offsets to damage: every 2 KiB, across the global heap (variable-length attributes such as DIMENSION_LIST:
    damage there made HDF5 loop forever before the reader stopped reading those attributes) and in every B-tree
    node (the chunk index: damage there made HDF5 return fill values for a chunk before the reader checked that every
    chunk it reads is stored)."""
    offsets = set(range(0, len(data) - 16, 2048))
    for heap in re.finditer(b"GCOL", data):
        offsets |= set(range(heap.start(), min(heap.start() + 4096, len(data) - 16), 128))
    for node in re.finditer(b"TREE", data):
        offsets |= {node.start() + 8, node.start() + 24, node.start() + 40}
    return sorted(offsets)


def test_corruption_anywhere_is_an_error_or_changes_nothing(granule_source: Path, tmp_path: Path) -> None:
    """Sixteen bytes inverted at offsets across a whole granule: each read either fails naming the file or gives
    exactly the pristine values (the bytes were never used: free space, an unread variable). Never other values,
    never a hang (a hang ends the test process after two minutes, with the stack of the stuck read)."""
    from merra2_text_data.source.fetch import find_granules
    from merra2_text_data.source.subset import open_region

    folder = tmp_path / "g"
    folder.mkdir()
    for path in granule_source.glob(f"*.{DAY2:%Y%m%d}.nc4"):
        shutil.copy(path, folder)
    found, _ = find_granules(folder, ["M2T1NXSLV", "M2T1NXFLX"], DAY2, DAY2)
    region, names = parse_region(BBOX), ["T2M", "U10M", "V10M", "PRECTOTCORR"]

    def read() -> dict[str, np.ndarray]:
        cube = open_region(found, names, region, DAY2, DAY2).load()
        return {v: cube[v].values for v in names} | {"time": cube["time"].values}

    pristine = read()
    victim = granule(folder, DAY2)
    original = victim.read_bytes()
    outcomes = {"error": 0, "unchanged": 0}
    faulthandler.dump_traceback_later(120, exit=True)
    try:
        _sweep(victim, original, read, pristine, outcomes)
    finally:
        faulthandler.cancel_dump_traceback_later()
    assert outcomes["error"] > 10 and outcomes["unchanged"] > 10, outcomes


def _sweep(
    victim: Path, original: bytes, read: Any, pristine: dict[str, np.ndarray], outcomes: dict[str, int]
) -> None:
    from merra2_text_data.errors import GranuleError

    for offset in _offsets(original):
        data = bytearray(original)
        for i in range(offset, offset + 16):
            data[i] ^= 0xFF
        victim.write_bytes(bytes(data))
        try:
            values = read()
        except GranuleError as exc:
            assert victim.name in str(exc)
            outcomes["error"] += 1
            continue
        for key, expected in pristine.items():
            assert np.array_equal(values[key], expected, equal_nan=True), (
                f"bytes {offset}..{offset + 16} of {victim.name} changed {key} silently"
            )
        outcomes["unchanged"] += 1


def test_a_granule_of_another_collection_under_this_name_is_named(granules: Path, tmp_path: Path) -> None:
    slv = granule(granules, DAY2)
    shutil.copy(granule(granules, DAY2, "flx"), slv)  # an M2T1NXFLX file saved under the M2T1NXSLV name
    res = cli(*build_args(granules, tmp_path / "out"))
    _fails_naming(res, slv.name, "M2T1NXFLX", "M2T1NXSLV")
    _nothing_published(tmp_path / "out")


def test_files_of_other_collections_in_the_folder_are_ignored(
    granules: Path, tmp_path: Path, reference_build: str
) -> None:
    """A radiation granule and a constants file in the folder: never opened (their bytes are garbage here), and the
    version is the one built without them."""
    (granules / "MERRA2_400.tavg1_2d_rad_Nx.20190102.nc4").write_bytes(b"not even HDF5")
    (granules / "MERRA2_101.const_2d_asm_Nx.00000000.nc4").write_bytes(b"garbage")
    res = cli(*build_args(granules, tmp_path / "out"))
    assert res.exit_code == 0, res.output
    assert _version(res.stdout) == _version(reference_build)


def _quarantine(ref: str) -> pd.DataFrame:
    return pd.read_parquet(Path(open_dataset(ref).version_url) / "quarantine.parquet")


@pytest.mark.parametrize("keep_fill_attribute", [True, False])
def test_an_all_fill_region_is_quarantined_with_the_reason(
    granules: Path, tmp_path: Path, reference_build: str, keep_fill_attribute: bool
) -> None:
    """T2M of one day is 1e15 over the whole region. With or without a _FillValue attribute declaring it, the sample
    is quarantined with the reason and every other sample is exactly the fault-free one."""
    with h5py.File(granule(granules, DAY3), "r+") as f:
        f["T2M"][...] = np.float32(1e15)
        if not keep_fill_attribute:
            for name in ("_FillValue", "missing_value", "fmissing_value"):
                if name in f["T2M"].attrs:
                    del f["T2M"].attrs[name]
    res = cli(*build_args(granules, tmp_path / "out"))
    assert res.exit_code == 0, res.output
    ref = res.stdout.strip().splitlines()[-1]
    key = f"{DATASET}-{DAY3:%Y%m%d}T0000"
    q = _quarantine(ref)
    assert list(q["key"]) == [key]
    reason = str(q["reason"].iloc[0])
    assert "fill" in reason.lower() and "1e15" in reason and "T2M" in reason, reason
    assert key in res.stderr and "quarantined" in res.stderr  # the user is told, not only the table
    ds = open_dataset(ref)
    assert ds.manifest.quarantined == 1 and key not in set(ds.read_index()["key"])
    assert cli("verify", ref).exit_code == 0
    good, clean = _samples(ref), _samples(reference_build)
    assert set(good) == set(clean) - {key}
    assert all(np.array_equal(good[k], clean[k]) for k in good)
    strict = cli(*build_args(granules, tmp_path / "strict", "--strict"))
    assert "fill" in _fails_naming(strict, key).lower()


@pytest.mark.parametrize("time_step", ["1h", "3h", "1d"])
def test_nan_patches_are_quarantined_never_averaged_away(
    granules: Path, tmp_path: Path, time_step: str
) -> None:
    day4 = START + dt.timedelta(days=3)
    with h5py.File(granule(granules, day4), "r+") as f:
        f["U10M"][5:7, 1:3, 1:3] = np.nan  # two hours of a 2 x 2 patch
    res = cli(*build_args(granules, tmp_path / "out", "--time-step", time_step))
    assert res.exit_code == 0, res.output
    q = _quarantine(res.stdout.strip().splitlines()[-1])
    assert list(q["key"]) == [f"{DATASET}-{day4:%Y%m%d}T0000"]
    assert "NaN" in q["reason"].iloc[0] and "U10M" in q["reason"].iloc[0]


def _rewrite_hours(path: Path, keep: np.ndarray, minutes: np.ndarray | None = None) -> None:
    """Rewrite a granule keeping the time steps `keep` (optionally with other time values), as a partial or damaged
    file would hold them."""
    tmp = path.with_suffix(".rewrite")
    with h5py.File(path) as src, h5py.File(tmp, "w") as dst:
        for key, value in src.attrs.items():
            dst.attrs[key] = value
        scales = {}
        for name in ("lon", "time", "lat"):
            values = src[name][:]
            if name == "time":
                values = (values[keep] if minutes is None else minutes).astype(values.dtype)
            dset = dst.create_dataset(name, data=values)
            dset.make_scale(name)
            for key, value in src[name].attrs.items():
                if key not in _SCALE_ATTRS:
                    dset.attrs[key] = value
            scales[name] = dset
        for name in src:
            if name in scales:
                continue
            dset = dst.create_dataset(name, data=src[name][keep], compression="gzip")
            for axis, dim in enumerate(("time", "lat", "lon")):
                dset.dims[axis].attach_scale(scales[dim])
            for key, value in src[name].attrs.items():
                if key not in _SCALE_ATTRS:
                    dset.attrs[key] = value
    tmp.replace(path)


def test_a_missing_hour_names_the_file_and_the_hour(granules: Path, tmp_path: Path) -> None:
    victim = granule(granules, DAY2)
    _rewrite_hours(victim, np.array([h for h in range(24) if h != 7]))
    res = cli(*build_args(granules, tmp_path / "out"))
    _fails_naming(res, victim.name, "23 step(s)", "missing 07:30")
    _nothing_published(tmp_path / "out")


def test_a_repeated_hour_names_the_file_and_the_hour(granules: Path, tmp_path: Path) -> None:
    victim = granule(granules, DAY2)
    minutes = np.arange(0, 1440, 60)
    minutes[8] = minutes[7]  # 07:30 twice, 08:30 missing: still 24 steps
    _rewrite_hours(victim, np.arange(24), minutes)
    res = cli(*build_args(granules, tmp_path / "out"))
    _fails_naming(res, victim.name, "missing 08:30", "repeated 07:30")


def test_streams_400_and_401_for_one_day_take_401_and_say_so(
    granules: Path, tmp_path: Path, reference_build: str
) -> None:
    """A reprocessed (401) file for day 2 next to the original (400): 401 is read, the log names both files, the
    manifest lists only 401 as a source."""
    other = tmp_path / "reprocessed"
    write_synthetic_granules(other, parse_region(BBOX), DAY2, DAY2, seed=99, collections=("M2T1NXSLV",))
    old = granule(granules, DAY2)
    new = granules / old.name.replace("MERRA2_400.", "MERRA2_401.")
    shutil.copy(granule(other, DAY2), new)
    res = cli(*build_args(granules, tmp_path / "out"))
    assert res.exit_code == 0, res.output
    assert (
        "WARNING" in res.stderr and f"using {new.name}" in res.stderr and f"ignoring {old.name}" in res.stderr
    )
    ref = res.stdout.strip().splitlines()[-1]
    files = {s.file for s in open_dataset(ref).manifest.sources}
    assert new.name in files and old.name not in files
    key = f"{DATASET}-{DAY2:%Y%m%d}T0000"
    t2m = _samples(ref)[key][:, 0]
    with h5py.File(new) as f:
        expected = f["T2M"][:]  # (time, lat, lon) over exactly the box's grid points
    assert np.array_equal(t2m, expected), "day 2 must come from the 401 file"
    assert not np.array_equal(_samples(reference_build)[key][:, 0], expected)


def test_name_and_contents_disagreeing_on_the_date_name_the_file(granules: Path, tmp_path: Path) -> None:
    victim = granule(granules, DAY3)
    shutil.copy(granule(granules, DAY2), victim)  # the file named ...0103 holds 2019-01-02
    res = cli(*build_args(granules, tmp_path / "out"))
    _fails_naming(res, victim.name, "its name says 2019-01-03", "2019-01-02T00:30")
    _nothing_published(tmp_path / "out")
