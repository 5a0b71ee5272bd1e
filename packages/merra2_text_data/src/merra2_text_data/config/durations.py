"""Durations of windows, strides and time steps: `1h`, `6h`, `1d`, `2w` (a whole number of hours), parsed and
written back."""

from __future__ import annotations

import re

import pandas as pd

from merra2_text_data.errors import ConfigError

__all__ = ["HOUR", "check_time_step", "format_duration", "parse_duration"]

HOUR = pd.Timedelta(hours=1)

_DURATION_RE = re.compile(r"^\s*(\d+)\s*([hdw])\s*$", re.IGNORECASE)
_UNIT_HOURS = {"h": 1, "d": 24, "w": 168}


def parse_duration(text: str | pd.Timedelta) -> pd.Timedelta:
    """Parse a window, stride or time step such as `1h`, `3h`, `12h`, `1d`, `7d`, `2w` (a whole number of hours).

    Args:
        text: the duration text (or an already parsed Timedelta, checked the same way).

    Returns:
        The duration.

    Raises:
        ConfigError: not `<positive integer><h|d|w>`, naming the value.

    Examples:
        >>> parse_duration("3h")
        Timedelta('0 days 03:00:00')
    """
    if isinstance(text, pd.Timedelta):
        td = text
    else:
        match = _DURATION_RE.match(str(text))
        if not match:
            raise ConfigError(
                f"duration {text!r} is not understood; write a whole number of h, d or w: 1h, 3h, 1d, 7d"
            )
        td = pd.Timedelta(hours=int(match.group(1)) * _UNIT_HOURS[match.group(2).lower()])
    if td <= pd.Timedelta(0) or td % HOUR != pd.Timedelta(0):
        raise ConfigError(
            f"duration {text!r} must be a positive whole number of hours (the source is hourly)"
        )
    return td


def format_duration(td: pd.Timedelta) -> str:
    """The short text of a duration: `1d`, `6h` (inverse of `parse_duration`)."""
    hours = int(td / HOUR)
    return f"{hours // 24}d" if hours % 24 == 0 else f"{hours}h"


def check_time_step(window: str | pd.Timedelta, time_step: str | pd.Timedelta) -> pd.Timedelta:
    """Check that `time_step` (e.g. 1h, 3h, 1d) divides `window`; return the parsed time step.

    Raises:
        ConfigError: naming both values when the step is longer than the window or does not divide it.
    """
    w, s = parse_duration(window), parse_duration(time_step)
    if w % s != pd.Timedelta(0):
        raise ConfigError(
            f"--time-step {format_duration(s)} does not divide --window {format_duration(w)}; "
            "choose a time step such as 1h, 3h or 1d that divides the window"
        )
    return s
