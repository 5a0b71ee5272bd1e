"""The pandera schema of index.parquet (CONTRACT section 3).

`validate_index` collects every failure (`lazy=True`) and raises one IndexValidationError whose message lists each
failure with its column, row (and key) and value.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import pandera.pandas as pa

from .errors import IndexValidationError
from .layout import SPLITS
from .variables import variable_spec

__all__ = [
    "BASE_COLUMNS",
    "STAT_SUFFIXES",
    "index_schema",
    "stat_columns",
    "validate_index",
    "variables_in_index",
]

BASE_COLUMNS: tuple[str, ...] = (
    "key", "split", "shard", "time_start", "time_end", "region",
    "lat_min", "lat_max", "lon_min", "lon_max", "text",
)  # fmt: skip
STAT_SUFFIXES: tuple[str, ...] = ("mean", "min", "max")

_MAX_LISTED = 50


def stat_columns(variable: str) -> list[str]:
    """`V_mean`, `V_min`, `V_max`."""
    return [f"{variable}_{s}" for s in STAT_SUFFIXES]


def variables_in_index(df: pd.DataFrame) -> list[str]:
    """The variables whose three stat columns are present in `df`, in column order."""
    cols = set(df.columns)
    return [
        c[: -len("_mean")] for c in df.columns if c.endswith("_mean") and set(stat_columns(c[:-5])) <= cols
    ]


def _stat_checks(variable: str) -> list[pa.Check]:
    checks = [
        pa.Check(lambda s: pd.Series(np.isfinite(s.to_numpy(dtype=float)), index=s.index), name="finite")
    ]
    spec = variable_spec(variable)
    if spec is not None:
        checks.append(
            pa.Check.in_range(spec.lower, spec.upper, name=f"plausible_{spec.units.replace(' ', '_')}")
        )
    return checks


def index_schema(variables: Sequence[str]) -> pa.DataFrameSchema:
    """The index schema for a dataset with these variables (extra columns are allowed)."""

    # Any resolution (pandas 3 defaults to microseconds), but always timezone-aware UTC.
    def ts() -> pa.Check:
        return pa.Check(
            lambda s: isinstance(s.dtype, pd.DatetimeTZDtype) and str(s.dtype.tz) == "UTC",
            name="utc_timestamp",
        )

    columns: dict[str, pa.Column] = {
        "key": pa.Column(str, pa.Check.str_matches(r"^[A-Za-z0-9_\-]+$", name="key_pattern"), unique=True),
        "split": pa.Column(str, pa.Check.isin(list(SPLITS), name="split_in_train_val_test")),
        "shard": pa.Column(
            str, pa.Check.str_matches(r"^shards/(train|val|test)-\d{6}\.tar$", name="shard_path")
        ),
        "time_start": pa.Column(checks=ts(), nullable=False),
        "time_end": pa.Column(checks=ts(), nullable=False),
        "region": pa.Column(str, pa.Check.str_length(min_value=1, name="non_empty")),
        "lat_min": pa.Column(float, pa.Check.in_range(-90.0, 90.0, name="lat_range")),
        "lat_max": pa.Column(float, pa.Check.in_range(-90.0, 90.0, name="lat_range")),
        "lon_min": pa.Column(float, pa.Check.in_range(-180.0, 180.0, name="lon_range")),
        "lon_max": pa.Column(float, pa.Check.in_range(-180.0, 180.0, name="lon_range")),
        "text": pa.Column(str, pa.Check(lambda s: s.str.strip().str.len() > 0, name="non_empty_text")),
    }
    for v in variables:
        for col in stat_columns(v):
            columns[col] = pa.Column(float, _stat_checks(v), nullable=False)
    checks = [
        pa.Check(lambda df: df["time_end"] > df["time_start"], name="time_end_after_time_start"),
        pa.Check(lambda df: df["lat_max"] >= df["lat_min"], name="lat_max_ge_lat_min"),
    ]
    for v in variables:
        mean, lo, hi = stat_columns(v)
        checks.append(
            pa.Check(
                lambda df, mean=mean, lo=lo, hi=hi: (
                    (df[lo] <= df[mean] + 1e-6 * df[mean].abs() + 1e-9)
                    & (df[mean] <= df[hi] + 1e-6 * df[mean].abs() + 1e-9)
                ),
                name=f"{v}_min_le_mean_le_max",
            )
        )
    return pa.DataFrameSchema(columns, checks=checks, strict=False, coerce=False, name="index.parquet")


def _describe(fc: pd.DataFrame, df: pd.DataFrame) -> list[dict[str, object]]:
    failures: list[dict[str, object]] = []
    keys = df["key"] if "key" in df.columns else None
    for rec in fc.to_dict("records"):
        row = rec.get("index")
        key = None
        if keys is not None and row is not None and not pd.isna(row) and row in keys.index:
            key = keys.loc[row]
        failures.append(
            {
                "column": rec.get("column") if rec.get("column") is not None else "(table)",
                "row": None if row is None or pd.isna(row) else row,
                "key": key,
                "check": str(rec.get("check")),
                "value": rec.get("failure_case"),
            }
        )
    return failures


def _format(failures: list[dict[str, object]], n_rows: int) -> str:
    lines = [f"index.parquet failed validation: {len(failures)} problem(s) in {n_rows} row(s)"]
    for f in failures[:_MAX_LISTED]:
        where = f"row {f['row']}" if f["row"] is not None else "table"
        if f["key"] is not None:
            where += f" (key {f['key']!r})"
        lines.append(f"  - column {f['column']!r}, {where}: check {f['check']} failed, value {f['value']!r}")
    if len(failures) > _MAX_LISTED:
        lines.append(f"  ... and {len(failures) - _MAX_LISTED} more")
    return "\n".join(lines)


def validate_index(df: pd.DataFrame, variables: Sequence[str] | None = None) -> pd.DataFrame:
    """Validate an index table, collecting every failure.

    Args:
        df: the index table.
        variables: the dataset's variables (default: those whose stat columns appear in `df`).

    Returns:
        The validated table.

    Raises:
        IndexValidationError: listing every failed check with column, row, key and value.
    """
    names = list(variables) if variables is not None else variables_in_index(df)
    schema = index_schema(names)
    try:
        return schema.validate(df, lazy=True)
    except pa.errors.SchemaErrors as exc:
        failures = _describe(exc.failure_cases, df)
        raise IndexValidationError(_format(failures, len(df)), failures) from exc
