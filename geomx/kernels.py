"""Array hot paths of the parameter servers: compiled (geomx._kernels) when built, numpy otherwise."""
from __future__ import annotations

import importlib
import logging
from types import ModuleType, SimpleNamespace
from typing import Optional

import numpy as np

__all__ = [
    "accumulate",
    "COMPILED",
    "copy_into",
    "f16_to_f32",
    "f32_to_f16",
    "has_f16c",
    "reference",
    "scale_into",
    "sum_into",
]

_log = logging.getLogger(__name__)

_SUM_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def load_extension(name: str, log: logging.Logger, instead: str) -> Optional[ModuleType]:
    """The compiled extension ``geomx.<name>``, or None when it is not built.

    A missing extension is logged once, on ``log`` (the caller's logger), as a warning saying what runs
    ``instead`` and how to build it. Every compiled extension (``_kernels``, ``_compress``,
    ``_delivery``) is loaded through here.
    """
    try:
        return importlib.import_module(f"geomx.{name}")
    except ImportError as exc:
        log.warning("geomx.%s is not built (%s); %s. Build it with `pip install -e . --no-build-isolation`.",
                    name, exc, instead)
        return None


def checked(arr: object, name: str, writable: bool = False) -> np.ndarray:
    """Return ``arr`` after the same layout checks the compiled kernels make (both extensions' kernels).

    Parameters
    ----------
    arr : object
        Candidate array.
    name : str
        Argument name used in error messages.
    writable : bool, optional
        Whether the array is written to.

    Returns
    -------
    numpy.ndarray
        ``arr`` itself.

    Raises
    ------
    TypeError
        If ``arr`` is not an ndarray or has non-native byte order.
    ValueError
        If ``arr`` is not 1-D, C-contiguous and aligned, or is read-only while ``writable``.
    """
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(arr).__name__}")
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}; pass arr.ravel()")
    if not arr.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous; pass np.ascontiguousarray({name})")
    if not arr.flags.aligned:
        raise ValueError(f"{name} is not aligned to its dtype; pass a copy")
    if not arr.dtype.isnative:
        raise TypeError(f"{name} has non-native byte order ({arr.dtype.str})")
    if writable and not arr.flags.writeable:
        raise ValueError(f"{name} is read-only")
    return arr


def _check_dtype(arr: np.ndarray, name: str, dtype: type) -> None:
    """Raise TypeError unless ``arr`` has exactly ``dtype``."""
    if arr.dtype != dtype:
        raise TypeError(f"{name} must be {np.dtype(dtype)}, got {arr.dtype}")


def _check_same_size(dst: np.ndarray, src: np.ndarray) -> None:
    """Raise ValueError unless ``dst`` and ``src`` have the same number of elements."""
    if dst.size != src.size:
        raise ValueError(f"size mismatch: dst has {dst.size} elements, src has {src.size}")


def _check_overlap(dst: np.ndarray, src: np.ndarray, allow_same: bool) -> None:
    """Raise ValueError if ``dst`` overlaps ``src``, unless it is exactly ``src`` and ``allow_same``."""
    d = dst.__array_interface__["data"][0]
    s = src.__array_interface__["data"][0]
    if allow_same and d == s and dst.nbytes == src.nbytes:
        return
    if d < s + src.nbytes and s < d + dst.nbytes:
        if allow_same:
            raise ValueError("dst and src partially overlap; pass the same array or disjoint arrays")
        raise ValueError("dst and src overlap; pass disjoint arrays")


def ref_sum_into(dst: np.ndarray, src: np.ndarray) -> None:
    """Add ``src`` into ``dst`` in place with numpy.

    Parameters
    ----------
    dst : numpy.ndarray
        1-D float16, float32 or float64 accumulator, updated in place. float16 is added in
        float32 and rounded once, as numpy's float16 add does.
    src : numpy.ndarray
        Array of the same dtype and size; may be ``dst`` itself.

    Raises
    ------
    TypeError
        On a dtype mismatch or an unsupported dtype.
    ValueError
        On a size mismatch, a bad layout or partial overlap.
    """
    checked(dst, "dst", writable=True)
    checked(src, "src")
    if dst.dtype != src.dtype:
        raise TypeError(f"dtype mismatch: dst is {dst.dtype}, src is {src.dtype}")
    _check_same_size(dst, src)
    _check_overlap(dst, src, allow_same=True)
    if dst.dtype not in _SUM_DTYPES:
        raise TypeError(f"sum_into supports float16, float32 and float64, got {dst.dtype}")
    np.add(dst, src, out=dst)


def ref_copy_into(dst: np.ndarray, src: np.ndarray) -> None:
    """Copy ``src`` into ``dst`` with numpy.

    Parameters
    ----------
    dst : numpy.ndarray
        1-D destination, written in place.
    src : numpy.ndarray
        Array of the same (non-object) dtype and size.

    Raises
    ------
    TypeError
        On a dtype mismatch or an object dtype.
    ValueError
        On a size mismatch or a bad layout.
    """
    checked(dst, "dst", writable=True)
    checked(src, "src")
    if dst.dtype != src.dtype:
        raise TypeError(f"dtype mismatch: dst is {dst.dtype}, src is {src.dtype}")
    if dst.dtype.hasobject:
        raise TypeError(f"copy_into cannot copy object references ({dst.dtype})")
    _check_same_size(dst, src)
    np.copyto(dst, src)


def ref_scale_into(dst: np.ndarray, src: np.ndarray, alpha: float) -> None:
    """Write ``src * float32(alpha)`` into ``dst`` with numpy.

    Parameters
    ----------
    dst : numpy.ndarray
        1-D float32 destination; may be ``src`` itself.
    src : numpy.ndarray
        1-D float32 array of the same size.
    alpha : float
        Factor, rounded to float32 before multiplying (e.g. ``1 / num_workers``).

    Raises
    ------
    TypeError
        If either array is not float32.
    ValueError
        On a size mismatch, a bad layout or partial overlap.
    """
    checked(dst, "dst", writable=True)
    checked(src, "src")
    _check_dtype(dst, "dst", np.float32)
    _check_dtype(src, "src", np.float32)
    _check_same_size(dst, src)
    _check_overlap(dst, src, allow_same=True)
    np.multiply(src, np.float32(alpha), out=dst)


def _prepared_out(out: np.ndarray | None, src: np.ndarray, dtype: type) -> np.ndarray | None:
    """Check a caller-supplied conversion output (``None`` passes through)."""
    if out is not None:
        checked(out, "out", writable=True)
        _check_dtype(out, "out", dtype)
        _check_same_size(out, src)
        _check_overlap(out, src, allow_same=False)
    return out


def ref_f32_to_f16(src: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Convert float32 to float16 with numpy (round to nearest even).

    Parameters
    ----------
    src : numpy.ndarray
        1-D float32 array.
    out : numpy.ndarray, optional
        1-D float16 array of the same size to write into; allocated when omitted.

    Returns
    -------
    numpy.ndarray
        The float16 result (``out`` when given).

    Raises
    ------
    TypeError
        On a wrong dtype.
    ValueError
        On a size mismatch, a bad layout or overlap between ``src`` and ``out``.
    """
    checked(src, "src")
    _check_dtype(src, "src", np.float32)
    if _prepared_out(out, src, np.float16) is None:
        return src.astype(np.float16)
    np.copyto(out, src, casting="same_kind")
    return out


def ref_f16_to_f32(src: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Convert float16 to float32 with numpy (exact).

    Parameters
    ----------
    src : numpy.ndarray
        1-D float16 array.
    out : numpy.ndarray, optional
        1-D float32 array of the same size to write into; allocated when omitted.

    Returns
    -------
    numpy.ndarray
        The float32 result (``out`` when given).

    Raises
    ------
    TypeError
        On a wrong dtype.
    ValueError
        On a size mismatch, a bad layout or overlap between ``src`` and ``out``.
    """
    checked(src, "src")
    _check_dtype(src, "src", np.float16)
    if _prepared_out(out, src, np.float32) is None:
        return src.astype(np.float32)
    np.copyto(out, src)
    return out


def ref_has_f16c() -> bool:
    """Return False: the numpy fallback never uses F16C itself.

    Returns
    -------
    bool
        Always False.
    """
    return False


reference = SimpleNamespace(
    ref_sum_into=ref_sum_into,
    ref_copy_into=ref_copy_into,
    ref_scale_into=ref_scale_into,
    ref_f32_to_f16=ref_f32_to_f16,
    ref_f16_to_f32=ref_f16_to_f32,
    ref_has_f16c=ref_has_f16c,
)
"""The numpy twins of the compiled kernels, for tests and for the fallback."""

_kernels = load_extension("_kernels", _log, "using the slower numpy kernels")

COMPILED: bool = _kernels is not None
"""True when the compiled extension geomx._kernels was imported."""

if _kernels is not None:
    # Chosen per function with benchmarks/bench_kernels.py (one thread, 1.6M and 10M elements):
    # - f32_to_f16 / f16_to_f32 (F16C) and float16 sum_into: 8x to 100x faster than numpy.
    # - float32/float64 sum_into, scale_into, copy_into: at parity with numpy (memory-bound at
    #   10M, in cache at 1.6M; the loops get AVX-512/AVX2 clones as numpy's do), and about 3x
    #   less call overhead on small keys (~0.15 us vs ~0.4 us for np.add on 1000 floats).
    # So the compiled kernel wins or ties everywhere and is used for every function.
    sum_into = _kernels.sum_into
    copy_into = _kernels.copy_into
    scale_into = _kernels.scale_into
    f32_to_f16 = _kernels.f32_to_f16
    f16_to_f32 = _kernels.f16_to_f32
    has_f16c = _kernels.has_f16c
else:
    sum_into = ref_sum_into
    copy_into = ref_copy_into
    scale_into = ref_scale_into
    f32_to_f16 = ref_f32_to_f16
    f16_to_f32 = ref_f16_to_f32
    has_f16c = ref_has_f16c


def accumulate(acc: Optional[np.ndarray], owned: bool, data: np.ndarray, dtype: np.dtype) -> tuple:
    """``acc + data`` as (running sum, owned): the first addend is borrowed (a read-only received
    buffer; a sum of one needs no copy), the first real sum allocates, later ones add in place.

    float16 keys are summed in float32 and rounded to float16 once, when the round is complete
    (``KeyState.round_value``), so a sum loses no precision it need not lose; a float32 ``data``
    for a float16 key is such a partial sum already (TSEngine's partial sums)."""
    fresh = False
    if dtype == np.float16 and data.dtype == np.float16:
        data, fresh = f16_to_f32(np.ascontiguousarray(data)), True
    if acc is None:
        return data, fresh
    if not owned:
        return np.add(acc, data), True  # the first sum allocates, fusing copy and add
    sum_into(acc, data)
    return acc, True
