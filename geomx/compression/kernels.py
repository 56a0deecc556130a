"""Codec hot paths: compiled (geomx._compress) when built, numpy twins otherwise.

Each public function here has a numpy twin in :data:`reference` (``ref_<name>``) that gives
bit-identical results; the tests compare the two on random and adversarial inputs.
"""
from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np

from ..kernels import checked as _checked
from ..kernels import load_extension

__all__ = [
    "COMPILED",
    "dgc_accumulate",
    "first_nonfinite",
    "index_dtype",
    "reference",
    "sample_abs",
    "scatter_add",
    "select_above",
]

_log = logging.getLogger(__name__)

_FLOAT32_MAX = float(np.finfo(np.float32).max)
_U64 = np.uint64
# splitmix64 constants (Steele, Lea and Flood 2014), the same as in csrc/_compress.pyx.
_GOLDEN = _U64(0x9E3779B97F4A7C15)
_MIX1 = _U64(0xBF58476D1CE4E5B9)
_MIX2 = _U64(0x94D049BB133111EB)


def _check_f32(arr: np.ndarray, name: str) -> None:
    if arr.dtype != np.float32:
        raise TypeError(f"{name} must be float32, got {arr.dtype}")


def _check_disjoint(a: np.ndarray, a_name: str, b: np.ndarray, b_name: str) -> None:
    p = a.__array_interface__["data"][0]
    q = b.__array_interface__["data"][0]
    if p < q + b.nbytes and q < p + a.nbytes:
        raise ValueError(f"{a_name} and {b_name} overlap; pass disjoint arrays")


def ref_index_dtype(n: int) -> np.dtype:
    """Index dtype for a tensor of ``n`` elements.

    Parameters
    ----------
    n : int
        Number of elements.

    Returns
    -------
    numpy.dtype
        int32 when every index fits (``n <= 2**31 - 1``), int64 otherwise.
    """
    return np.dtype(np.int32) if n <= 2147483647 else np.dtype(np.int64)


def ref_first_nonfinite(src: np.ndarray) -> int:
    """Index of the first inf or NaN in a float32 array.

    Parameters
    ----------
    src : numpy.ndarray
        1-D float32 array.

    Returns
    -------
    int
        The first index holding inf or NaN, or -1 when every value is finite.
    """
    _checked(src, "src")
    _check_f32(src, "src")
    bad = np.flatnonzero(~np.isfinite(src))
    return int(bad[0]) if bad.size else -1


def ref_select_above(src: np.ndarray, thr: float, max_k: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The first ``max_k`` entries, in index order, whose magnitude reaches ``thr``.

    Parameters
    ----------
    src : numpy.ndarray
        1-D float32 array, every value finite.
    thr : float
        Finite threshold >= 0, rounded to float32; an entry qualifies when ``|src[i]| >= thr``
        (so ``thr = 0`` takes every entry, zeros included).
    max_k : int
        Most entries returned (>= 0); the buffers never hold more, whatever ``src`` holds.

    Returns
    -------
    indices : numpy.ndarray
        Increasing positions, int32 (int64 from 2**31 elements).
    values : numpy.ndarray
        ``src[indices]`` as float32.
    total : int
        How many entries qualify in all (may exceed ``max_k``: ties, or a low threshold).

    Raises
    ------
    ValueError
        If ``thr`` is negative or not finite, ``max_k < 0``, or ``src`` holds inf/NaN (the
        message names the first one the scan meets).
    """
    _checked(src, "src")
    _check_f32(src, "src")
    t = np.float32(thr)
    if not (t >= 0 and t <= _FLOAT32_MAX):
        raise ValueError(f"thr must be a finite float >= 0, got {thr!r}")
    if max_k < 0:
        raise ValueError(f"max_k must be >= 0, got {max_k}")
    mag = np.abs(src)
    hits = np.flatnonzero(mag >= t)
    # inf/NaN: inf always passes the test; NaN fails it, so look for both explicitly.
    bad = np.flatnonzero(~np.isfinite(mag))
    if bad.size:
        first = int(bad[0])
        raise ValueError(f"non-finite value {float(src[first])!r} at index {first}; "
                         "the codec cannot select from inf/NaN")
    total = int(hits.size)
    hits = hits[: min(max_k, src.size)]
    return hits.astype(ref_index_dtype(src.size)), src[hits], total


def ref_dgc_accumulate(u: np.ndarray, v: np.ndarray, g: np.ndarray, momentum: float) -> None:
    """DGC momentum correction and accumulation in place, in float32.

    ``u = m*u + g`` then ``v = v + u``, each operation rounded to float32.

    Parameters
    ----------
    u : numpy.ndarray
        Velocity (1-D float32), updated in place.
    v : numpy.ndarray
        Accumulated velocity (1-D float32, same size), updated in place.
    g : numpy.ndarray
        Gradient (1-D float32, same size), read only.
    momentum : float
        Correction factor m, rounded to float32.

    Raises
    ------
    ValueError
        On a size mismatch, overlapping arrays, or an inf/NaN in ``g`` (named; ``u`` and ``v``
        are then left untouched).
    """
    for arr, name, w in ((u, "u", True), (v, "v", True), (g, "g", False)):
        _checked(arr, name, writable=w)
        _check_f32(arr, name)
    if u.size != g.size or v.size != g.size:
        raise ValueError(f"size mismatch: u has {u.size}, v has {v.size}, g has {g.size} elements")
    _check_disjoint(u, "u", v, "v")
    _check_disjoint(u, "u", g, "g")
    _check_disjoint(v, "v", g, "g")
    bad = ref_first_nonfinite(g)
    if bad >= 0:
        raise ValueError(f"non-finite gradient value {float(g[bad])!r} at index {bad}")
    with np.errstate(over="ignore"):  # overflow to inf is reported by the selection
        np.multiply(u, np.float32(momentum), out=u)
        np.add(u, g, out=u)
        np.add(v, u, out=v)


def ref_sample_positions(n: int, count: int, seed: int, block: int = 8) -> np.ndarray:
    """The positions :func:`sample_abs` reads.

    Run b (b = 0, 1, ...) starts at ``((splitmix64(seed, b+1) >> 32) * n) >> 32`` and covers
    ``block`` consecutive positions, wrapping at ``n``; the first ``count`` positions are read.

    Parameters
    ----------
    n : int
        Tensor size, ``0 < n < 2**32``.
    count : int
        Number of positions.
    seed : int
        Stream seed (taken modulo 2**64).
    block : int, optional
        Run length (default 8, i.e. 32 bytes: one cache miss per run rather than per entry).

    Returns
    -------
    numpy.ndarray
        ``count`` uint64 positions, each in ``[0, n)`` (repeats possible).
    """
    runs = -(-count // block)
    z = _U64(int(seed) & 0xFFFFFFFFFFFFFFFF) + np.arange(1, runs + 1, dtype=_U64) * _GOLDEN
    z = (z ^ (z >> _U64(30))) * _MIX1
    z = (z ^ (z >> _U64(27))) * _MIX2
    z = z ^ (z >> _U64(31))
    starts = ((z >> _U64(32)) * _U64(n)) >> _U64(32)
    pos = (starts[:, None] + np.arange(block, dtype=_U64)[None, :]) % _U64(n)
    return pos.reshape(-1)[:count]


def ref_sample_abs(src: np.ndarray, count: int, seed: int, block: int = 8) -> np.ndarray:
    """Magnitudes of ``count`` pseudo-random entries of ``src``, read in runs (positions may repeat).

    Parameters
    ----------
    src : numpy.ndarray
        1-D float32 array with ``0 < size < 2**32``.
    count : int
        Sample size (>= 0).
    seed : int
        Seed of the splitmix64 stream that picks the runs (see :func:`ref_sample_positions`);
        the same seed reads the same positions. Every entry is equally likely to be read.
    block : int, optional
        Run length (>= 1, default 8).

    Returns
    -------
    numpy.ndarray
        float32 ``|src[pos]|`` (the sign bit cleared, so NaN stays NaN).

    Raises
    ------
    ValueError
        If ``src`` is empty or has 2**32 elements or more, ``count < 0`` or ``block < 1``.
    """
    _checked(src, "src")
    _check_f32(src, "src")
    if src.size == 0 or src.size >= 2**32:
        raise ValueError(f"sample_abs needs 0 < size < 2**32, got {src.size}")
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    return np.abs(src[ref_sample_positions(src.size, count, seed, block)])


def _check_scatter(dst: np.ndarray, indices: np.ndarray, values: np.ndarray) -> None:
    _checked(dst, "dst", writable=True)
    _checked(indices, "indices")
    _checked(values, "values")
    _check_f32(dst, "dst")
    _check_f32(values, "values")
    if indices.size != values.size:
        raise ValueError(f"size mismatch: {indices.size} indices, {values.size} values")
    _check_disjoint(dst, "dst", values, "values")
    _check_disjoint(dst, "dst", indices, "indices")
    if indices.dtype not in (np.int32, np.int64):
        raise TypeError(f"indices must be int32 or int64, got {indices.dtype}")
    bad = np.flatnonzero((indices < 0) | (indices >= dst.size))
    if bad.size:
        first = int(bad[0])
        raise ValueError(f"index {int(indices[first])} at position {first} is out of range "
                         f"for a tensor of {dst.size} elements")


def ref_scatter_add(dst: np.ndarray, indices: np.ndarray, values: np.ndarray) -> None:
    """``dst[indices[j]] += values[j]`` for every j, in order (``np.add.at`` semantics).

    Parameters
    ----------
    dst : numpy.ndarray
        1-D float32 accumulator, updated in place.
    indices : numpy.ndarray
        1-D int32 or int64 positions, in any order; duplicates add up.
    values : numpy.ndarray
        1-D float32 values, one per index.

    Raises
    ------
    TypeError
        On a wrong dtype.
    ValueError
        On a size mismatch, overlap, or any index outside ``[0, dst.size)`` (checked before
        anything is written).
    """
    _check_scatter(dst, indices, values)
    np.add.at(dst, indices, values)


reference = SimpleNamespace(
    ref_index_dtype=ref_index_dtype,
    ref_first_nonfinite=ref_first_nonfinite,
    ref_select_above=ref_select_above,
    ref_dgc_accumulate=ref_dgc_accumulate,
    ref_sample_abs=ref_sample_abs,
    ref_sample_positions=ref_sample_positions,
    ref_scatter_add=ref_scatter_add,
)
"""The numpy twins of the compiled codec kernels, for tests and for the fallback."""

_compress = load_extension("_compress", _log, "the codecs use the slower numpy kernels")

COMPILED: bool = _compress is not None
"""True when the compiled extension geomx._compress was imported."""

if _compress is not None:
    index_dtype = _compress.index_dtype
    first_nonfinite = _compress.first_nonfinite
    select_above = _compress.select_above
    dgc_accumulate = _compress.dgc_accumulate
    sample_abs = _compress.sample_abs
    scatter_add = _compress.scatter_add
else:
    index_dtype = ref_index_dtype
    first_nonfinite = ref_first_nonfinite
    select_above = ref_select_above
    dgc_accumulate = ref_dgc_accumulate
    sample_abs = ref_sample_abs
    scatter_add = ref_scatter_add
