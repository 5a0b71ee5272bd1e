"""HashingReader: the one reader that hashes and counts a shard's bytes for both packages."""

from __future__ import annotations

import hashlib
import io
import tarfile

import pytest
from climate_text_schema import READ_SIZE, HashingReader


class _Chunky(io.RawIOBase):
    """A file object that returns at most `chunk` bytes per read and counts its read calls (as S3 files can)."""

    def __init__(self, data: bytes, chunk: int) -> None:
        super().__init__()
        self._data, self._pos, self._chunk, self.calls = data, 0, chunk, 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        self.calls += 1
        n = self._chunk if size is None or size < 0 else min(size, self._chunk)
        out = self._data[self._pos : self._pos + n]
        self._pos += len(out)
        return out


def _payload(n: int) -> bytes:
    return bytes((i * 7 + i // 251) % 256 for i in range(n))


@pytest.mark.parametrize("size", [0, 1, 4095, READ_SIZE + 17])
def test_digest_and_count_cover_every_byte_read(size: int) -> None:
    data = _payload(size)
    reader = HashingReader(io.BytesIO(data))
    assert reader.read() == data
    assert reader.nbytes == size
    assert reader.hexdigest() == hashlib.sha256(data).hexdigest()


def test_short_reads_of_the_wrapped_file_are_handled() -> None:
    data = _payload(10_000)
    reader = HashingReader(_Chunky(data, chunk=333))
    got = bytearray()
    while chunk := reader.read(1000):
        got += chunk
    assert bytes(got) == data and reader.nbytes == len(data)
    assert reader.hexdigest() == hashlib.sha256(data).hexdigest()


def test_drain_after_a_partial_read_covers_the_whole_object() -> None:
    data = _payload(3 * READ_SIZE // 2)
    reader = HashingReader(io.BytesIO(data))
    buffered = reader.buffered(4096)
    assert buffered.read(10) == data[:10]
    assert reader.nbytes == 4096, "the buffer's read was counted, not the 10 bytes handed out"
    reader.drain()
    assert reader.nbytes == len(data)
    assert reader.hexdigest() == hashlib.sha256(data).hexdigest()
    assert reader.read(1) == b"", "drained: nothing left"


def test_a_buffered_reader_turns_small_reads_into_large_hashed_reads() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(40):
            member = _payload(20_000 + i)
            info = tarfile.TarInfo(f"s{i:03d}.bin")
            info.size = len(member)
            tar.addfile(info, io.BytesIO(member))
    data = buf.getvalue()
    raw = _Chunky(data, chunk=READ_SIZE)
    reader = HashingReader(raw)
    with tarfile.open(fileobj=reader.buffered(), mode="r|") as tar:
        sizes = [len(tar.extractfile(m).read()) for m in tar]  # type: ignore[union-attr]
    reader.drain()
    assert sizes == [20_000 + i for i in range(40)]
    assert reader.nbytes == len(data) and reader.hexdigest() == hashlib.sha256(data).hexdigest()
    assert raw.calls <= len(data) // READ_SIZE + 3, f"{raw.calls} reads of the file for {len(data)} bytes"


def test_other_algorithms_and_unknown_ones() -> None:
    reader = HashingReader(io.BytesIO(b"abc"), algorithm="md5")
    reader.read()
    assert reader.hexdigest() == hashlib.md5(b"abc").hexdigest()
    with pytest.raises(ValueError):
        HashingReader(io.BytesIO(b""), algorithm="no-such-hash")
