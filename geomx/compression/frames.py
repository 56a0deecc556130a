"""Payloads to bytes and back: one byte buffer plus a JSON-safe meta dict, validated on the way in."""
from __future__ import annotations

import numbers
from typing import Any, Mapping

import numpy as np

from geomx.compression.base import HALF_SCALE_LIMIT, Payload, half_scale

__all__ = ["META_KEYS", "from_frames", "to_frames"]

META_KEYS = ("kind", "nnz", "index_dtype", "value_dtype")
"""Keys of a frame's meta dict, all required; ``scale`` is the only other one, on a sparse frame with
float16 values."""

_VALUE_DTYPES = {
    "dense": ("float16", "float32", "float64"),
    "fp16": ("float16",),
    "sparse": ("float32", "float16"),
}
_INDEX_DTYPES = ("int32", "int64", "gap16")
_GAP_MAX = 0xFFFF
"""``gap16``: increasing indices as uint16 gaps (the first from 0), 2 bytes an index instead of 4; a
tensor's sparse payload at 1 % has gaps of about 100, so every gap but a rare one fits (a payload with
one that does not travels as int32/int64)."""


def _gaps(indices: np.ndarray) -> np.ndarray | None:
    """``indices`` as uint16 gaps (little-endian), or None if they decrease or a gap exceeds 65535."""
    if indices.size == 0:
        return None
    gaps = np.diff(indices.astype(np.int64), prepend=0)
    if gaps.min() < 0 or gaps.max() > _GAP_MAX:
        return None
    return gaps.astype("<u2")


def to_frames(payload: Payload) -> tuple[dict[str, Any], np.ndarray]:
    """Pack a payload into a meta dict and one byte buffer.

    The buffer holds the indices (sparse only), then the values, little-endian, with no
    padding; the meta dict says how to read it::

        {"kind": "sparse", "nnz": 3, "index_dtype": "int32", "value_dtype": "float32"}

    A sparse payload is packed as small as it goes without loss: increasing indices whose gaps fit
    16 bits as ``gap16``, and values that are float16 numbers times one power of two (what a codec
    with ``value_dtype`` float16 sends, :func:`geomx.compression.base.half_scale`) as ``float16``
    with ``"scale": s`` (the value is the float16 number times ``2**-s``). Values that need up to twice
    float16's bits (a sum of parties' float16 values) go as float16 pairs when that is exact and smaller:
    the index twice, the two halves adding up to the value when decoded.

    Parameters
    ----------
    payload : Payload

    Returns
    -------
    meta : dict
        JSON-serializable description (:data:`META_KEYS`).
    data : numpy.ndarray
        1-D uint8 buffer of ``nnz * (index itemsize + value itemsize)`` bytes; for dense and
        fp16 payloads a view of ``payload.values`` (no copy).

    Raises
    ------
    ValueError
        If the payload is inconsistent (kind, dtypes, lengths) with what :func:`from_frames`
        accepts.
    """
    values = np.ascontiguousarray(payload.values).reshape(-1)
    kind = payload.kind
    if kind not in _VALUE_DTYPES:
        raise ValueError(f"unknown payload kind {kind!r}")
    if values.dtype.name not in _VALUE_DTYPES[kind] or (kind == "sparse" and values.dtype != np.float32):
        raise ValueError(f"{kind} payload values must be {_VALUE_DTYPES[kind] if kind != 'sparse' else 'float32'}, "
                         f"got {values.dtype}")
    values = values.astype(values.dtype.newbyteorder("<"), copy=False)
    nnz = int(values.size)
    meta: dict[str, Any] = {"kind": kind, "nnz": nnz, "index_dtype": None,
                            "value_dtype": values.dtype.name}
    if kind != "sparse":
        if payload.indices is not None:
            raise ValueError(f"a {kind} payload carries no indices")
        return meta, values.view(np.uint8)
    if payload.indices is None:
        raise ValueError("a sparse payload needs indices")
    indices = np.ascontiguousarray(payload.indices).reshape(-1)
    if indices.dtype.name not in _INDEX_DTYPES:
        raise ValueError(f"sparse indices must be int32 or int64, got {indices.dtype}")
    if indices.size != nnz:
        raise ValueError(f"sparse payload has {indices.size} indices and {nnz} values")
    halves = _as_halves(indices, values)
    if halves is not None:
        meta["scale"], indices, values = halves
        meta["nnz"], meta["value_dtype"] = int(values.size), "float16"
    gaps = _gaps(indices)
    if gaps is not None:
        indices, meta["index_dtype"] = gaps, "gap16"
    else:
        indices = indices.astype(indices.dtype.newbyteorder("<"), copy=False)
        meta["index_dtype"] = indices.dtype.name
    data = np.empty(indices.nbytes + values.nbytes, dtype=np.uint8)
    data[: indices.nbytes] = indices.view(np.uint8)
    data[indices.nbytes:] = values.view(np.uint8)
    return meta, data


def _as_halves(indices: np.ndarray, values: np.ndarray) -> tuple[int, np.ndarray, np.ndarray] | None:
    """``(scale, indices, halves)``: ``values`` as float16 numbers at one power-of-two scale, each value
    that needs more bits as a pair (its index twice: decoding adds them), when that is exact and smaller
    than float32 values; else None.

    A codec's payload with ``value_dtype`` float16 needs no pair (its values are float16 numbers at one
    scale already). The global server's downlink sums the parties' float16 steps, so an entry several
    parties sent needs about twice float16's significand: it is the float16 rounding of the sum plus the
    rounding's error (which a float32 holds exactly); when the error is itself a float16 number at the
    same scale, the two travel in 4 bytes (8 with their gap16 indices) and every other entry in 2,
    against 4 for each value as float32. Exactness is checked by decoding the way :func:`from_frames`
    does."""
    found = half_scale(values, lossless=False)
    if found is None:
        return None
    scale, hi = found
    up, down = np.float32(2.0 ** scale), np.float32(2.0 ** -scale)
    hi32 = hi.astype(np.float32)
    lo = (values.astype(np.float32) * up - hi32).astype(np.float16)  # the rounding error, exact in float32
    second = lo != 0
    extra = int(np.count_nonzero(second))
    if extra and (2 * (values.size + extra) >= 4 * values.size or values.size + extra > int(indices.max()) + 1):
        return None  # no smaller than float32 values, or more entries than the tensor may have (from_frames)
    decoded = hi32 * down  # as from_frames and decode_payload: each half times 2**-scale, added in order
    if extra:
        decoded[second] += lo[second].astype(np.float32) * down
    if not np.array_equal(decoded, values):
        return None
    if not extra:
        return scale, indices, hi.astype("<f2", copy=False)
    counts = 1 + second
    first = np.cumsum(counts) - counts  # where each entry's first half goes
    halves = np.empty(values.size + extra, dtype="<f2")
    halves[first] = hi
    halves[first[second] + 1] = lo[second]
    return scale, np.repeat(indices, counts), halves


def _as_bytes(data: object) -> np.ndarray:
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8 or data.ndim != 1:
            raise ValueError(f"frame data must be a 1-D uint8 array, got {data.dtype} {data.shape}")
        return np.ascontiguousarray(data)
    if isinstance(data, (bytes, bytearray, memoryview)):
        return np.frombuffer(data, dtype=np.uint8)
    raise ValueError(f"frame data must be bytes or a uint8 array, got {type(data).__name__}")


def _read(data: np.ndarray, offset: int, count: int, dtype_name: str) -> np.ndarray:
    """``count`` little-endian ``dtype_name`` items at byte ``offset`` (copied when misaligned)."""
    dt = np.dtype(dtype_name).newbyteorder("<")
    raw = data[offset: offset + count * dt.itemsize]
    if raw.__array_interface__["data"][0] % dt.alignment:
        raw = raw.copy()
    arr = raw.view(dt)
    return arr if arr.dtype.isnative else arr.astype(arr.dtype.newbyteorder("="))


def from_frames(meta: Mapping[str, Any], data: object, size: int) -> Payload:
    """Unpack and validate a payload that came from the network (which is not trusted).

    Parameters
    ----------
    meta : Mapping
        The meta dict :func:`to_frames` made (after a JSON round trip).
    data : bytes, bytearray, memoryview or numpy.ndarray
        The byte buffer (uint8 when an array).
    size : int
        Number of elements of the tensor this payload is for, as the receiver knows it.

    Returns
    -------
    Payload
        Arrays are read-only views of ``data`` when it is aligned, copies otherwise; gap16 indices
        and float16 sparse values are decoded to int32 (int64 above 2**31 elements) and float32.

    Raises
    ------
    ValueError
        With a message saying what is wrong, if: ``meta`` is not a mapping with exactly
        :data:`META_KEYS`; ``kind`` is unknown; ``nnz`` is not an int in ``[0, size]`` (sparse)
        or not ``size`` (dense, fp16); a dtype is outside the whitelist for the kind (values:
        dense float16/32/64, fp16 float16, sparse float32 or float16 with an int ``scale`` within
        ``HALF_SCALE_LIMIT``; indices: int32/int64/gap16 for sparse, None otherwise); the byte
        length is not ``nnz * (index + value itemsize)``; or an index is outside ``[0, size)``.
        Indices may come in any order and repeat (they add up when decoded); only their range is
        checked.  Values are not checked for inf/NaN.
    """
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 0:
        raise ValueError(f"size must be an int >= 0, got {size!r}")
    size = int(size)
    if not isinstance(meta, Mapping):
        raise ValueError(f"frame meta must be a dict, got {type(meta).__name__}")
    missing = [k for k in META_KEYS if k not in meta]
    extra = sorted(str(k) for k in meta if k not in META_KEYS and k != "scale")
    if missing or extra:
        raise ValueError(f"frame meta must have exactly the keys {list(META_KEYS)} (and 'scale' with "
                         f"float16 sparse values); missing {missing}, unexpected {extra}")
    kind = meta["kind"]
    if not isinstance(kind, str) or kind not in _VALUE_DTYPES:
        raise ValueError(f"frame kind must be one of {sorted(_VALUE_DTYPES)}, got {kind!r}")
    nnz = meta["nnz"]
    if isinstance(nnz, bool) or not isinstance(nnz, numbers.Integral) or nnz < 0:
        raise ValueError(f"frame nnz must be an int >= 0, got {nnz!r}")
    nnz = int(nnz)
    value_dtype = meta["value_dtype"]
    if not isinstance(value_dtype, str) or value_dtype not in _VALUE_DTYPES[kind]:
        raise ValueError(f"{kind} frame value_dtype must be one of {_VALUE_DTYPES[kind]}, "
                         f"got {value_dtype!r}")
    index_dtype = meta["index_dtype"]
    scale = meta.get("scale")
    if (kind, value_dtype) == ("sparse", "float16"):
        if isinstance(scale, bool) or not isinstance(scale, numbers.Integral) or abs(scale) > HALF_SCALE_LIMIT:
            raise ValueError(f"a sparse frame with float16 values needs an int 'scale' in "
                             f"[-{HALF_SCALE_LIMIT}, {HALF_SCALE_LIMIT}], got {scale!r}")
    elif "scale" in meta:
        raise ValueError(f"'scale' belongs to sparse frames with float16 values, not {kind}/{value_dtype}")
    if kind == "sparse":
        if not isinstance(index_dtype, str) or index_dtype not in _INDEX_DTYPES:
            raise ValueError(f"sparse frame index_dtype must be one of {_INDEX_DTYPES}, "
                             f"got {index_dtype!r}")
        if nnz > size:
            raise ValueError(f"sparse frame has nnz={nnz} for a tensor of {size} elements")
        index_size = 2 if index_dtype == "gap16" else np.dtype(index_dtype).itemsize
    else:
        if index_dtype is not None:
            raise ValueError(f"{kind} frame index_dtype must be null, got {index_dtype!r}")
        if nnz != size:
            raise ValueError(f"{kind} frame has nnz={nnz} for a tensor of {size} elements")
        index_size = 0
    buf = _as_bytes(data)
    expected = nnz * (index_size + np.dtype(value_dtype).itemsize)
    if buf.size != expected:
        raise ValueError(f"{kind} frame with nnz={nnz} ({index_dtype}/{value_dtype}) needs "
                         f"{expected} bytes, got {buf.size}")
    if kind != "sparse":
        return Payload(kind, _read(buf, 0, nnz, value_dtype))
    if index_dtype == "gap16":
        indices = np.cumsum(_read(buf, 0, nnz, "uint16"), dtype=np.int64)  # increasing from the first gap
        if nnz and size <= np.iinfo(np.int32).max:
            indices = indices.astype(np.int32)
    else:
        indices = _read(buf, 0, nnz, index_dtype)
    values = _read(buf, nnz * index_size, nnz, value_dtype)
    if value_dtype == "float16":
        values = values.astype(np.float32) * np.float32(2.0 ** -int(scale))  # exact: a power of two
    if nnz:
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"sparse frame index {bad} is out of range for a tensor of "
                             f"{size} elements")
    return Payload("sparse", values, indices)
