"""Known MERRA-2 variables: units, collection and physical plausibility bounds.

The bounds are deliberately generous (they catch unit mistakes, fill values and corrupt data, not extremes): a sample
whose statistics fall outside them is quarantined by the builder and rejected by the index schema.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_VARIABLES", "FILL_VALUE", "KNOWN_VARIABLES", "VariableSpec", "variable_spec"]

FILL_VALUE = 1.0e15
"""MERRA-2 `_FillValue` (= missing_value = fmissing_value) of every float32 field."""


@dataclass(frozen=True)
class VariableSpec:
    """What the contract knows about one MERRA-2 variable."""

    name: str
    units: str
    long_name: str
    collection: str
    lower: float
    upper: float


def _v(name: str, units: str, long_name: str, collection: str, lower: float, upper: float) -> VariableSpec:
    return VariableSpec(name, units, long_name, collection, lower, upper)


_SLV = "M2T1NXSLV"
_FLX = "M2T1NXFLX"

KNOWN_VARIABLES: dict[str, VariableSpec] = {
    v.name: v
    for v in [
        _v("T2M", "K", "2-meter_air_temperature", _SLV, 170.0, 340.0),
        _v("T10M", "K", "10-meter_air_temperature", _SLV, 170.0, 340.0),
        _v("T2MDEW", "K", "dew_point_temperature_at_2_m", _SLV, 150.0, 320.0),
        _v("T2MWET", "K", "wet_bulb_temperature_at_2_m", _SLV, 150.0, 320.0),
        _v("TS", "K", "surface_skin_temperature", _SLV, 160.0, 360.0),
        _v("T850", "K", "air_temperature_at_850_hPa", _SLV, 190.0, 330.0),
        _v("T500", "K", "air_temperature_at_500_hPa", _SLV, 180.0, 300.0),
        _v("T250", "K", "air_temperature_at_250_hPa", _SLV, 170.0, 270.0),
        _v("QV2M", "kg kg-1", "2-meter_specific_humidity", _SLV, 0.0, 0.05),
        _v("QV10M", "kg kg-1", "10-meter_specific_humidity", _SLV, 0.0, 0.05),
        _v("U2M", "m s-1", "2-meter_eastward_wind", _SLV, -80.0, 80.0),
        _v("V2M", "m s-1", "2-meter_northward_wind", _SLV, -80.0, 80.0),
        _v("U10M", "m s-1", "10-meter_eastward_wind", _SLV, -100.0, 100.0),
        _v("V10M", "m s-1", "10-meter_northward_wind", _SLV, -100.0, 100.0),
        _v("U50M", "m s-1", "eastward_wind_at_50_meters", _SLV, -120.0, 120.0),
        _v("V50M", "m s-1", "northward_wind_at_50_meters", _SLV, -120.0, 120.0),
        _v("U850", "m s-1", "eastward_wind_at_850_hPa", _SLV, -150.0, 150.0),
        _v("V850", "m s-1", "northward_wind_at_850_hPa", _SLV, -150.0, 150.0),
        _v("U500", "m s-1", "eastward_wind_at_500_hPa", _SLV, -150.0, 150.0),
        _v("V500", "m s-1", "northward_wind_at_500_hPa", _SLV, -150.0, 150.0),
        _v("SLP", "Pa", "sea_level_pressure", _SLV, 85000.0, 110000.0),
        _v("PS", "Pa", "surface_pressure", _SLV, 40000.0, 110000.0),
        _v("TQV", "kg m-2", "total_precipitable_water_vapor", _SLV, 0.0, 100.0),
        _v("TQL", "kg m-2", "total_precipitable_liquid_water", _SLV, 0.0, 10.0),
        _v("TQI", "kg m-2", "total_precipitable_ice_water", _SLV, 0.0, 10.0),
        _v("TO3", "Dobsons", "total_column_ozone", _SLV, 50.0, 700.0),
        _v("H500", "m", "height_at_500_hPa", _SLV, 4000.0, 6500.0),
        _v("H850", "m", "height_at_850_hPa", _SLV, 500.0, 2000.0),
        _v("PRECTOTCORR", "kg m-2 s-1", "total_precipitation_bias_corrected", _FLX, 0.0, 0.1),
        _v("PRECTOT", "kg m-2 s-1", "total_precipitation", _FLX, 0.0, 0.1),
    ]
}

DEFAULT_VARIABLES: tuple[str, ...] = (
    "T2M", "T2MDEW", "QV2M", "U10M", "V10M", "SLP", "PS", "TQV", "TS", "T850", "PRECTOTCORR",
)  # fmt: skip
"""The builder's default variables: M2T1NXSLV's surface set plus M2T1NXFLX precipitation."""


def variable_spec(name: str) -> VariableSpec | None:
    """Return the known spec of a MERRA-2 variable, or None for one the contract has no bounds for."""
    return KNOWN_VARIABLES.get(name)
