"""The parts of the `merra2-text` command line that are not commands: logging set-up, the one-line error handling
(`one_line_errors`), how references are shown, and `inspect`'s map."""

from __future__ import annotations

import functools
import logging
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from climate_text_schema import ContractError

from .errors import ConfigError, Merra2TextError

F = TypeVar("F", bound=Callable[..., Any])


def setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(
        level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True
    )
    from climate_text_schema import quiet_session_teardown, redact_log_records

    redact_log_records()  # passwords in URLs never reach a log line
    quiet_session_teardown()  # an S3 session's teardown on another loop is not an error line


def _fail(message: str, code: int) -> None:
    from climate_text_schema import redact_credentials

    typer.echo(f"error: {redact_credentials(message)}", err=True)
    raise typer.Exit(code)


def _error_line(exc: Exception) -> tuple[str, int] | None:
    """The one-line message and exit code of an expected error (None: a bug, let the traceback show)."""
    from climate_text_schema import credentials_message

    missing = credentials_message(exc)  # botocore's NoCredentialsError and friends, here or as a cause
    if missing is not None:
        return missing, 1
    if isinstance(exc, ConfigError):
        return str(exc), 2
    if isinstance(exc, Merra2TextError | ContractError):
        return str(exc), 1
    if isinstance(exc, OSError):
        return f"{type(exc).__name__}: {exc}; check the path or URL and your permissions/credentials", 1
    return None


def one_line_errors(func: F) -> F:
    """Turn every expected error into one message on stderr and a non-zero exit code (2: usage, 1: failure)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            _fail("interrupted; rerun the same command to resume", 130)
        except Exception as exc:
            line = _error_line(exc)
            if line is None:
                raise
            _fail(*line)

    return wrapper  # type: ignore[return-value]


def stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


def display_ref(ref: str, out: str) -> str:
    """Show a local reference in the form the user wrote `--out` (./datasets/conus@v rather than an absolute path)."""
    if "://" in out:
        return ref
    root = str(Path(out).expanduser().resolve())
    if ref.startswith(root + "/"):
        return out.rstrip("/") + ref[len(root) :]
    return ref


def draw_sample(sample: dict[str, Any], variables: list[str], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    meta, array = sample["meta"], sample["climate"]
    field = array[:, 0].mean(axis=0)
    fig, ax = plt.subplots(figsize=(8, 6.5))
    lon = np.unwrap(np.deg2rad(np.asarray(meta.lon))) * 180 / np.pi
    mesh = ax.pcolormesh(lon, meta.lat, field, shading="nearest", cmap="RdYlBu_r")
    fig.colorbar(mesh, ax=ax, label=f"{variables[0]} window mean [{meta.units[0]}]")
    ax.set_xlabel("longitude (°E)")
    ax.set_ylabel("latitude (°N)")
    ax.set_title(f"{sample['key']}  {meta.time_start} .. {meta.time_end}", fontsize=9)
    fig.text(0.02, 0.01, textwrap.fill(sample["text"], 120), fontsize=7, va="bottom")
    fig.subplots_adjust(bottom=0.3)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
