"""The stream's fast paths give exactly what the plain ones give: the tar member reader (against tarfile), the .npy
fast path (against np.load), and the batch builder with its token cache (against decode_sample + encode_texts +
collate)."""

from __future__ import annotations

import io
import tarfile
from typing import Any

import numpy as np
import pytest
import torch
from climate_text_schema import SampleError
from fusion_trainer.data.decode import _load_climate
from fusion_trainer.data.shard_reader import iter_shard
from fusion_trainer.data.stream import (
    DEFAULT_PROMPT,
    ClimateTextStream,
    collate,
    decode_sample,
    encode_sample,
    encode_texts,
    epoch_samples,
    open_shards,
    render_prompt,
)
from fusion_trainer.data.tar_reader import tar_members, tar_samples
from webdataset.tariterators import group_by_keys


def _archive(fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        entries: list[tuple[str, bytes | None]] = [
            ("a.climate.npy", b"x" * 700),
            ("a.txt", b""),
            ("dir/", None),
            ("__meta__", b"skip me"),
            ("k" * 120 + ".txt", b"long name " * 60),
            ("t\u00e9st-\u00fc.json", b"{}"),
            ("x" * 90 + "/" + "y" * 60 + ".txt", b"prefix"),
        ]
        for name, payload in entries:
            info = tarfile.TarInfo(name.rstrip("/"))
            if payload is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
                continue
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        link = tarfile.TarInfo("a.link")
        link.type, link.linkname = tarfile.SYMTYPE, "a.txt"
        tar.addfile(link)
    return buf.getvalue()


def _tarfile_members(data: bytes) -> list[tuple[str, bytes]]:
    out = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
        for info in tar:
            if info.isreg() and info.name != "__meta__":
                out.append((info.name, tar.extractfile(info).read()))  # type: ignore[union-attr]
    return out


def _ustar_archive() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, payload in (
            ("a.txt", b"one"),
            ("p" * 90 + "/" + "q" * 60 + ".txt", b"prefix field"),
            ("e.bin", b""),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_members_match_tarfile(fmt: int) -> None:
    """Regular files only (directories, links and webdataset's __meta__ skipped), long and non-ASCII names (GNU L,
    pax path), ustar's prefix field, empty members."""
    data = _ustar_archive() if fmt == tarfile.USTAR_FORMAT else _archive(fmt)
    got = list(tar_members(data, "mem://x.tar"))
    assert [(m["fname"], m["data"]) for m in got] == _tarfile_members(data)
    assert len(got) >= 3 and all(m["__url__"] == "mem://x.tar" for m in got)


def test_tar_members_refuse_damage() -> None:
    data = bytearray(_ustar_archive())
    with pytest.raises(EOFError):
        list(tar_members(bytes(data[:700]), "x"))  # cut inside the second member
    with pytest.raises(EOFError):
        list(tar_members(bytes(data[: 512 * 2]), "x"))  # no end-of-archive blocks
    data[3] ^= 0x20  # a name byte: the header checksum no longer matches
    with pytest.raises(tarfile.HeaderError, match="checksum"):
        next(tar_members(bytes(data), "x"))  # not even the first member is handed out
    with pytest.raises(tarfile.HeaderError):
        list(tar_members(b"not a tar at all" * 64, "x"))
    huge = bytearray(_ustar_archive())
    huge[124:136] = b"77777777777\0"  # a size of 8 GiB in the first header, checksum fixed up
    huge[148:156] = b"        "
    huge[148:156] = b"%06o\0 " % sum(huge[:512])
    with pytest.raises(tarfile.HeaderError, match="out of bounds"):
        list(tar_members(bytes(huge), "x", limit=len(huge)))
    assert [m["fname"] for m in tar_members(_ustar_archive(), "x", limit=10_240)][0] == "a.txt"


def _named_archive(names: list[str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i, name in enumerate(names):
            payload = f"{i}:{name}".encode()
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


@pytest.mark.parametrize(
    "names",
    [
        ["a.climate.npy", "a.txt", "a.json", "b.climate.npy", "b.TXT", "b.json"],  # suffixes lower-cased
        ["a.txt", "noext", "a.json", "dir/c.d.e", ".hidden", "a.txt"],  # no suffix skipped; a key seen again later
        ["x/y.z/w.txt", "x/y.z/w.json", "k" * 120 + ".txt", "k" * 120 + ".json", "t\u00e9st.txt"],
    ],
)
def test_tar_samples_group_like_webdataset(names: list[str]) -> None:
    data = _named_archive(names)
    expected = list(group_by_keys(tar_members(data, "mem://x.tar")))
    assert tar_samples(data, "mem://x.tar") == expected
    assert len(expected) >= 2


def test_tar_samples_refuse_a_duplicate_member() -> None:
    data = _named_archive(["a.txt", "a.json", "a.txt"])
    with pytest.raises(ValueError, match="duplicate file name"):
        tar_samples(data, "x")
    with pytest.raises(ValueError, match="duplicate file name"):
        list(group_by_keys(tar_members(data, "x")))


def test_a_bad_checksum_is_found_in_any_header() -> None:
    """The checksums are checked after the walk, all at once: a damaged last header is caught as surely as the
    first, and nothing is handed out."""
    data = bytearray(_named_archive(["a.txt", "a.json", "b.txt", "b.json"]))
    last = 512 * 6  # the fourth member: each is one header block and one data block
    assert data[last + 156 : last + 157] == b"0"
    data[last + 5] ^= 0x01
    with pytest.raises(tarfile.HeaderError, match="checksum"):
        tar_samples(bytes(data), "x")


@pytest.mark.parametrize(
    "array",
    [
        np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5),
        np.ones((24, 11, 16, 16), dtype=np.float32),
        np.zeros((1, 1, 1, 1), dtype=np.float32),
    ],
)
def test_npy_fast_path_equals_np_load(array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array)
    got = _load_climate(buf.getvalue(), "k")
    assert got.dtype == np.float32 and got.shape == array.shape and np.array_equal(got, array)


@pytest.mark.parametrize(
    "array",
    [
        np.ones((2, 3, 4), dtype=np.float32),  # 3-D
        np.ones((2, 3, 4, 5), dtype=np.float64),
        np.asfortranarray(np.arange(120, dtype=np.float32).reshape(2, 3, 4, 5)),
        np.ones((2, 3, 4, 5), dtype=">f4"),
    ],
)
def test_other_arrays_take_the_contract_path(array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array)
    got = _load_climate(buf.getvalue(), "k")
    assert np.array_equal(got, np.load(io.BytesIO(buf.getvalue())))
    assert got.dtype == array.dtype and got.shape == array.shape


def test_npy_fast_path_refuses_truncation_and_pickles() -> None:
    buf = io.BytesIO()
    np.save(buf, np.ones((2, 3, 4, 5), dtype=np.float32))
    with pytest.raises(SampleError):
        _load_climate(
            buf.getvalue()[:-4], "k"
        )  # the header's shape no longer fits: the contract path refuses it
    evil = io.BytesIO()
    np.save(evil, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(SampleError, match="not a plain numeric"):
        _load_climate(evil.getvalue(), "k")


@pytest.mark.parametrize("cache_mb", [64.0, 0.0])
def test_stream_batches_equal_the_plain_functions(dataset_ref: str, tokenizer: Any, cache_mb: float) -> None:
    ds = open_shards(dataset_ref)
    stream = ClimateTextStream(
        ds, "train", tokenizer, prompt=render_prompt(DEFAULT_PROMPT, ds), micro_batch=3, max_length=256, seed=2,
        token_cache_mb=cache_mb,
    )  # fmt: skip
    loader = iter(stream)
    raws = {
        r.key: r
        for epoch in range(2)
        for r in epoch_samples(ds, "train", epoch=epoch, rank=0, world=1, seed=2, shuffle=True)
    }
    for _ in range(2 * stream.batches_per_epoch):  # two epochs: the second one from the cache, if on
        batch = next(loader)
        samples = [decode_sample(raws[k], ds) for k in batch["keys"]]
        want = collate(
            samples, encode_texts([s.text for s in samples], stream.prompt_ids, tokenizer, 256), stream.pad_id
        )
        for name in ("climate_x", "input_ids", "labels", "attention_mask"):
            assert batch[name].dtype == want[name].dtype and torch.equal(batch[name], want[name]), name
    assert bool(stream._tokens) == (cache_mb > 0)


@pytest.mark.parametrize("bad", [None, float("nan"), 1e15])
def test_a_batch_decodes_as_its_samples_do(dataset_ref: str, bad: float | None) -> None:
    """`decode_batch` (one stack, one min/max pair, one normalisation) gives `decode_sample`'s values and stats bit
    for bit; a NaN or fill value in one sample names that sample, as sample by sample."""
    from dataclasses import replace

    from fusion_trainer.data.decode import decode_batch, norm_arrays
    from fusion_trainer.errors import DataError

    ds = open_shards(dataset_ref)
    raws = list(epoch_samples(ds, "train", epoch=0, rank=0, world=1, seed=0, shuffle=False))[:4]
    if bad is not None:
        array = _load_climate(raws[2].members["climate.npy"], raws[2].key).copy()
        array[0, 0, 0, 0] = bad
        buf = io.BytesIO()
        np.save(buf, array)
        raws[2] = replace(raws[2], members={**raws[2].members, "climate.npy": buf.getvalue()})
        with pytest.raises(DataError, match=f"sample '{raws[2].key}' breaks the contract"):
            decode_batch(raws, ds, norm_arrays(ds))
        with pytest.raises(DataError, match=f"sample '{raws[2].key}' breaks the contract"):
            decode_sample(raws[2], ds)
        return
    samples, climate = decode_batch(raws, ds, norm_arrays(ds))
    want = [decode_sample(r, ds) for r in raws]
    assert np.array_equal(climate, np.stack([w.climate_x for w in want]))
    assert climate.dtype == np.float32 and climate.shape[0] == 4
    for got, one in zip(samples, want, strict=True):
        assert (got.key, got.text) == (one.key, one.text)
        assert got.stats is not None and one.stats is not None and np.array_equal(got.stats, one.stats)


def test_decode_batch_fallbacks(dataset_ref: str) -> None:
    """Already-decoded samples (`skip_bad_samples`) keep their values; `stats=False` leaves stats out; samples of two
    array shapes get `stack_climate`'s error."""
    from dataclasses import replace

    from fusion_trainer.data.decode import decode_batch, norm_arrays
    from fusion_trainer.errors import DataError

    ds = open_shards(dataset_ref)
    raws = list(epoch_samples(ds, "train", epoch=0, rank=0, world=1, seed=0, shuffle=False))[:3]
    norm = norm_arrays(ds)
    plain, climate = decode_batch(raws, ds, norm)
    decoded = [replace(r, members={}, decoded=decode_sample(r, ds)) for r in raws]
    again, climate_again = decode_batch(decoded, ds, norm)
    assert np.array_equal(climate, climate_again) and [s.key for s in again] == [s.key for s in plain]
    no_stats, _ = decode_batch(raws, ds, norm, stats=False)
    assert all(s.stats is None for s in no_stats) and all(s.stats is not None for s in plain)
    small = _load_climate(raws[1].members["climate.npy"], raws[1].key)[:, :, :-1].copy()
    buf = io.BytesIO()
    np.save(buf, small)
    mixed = [raws[0], replace(raws[1], members={**raws[1].members, "climate.npy": buf.getvalue()})]
    with pytest.raises(DataError, match="one batch needs one climate shape|shape"):
        decode_batch(mixed, ds, norm)


def test_samples_left_in_the_shuffle_buffer_do_not_keep_their_shard(dataset_ref: str) -> None:
    """A shard is parsed in place (a sample's climate member is a view of the shard's bytes). Once the reader has
    moved on to the next shard, the few samples of the earlier one still in the buffer get copies of their own, so
    they do not keep its whole buffer alive; a buffer holding most of a shard keeps the views. The order, and what
    the samples decode to, are the same either way."""
    import itertools
    import random

    from fusion_trainer.data.shards import shuffle_samples

    ds = open_shards(dataset_ref)
    first, second = sorted(ds.shards("train"), key=lambda s: -s.samples)[:2]
    assert first.samples >= 3 and second.samples >= 3
    read = list(iter_shard(ds, first))
    assert all(isinstance(r.members["climate.npy"], memoryview) for r in read)
    assert all(type(r.members[m]) is bytes for r in read for m in ("txt", "json"))
    want = {r.key: decode_sample(r, ds).climate_x for r in [*read, *iter_shard(ds, second)]}

    def both() -> Any:
        return itertools.chain(iter_shard(ds, first), iter_shard(ds, second))

    out, second_started = [], False
    for raw in shuffle_samples(both(), 2, random.Random(0)):  # one sample of the first shard left behind
        out.append((raw, second_started))
        second_started = second_started or raw.shard == second.path
    left_behind = [raw for raw, late in out if late and raw.shard == first.path]
    assert all(type(raw.members["climate.npy"]) is bytes for raw in left_behind)
    plain = [r.key for r in shuffle_samples(iter(list(both())), 2, random.Random(0))]
    assert [raw.key for raw, _ in out] == plain
    # every sample stays in the buffer: the first shard's are copied only if their arrays are under half its bytes
    whole = list(shuffle_samples(both(), 10_000, random.Random(0)))
    arrays = sum(len(r.members["climate.npy"]) for r in read)
    kind = memoryview if 2 * arrays >= first.bytes + 1 else bytes
    assert all(isinstance(r.members["climate.npy"], kind) for r in whole if r.shard == first.path)
    assert all(isinstance(r.members["climate.npy"], memoryview) for r in whole if r.shard == second.path)
    for raw in [*whole, *(r for r, _ in out)]:
        assert np.array_equal(decode_sample(raw, ds).climate_x, want[raw.key])


def test_encode_texts_equals_encode_sample_and_truncates(tokenizer: Any) -> None:
    texts = ["Mean 2 m temperature 12.5 °C.", "Calm.", "A much longer caption " * 20]
    prompt = [1, 2, 3]
    assert encode_texts(texts, prompt, tokenizer, 40) == [
        encode_sample(t, prompt, tokenizer, 40) for t in texts
    ]
    ids, labels = encode_texts(texts, prompt, tokenizer, 40)[2]
    assert len(ids) == len(labels) == 40 and labels[:3] == [-100] * 3 and ids[:3] == prompt
    assert encode_texts([], prompt, tokenizer, 40) == []


def test_a_caption_cut_at_max_length_is_named_once(
    dataset_ref: str, tokenizer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A max_length that leaves room for the prompt but not the whole caption trains only the caption's beginning:
    the stream says so (once), with the length that would fit; a max_length that fits says nothing."""
    ds = open_shards(dataset_ref)
    prompt = render_prompt(DEFAULT_PROMPT, ds)
    n_prompt = len(tokenizer(prompt)["input_ids"])
    for max_length, warned in ((n_prompt + 5, True), (4096, False)):
        caplog.clear()
        stream = ClimateTextStream(ds, "train", tokenizer, prompt=prompt, micro_batch=2, max_length=max_length,
                                   seed=0)  # fmt: skip
        loader = iter(stream)
        batches = [next(loader) for _ in range(3)]
        assert all(b["input_ids"].shape[1] <= max_length for b in batches)
        cut = [r.getMessage() for r in caplog.records if "cut at max_length" in r.getMessage()]
        assert len(cut) == (1 if warned else 0), cut
        if warned:
            assert f"cut at max_length {max_length}" in cut[0] and "raise max_length to at least" in cut[0]
