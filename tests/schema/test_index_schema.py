"""The pandera schema of index.parquet: a valid index passes; each violation is named by column and row."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from climate_text_schema import IndexValidationError, validate_index

from .helpers import make_index


def test_valid_index_passes() -> None:
    df = make_index()
    out = validate_index(df)
    assert len(out) == len(df)


def _failures(df: pd.DataFrame) -> IndexValidationError:
    with pytest.raises(IndexValidationError) as info:
        validate_index(df)
    return info.value


def test_duplicate_key_names_column_and_rows() -> None:
    df = make_index()
    df.loc[2, "key"] = df.loc[1, "key"]
    err = _failures(df)
    assert "column 'key'" in str(err) and "row 2" in str(err)
    assert any(f["column"] == "key" and "unique" in str(f["check"]) for f in err.failures)


def test_bad_split() -> None:
    df = make_index()
    df.loc[1, "split"] = "validation"
    err = _failures(df)
    assert "column 'split', row 1" in str(err) and "'validation'" in str(err)


def test_nan_stat() -> None:
    df = make_index()
    df.loc[0, "U10M_mean"] = np.nan
    err = _failures(df)
    assert "column 'U10M_mean', row 0" in str(err)


def test_implausible_temperature() -> None:
    df = make_index()
    df.loc[3, "T2M_mean"] = 500.0
    df.loc[3, "T2M_max"] = 502.0
    err = _failures(df)
    text = str(err)
    assert "column 'T2M_mean', row 3" in text and "500.0" in text
    assert "key 'conus-20190103'" in text


def test_empty_text() -> None:
    df = make_index()
    df.loc[2, "text"] = "   "
    err = _failures(df)
    assert "column 'text', row 2" in str(err)


def test_time_end_before_time_start() -> None:
    df = make_index()
    df.loc[1, "time_end"] = df.loc[1, "time_start"] - pd.Timedelta(hours=1)
    err = _failures(df)
    assert any(f["check"] == "time_end_after_time_start" and f["row"] == 1 for f in err.failures)
    assert "time_end_after_time_start" in str(err) and "row 1" in str(err)


def test_all_failures_reported_at_once() -> None:
    df = make_index()
    df.loc[0, "split"] = "bogus"
    df.loc[1, "text"] = ""
    df.loc[2, "lat_min"] = -95.0
    err = _failures(df)
    columns = {f["column"] for f in err.failures}
    assert {"split", "text", "lat_min"} <= columns


def test_unknown_variable_gets_finiteness_only() -> None:
    df = make_index(variables=("T2M", "MYVAR"))
    df["MYVAR_mean"] = 1e6
    df["MYVAR_min"] = 1e6 - 1
    df["MYVAR_max"] = 1e6 + 1
    validate_index(df)
    df.loc[0, "MYVAR_mean"] = np.inf
    df.loc[0, "MYVAR_max"] = np.inf
    assert "MYVAR_mean" in str(_failures(df))


def test_missing_column_is_named() -> None:
    df = make_index().drop(columns=["region"])
    assert "region" in str(_failures(df))


def test_naive_timestamps_are_refused() -> None:
    df = make_index()
    df["time_start"] = df["time_start"].dt.tz_localize(None)
    err = _failures(df)
    assert any(f["column"] == "time_start" and f["check"] == "utc_timestamp" for f in err.failures)


def test_min_le_mean_le_max() -> None:
    df = make_index()
    df.loc[1, "U10M_min"] = df.loc[1, "U10M_mean"] + 1.0
    err = _failures(df)
    assert any(f["check"] == "U10M_min_le_mean_le_max" and f["row"] == 1 for f in err.failures)
