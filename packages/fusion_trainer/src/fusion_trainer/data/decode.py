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
    check_climate_array,
    decode_climate,
    decode_meta,
    decode_text,
)

from fusion_trainer.errors import DataError
from fusion_trainer.model.encoder import STATS

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
    n_variables = len(ds.manifest.variables)
    try:
        array = _load_climate(raw.members[CLIMATE_MEMBER], raw.key)
        text = decode_text(bytes(raw.members[TEXT_MEMBER]), raw.key).strip()
        meta = decode_meta(bytes(raw.members[META_MEMBER]), raw.key) if META_MEMBER in raw.members else None
    except ContractError as exc:
        raise DataError(f"shard {raw.shard}: {exc}") from exc
    if meta is not None and meta.key != raw.key:
        raise DataError(f"shard {raw.shard}: sample {raw.key!r} carries the metadata of {meta.key!r}")
    limit = FILL_VALUE * 0.5
    plain = array.dtype == np.float32 and array.ndim == 4 and array.size and array.shape[1] == n_variables
    # min/max propagate NaN, so one pair of reductions clears the usual case; anything else gets the full check
    if not (plain and -limit < array.min() and array.max() < limit):
        problems = check_climate_array(array, n_variables)
        if problems:
            raise DataError(
                f"shard {raw.shard}: sample {raw.key!r} breaks the contract: {'; '.join(problems)}"
            )
    shape = ds.manifest.array_shape
    if shape is not None and list(array.shape) != shape:
        raise DataError(
            f"shard {raw.shard}: sample {raw.key!r} has a climate array of shape {tuple(array.shape)}, but the "
            f"manifest gives every sample {tuple(shape)}; the version is damaged: rebuild it"
        )
    mean, std = norm
    climate = np.subtract(array, mean, dtype=np.float32)
    climate /= std
    window_stats = _normalised_stats(meta.stats, ds, raw, norm) if stats and meta is not None else None
    return Sample(key=raw.key, shard=raw.shard, climate_x=climate, text=text, stats=window_stats)


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
