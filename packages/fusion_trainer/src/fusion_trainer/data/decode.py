"""Decoding a sample: its members checked against the contract (no pickle), the climate normalised per variable
with the manifest's train statistics, and its `.json` window statistics normalised alike.

Speed (docs/performance.md, "Streaming"): `.npy` members in np.save's own float32 layout skip np.load's header
parser, and one min/max pair clears the contract's NaN/fill check.
"""

from __future__ import annotations

import logging
import math
import re

import numpy as np
from climate_text_schema import (
    CLIMATE_MEMBER,
    FILL_VALUE,
    META_MEMBER,
    TEXT_MEMBER,
    ContractError,
    OpenedDataset,
    SampleMeta,
    check_climate_array,
    decode_climate,
    decode_meta,
    decode_text,
)

from fusion_trainer.errors import DataError
from fusion_trainer.model.encoder import STATS

from .collate import stack_climate
from .samples import RawSample, Sample

__all__ = ["decode_sample"]

logger = logging.getLogger(__name__)


def decode_sample(raw: RawSample, ds: OpenedDataset) -> Sample:
    """Decode (allow_pickle=False), check against the contract and normalise `(x - mean) / std` per variable.

    The `.json` member, when present, must be the contract's metadata of this very key.

    Raises:
        DataError: the sample breaks the contract or the manifest lacks normalisation for a variable.
    """
    return decode_with_norm(raw, ds, norm_arrays(ds))


def norm_arrays(ds: OpenedDataset) -> tuple[np.ndarray, np.ndarray]:
    """The manifest's per-variable (mean, std), each shaped `(1, V, 1, 1)` float32."""
    manifest = ds.manifest
    names = manifest.variable_names
    missing = [v for v in names if v not in manifest.normalization]
    if missing:
        raise DataError(f"dataset {ds.version_url}: manifest has no normalization for {', '.join(missing)}")
    mean = np.array([manifest.normalization[v].mean for v in names], dtype=np.float32)[None, :, None, None]
    std = np.array([manifest.normalization[v].std for v in names], dtype=np.float32)[None, :, None, None]
    return mean, std


_NPY_HEADER = re.compile(
    rb"\{'descr': '<f4', 'fortran_order': False, 'shape': \((\d+), (\d+), (\d+), (\d+)\), \} *\n"
)
"""The header `np.save` writes for a C-order little-endian float32 4-D array (.npy format 1.0)."""


def _load_climate(data: bytes | memoryview, key: str) -> np.ndarray:
    """`decode_climate`, with a fast path for exactly what `np.save` writes for the contract's arrays.

    The fast path reads the raw float32 values after a header that matches `_NPY_HEADER` and a size that matches its
    shape (never unpickling anything); every other payload goes through the contract's `decode_climate`.
    """
    if data[:8] == b"\x93NUMPY\x01\x00":
        end = 10 + int.from_bytes(data[8:10], "little")
        match = _NPY_HEADER.fullmatch(data, 10, end)
        if match is not None:
            shape = tuple(int(g) for g in match.groups())
            count = math.prod(shape)
            if len(data) == end + 4 * count:
                return np.frombuffer(data, dtype="<f4", count=count, offset=end).reshape(shape)
    return decode_climate(bytes(data), key)


def decode_with_norm(
    raw: RawSample, ds: OpenedDataset, norm: tuple[np.ndarray, np.ndarray], stats: bool = True
) -> Sample:
    """`decode_sample` with the normalisation arrays given; `stats=False` leaves `Sample.stats` None (it costs about
    a tenth of a sample's decoding, and only the stats loss reads it)."""
    if raw.decoded is not None:
        return raw.decoded
    array, text, meta = _checked(raw, ds)
    mean, std = norm
    climate = np.subtract(array, mean, dtype=np.float32)
    climate /= std
    return _sample(raw, ds, norm, climate, text, meta if stats else None)


def decode_batch(
    raws: list[RawSample], ds: OpenedDataset, norm: tuple[np.ndarray, np.ndarray], stats: bool = True
) -> tuple[list[Sample], np.ndarray]:
    """`decode_with_norm` of each sample and their climate stacked `(B, T, V, H, W)` (`collate.stack_climate`), in
    one go: the raw arrays are stacked, checked for NaN and fill values with one min/max pair and normalised as one
    array, with the same float32 operation per element as sample by sample (the same values, tested), instead of one
    new array per sample stacked afterwards. A batch of samples already decoded takes the sample-by-sample path; one
    of several array shapes is checked and normalised sample by sample and gets `stack_climate`'s error."""
    if any(r.decoded is not None for r in raws):
        samples = [decode_with_norm(r, ds, norm, stats) for r in raws]
        return samples, stack_climate(samples)
    checked = [_checked(r, ds, values=False) for r in raws]
    arrays = [array for array, _, _ in checked]
    batch = np.stack(arrays) if len({a.shape for a in arrays}) == 1 else None
    if not (_clear(batch) if batch is not None else all(map(_clear, arrays))):  # the first bad sample is named
        for raw, array in zip(raws, arrays, strict=True):
            _check_values(raw, array, len(ds.manifest.variables))
    mean, std = norm
    if batch is not None:
        np.subtract(batch, mean, out=batch)
        batch /= std
    climates = list(batch) if batch is not None else [np.subtract(a, mean, dtype=np.float32) / std for a in arrays]
    samples = [
        _sample(raw, ds, norm, climate, text, meta if stats else None)
        for raw, climate, (_, text, meta) in zip(raws, climates, checked, strict=True)
    ]
    return samples, batch if batch is not None else stack_climate(samples)


def _clear(array: np.ndarray) -> bool:
    """No NaN and no fill value in `array`: min and max propagate NaN, so one pair of reductions tells."""
    limit = FILL_VALUE * 0.5
    return bool(-limit < array.min() and array.max() < limit)


def _sample(
    raw: RawSample,
    ds: OpenedDataset,
    norm: tuple[np.ndarray, np.ndarray],
    climate: np.ndarray,
    text: str,
    meta: SampleMeta | None,
) -> Sample:
    window_stats = _normalised_stats(meta.stats, ds, raw, norm) if meta is not None else None
    return Sample(key=raw.key, shard=raw.shard, climate_x=climate, text=text, stats=window_stats)


def _check_values(raw: RawSample, array: np.ndarray, n_variables: int) -> None:
    """The contract's full check of a decoded array (dtype, dims, NaN, fill values), raised as a DataError."""
    problems = check_climate_array(array, n_variables)
    if problems:
        raise DataError(f"shard {raw.shard}: sample {raw.key!r} breaks the contract: {'; '.join(problems)}")


def _checked(raw: RawSample, ds: OpenedDataset, values: bool = True) -> tuple[np.ndarray, str, SampleMeta | None]:
    """A sample's raw climate array, text and metadata, checked against the contract and the manifest (with
    `values=False` the NaN and fill-value check is left to the caller; a non-plain array is checked whole anyway)."""
    n_variables = len(ds.manifest.variables)
    try:
        array = _load_climate(raw.members[CLIMATE_MEMBER], raw.key)
        text = decode_text(bytes(raw.members[TEXT_MEMBER]), raw.key).strip()
        meta = decode_meta(bytes(raw.members[META_MEMBER]), raw.key) if META_MEMBER in raw.members else None
    except ContractError as exc:
        raise DataError(f"shard {raw.shard}: {exc}") from exc
    if meta is not None and meta.key != raw.key:
        raise DataError(f"shard {raw.shard}: sample {raw.key!r} carries the metadata of {meta.key!r}")
    plain = array.dtype == np.float32 and array.ndim == 4 and array.size and array.shape[1] == n_variables
    # one pair of reductions clears the usual case; anything else gets the full check
    if not (plain and (not values or _clear(array))):
        _check_values(raw, array, n_variables)
    shape = ds.manifest.array_shape
    if shape is not None and list(array.shape) != shape:
        raise DataError(
            f"shard {raw.shard}: sample {raw.key!r} has a climate array of shape {tuple(array.shape)}, but the "
            f"manifest gives every sample {tuple(shape)}; the version is damaged: rebuild it"
        )
    return array, text, meta


def _normalised_stats(
    stats: dict[str, dict[str, float]], ds: OpenedDataset, raw: RawSample, norm: tuple[np.ndarray, np.ndarray]
) -> np.ndarray:
    """The `.json` stats as `(V, 3)` float32 (mean, min, max per variable in manifest order), normalised."""
    try:
        values = [[stats[v][k] for k in STATS] for v in ds.manifest.variable_names]
    except KeyError as exc:
        raise DataError(
            f"shard {raw.shard}: sample {raw.key!r} has no {exc.args[0]!r} in its .json stats; the contract gives "
            f"{{variable: {{mean, min, max}}}} for every variable {ds.manifest.variable_names}"
        ) from exc
    mean, std = norm
    return (np.array(values, dtype=np.float32) - mean.reshape(-1, 1)) / std.reshape(-1, 1)
