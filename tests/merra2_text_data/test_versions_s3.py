"""`merra2-text versions` on the real S3 protocol (moto): two listings and one concurrent round of GETs, whatever the
number of versions, and no HEAD per object (s3fs's `cat_file` asks for the size first)."""

from __future__ import annotations

import asyncio
import collections
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import s3fs
from merra2_text_data.store.versions import list_versions, tag

_spec = importlib.util.spec_from_file_location("_publish_helpers", Path(__file__).with_name("test_publish.py"))
assert _spec is not None and _spec.loader is not None
_helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_helpers)
publish_fake: Callable[..., str] = _helpers.publish_fake

LATENCY = 0.1
"""Seconds added to every S3 request, as a real store's round trip."""


def test_versions_lists_twice_and_reads_concurrently(s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    root = f"{s3_bucket}/merra2-text/conus"
    ids = [publish_fake(root, days=d) for d in (3, 4, 5, 6)]
    tag(f"{root}@latest", "paper")
    calls: collections.Counter[str] = collections.Counter()
    in_flight = {"now": 0, "max": 0}
    original = s3fs.S3FileSystem._call_s3

    async def slow_counting(self: s3fs.S3FileSystem, method: str, *args: Any, **kwargs: Any) -> Any:
        calls[method] += 1
        in_flight["now"] += 1
        in_flight["max"] = max(in_flight["max"], in_flight["now"])
        try:
            await asyncio.sleep(LATENCY)
            return await original(self, method, *args, **kwargs)
        finally:
            in_flight["now"] -= 1

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", slow_counting)
    s3fs.S3FileSystem.clear_instance_cache()
    versions = list_versions(root)
    assert sorted(v.id for v in versions) == sorted(ids)
    assert [v.tags for v in versions if v.tags] == [["latest", "paper"]]
    # 2 listings (tags/, versions/), one GET per tag and per manifest, no HEAD
    assert dict(calls) == {"list_objects_v2": 2, "get_object": 2 + 4}
    # sequential reads would take 8 round trips (12 with s3fs's HEADs); counted, not timed (a timed bound failed
    # under load): every GET was in flight at once
    assert in_flight["max"] == 6, "the tags and manifests are read in one concurrent round"
