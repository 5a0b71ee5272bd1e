"""What the command lines share: logging set-up, and errors as one `error:` line (`fusion-train` in cli.py,
`fusion-eval` and `fusion-generate` in cli_eval.py run their bodies in `one_line_errors`)."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import typer
from climate_text_schema import ContractError

from .errors import FusionError

__all__ = ["fail", "fail_on_credentials", "one_line_errors", "setup_logging"]


def setup_logging(level: str) -> None:
    rank = int(os.environ.get("RANK", "0"))
    fmt = (
        "%(asctime)s %(levelname)s %(name)s: %(message)s"
        if rank == 0
        else f"[rank {rank}] %(levelname)s %(message)s"
    )
    logging.basicConfig(
        level=level.upper() if rank == 0 else "WARNING", format=fmt, stream=sys.stderr, force=True
    )
    from climate_text_schema import quiet_session_teardown, redact_log_records

    redact_log_records()  # passwords in URLs never reach a log line
    quiet_session_teardown()  # an S3 session's teardown on another loop is not an error line


def fail(exc: BaseException | str) -> typer.Exit:
    prefix = f"[rank {os.environ['RANK']}] " if os.environ.get("WORLD_SIZE", "1") != "1" else ""
    from climate_text_schema import redact_credentials

    typer.echo(f"{prefix}error: {redact_credentials(str(exc))}", err=True)
    return typer.Exit(1)


def fail_on_credentials(exc: Exception) -> typer.Exit:
    """One `error:` line for missing object-store credentials (botocore's NoCredentialsError, ...); re-raise
    anything else (a bug shows its traceback)."""
    from climate_text_schema import credentials_message

    message = credentials_message(exc)
    if message is None:
        raise exc
    return fail(message)


@contextmanager
def one_line_errors() -> Iterator[None]:
    """A command's body: its errors (FusionError, ContractError, missing object-store credentials) exit 1 with one
    `error:` line; `typer.Exit` passes; anything else shows its traceback."""
    try:
        yield
    except (FusionError, ContractError) as exc:
        raise fail(exc) from exc
    except typer.Exit:
        raise
    except Exception as exc:
        raise fail_on_credentials(exc) from exc
