"""Reading one shard: its bytes read and hashed (`iter_shard`), checked whole against the manifest (size, sha256,
tar, sample count, member names) before any of its samples is handed out, and the local shard files a stream has
already hashed (`VerifiedShards`). Dealing shards to ranks and one rank's epoch are `shards.py`.

Speed (docs/performance.md, "Streaming at the floor"): the shard is read into one buffer and hashed in a thread as
its bytes arrive and while its tar is parsed in place (`tar_reader`); a sample's climate member is a view of the
shard's bytes (`shards.shuffle_samples` copies the ones that would keep a shard alive alone).
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import threading
from collections.abc import Generator
from typing import Any

from climate_text_schema import (
    CLIMATE_MEMBER,
    MAX_SHARD_BYTES,
    META_MEMBER,
    READ_SIZE,
    TEXT_MEMBER,
    OpenedDataset,
    SampleError,
    ShardInfo,
    check_sample_key,
    member_suffix_problem,
)
from fsspec.implementations.local import LocalFileSystem

from fusion_trainer.errors import DataError

from .samples import BadSampleHook, RawSample
from .tar_reader import tar_samples

__all__ = ["VerifiedShards", "iter_shard"]

_MEMBERS = (CLIMATE_MEMBER, TEXT_MEMBER, META_MEMBER)


def _group_problem(group: dict[str, Any], key: str, url: str) -> str | None:
    """Why a group of tar members is not a sample (a key that is a path, a missing member), or None."""
    try:
        check_sample_key(key, f"shard {url}")
    except SampleError as exc:
        return str(exc)
    for suffix in sorted(k for k in group if not k.startswith("__")):
        problem = member_suffix_problem(f"{key}.{suffix}", f"shard {url}")
        if problem is not None:  # the rule `merra2-text verify` applies: never silently left out
            return problem
    missing = [m for m in _MEMBERS if m not in group]
    if missing:
        return f"shard {url}: sample {key!r} lacks member(s) {', '.join(missing)}"
    return None


class VerifiedShards:
    """The local shard files one stream has hashed, each with its file identity (device, inode, size, modification
    and status-change times in ns): `iter_shard` does not hash such a file again while its identity is the same
    before and after the read as when it passed. The bytes of a later epoch then come from the page cache the hashed
    ones were read into, and any write to the file, even one that restores its modification time, changes its
    status-change time. Shards on an object store are hashed on every read (every read downloads them again).

    Re-hashing an unchanged 10 MB shard cost a fifth of a warm epoch (docs/performance.md, "Streaming")."""

    def __init__(self) -> None:
        self._identity: dict[tuple[str, str], tuple[int, ...]] = {}

    def unchanged(self, url: str, sha256: str, identity: tuple[int, ...] | None) -> bool:
        """Whether the file at `url` was hashed and found to be `sha256` with this very identity."""
        return identity is not None and self._identity.get((url, sha256)) == identity

    def record(self, url: str, sha256: str, identity: tuple[int, ...] | None) -> None:
        """`url` was just hashed and found to be `sha256`, its identity unchanged during the read."""
        if identity is not None:
            self._identity[(url, sha256)] = identity


class _Sha256(threading.Thread):
    """The sha256 of a buffer being filled, computed in a thread of its own: `ready(n)` says the first `n` bytes are
    in; the thread hashes whatever has arrived since its last pass in one call (hashlib releases the GIL over large
    buffers), so hashing overlaps the read and then the tar's parsing, and needs the GIL only between passes: a pass
    per chunk could wait a whole switch interval for it while the reader parses. `result()` waits for the end.
    Reading, checking and parsing a 10 MB local shard here: 10.2 -> about 7.5 ms (docs/performance.md,
    "Streaming"); on an object store the hash hides behind the download."""

    def __init__(self, buf: memoryview) -> None:
        super().__init__(name="shard-sha256", daemon=True)
        self._buf, self._ready, self._closed, self._hexdigest = buf, 0, False, ""
        self._cond = threading.Condition()
        self.start()

    def ready(self, n: int) -> None:
        with self._cond:
            self._ready = n
            self._cond.notify()

    def run(self) -> None:
        h, done = hashlib.sha256(), 0
        while True:
            with self._cond:
                while self._ready == done and not self._closed:
                    self._cond.wait()
                ready = self._ready
            if ready == done:  # closed, and everything hashed
                break
            h.update(self._buf[done:ready])
            done = ready
        self._hexdigest = h.hexdigest()

    def result(self) -> str:
        """The hex digest of the buffer's first `n` bytes, `n` from the last `ready(n)` (idempotent)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self.join()
        self._buf = memoryview(b"")  # the shard's bytes are no longer held here
        return self._hexdigest


def _identity(fh: Any) -> tuple[int, ...]:
    st = os.fstat(fh.fileno())
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def iter_shard(
    ds: OpenedDataset,
    shard: ShardInfo,
    verify: bool = True,
    on_bad: BadSampleHook | None = None,
    verified: VerifiedShards | None = None,
) -> Generator[RawSample, None, None]:
    """The samples of one shard, handed out only once the whole shard has passed its checks.

    The shard is read whole into memory (at most `MAX_SHARD_BYTES`, which the manifest contract and the builder
    enforce), its size and (if `verify`) sha256 are compared with the manifest, then its members are parsed and its
    sample count compared: no sample of a shard that fails a check is ever yielded, however early its reader stops
    (an evaluation pass, a cut epoch, `generate --limit`). Members are only read into memory, never extracted: a
    member named like a path (`../../x.txt`) is refused by name. The shard's bytes are parsed in place: a sample's
    climate member is a view of them (its text and metadata are `bytes`); the shuffle buffer copies the samples of an
    earlier shard that hold less than half of it (`shards.shuffle_samples`).

    Args:
        ds: the opened dataset.
        shard: one of its shards.
        verify: check the sha256 (size and sample count are always checked).
        on_bad: called for a sample whose key is a path or that lacks a member, which is then left out; None:
            raise.
        verified: with `verify`, the local files this reader has already hashed (`VerifiedShards`): one of them
            whose identity has not changed is not hashed again (its size and sample count still are checked).

    Raises:
        DataError: the shard is missing, unreadable, truncated or fails its checks; a bad sample without `on_bad`.
    """
    url = ds.url_of(shard.path)
    if (
        shard.bytes > MAX_SHARD_BYTES
    ):  # the manifest contract refuses it too; a ShardInfo built by hand may not
        raise DataError(
            f"shard {url}: {shard.bytes} bytes is over the contract's {MAX_SHARD_BYTES}; re-publish it"
        )
    digest: _Sha256 | None = None
    try:
        with ds.fs.open(ds.fs._strip_protocol(url), "rb") as fh:
            local = verify and verified is not None and isinstance(ds.fs, LocalFileSystem)
            before = _identity(fh) if local else None
            known = verified is not None and verified.unchanged(url, shard.sha256, before)
            buf = memoryview(bytearray(shard.bytes + 1))  # one byte more than listed: a longer object is caught too
            digest = _Sha256(buf) if verify and not known else None  # hashes as the bytes arrive
            data = _read_into(fh, buf, digest)
            identity = before if local and _identity(fh) == before else None
    except BaseException as exc:
        if digest is not None:  # never leave the hashing thread waiting
            digest.result()
        if isinstance(exc, FileNotFoundError):
            raise DataError(f"shard {url} listed in the manifest does not exist: re-publish the dataset") from exc
        if not isinstance(exc, OSError):
            raise
        raise DataError(f"shard {url} cannot be read ({type(exc).__name__}: {exc}); check the store") from exc
    del buf
    if verify and digest is None and identity is None:  # the file changed while it was read: hash what was read
        digest = _Sha256(data)
        digest.ready(len(data))
    try:
        samples = _parse_checked(shard, url, data, digest, identity, verified)
    finally:
        if digest is not None:
            digest.result()
    del data, digest
    yield from _hand_out(samples, shard, on_bad)


def _parse_checked(
    shard: ShardInfo,
    url: str,
    data: memoryview,
    digest: _Sha256 | None,
    identity: tuple[int, ...] | None,
    verified: VerifiedShards | None,
) -> list[tuple[RawSample, str | None]]:
    """The shard's samples, each with the reason it is bad (or None), once every check of the shard has passed.

    Raises:
        DataError: the size, the sha256 (`digest`), the tar or the sample count is not the manifest's.
    """
    if len(data) != shard.bytes:
        # a longer file is read to one byte past the listed size: all that is known is that it is longer
        size = f"more than {shard.bytes}" if len(data) > shard.bytes else str(len(data))
        raise DataError(
            f"shard {url} fails its checks ({size} bytes where the manifest lists {shard.bytes}): it is truncated "
            "or was altered"
        )
    parse_error: Exception | None = None
    samples: list[tuple[RawSample, str | None]] = []
    try:  # while the last bytes are hashed: parse the tar, check every sample's names (nothing is handed out yet)
        groups = tar_samples(data, url, limit=shard.bytes)
        for group in groups:
            key = str(group["__key__"])
            problem = _group_problem(group, key, url)
            members = (
                {}
                if problem is not None
                else {m: group[m] if m == CLIMATE_MEMBER else bytes(group[m]) for m in _MEMBERS}
            )
            samples.append((RawSample(key=key, shard=shard.path, members=members), problem))
    except (tarfile.TarError, OSError, ValueError, EOFError) as exc:
        parse_error = exc
    finally:
        hexdigest = None if digest is None else digest.result()
    if hexdigest is not None:
        if hexdigest != shard.sha256:
            raise DataError(
                f"shard {url} fails its checks (sha256 {hexdigest} where the manifest lists {shard.sha256}): it is "
                "truncated or was altered"
            )
        if verified is not None:
            verified.record(url, shard.sha256, identity)
    if parse_error is not None:
        raise DataError(
            f"shard {url} is truncated or corrupt ({type(parse_error).__name__}: {parse_error}); re-publish it"
        ) from parse_error
    if len(samples) != shard.samples:
        raise DataError(
            f"shard {url} fails its checks ({len(samples)} samples where the manifest lists {shard.samples}): it is "
            "truncated or was altered"
        )
    return samples


def _hand_out(
    samples: list[tuple[RawSample, str | None]], shard: ShardInfo, on_bad: BadSampleHook | None
) -> Generator[RawSample, None, None]:
    """Yield the good samples (a bad one raises, or goes to `on_bad`). Their climate members are views of the
    shard's bytes: the shuffle buffer (`shards.shuffle_samples`) copies those that would keep the shard alive alone;
    a reader that decodes and drops them (evaluation) copies nothing."""
    try:
        for i in range(len(samples)):
            raw, problem = samples[i]
            samples[i] = _HANDED_OUT  # this list no longer holds it
            if problem is not None:
                if on_bad is None:
                    raise DataError(problem)
                on_bad(shard.path, raw.key, problem)
                continue
            yield raw
    finally:  # an error (or a reader stopping early) leaves no view of the shard behind in this list
        samples.clear()


_HANDED_OUT: tuple[RawSample, str | None] = (RawSample(key="", shard="", members={}), None)


def _read_into(fh: Any, buf: memoryview, digest: _Sha256 | None = None) -> memoryview:
    """Fill `buf` from `fh` as far as it goes, in `READ_SIZE` reads (a store may return short reads); `digest` is
    told of each part as it arrives. Returns the part read."""
    readinto = getattr(fh, "readinto", None)
    n, limit = 0, len(buf)
    while n < limit:
        chunk = buf[n : min(n + READ_SIZE, limit)]
        if readinto is not None:
            k = readinto(chunk) or 0
        else:
            part = fh.read(len(chunk))
            k = len(part)
            chunk[:k] = part
        if k == 0:
            break
        n += k
        if digest is not None:
            digest.ready(n)
    return buf[:n]
