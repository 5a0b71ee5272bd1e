"""Reading a version's objects from any fsspec store: plain WebDataset on `s3://` URLs, and one-line messages for
missing credentials.

`OpenedDataset.shard_urls` returns fsspec URLs (`s3://...`, `gs://...`). WebDataset opens URLs through its own
`gopen_schemes` table, which has no handler for `s3://`; `register_webdataset_fsspec()` adds one that opens them
with fsspec (and so with the same credentials and `AWS_ENDPOINT_URL` as every other reader here).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import fsspec

__all__ = ["OBJECT_STORE_PROTOCOLS", "credentials_message", "register_webdataset_fsspec"]

OBJECT_STORE_PROTOCOLS: tuple[str, ...] = ("s3", "gs", "gcs", "az", "abfs", "abfss")
"""The URL schemes `register_webdataset_fsspec` hands to fsspec by default (object stores with fsspec drivers)."""

_HINTS = {
    "botocore": (
        "S3",
        "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or ~/.aws/credentials), and "
        "AWS_ENDPOINT_URL for an S3-compatible store (MinIO, Ceph, R2)",
    ),
    "aiobotocore": (
        "S3",
        "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or ~/.aws/credentials), and "
        "AWS_ENDPOINT_URL for an S3-compatible store (MinIO, Ceph, R2)",
    ),
    "google": ("Google Cloud Storage", "run `gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS"),
    "azure": ("Azure Blob Storage", "set AZURE_STORAGE_CONNECTION_STRING, or AZURE_STORAGE_ACCOUNT_NAME and a key"),
}
_CREDENTIAL_ERRORS = frozenset(
    {
        "NoCredentialsError",
        "PartialCredentialsError",
        "CredentialRetrievalError",
        "NoAuthTokenError",
        "TokenRetrievalError",
        "SSOTokenLoadError",
        "UnauthorizedSSOTokenError",
        "DefaultCredentialsError",
        "RefreshError",
        "ClientAuthenticationError",
    }
)


def credentials_message(exc: BaseException) -> str | None:
    """A one-line message for an error that means "no (valid) credentials for the object store", else None.

    The error is recognised by its class name and package (botocore, google-auth, azure), here or anywhere in its
    chain of causes, so neither this package nor its callers import those libraries. The CLIs print the message
    as their one `error:` line instead of the library's traceback.

    Examples:
        >>> from botocore.exceptions import NoCredentialsError  # doctest: +SKIP
        >>> credentials_message(NoCredentialsError())  # doctest: +SKIP
        'no credentials for S3 (NoCredentialsError: Unable to locate credentials); set AWS_ACCESS_KEY_ID ...'
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        kind = type(current)
        package = kind.__module__.split(".", 1)[0]
        if kind.__name__ in _CREDENTIAL_ERRORS and package in _HINTS:
            store, hint = _HINTS[package]
            return f"no credentials for {store} ({kind.__name__}: {current}); {hint}, then rerun"
        current = current.__cause__ or current.__context__
    return None


def register_webdataset_fsspec(
    protocols: Iterable[str] = OBJECT_STORE_PROTOCOLS, storage_options: Mapping[str, Any] | None = None
) -> list[str]:
    """Let plain `webdataset` open `s3://` (and other object-store) URLs through fsspec.

    Adds a handler for each protocol to `webdataset.gopen_schemes` (process-wide; call it in every process that
    opens shards, e.g. in a DataLoader's `worker_init_fn` when workers are spawned). Credentials and endpoints
    come from the standard environment (`AWS_*`, `AWS_ENDPOINT_URL`) unless `storage_options` are given.

    Args:
        protocols: the URL schemes to route through fsspec (default: s3, gs, gcs, az, abfs, abfss).
        storage_options: passed to `fsspec.open` for every URL (e.g. `{"anon": True}` for a public bucket).

    Returns:
        The protocols registered.

    Raises:
        ImportError: webdataset is not installed (the message says what to install).

    Examples:
        >>> import webdataset as wds  # doctest: +SKIP
        >>> register_webdataset_fsspec()  # doctest: +SKIP
        >>> wds.WebDataset(open_dataset("s3://bucket/merra2-text/conus@latest").shard_urls("train"))  # doctest: +SKIP
    """
    try:
        import webdataset as wds
    except ImportError as exc:
        raise ImportError("register_webdataset_fsspec needs webdataset: pip install webdataset") from exc
    options = dict(storage_options or {})

    def gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> Any:
        return fsspec.open(url, mode, **options).open()

    names = [str(p) for p in protocols]
    for name in names:
        wds.gopen_schemes[name] = gopen_fsspec
    return names
