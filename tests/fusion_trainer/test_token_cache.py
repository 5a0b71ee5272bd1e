"""Caption token ids on disk (`token_cache_dir`) and the backend batch call: the same batches as tokenising afresh, a
later stream reads the ids instead of tokenising, another tokenizer or dataset version never sees them, and a damaged
file is ignored."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fusion_trainer.data.stream import ClimateTextStream
from fusion_trainer.data.token_cache import TokenCache, batch_encoder, tokenizer_fingerprint

from .conftest import open_stream


def _epoch(stream: ClimateTextStream) -> list[dict[str, Any]]:
    it = iter(stream)
    return [next(it) for _ in range(stream.batches_per_epoch)]


def _stream(ref: str, tokenizer: Any, **kw: Any) -> ClimateTextStream:
    stream: ClimateTextStream = open_stream(ref, tokenizer, **{"seed": 3, **kw})
    return stream


def test_the_backend_call_equals_the_wrappers(tokenizer: Any) -> None:
    texts = ["Mean 2 m temperature -12.5 °C.", "Calm.", "", "A much longer caption " * 30]
    want = [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    assert batch_encoder(tokenizer)(texts) == want


@pytest.mark.parametrize("caption", ["full", "numbers"])
def test_a_later_stream_reads_the_ids_and_gives_the_same_batches(
    dataset_ref: str, tokenizer: Any, tmp_path: Path, caption: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = _epoch(_stream(dataset_ref, tokenizer, caption=caption))
    first = _stream(dataset_ref, tokenizer, caption=caption, token_cache_dir=tmp_path)
    assert not first._tokens, "nothing on disk yet"
    it = iter(first)
    got = [next(it) for _ in range(first.batches_per_epoch)]
    assert not list(tmp_path.glob("tokens-*.npz")), "written when the epoch's batches are done"
    next(it)  # into the next epoch
    files = list(tmp_path.glob("tokens-*.npz"))
    assert len(files) == 1
    later = _stream(dataset_ref, tokenizer, caption=caption, token_cache_dir=tmp_path)
    assert len(later._tokens) == 20, "every train caption's ids came from the file"

    def no_tokenising(texts: list[str]) -> list[list[int]]:
        raise AssertionError(f"tokenised {texts[:1]} again")

    monkeypatch.setattr(later, "_encode", no_tokenising)
    again = _epoch(later)
    for a, b, c in zip(plain, got, again, strict=True):
        for name in ("input_ids", "labels", "attention_mask"):
            assert torch.equal(a[name], b[name]) and torch.equal(a[name], c[name]), name


def test_another_tokenizer_or_version_gets_another_file(
    dataset_ref: str, tokenizer: Any, tmp_path: Path, make_dataset: Any
) -> None:
    import copy

    other = copy.deepcopy(tokenizer)
    other.eos_token = other.convert_ids_to_tokens(5)
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tokenizer)
    a = TokenCache(tmp_path, "v1", "train", "full", tokenizer)
    assert a.path != TokenCache(tmp_path, "v1", "train", "full", other).path
    assert a.path != TokenCache(tmp_path, "v2", "train", "full", tokenizer).path
    assert a.path != TokenCache(tmp_path, "v1", "train", "numbers", tokenizer).path
    assert a.path == TokenCache(tmp_path, "v1", "train", "full", copy.deepcopy(tokenizer)).path


def test_a_damaged_file_is_ignored_and_rewritten(tokenizer: Any, tmp_path: Path) -> None:
    cache = TokenCache(tmp_path, "v1", "train", "full", tokenizer)
    entries = {"a caption": np.array([5, 6, 2], dtype=np.int32), "another": np.array([7, 2], dtype=np.int32)}
    cache.save(entries)
    loaded: dict[str, np.ndarray] = {}
    TokenCache(tmp_path, "v1", "train", "full", tokenizer).load_into(loaded, 1 << 20)
    assert set(loaded) == set(entries) and all(np.array_equal(loaded[k], v) for k, v in entries.items())
    cache.path.write_bytes(cache.path.read_bytes()[:40])  # torn
    fresh: dict[str, np.ndarray] = {}
    again = TokenCache(tmp_path, "v1", "train", "full", tokenizer)
    assert again.load_into(fresh, 1 << 20) == 1 << 20 and not fresh
    again.save(entries)
    TokenCache(tmp_path, "v1", "train", "full", tokenizer).load_into(fresh, 1 << 20)
    assert set(fresh) == set(entries)
    small: dict[str, np.ndarray] = {}
    TokenCache(tmp_path, "v1", "train", "full", tokenizer).load_into(small, 230)
    assert len(small) == 1, "the room bounds what is loaded"


@pytest.mark.parametrize("fails", ["savez", "replace"])
def test_a_failed_save_leaves_no_temporary_file(
    tokenizer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fails: str
) -> None:
    """A full disk (np.savez) or a failed rename left a partial `.tokens-*.tmp` behind at every epoch's save."""
    import fusion_trainer.data.token_cache as token_cache

    def full_disk(fh: Any, *args: Any, **kw: Any) -> None:
        fh.write(b"PK partial")
        raise OSError(28, "No space left on device")

    def no_rename(src: Any, dst: Any) -> None:
        raise OSError(13, "Permission denied")

    if fails == "savez":
        monkeypatch.setattr(token_cache.np, "savez", full_disk)
    else:
        monkeypatch.setattr(token_cache.os, "replace", no_rename)
    cache = TokenCache(tmp_path, "v1", "train", "full", tokenizer)
    for epoch in range(3):
        cache.save({f"caption {epoch}": np.array([5, 2], dtype=np.int32)})
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "nothing written, nothing left"
