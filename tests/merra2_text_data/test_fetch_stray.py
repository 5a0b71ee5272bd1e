"""A granule folder holding files that are not granules: they are ignored, and a warning names them."""

from __future__ import annotations

import logging
from datetime import date
from pathlib import Path

import pytest
from merra2_text_data.source.fetch import find_granules


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")


def test_stray_files_are_named_in_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _touch(tmp_path / "MERRA2_400.tavg1_2d_slv_Nx.20190101.nc4")
    _touch(tmp_path / "2019" / "MERRA2_400.tavg1_2d_slv_Nx.20190102.nc4.part")  # an interrupted copy
    _touch(tmp_path / "notes.txt")
    _touch(tmp_path / ".DS_Store")  # hidden files are not worth a warning
    _touch(tmp_path / "MERRA2_400.tavg1_2d_rad_Nx.20190101.nc4")  # a granule of another collection: no warning
    with caplog.at_level(logging.WARNING, logger="merra2_text_data.source.fetch"):
        granules, missing = find_granules(tmp_path, ["M2T1NXSLV"], date(2019, 1, 1), date(2019, 1, 2))
    assert [g.file_name for g in granules] == ["MERRA2_400.tavg1_2d_slv_Nx.20190101.nc4"]
    assert missing == [date(2019, 1, 2)]
    [warning] = [r.getMessage() for r in caplog.records if "not MERRA-2 granules" in r.getMessage()]
    assert "2 file(s)" in warning
    assert "2019/MERRA2_400.tavg1_2d_slv_Nx.20190102.nc4.part" in warning and "notes.txt" in warning
    assert ".DS_Store" not in warning and "rad_Nx" not in warning


def test_a_clean_folder_warns_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _touch(tmp_path / "MERRA2_400.tavg1_2d_slv_Nx.20190101.nc4")
    with caplog.at_level(logging.WARNING, logger="merra2_text_data.source.fetch"):
        find_granules(tmp_path, ["M2T1NXSLV"], date(2019, 1, 1), date(2019, 1, 1))
    assert not caplog.records


def test_many_stray_files_are_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for i in range(13):
        _touch(tmp_path / f"extra-{i:02d}.csv")
    _touch(tmp_path / "MERRA2_400.tavg1_2d_slv_Nx.20190101.nc4")
    with caplog.at_level(logging.WARNING, logger="merra2_text_data.source.fetch"):
        find_granules(tmp_path, ["M2T1NXSLV"], date(2019, 1, 1), date(2019, 1, 1))
    [warning] = [r.getMessage() for r in caplog.records]
    assert "13 file(s)" in warning and "extra-09.csv and 3 more" in warning and "extra-10.csv" not in warning
