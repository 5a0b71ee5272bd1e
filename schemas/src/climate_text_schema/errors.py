"""Errors of the shared contract. Every message names the offending value and the way out."""

from __future__ import annotations

import logging
import re

__all__ = [
    "quiet_session_teardown",
    "redact_credentials",
    "ContractError",
    "DatasetNotFoundError",
    "IndexValidationError",
    "ManifestError",
    "ReferenceError_",
    "SampleError",
    "SchemaVersionError",
]


class ContractError(Exception):
    """Base class: data or a reference does not satisfy the shared contract."""


class IndexValidationError(ContractError):
    """An index table failed the pandera schema; the message lists every failure (column, row, check, value)."""

    def __init__(self, message: str, failures: list[dict[str, object]]):
        super().__init__(message)
        self.failures = failures


class SampleError(ContractError):
    """One sample (climate array, text or metadata) breaks the sample contract."""


class ManifestError(ContractError):
    """A manifest.json is missing a field, has a wrong type, or is not JSON."""


class SchemaVersionError(ContractError):
    """A dataset was written with a schema version this reader does not support."""


class ReferenceError_(ContractError):  # trailing underscore: the builtin ReferenceError is another thing
    """A dataset reference string is malformed."""


class DatasetNotFoundError(ContractError):
    """A dataset reference resolves to nothing: no manifest, unknown tag or version."""


_URL_CREDENTIALS = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/@\s:'\"]*):[^/@\s'\"]*@")


def redact_credentials(text: str) -> str:
    """`text` with the password of every URL that embeds one (`s3://user:pw@host/...`, `https://user:pw@...`)
    replaced by `***`: what every error message, log line and RUN_DIR/config.yaml shows.

    Examples:
        >>> redact_credentials("cannot read s3://AKIA:secret@minio:9000/bucket/x")
        'cannot read s3://AKIA:***@minio:9000/bucket/x'
    """
    return _URL_CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)


class RedactingFormatter(logging.Formatter):
    """A log formatter that passes another formatter's line through `redact_credentials`."""

    def __init__(self, inner: logging.Formatter | None = None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        return redact_credentials(self.inner.format(record))


class _SessionTeardownNoise(logging.Filter):
    """asyncio's "Task exception was never retrieved" for an S3 client session that s3fs closes at garbage
    collection on another event loop ("... attached to a different loop"): teardown of a connection pool after the
    work is done or has failed, never a lost write (every write is awaited, and a version is committed only when its
    manifest is). Demoted to DEBUG, so a failing command's stderr is its one `error:` line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not (
            record.getMessage().startswith("Task exception was never retrieved")
            and isinstance(exc, RuntimeError)
            and "attached to a different loop" in str(exc)
        ):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger().isEnabledFor(logging.DEBUG)


def quiet_session_teardown() -> None:
    """Demote asyncio's reports of S3 sessions torn down on another loop to DEBUG (`_SessionTeardownNoise`); the
    command lines call it after configuring logging. Idempotent."""
    log = logging.getLogger("asyncio")
    if not any(isinstance(f, _SessionTeardownNoise) for f in log.filters):
        log.addFilter(_SessionTeardownNoise())


def redact_log_records() -> None:
    """Make every handler of the root logger write its lines through `redact_credentials` (the command lines call
    it after configuring logging): a URL's password never reaches a log line, at any level."""
    for handler in logging.getLogger().handlers:
        if not isinstance(handler.formatter, RedactingFormatter):
            handler.setFormatter(RedactingFormatter(handler.formatter))
