# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""Compiled kernels of the gradient codecs (geomx.compression); import them through
geomx.compression.kernels, which also holds their numpy twins.

Every function takes 1-D, C-contiguous, aligned, native-byte-order numpy arrays, checks them
(TypeError for a wrong type or dtype, ValueError for a wrong shape, layout, size or value) and
runs its loop with the GIL released.  Results are bit-identical to the numpy twins.
"""
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t

cimport numpy as cnp
import numpy as np

cnp.import_array()


cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>

    /* |x| as the bits of a non-negative float: for two such values the unsigned (and, since the
     * sign bit is clear, also the signed) integer order is the float order, and every value
     * >= 0x7f800000 is inf or NaN.  Integer compares let the block test below vectorize. */
    static inline int32_t geomx_abs_bits(float x)
    {
        uint32_t u;
        memcpy(&u, &x, sizeof u);
        return (int32_t)(u & 0x7fffffffu);
    }

    #define GEOMX_NONFINITE_BITS 0x7f800000

    /* Index of the first inf/NaN in src[0..n), or -1.  Scans blocks with a vectorizable test. */
    static int64_t geomx_first_nonfinite(const float *src, int64_t n)
    {
        int64_t i = 0, j;
        for (; i + 64 <= n; i += 64) {
            int32_t hit = 0;
            for (j = 0; j < 64; j++)
                hit |= geomx_abs_bits(src[i + j]) >= GEOMX_NONFINITE_BITS;
            if (hit)
                break;
        }
        for (; i < n; i++)
            if (geomx_abs_bits(src[i]) >= GEOMX_NONFINITE_BITS)
                return i;
        return -1;
    }

    /* Write the first `cap` positions i (in increasing order) with |src[i]| >= the float whose
     * bits are `thr_bits` into idx/val; return how many qualify in total (may exceed cap), or
     * -(i+1) for the first non-finite src[i] (inf/NaN always pass the test, so none is missed).
     * With SSE2 (every x86-64) blocks of 16 are tested with four vector compares; the
     * positions that pass come out of a 16-bit mask, so there is no branch per element. */
    #define GEOMX_SELECT_EMIT(IDX_T, J)                                                    \\
        do {                                                                                \\
            if (count < cap) {                                                              \\
                idx[count] = (IDX_T)(J);                                                    \\
                val[count] = src[J];                                                        \\
            }                                                                               \\
            count++;                                                                        \\
        } while (0)

    #define GEOMX_SELECT_TAIL(IDX_T)                                                       \\
        for (; i < n; i++) {                                                                \\
            int32_t a = geomx_abs_bits(src[i]);                                             \\
            if (a >= thr_bits) {                                                            \\
                if (a >= GEOMX_NONFINITE_BITS)                                              \\
                    return -(i + 1);                                                        \\
                GEOMX_SELECT_EMIT(IDX_T, i);                                                \\
            }                                                                               \\
        }                                                                                   \\
        return count;

    #if defined(__SSE2__)
    #include <emmintrin.h>
    #define GEOMX_SELECT_BODY(IDX_T)                                                       \\
        int64_t i = 0, count = 0;                                                           \\
        const __m128i absmask = _mm_set1_epi32(0x7fffffff);                                 \\
        const __m128i below = _mm_set1_epi32(thr_bits - 1);                                \\
        const __m128i finite_max = _mm_set1_epi32(GEOMX_NONFINITE_BITS - 1);                \\
        for (; i + 16 <= n; i += 16) {                                                      \\
            const __m128i *p = (const __m128i *)(src + i);                                  \\
            __m128i a0 = _mm_and_si128(_mm_loadu_si128(p), absmask);                        \\
            __m128i a1 = _mm_and_si128(_mm_loadu_si128(p + 1), absmask);                    \\
            __m128i a2 = _mm_and_si128(_mm_loadu_si128(p + 2), absmask);                    \\
            __m128i a3 = _mm_and_si128(_mm_loadu_si128(p + 3), absmask);                    \\
            __m128i c0 = _mm_cmpgt_epi32(a0, below), c1 = _mm_cmpgt_epi32(a1, below);       \\
            __m128i c2 = _mm_cmpgt_epi32(a2, below), c3 = _mm_cmpgt_epi32(a3, below);       \\
            __m128i any = _mm_or_si128(_mm_or_si128(c0, c1), _mm_or_si128(c2, c3));         \\
            if (!_mm_movemask_epi8(any))                                                    \\
                continue;                                                                   \\
            __m128i bad = _mm_or_si128(                                                     \\
                _mm_or_si128(_mm_cmpgt_epi32(a0, finite_max), _mm_cmpgt_epi32(a1, finite_max)), \\
                _mm_or_si128(_mm_cmpgt_epi32(a2, finite_max), _mm_cmpgt_epi32(a3, finite_max))); \\
            if (_mm_movemask_epi8(bad))                                                     \\
                break; /* the scalar tail finds it (and emits the block's earlier hits) */  \\
            unsigned mask = (unsigned)_mm_movemask_ps(_mm_castsi128_ps(c0))                 \\
                | ((unsigned)_mm_movemask_ps(_mm_castsi128_ps(c1)) << 4)                    \\
                | ((unsigned)_mm_movemask_ps(_mm_castsi128_ps(c2)) << 8)                    \\
                | ((unsigned)_mm_movemask_ps(_mm_castsi128_ps(c3)) << 12);                  \\
            while (mask) {                                                                  \\
                int64_t j = i + __builtin_ctz(mask);                                        \\
                mask &= mask - 1;                                                           \\
                GEOMX_SELECT_EMIT(IDX_T, j);                                                \\
            }                                                                               \\
        }                                                                                   \\
        GEOMX_SELECT_TAIL(IDX_T)
    #else
    #define GEOMX_SELECT_BODY(IDX_T)                                                       \\
        int64_t i = 0, count = 0;                                                           \\
        GEOMX_SELECT_TAIL(IDX_T)
    #endif

    static int64_t geomx_select_i32(const float *src, int64_t n, int32_t thr_bits, int64_t cap,
                                    int32_t *idx, float *val)
    {
        GEOMX_SELECT_BODY(int32_t)
    }

    static int64_t geomx_select_i64(const float *src, int64_t n, int32_t thr_bits, int64_t cap,
                                    int64_t *idx, float *val)
    {
        GEOMX_SELECT_BODY(int64_t)
    }

    /* u = m*u + g; v = v + u (float32 throughout, each operation rounded, as numpy does). */
    static void geomx_dgc_accumulate(float *u, float *v, const float *g, float m, int64_t n)
    {
        int64_t i;
        for (i = 0; i < n; i++) {
            float t = m * u[i];
            t = t + g[i];
            u[i] = t;
            v[i] = v[i] + t;
        }
    }

    /* splitmix64 (Steele, Lea and Flood 2014): the k-th output of the stream seeded with s. */
    static inline uint64_t geomx_splitmix64(uint64_t s, uint64_t k)
    {
        uint64_t z = s + k * 0x9E3779B97F4A7C15ull;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        return z ^ (z >> 31);
    }

    /* Magnitudes of `m` entries read in runs of `block` consecutive entries (wrapping at n):
     * out[b*block + t] = |src[(pos_b + t) mod n]| with pos_b = ((splitmix64(seed, b+1) >> 32) * n)
     * >> 32, n < 2^32.  Runs cost one cache miss per run instead of one per entry, and every entry
     * is equally likely to be read. */
    static void geomx_sample_abs(const float *src, uint64_t n, uint64_t seed, int64_t block,
                                 float *out, int64_t m)
    {
        int64_t j = 0, b = 0, t;
        while (j < m) {
            uint64_t pos = ((geomx_splitmix64(seed, (uint64_t)b + 1) >> 32) * n) >> 32;
            b++;
            for (t = 0; t < block && j < m; t++, j++) {
                uint32_t bits;
                memcpy(&bits, &src[pos], sizeof bits);
                bits &= 0x7fffffffu;
                memcpy(&out[j], &bits, sizeof bits);
                if (++pos == n)
                    pos = 0;
            }
        }
    }
    """
    int64_t geomx_first_nonfinite(const float *src, int64_t n) nogil
    int64_t geomx_select_i32(const float *src, int64_t n, int32_t thr_bits, int64_t cap,
                             int32_t *idx, float *val) nogil
    int64_t geomx_select_i64(const float *src, int64_t n, int32_t thr_bits, int64_t cap,
                             int64_t *idx, float *val) nogil
    void geomx_dgc_accumulate(float *u, float *v, const float *g, float m, int64_t n) nogil
    void geomx_sample_abs(const float *src, uint64_t n, uint64_t seed, int64_t block,
                          float *out, int64_t m) nogil


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


cdef int _check_f32(cnp.ndarray a, str name) except -1:
    if cnp.PyArray_TYPE(a) != cnp.NPY_FLOAT32:
        raise TypeError(f"{name} must be float32, got {a.dtype}")
    return 0


cdef int _check_disjoint(cnp.ndarray a, str a_name, cnp.ndarray b, str b_name) except -1:
    cdef char *p = <char *>cnp.PyArray_DATA(a)
    cdef char *q = <char *>cnp.PyArray_DATA(b)
    if p < q + cnp.PyArray_NBYTES(b) and q < p + cnp.PyArray_NBYTES(a):
        raise ValueError(f"{a_name} and {b_name} overlap; pass disjoint arrays")
    return 0


def first_nonfinite(src):
    """Return the index of the first inf or NaN in float32 ``src``, or -1 if all are finite."""
    cdef cnp.ndarray s = _checked(src, "src", False)
    _check_f32(s, "src")
    cdef int64_t n = cnp.PyArray_SIZE(s)
    cdef const float *sp = <const float *>cnp.PyArray_DATA(s)
    cdef int64_t r
    with nogil:
        r = geomx_first_nonfinite(sp, n)
    return r


def index_dtype(n):
    """Index dtype for a tensor of ``n`` elements: int32 below 2**31, int64 above."""
    return np.dtype(np.int32) if n <= 2147483647 else np.dtype(np.int64)


def select_above(src, thr, max_k):
    """Positions and values of the first ``max_k`` entries (in index order) with |src| >= thr.

    Returns ``(indices, values, total)``: int32 (int64 from 2**31 elements) indices in increasing
    order, float32 values ``src[indices]``, and how many entries qualify in all (may exceed
    ``max_k``).  ``thr`` is a finite float >= 0 (rounded to float32); ValueError names the first
    inf/NaN of ``src`` that the scan meets.
    """
    cdef cnp.ndarray s = _checked(src, "src", False)
    _check_f32(s, "src")
    cdef float t = <float>thr
    if not (t >= 0.0 and t <= 3.4028234663852886e38):
        raise ValueError(f"thr must be a finite float >= 0, got {thr!r}")
    cdef int64_t n = cnp.PyArray_SIZE(s)
    cdef int64_t cap = max_k
    if cap < 0:
        raise ValueError(f"max_k must be >= 0, got {max_k}")
    if cap > n:
        cap = n
    cdef uint32_t tb_u = (<uint32_t *>&t)[0] & 0x7fffffffu
    cdef int32_t tb = <int32_t>tb_u
    idt = index_dtype(n)
    cdef cnp.ndarray idx = np.empty(cap, dtype=idt)
    cdef cnp.ndarray val = np.empty(cap, dtype=np.float32)
    cdef const float *sp = <const float *>cnp.PyArray_DATA(s)
    cdef float *vp = <float *>cnp.PyArray_DATA(val)
    cdef void *ip = cnp.PyArray_DATA(idx)
    cdef int64_t total
    if idt == np.int32:
        with nogil:
            total = geomx_select_i32(sp, n, tb, cap, <int32_t *>ip, vp)
    else:
        with nogil:
            total = geomx_select_i64(sp, n, tb, cap, <int64_t *>ip, vp)
    if total < 0:
        bad = -total - 1
        raise ValueError(f"non-finite value {float(src[bad])!r} at index {bad}; "
                         "the codec cannot select from inf/NaN")
    cdef int64_t nnz = total if total < cap else cap
    return idx[:nnz], val[:nnz], total


def dgc_accumulate(u, v, g, momentum):
    """DGC momentum correction in place: ``u = m*u + g`` then ``v = v + u`` (float32).

    ``g`` is checked first: ValueError naming the first inf/NaN, with ``u`` and ``v`` untouched.
    """
    cdef cnp.ndarray ua = _checked(u, "u", True)
    cdef cnp.ndarray va = _checked(v, "v", True)
    cdef cnp.ndarray ga = _checked(g, "g", False)
    _check_f32(ua, "u")
    _check_f32(va, "v")
    _check_f32(ga, "g")
    cdef int64_t n = cnp.PyArray_SIZE(ga)
    if cnp.PyArray_SIZE(ua) != n or cnp.PyArray_SIZE(va) != n:
        raise ValueError(f"size mismatch: u has {u.size}, v has {v.size}, g has {n} elements")
    _check_disjoint(ua, "u", va, "v")
    _check_disjoint(ua, "u", ga, "g")
    _check_disjoint(va, "v", ga, "g")
    cdef float m = <float>momentum
    cdef const float *gp = <const float *>cnp.PyArray_DATA(ga)
    cdef float *up = <float *>cnp.PyArray_DATA(ua)
    cdef float *vp = <float *>cnp.PyArray_DATA(va)
    cdef int64_t bad
    with nogil:
        bad = geomx_first_nonfinite(gp, n)
    if bad >= 0:
        raise ValueError(f"non-finite gradient value {float(g[bad])!r} at index {bad}")
    with nogil:
        geomx_dgc_accumulate(up, vp, gp, m, n)


def sample_abs(src, count, seed, block=8):
    """``count`` magnitudes of float32 ``src`` read in runs of ``block`` consecutive entries.

    Run b starts at ``((splitmix64(seed, b+1) >> 32) * n) >> 32`` and wraps at ``n`` (so every
    entry is equally likely to be read; positions never leave the array), n < 2**32.
    """
    cdef cnp.ndarray s = _checked(src, "src", False)
    _check_f32(s, "src")
    cdef int64_t n = cnp.PyArray_SIZE(s)
    if n == 0 or n >= 4294967296:
        raise ValueError(f"sample_abs needs 0 < size < 2**32, got {n}")
    cdef int64_t m = count
    if m < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    cdef int64_t blk = block
    if blk < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    cdef uint64_t sd = <uint64_t>(int(seed) & 0xFFFFFFFFFFFFFFFF)
    cdef cnp.ndarray out = np.empty(m, dtype=np.float32)
    cdef const float *sp = <const float *>cnp.PyArray_DATA(s)
    cdef float *op = <float *>cnp.PyArray_DATA(out)
    with nogil:
        geomx_sample_abs(sp, <uint64_t>n, sd, blk, op, m)
    return out


ctypedef fused index_t:
    int32_t
    int64_t


cdef int64_t _first_out_of_range(const index_t *ip, int64_t nnz, int64_t size) noexcept nogil:
    cdef int64_t j
    for j in range(nnz):
        if ip[j] < 0 or ip[j] >= size:
            return j
    return -1


cdef void _scatter(float *dp, const index_t *ip, const float *vp, int64_t nnz) noexcept nogil:
    cdef int64_t j
    for j in range(nnz):
        dp[ip[j]] += vp[j]


def scatter_add(dst, indices, values):
    """``dst[indices[j]] += values[j]`` for every j in order (``np.add.at`` semantics).

    ``dst`` and ``values`` are float32, ``indices`` int32 or int64, duplicates allowed.  Every
    index is checked to lie in ``[0, dst.size)`` before anything is written (ValueError).
    """
    cdef cnp.ndarray d = _checked(dst, "dst", True)
    cdef cnp.ndarray ia = _checked(indices, "indices", False)
    cdef cnp.ndarray va = _checked(values, "values", False)
    _check_f32(d, "dst")
    _check_f32(va, "values")
    cdef int64_t nnz = cnp.PyArray_SIZE(ia)
    if cnp.PyArray_SIZE(va) != nnz:
        raise ValueError(f"size mismatch: {nnz} indices, {values.size} values")
    _check_disjoint(d, "dst", va, "values")
    _check_disjoint(d, "dst", ia, "indices")
    cdef int64_t size = cnp.PyArray_SIZE(d)
    cdef float *dp = <float *>cnp.PyArray_DATA(d)
    cdef const float *vp = <const float *>cnp.PyArray_DATA(va)
    cdef int64_t bad
    cdef int type_num = cnp.PyArray_TYPE(ia)
    if type_num == cnp.NPY_INT32:
        with nogil:
            bad = _first_out_of_range(<const int32_t *>cnp.PyArray_DATA(ia), nnz, size)
    elif type_num == cnp.NPY_INT64:
        with nogil:
            bad = _first_out_of_range(<const int64_t *>cnp.PyArray_DATA(ia), nnz, size)
    else:
        raise TypeError(f"indices must be int32 or int64, got {indices.dtype}")
    if bad >= 0:
        raise ValueError(f"index {int(indices[bad])} at position {bad} is out of range "
                         f"for a tensor of {size} elements")
    if type_num == cnp.NPY_INT32:
        with nogil:
            _scatter(dp, <const int32_t *>cnp.PyArray_DATA(ia), vp, nnz)
    else:
        with nogil:
            _scatter(dp, <const int64_t *>cnp.PyArray_DATA(ia), vp, nnz)
