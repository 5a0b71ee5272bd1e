"""Caption token ids kept on disk between runs, and the batch call that makes them.

`TokenCache` is one `.npz` file per (dataset version, split, caption form, tokenizer fingerprint): the dataset version
is a content address, so the same captions always give the same file, and the tokenizer's fingerprint (its full
serialised state, or its vocabulary for a slow tokenizer, plus its class and EOS id) makes a file written for another
tokenizer unreachable rather than wrong. A file is written to a temporary name and renamed into place, so a reader
sees a whole file or none; a damaged or foreign file is ignored (logged) and rewritten. Nothing here can change a
batch: the ids are the tokenizer's own, only fetched instead of recomputed (tests/fusion_trainer/test_token_cache.py).

`batch_encoder` calls a fast tokenizer's Rust backend directly (`encode_batch`, no wrapper bookkeeping per call), but
only when that is the same call: the backend has no truncation or padding of its own configured; otherwise, and for
slow tokenizers, the wrapper's call.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["TokenCache", "batch_encoder", "tokenizer_fingerprint"]

logger = logging.getLogger(__name__)

FORMAT = 1
"""Bumped when the file layout changes (part of the file name)."""


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A sha256 of everything that decides a caption's ids: the backend's serialised state (fast tokenizers) or the
    vocabulary (slow ones), the class and the EOS id. Kept on the tokenizer object (serialising a 49k-token BPE takes
    tens of ms) next to the EOS id it was computed with."""
    memo = getattr(tokenizer, "_fusion_fingerprint", None)
    if memo is not None and memo[0] == tokenizer.eos_token_id:
        return str(memo[1])
    digest = _fingerprint(tokenizer)
    with contextlib.suppress(AttributeError):  # an object that takes no attributes: computed each time
        tokenizer._fusion_fingerprint = (tokenizer.eos_token_id, digest)
    return digest


def _fingerprint(tokenizer: Any) -> str:
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    h.update(repr(tokenizer.eos_token_id).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
        h.update(repr(getattr(tokenizer, "init_kwargs", {})).encode())
    return h.hexdigest()


def batch_encoder(tokenizer: Any) -> Callable[[list[str]], list[list[int]]]:
    """A function from texts to their ids without special tokens, as `tokenizer(texts, add_special_tokens=False)`."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None and backend.padding is None:

        def fast(texts: list[str]) -> list[list[int]]:
            return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]

        return fast

    def plain(texts: list[str]) -> list[list[int]]:
        return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    return plain


class TokenCache:
    """The on-disk token ids of one dataset version's split, for one caption form and tokenizer."""

    def __init__(
        self, folder: str | os.PathLike[str], version: str, split: str, caption: str, tokenizer: Any
    ) -> None:
        key = hashlib.sha256(
            f"{FORMAT}/{version}/{split}/{caption}/{tokenizer_fingerprint(tokenizer)}".encode()
        ).hexdigest()[:32]
        self.path = Path(folder).expanduser() / f"tokens-{version[:16]}-{split}-{key}.npz"
        self._saved = 0  # entries known to be on disk

    def load_into(self, cache: dict[str, np.ndarray], room: int) -> int:
        """Add the file's ids to `cache` while they fit in `room` bytes; returns the room left."""
        entries = self._read()
        for text, ids in entries.items():
            cost = ids.nbytes + len(text) + 200
            if cost > room:
                break
            cache.setdefault(text, ids)
            room -= cost
        self._saved = len(entries)
        if entries:
            logger.info("token cache: %d captions' ids from %s", len(entries), self.path)
        return room

    def save(self, cache: dict[str, np.ndarray]) -> None:
        """Write `cache` merged with the file (entries of other workers kept), if it holds anything new."""
        if len(cache) <= self._saved:
            return
        merged = {**self._read(), **cache}
        texts = list(merged)
        arrays = [merged[t] for t in texts]
        offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
        np.cumsum([len(a) for a in arrays], out=offsets[1:])
        encoded = [t.encode("utf-8") for t in texts]
        text_offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=text_offsets[1:])
        blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        ids = np.concatenate(arrays).astype(np.int32) if arrays else np.zeros(0, dtype=np.int32)
        tmp: str | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, ids=ids, offsets=offsets, texts=blob, text_offsets=text_offsets)
            os.replace(tmp, self.path)
        except OSError as exc:  # a cache: a full or read-only disk costs speed, never the run
            if tmp is not None:  # a partial file under a temporary name: each failed save left one more
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            logger.warning(
                "token cache: cannot write %s (%s); captions will be tokenised again", self.path, exc
            )
            return
        self._saved = len(merged)

    def _read(self) -> dict[str, np.ndarray]:
        if not self.path.exists():
            return {}
        try:
            with np.load(self.path, allow_pickle=False) as data:
                ids, offsets, blob, cuts = data["ids"], data["offsets"], data["texts"], data["text_offsets"]
            if len(cuts) != len(offsets) or int(offsets[-1]) != len(ids) or int(cuts[-1]) != len(blob):
                raise ValueError("inconsistent lengths")
            raw = blob.tobytes()
            texts = [raw[cuts[i] : cuts[i + 1]].decode("utf-8") for i in range(len(cuts) - 1)]
        except (OSError, ValueError, KeyError, UnicodeDecodeError, EOFError, zipfile.BadZipFile) as exc:
            logger.warning("token cache: ignoring unreadable %s (%s)", self.path, exc)
            return {}
        return {t: ids[offsets[i] : offsets[i + 1]] for i, t in enumerate(texts)}
