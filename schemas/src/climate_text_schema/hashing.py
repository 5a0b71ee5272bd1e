"""One reader that hashes and counts the bytes of a shard as they stream past (writer's `verify` and trainer alike).

A manifest lists each shard's `bytes` and `sha256` (CONTRACT section 4); both packages re-read shards and compare.
`HashingReader` wraps any binary file object (a local file, an fsspec S3 file, ...) so that whatever parses the
stream (tarfile, webdataset) sees the same bytes while the digest and the count are taken on the way. Hash in large
reads: wrap it in `io.BufferedReader(reader, READ_SIZE)` (or call `buffered()`) so a parser's small reads (tarfile
reads 10 KiB records) become few large `readinto` calls, each hashed in one `update`.
"""

from __future__ import annotations

import hashlib
import io
import logging
from typing import Any, Protocol

__all__ = ["READ_SIZE", "HashingReader", "SupportsRead"]

logger = logging.getLogger(__name__)

READ_SIZE = 1 << 20
"""Bytes per read when hashing a stream (1 MiB: the per-call cost of reading and hashing is then negligible)."""


class SupportsRead(Protocol):
    """Anything with `read(size) -> bytes`: a file opened "rb", an fsspec file, a `BytesIO`."""

    def read(self, size: int = -1, /) -> bytes:
        """Up to `size` bytes; b"" at the end."""
        ...


class HashingReader(io.RawIOBase):
    """A read-only raw stream that hashes (sha256 by default) and counts every byte read through it.

    The wrapped file object is not closed by this reader; close it yourself (e.g. with `fs.open(...)` as a context).

    Args:
        raw: a binary file object opened for reading.
        algorithm: a `hashlib` algorithm name.

    Raises:
        ValueError: `algorithm` is not a hashlib algorithm.

    Examples:
        >>> reader = HashingReader(io.BytesIO(b"abc"))
        >>> reader.read(), reader.nbytes, reader.hexdigest()[:8]
        (b'abc', 3, 'ba7816bf')
    """

    def __init__(self, raw: SupportsRead, algorithm: str = "sha256") -> None:
        super().__init__()
        self._raw = raw
        self._hash = hashlib.new(algorithm)
        self.nbytes = 0
        """Bytes read from `raw` so far (those sitting in a wrapping buffer included)."""

    def readable(self) -> bool:
        """Always True: this is a read-only stream."""
        return True

    def readinto(self, buffer: Any) -> int:
        """Fill `buffer` from the wrapped file, hashing and counting what was read; 0 at the end of the file."""
        data = self._raw.read(len(buffer))
        if not data:
            return 0
        n = len(data)
        buffer[:n] = data
        self._hash.update(data)
        self.nbytes += n
        return n

    def hexdigest(self) -> str:
        """Hex digest of the bytes read so far."""
        return self._hash.hexdigest()

    def drain(self, size: int = READ_SIZE) -> None:
        """Read (hash and count) whatever is left of the wrapped file, `size` bytes at a time.

        Call it after a parser stopped early (a tar's end-of-archive blocks, padding) so that the digest and the count
        cover the whole object. Bytes held by a wrapping `io.BufferedReader` were already counted when it read them.
        """
        while True:
            data = self._raw.read(size)
            if not data:
                return
            self._hash.update(data)
            self.nbytes += len(data)

    def buffered(self, size: int = READ_SIZE) -> io.BufferedReader:
        """A buffered reader over this stream that reads (and hashes) `size` bytes at a time."""
        return io.BufferedReader(self, buffer_size=size)
