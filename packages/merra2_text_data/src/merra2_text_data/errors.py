"""Errors of merra2_text_data. User mistakes (ConfigError) are kept apart from runtime failures.

Every message states what failed, the actual value, and the next step.
"""

from __future__ import annotations

__all__ = [
    "BuildError",
    "ConfigError",
    "CredentialsError",
    "GranuleError",
    "Merra2TextError",
    "MissingDataError",
    "PublishError",
    "SampleValidationError",
    "StoreError",
    "VerifyError",
]


class Merra2TextError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(Merra2TextError, ValueError):
    """The user asked for something invalid: unknown region, malformed bbox, years out of range, unknown variable,
    bad window/stride/time-step, a config file field of the wrong type. Raised before anything is read or written."""


class CredentialsError(Merra2TextError):
    """No usable NASA Earthdata credentials (the message lists the environment variables and ~/.netrc)."""


class GranuleError(Merra2TextError):
    """A granule cannot be used: truncated or corrupt file, wrong collection, unsupported variant, or its name and
    contents disagree. The message names the file."""


class MissingDataError(Merra2TextError):
    """Days or variables the build needs are absent from the source (the message lists them; `--allow-gaps` builds
    around missing days)."""


class SampleValidationError(Merra2TextError):
    """With `--strict`, a sample failed validation (without it the sample is quarantined instead)."""


class BuildError(Merra2TextError):
    """The build failed at run time for a reason that is not one of the above."""


class PublishError(Merra2TextError):
    """Writing, committing or tagging a version on the store failed; no manifest was written."""


class StoreError(PublishError, OSError):
    """A write to the dataset store failed after the client's retries (unreachable, throttling, timing out, refusing):
    the message names the object and says to rerun, which resumes. Also an OSError, as the store's own errors are."""


class VerifyError(Merra2TextError):
    """`verify` found mismatches (checksums, sample counts, schema); the message lists each one."""
