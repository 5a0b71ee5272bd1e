"""The record of each source: the years a build may ask for (MERRA-2 from 1980, ERA5 from 1940).

`BuildConfig.from_dict` passes the source's record to the sections' validators as the validation context.
"""

from __future__ import annotations

from pydantic import ValidationInfo

__all__ = ["ERA5_FIRST_YEAR", "FIRST_YEAR", "record_of", "source_record"]

FIRST_YEAR = 1980
"""MERRA-2 starts on 1980-01-01."""
ERA5_FIRST_YEAR = 1940
"""ERA5 starts on 1940-01-01."""


def record_of(source: str) -> tuple[str, int]:
    """The name and first year of a source's record: ERA5's (1940) for `era5:URL`, else MERRA-2's (1980)."""
    from merra2_text_data.source.era5 import is_era5

    return ("ERA5", ERA5_FIRST_YEAR) if is_era5(str(source)) else ("MERRA-2", FIRST_YEAR)


def source_record(info: ValidationInfo) -> tuple[str, int]:
    """The record a validator checks against: the context's `record` (the build's source), else MERRA-2's (a
    section validated alone, an assignment after validation)."""
    name, first = (info.context or {}).get("record", ("MERRA-2", FIRST_YEAR))
    return str(name), int(first)
