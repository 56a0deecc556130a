# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""Compiled hot paths of the geomx parameter servers; import them through geomx.kernels.

Every function takes 1-D, C-contiguous, aligned, native-byte-order numpy arrays, checks
them (TypeError for a wrong type or dtype, ValueError for a wrong shape, layout, size or
overlap) and then runs its loop with the GIL released.  Results are bit-identical to the
numpy twins in geomx.kernels.
"""
from libc.stdint cimport uint16_t
from libc.string cimport memmove

cimport numpy as cnp
import numpy as np

cnp.import_array()


cdef extern from "simd.h" nogil:
    int geomx_f16c_available
    int geomx_f16c_enabled
    void geomx_cpu_init()
    void geomx_f32_to_f16(const float *src, uint16_t *dst, size_t n)
    void geomx_f16_to_f32(const uint16_t *src, float *dst, size_t n)
    void geomx_sum_f16(uint16_t *dst, const uint16_t *src, size_t n)
    void geomx_sum_f32(float *dst, const float *src, size_t n)
    void geomx_sum_f64(double *dst, const double *src, size_t n)
    void geomx_scale_f32(float *dst, const float *src, float alpha, size_t n)


geomx_cpu_init()


cdef cnp.ndarray _checked(object arr, str name, bint writable):
    """Return ``arr`` as an ndarray after checking it is a usable flat buffer."""
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(arr).__name__}")
    cdef cnp.ndarray a = <cnp.ndarray>arr
    if cnp.PyArray_NDIM(a) != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}; pass arr.ravel()")
    if not cnp.PyArray_IS_C_CONTIGUOUS(a):
        raise ValueError(f"{name} must be C-contiguous; pass np.ascontiguousarray({name})")
    if not cnp.PyArray_ISALIGNED(a):
        raise ValueError(f"{name} is not aligned to its dtype; pass a copy")
    if not cnp.PyArray_ISNOTSWAPPED(a):
        raise TypeError(f"{name} has non-native byte order ({a.dtype.str})")
    if writable and not cnp.PyArray_ISWRITEABLE(a):
        raise ValueError(f"{name} is read-only")
    return a


cdef int _check_dtype(cnp.ndarray a, str name, int type_num, str expected) except -1:
    if cnp.PyArray_TYPE(a) != type_num:
        raise TypeError(f"{name} must be {expected}, got {a.dtype}")
    return 0


cdef int _check_same_size(cnp.ndarray dst, cnp.ndarray src) except -1:
    if cnp.PyArray_SIZE(dst) != cnp.PyArray_SIZE(src):
        raise ValueError(f"size mismatch: dst has {cnp.PyArray_SIZE(dst)} elements, "
                         f"src has {cnp.PyArray_SIZE(src)}")
    return 0


cdef int _check_overlap(cnp.ndarray dst, cnp.ndarray src, bint allow_same) except -1:
    """Reject a ``dst`` that overlaps ``src`` (unless it is exactly ``src`` and that is allowed)."""
    cdef char *d = <char *>cnp.PyArray_DATA(dst)
    cdef char *s = <char *>cnp.PyArray_DATA(src)
    if allow_same and d == s and cnp.PyArray_NBYTES(dst) == cnp.PyArray_NBYTES(src):
        return 0
    if d < s + cnp.PyArray_NBYTES(src) and s < d + cnp.PyArray_NBYTES(dst):
        if allow_same:
            raise ValueError("dst and src partially overlap; pass the same array or disjoint arrays")
        raise ValueError("dst and src overlap; pass disjoint arrays")
    return 0


def has_f16c():
    """Return True when this CPU supports F16C (and AVX), so the conversions use it."""
    return bool(geomx_f16c_available)


def _set_f16c_enabled(enabled):
    """Switch the F16C paths on or off (for tests of the scalar fallback); return the old state.

    Enabling has no effect on a CPU without F16C.
    """
    global geomx_f16c_enabled
    previous = bool(geomx_f16c_enabled)
    geomx_f16c_enabled = 1 if (enabled and geomx_f16c_available) else 0
    return previous


def sum_into(dst, src):
    """dst += src for float32, float64 or float16 (float16 is added in float32, rounded once)."""
    cdef cnp.ndarray d = _checked(dst, "dst", True)
    cdef cnp.ndarray s = _checked(src, "src", False)
    if cnp.PyArray_TYPE(d) != cnp.PyArray_TYPE(s):
        raise TypeError(f"dtype mismatch: dst is {d.dtype}, src is {s.dtype}")
    _check_same_size(d, s)
    _check_overlap(d, s, True)
    cdef size_t n = <size_t>cnp.PyArray_SIZE(d)
    cdef int type_num = cnp.PyArray_TYPE(d)
    cdef void *dp = cnp.PyArray_DATA(d)
    cdef const void *sp = cnp.PyArray_DATA(s)
    if type_num == cnp.NPY_FLOAT32:
        with nogil:
            geomx_sum_f32(<float *>dp, <const float *>sp, n)
    elif type_num == cnp.NPY_FLOAT64:
        with nogil:
            geomx_sum_f64(<double *>dp, <const double *>sp, n)
    elif type_num == cnp.NPY_FLOAT16:
        with nogil:
            geomx_sum_f16(<uint16_t *>dp, <const uint16_t *>sp, n)
    else:
        raise TypeError(f"sum_into supports float16, float32 and float64, got {d.dtype}")


def copy_into(dst, src):
    """dst[:] = src for two arrays of the same (non-object) dtype."""
    cdef cnp.ndarray d = _checked(dst, "dst", True)
    cdef cnp.ndarray s = _checked(src, "src", False)
    if d.dtype != s.dtype:
        raise TypeError(f"dtype mismatch: dst is {d.dtype}, src is {s.dtype}")
    if d.dtype.hasobject:
        raise TypeError(f"copy_into cannot copy object references ({d.dtype})")
    _check_same_size(d, s)
    cdef size_t nbytes = <size_t>cnp.PyArray_NBYTES(d)
    cdef void *dp = cnp.PyArray_DATA(d)
    cdef const void *sp = cnp.PyArray_DATA(s)
    with nogil:
        memmove(dp, sp, nbytes)


def scale_into(dst, src, alpha):
    """dst = src * float32(alpha) for float32 arrays (``dst`` may be ``src``)."""
    cdef cnp.ndarray d = _checked(dst, "dst", True)
    cdef cnp.ndarray s = _checked(src, "src", False)
    _check_dtype(d, "dst", cnp.NPY_FLOAT32, "float32")
    _check_dtype(s, "src", cnp.NPY_FLOAT32, "float32")
    _check_same_size(d, s)
    _check_overlap(d, s, True)
    cdef float a = <float>alpha
    cdef size_t n = <size_t>cnp.PyArray_SIZE(d)
    cdef float *dp = <float *>cnp.PyArray_DATA(d)
    cdef const float *sp = <const float *>cnp.PyArray_DATA(s)
    with nogil:
        geomx_scale_f32(dp, sp, a, n)


cdef cnp.ndarray _output(object out, cnp.ndarray src, object dtype, int type_num, str expected):
    if out is None:
        return np.empty(cnp.PyArray_SIZE(src), dtype=dtype)
    cdef cnp.ndarray o = _checked(out, "out", True)
    _check_dtype(o, "out", type_num, expected)
    _check_same_size(o, src)
    _check_overlap(o, src, False)
    return o


def f32_to_f16(src, out=None):
    """Return ``src`` (float32) converted to float16, written into ``out`` if given."""
    cdef cnp.ndarray s = _checked(src, "src", False)
    _check_dtype(s, "src", cnp.NPY_FLOAT32, "float32")
    cdef cnp.ndarray o = _output(out, s, np.float16, cnp.NPY_FLOAT16, "float16")
    cdef size_t n = <size_t>cnp.PyArray_SIZE(s)
    cdef const float *sp = <const float *>cnp.PyArray_DATA(s)
    cdef uint16_t *op = <uint16_t *>cnp.PyArray_DATA(o)
    with nogil:
        geomx_f32_to_f16(sp, op, n)
    return o


def f16_to_f32(src, out=None):
    """Return ``src`` (float16) converted to float32, written into ``out`` if given."""
    cdef cnp.ndarray s = _checked(src, "src", False)
    _check_dtype(s, "src", cnp.NPY_FLOAT16, "float16")
    cdef cnp.ndarray o = _output(out, s, np.float32, cnp.NPY_FLOAT32, "float32")
    cdef size_t n = <size_t>cnp.PyArray_SIZE(s)
    cdef const uint16_t *sp = <const uint16_t *>cnp.PyArray_DATA(s)
    cdef float *op = <float *>cnp.PyArray_DATA(o)
    with nogil:
        geomx_f16_to_f32(sp, op, n)
    return o
