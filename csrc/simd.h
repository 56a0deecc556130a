/*
 * SIMD loops for geomx._kernels: float16 <-> float32 conversion, float16 accumulation,
 * and float32/float64 add and scale.
 *
 * Every function here is bit-identical to numpy 1.23 on x86-64 (round-to-nearest-even,
 * inf preserved, NaN payloads truncated the way numpy's npy_floatbits_to_halfbits and
 * npy_halfbits_to_floatbits do it).  The F16C paths are compiled with a per-function
 * target attribute and chosen at run time (geomx_cpu_init), so the module needs no
 * -march flag and still runs on CPUs without F16C through the scalar paths.
 */
#ifndef GEOMX_SIMD_H
#define GEOMX_SIMD_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#define GEOMX_HAVE_X86_SIMD 1
#include <immintrin.h>
#else
#define GEOMX_HAVE_X86_SIMD 0
#endif

/*
 * Plain float loops get AVX-512 / AVX2 / baseline clones, picked by the loader (ifunc) on
 * x86-64 Linux; numpy's own add dispatches the same way, and the SSE2 baseline alone is about
 * half as fast as numpy on cache-resident arrays.  IEEE add and multiply round identically in
 * every clone, so results do not depend on the clone.  (Only when both operands of an add are
 * NaNs with different payloads may the surviving payload differ from numpy's.)
 */
#if GEOMX_HAVE_X86_SIMD && defined(__linux__)
#define GEOMX_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define GEOMX_CLONES
#endif

/* 1 when the CPU (and OS) support AVX + F16C; set once by geomx_cpu_init. */
static int geomx_f16c_available = 0;
/* Dispatch switch: 1 selects the F16C paths.  Only ever 1 when geomx_f16c_available. */
static int geomx_f16c_enabled = 0;
/* float16 bits of the NaN this CPU produces for inf + (-inf) (0xfe00 on x86). */
static uint16_t geomx_default_nan_f16 = 0x7e00u;

static inline uint32_t geomx_float_bits(float x)
{
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return u;
}

static inline float geomx_bits_float(uint32_t u)
{
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
}

static inline int geomx_f16_is_nan(uint16_t h)
{
    return (h & 0x7fffu) > 0x7c00u;
}

/* float32 bits -> float16 bits, round to nearest even. */
static inline uint16_t geomx_f32_to_f16_bits(uint32_t f)
{
    uint16_t sign = (uint16_t)((f >> 16) & 0x8000u);
    uint32_t absf = f & 0x7fffffffu;

    if (absf >= 0x7f800000u) {
        if (absf == 0x7f800000u) {
            return (uint16_t)(sign | 0x7c00u);
        }
        /* NaN: keep the top 10 payload bits; a payload that truncates to 0 becomes 1. */
        uint16_t payload = (uint16_t)((absf & 0x007fffffu) >> 13);
        return (uint16_t)(sign | 0x7c00u | (payload ? payload : 1u));
    }
    if (absf >= 0x47800000u) {          /* >= 65536: beyond the largest finite half */
        return (uint16_t)(sign | 0x7c00u);
    }
    if (absf >= 0x38800000u) {          /* normal half: rebias 127 -> 15, round on bit 13 */
        uint32_t rounded = absf + 0x0fffu + ((absf >> 13) & 1u);
        /* A carry out of the mantissa bumps the exponent, up to 0x7c00 (inf). */
        return (uint16_t)(sign | ((rounded >> 13) - (112u << 10)));
    }
    uint32_t exponent = absf >> 23;
    if (exponent < 102u) {              /* below 2^-25: rounds to a signed zero */
        return sign;
    }
    /* Subnormal half: value / 2^-24 = mantissa >> (126 - exponent), rounded to even. */
    uint32_t mantissa = (absf & 0x007fffffu) | 0x00800000u;
    uint32_t shift = 126u - exponent;   /* 14 .. 24 */
    uint32_t quotient = mantissa >> shift;
    uint32_t remainder = mantissa & ((1u << shift) - 1u);
    uint32_t half = 1u << (shift - 1u);
    if (remainder > half || (remainder == half && (quotient & 1u))) {
        ++quotient;                     /* may reach 0x400, the smallest normal: still right */
    }
    return (uint16_t)(sign | quotient);
}

/* float16 bits -> float32 bits (exact; NaN payload shifted up, signalling NaNs kept). */
static inline uint32_t geomx_f16_to_f32_bits(uint16_t h)
{
    uint32_t sign = ((uint32_t)h & 0x8000u) << 16;
    uint32_t exponent = ((uint32_t)h >> 10) & 0x1fu;
    uint32_t mantissa = (uint32_t)h & 0x03ffu;

    if (exponent == 0x1fu) {
        return sign | 0x7f800000u | (mantissa << 13);
    }
    if (exponent != 0u) {
        return sign | ((exponent + 112u) << 23) | (mantissa << 13);
    }
    if (mantissa == 0u) {
        return sign;
    }
    /* Subnormal half: normalise; 2^-14 has float32 exponent 113. */
    exponent = 113u;
    while (!(mantissa & 0x0400u)) {
        mantissa <<= 1;
        --exponent;
    }
    return sign | (exponent << 23) | ((mantissa & 0x03ffu) << 13);
}

/*
 * a + b for float16 bits, computed in float32 and rounded once to float16, as numpy's
 * float16 add does.  When the sum is NaN the result follows numpy 1.23 on x86-64: the
 * second operand's NaN if it is one, else the first's, quieted; inf + (-inf) gives the
 * CPU's default NaN.  Spelling this out keeps it independent of the operand order the
 * compiler picks for the float addition.
 */
static inline uint16_t geomx_add_f16_bits(uint16_t a, uint16_t b)
{
    float sum = geomx_bits_float(geomx_f16_to_f32_bits(a)) + geomx_bits_float(geomx_f16_to_f32_bits(b));
    if (sum == sum) {
        return geomx_f32_to_f16_bits(geomx_float_bits(sum));
    }
    if (geomx_f16_is_nan(b)) {
        return (uint16_t)(b | 0x0200u);
    }
    if (geomx_f16_is_nan(a)) {
        return (uint16_t)(a | 0x0200u);
    }
    return geomx_default_nan_f16;
}

static void geomx_f32_to_f16_scalar(const float *src, uint16_t *dst, size_t start, size_t n)
{
    for (size_t i = start; i < n; ++i) {
        dst[i] = geomx_f32_to_f16_bits(geomx_float_bits(src[i]));
    }
}

static void geomx_f16_to_f32_scalar(const uint16_t *src, float *dst, size_t start, size_t n)
{
    for (size_t i = start; i < n; ++i) {
        dst[i] = geomx_bits_float(geomx_f16_to_f32_bits(src[i]));
    }
}

static void geomx_sum_f16_scalar(uint16_t *dst, const uint16_t *src, size_t start, size_t n)
{
    for (size_t i = start; i < n; ++i) {
        dst[i] = geomx_add_f16_bits(dst[i], src[i]);
    }
}

#if GEOMX_HAVE_X86_SIMD

/*
 * Blocks of 8 go through F16C.  A block holding a NaN is redone with the scalar code:
 * the instructions quiet signalling NaNs, numpy does not.  NaNs are rare in gradients,
 * so the check (one compare + movemask per block) is all the fast path pays.
 */
__attribute__((target("avx,f16c")))
static void geomx_f32_to_f16_f16c(const float *src, uint16_t *dst, size_t n)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 x = _mm256_loadu_ps(src + i);
        _mm_storeu_si128((__m128i *)(dst + i), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
        if (_mm256_movemask_ps(_mm256_cmp_ps(x, x, _CMP_UNORD_Q))) {
            geomx_f32_to_f16_scalar(src, dst, i, i + 8);
        }
    }
    geomx_f32_to_f16_scalar(src, dst, i, n);
}

__attribute__((target("avx,f16c")))
static void geomx_f16_to_f32_f16c(const uint16_t *src, float *dst, size_t n)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 y = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i)));
        _mm256_storeu_ps(dst + i, y);
        if (_mm256_movemask_ps(_mm256_cmp_ps(y, y, _CMP_UNORD_Q))) {
            geomx_f16_to_f32_scalar(src, dst, i, i + 8);
        }
    }
    geomx_f16_to_f32_scalar(src, dst, i, n);
}

__attribute__((target("avx,f16c")))
static void geomx_sum_f16_f16c(uint16_t *dst, const uint16_t *src, size_t n)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 a = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(dst + i)));
        __m256 b = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i)));
        __m256 sum = _mm256_add_ps(a, b);
        if (_mm256_movemask_ps(_mm256_cmp_ps(sum, sum, _CMP_UNORD_Q))) {
            geomx_sum_f16_scalar(dst, src, i, i + 8);   /* dst block not written yet */
        } else {
            _mm_storeu_si128((__m128i *)(dst + i), _mm256_cvtps_ph(sum, _MM_FROUND_TO_NEAREST_INT));
        }
    }
    geomx_sum_f16_scalar(dst, src, i, n);
}

#endif /* GEOMX_HAVE_X86_SIMD */

GEOMX_CLONES static void geomx_sum_f32(float *dst, const float *src, size_t n)
{
    for (size_t i = 0; i < n; ++i) {
        dst[i] += src[i];
    }
}

GEOMX_CLONES static void geomx_sum_f64(double *dst, const double *src, size_t n)
{
    for (size_t i = 0; i < n; ++i) {
        dst[i] += src[i];
    }
}

GEOMX_CLONES static void geomx_scale_f32(float *dst, const float *src, float alpha, size_t n)
{
    for (size_t i = 0; i < n; ++i) {
        dst[i] = src[i] * alpha;
    }
}

static void geomx_cpu_init(void)
{
    volatile float inf = geomx_bits_float(0x7f800000u);   /* volatile: no constant folding */
    geomx_default_nan_f16 = geomx_f32_to_f16_bits(geomx_float_bits(inf - inf));
#if GEOMX_HAVE_X86_SIMD
    __builtin_cpu_init();
    geomx_f16c_available = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
#endif
    geomx_f16c_enabled = geomx_f16c_available;
}

static void geomx_f32_to_f16(const float *src, uint16_t *dst, size_t n)
{
#if GEOMX_HAVE_X86_SIMD
    if (geomx_f16c_enabled) {
        geomx_f32_to_f16_f16c(src, dst, n);
        return;
    }
#endif
    geomx_f32_to_f16_scalar(src, dst, 0, n);
}

static void geomx_f16_to_f32(const uint16_t *src, float *dst, size_t n)
{
#if GEOMX_HAVE_X86_SIMD
    if (geomx_f16c_enabled) {
        geomx_f16_to_f32_f16c(src, dst, n);
        return;
    }
#endif
    geomx_f16_to_f32_scalar(src, dst, 0, n);
}

static void geomx_sum_f16(uint16_t *dst, const uint16_t *src, size_t n)
{
#if GEOMX_HAVE_X86_SIMD
    if (geomx_f16c_enabled) {
        geomx_sum_f16_f16c(dst, src, n);
        return;
    }
#endif
    geomx_sum_f16_scalar(dst, src, 0, n);
}

#endif /* GEOMX_SIMD_H */
