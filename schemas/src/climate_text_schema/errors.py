"""Errors of the shared contract. Every message names the offending value and the way out."""

from __future__ import annotations

import logging
import re

__all__ = [
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


def redact_log_records() -> None:
    """Make every handler of the root logger write its lines through `redact_credentials` (the command lines call
    it after configuring logging): a URL's password never reaches a log line, at any level."""
    for handler in logging.getLogger().handlers:
        if not isinstance(handler.formatter, RedactingFormatter):
            handler.setFormatter(RedactingFormatter(handler.formatter))
