"""Compiled kernels (geomx._kernels) against their numpy twins in geomx.kernels, bit for bit."""
import importlib
import logging
import sys

import numpy as np
import pytest
from helpers import built_or_skip, fail_unbuilt_under_ci

import geomx
from geomx import kernels
from geomx.kernels import reference as ref

try:
    from geomx import _kernels
except ImportError:
    _kernels = None

pytestmark = pytest.mark.unit

SIZES = [0, 1, 7, 8, 9, 1023, 100003]
NOT_BUILT = "geomx._kernels is not built; run `pip install -e . --no-build-isolation`"


def test_extension_built_when_ci_is_set():
    fail_unbuilt_under_ci(_kernels, NOT_BUILT)


@pytest.fixture(scope="module")
def compiled():
    """The compiled module; a skip outside CI when it is missing, an error under CI."""
    return built_or_skip(_kernels, NOT_BUILT)


@pytest.fixture(params=["f16c", "scalar"])
def ck(request, compiled):
    """The compiled module with its F16C paths on (when the CPU has F16C) or forced off."""
    if request.param == "f16c" and not compiled.has_f16c():
        pytest.skip("this CPU has no F16C")
    previous = compiled._set_f16c_enabled(request.param == "f16c")
    yield compiled
    compiled._set_f16c_enabled(previous)


def bits(a):
    """View a float array as unsigned integers of the same width, for exact comparison."""
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def assert_bits_equal(got, want):
    assert got.dtype == want.dtype
    mismatch = np.flatnonzero(bits(got) != bits(want))
    assert mismatch.size == 0, (
        f"{mismatch.size} mismatches, first at {mismatch[:5]}: "
        f"got {[hex(x) for x in bits(got)[mismatch[:5]]]}, want {[hex(x) for x in bits(want)[mismatch[:5]]]}")


def f32_from_bits(*patterns):
    return np.array(patterns, dtype=np.uint32).view(np.float32)


def f16_from_bits(*patterns):
    return np.array(patterns, dtype=np.uint16).view(np.float16)


def f32_specials():
    """float32 values where float16 rounding, overflow, underflow or NaN handling can go wrong."""
    rng = np.random.default_rng(7)
    halves = rng.integers(0, 0x7c00, 4000, dtype=np.uint16).view(np.float16).astype(np.float32)
    ulp = np.spacing(halves.astype(np.float16)).astype(np.float32)
    ties = halves + ulp / 2  # exactly halfway between two float16 values
    fixed = np.array([0.0, -0.0, 1.0, -1.0, 65504.0, 65519.996, 65520.0, 65536.0, 1e30, -1e30,
                      2.0 ** -14, 2.0 ** -24, 2.0 ** -25, 1.5 * 2.0 ** -25, 1.5 * 2.0 ** -24,
                      2.0 ** -26, 1e-45, -1e-45, np.inf, -np.inf], dtype=np.float32)
    nans = f32_from_bits(0x7fc00000, 0xffc00000, 0x7f800001, 0xff800001, 0x7fa00000, 0x7f802000,
                         0x7fc00001, 0x7fffffff, 0xffffffff, 0x7f801fff, 0x7fbfe000)
    pool = np.concatenate([fixed, nans, ties, -ties, halves + ulp / 4, halves - ulp / 4])
    return pool.astype(np.float32)


def random_f32(n, seed):
    """Random float32 values: wide-range normals, raw bit patterns (incl. NaNs) and specials."""
    rng = np.random.default_rng(seed)
    scale = (10.0 ** rng.uniform(-10, 6, n)).astype(np.float32)
    values = rng.standard_normal(n, dtype=np.float32) * scale
    raw = rng.integers(0, 2 ** 32, n, dtype=np.uint32).view(np.float32)
    specials = f32_specials()
    pick = rng.integers(0, 3, n)
    values[pick == 1] = raw[pick == 1]
    values[pick == 2] = specials[rng.integers(0, specials.size, int((pick == 2).sum()))]
    return values


def random_f16(n, seed):
    """Random float16 values: all bit patterns (NaNs, infs, subnormals) plus ordinary numbers."""
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 2 ** 16, n, dtype=np.uint16).view(np.float16)
    normal = rng.standard_normal(n).astype(np.float16)
    keep = rng.integers(0, 2, n).astype(bool)
    values[keep] = normal[keep]
    return values


# --- conversions -----------------------------------------------------------------------------------

@pytest.mark.parametrize("n", SIZES)
def test_f32_to_f16_matches_numpy(ck, n):
    src = random_f32(n, seed=n)
    want = ref.ref_f32_to_f16(src)
    assert_bits_equal(ck.f32_to_f16(src), want)
    out = np.full(n, 7, dtype=np.float16)
    assert ck.f32_to_f16(src, out=out) is out
    assert_bits_equal(out, want)


def test_f32_to_f16_specials_in_every_lane(ck):
    specials = f32_specials()
    for offset in range(9):  # every position in an 8-wide block, and the tail
        src = np.concatenate([np.ones(offset, np.float32), specials])
        assert_bits_equal(ck.f32_to_f16(src), src.astype(np.float16))


def test_f32_to_f16_known_values(ck):
    # Independent of numpy: overflow, ties to even, underflow, NaN payload truncation.
    src = np.array([65504.0, 65519.0, 65520.0, 2.0 ** -25, 1.5 * 2.0 ** -24, 1.0 + 2.0 ** -11,
                    1.0 + 3 * 2.0 ** -11, -0.0], dtype=np.float32)
    src = np.concatenate([src, f32_from_bits(0x7f800001, 0x7fa00000, 0xffc00000)])
    want = [0x7bff, 0x7bff, 0x7c00, 0x0000, 0x0002, 0x3c00, 0x3c02, 0x8000, 0x7c01, 0x7d00, 0xfe00]
    assert bits(ck.f32_to_f16(src)).tolist() == want


def test_f16_to_f32_every_bit_pattern(ck):
    src = np.arange(2 ** 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    assert_bits_equal(ck.f16_to_f32(src), ref.ref_f16_to_f32(src))
    # Signalling NaNs keep their payload (the F16C instruction alone would quiet them).
    assert bits(ck.f16_to_f32(f16_from_bits(0x7c01, 0xfd00))).tolist() == [0x7f802000, 0xffa00000]


@pytest.mark.parametrize("n", SIZES)
def test_f16_to_f32_matches_numpy(ck, n):
    src = random_f16(n, seed=n)
    out = np.full(n, 3, dtype=np.float32)
    assert ck.f16_to_f32(src, out=out) is out
    assert_bits_equal(out, ref.ref_f16_to_f32(src))


def test_round_trip_is_identity_on_float16_values(ck):
    halves = np.arange(2 ** 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    assert_bits_equal(ck.f32_to_f16(ck.f16_to_f32(halves)), halves)


# --- sum_into ----------------------------------------------------------------------------------

@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sum_into_matches_numpy(compiled, n, dtype):
    rng = np.random.default_rng(n)
    dst = rng.standard_normal(n).astype(dtype)
    src = rng.standard_normal(n).astype(dtype)
    want = dst.copy()
    ref.ref_sum_into(want, src)
    compiled.sum_into(dst, src)
    assert_bits_equal(dst, want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sum_into_specials(compiled, dtype):
    vals = np.array([0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, np.finfo(dtype).max, 1e-300], dtype)
    dst, src = (a.ravel().copy() for a in np.meshgrid(vals, vals))
    want = dst.copy()
    with np.errstate(all="ignore"):
        ref.ref_sum_into(want, src)
    compiled.sum_into(dst, src)
    assert_bits_equal(dst, want)


@pytest.mark.parametrize("n", SIZES)
def test_sum_into_float16_matches_numpy(ck, n):
    dst, src = random_f16(n, seed=n), random_f16(n, seed=n + 1)
    want = dst.copy()
    with np.errstate(all="ignore"):
        ref.ref_sum_into(want, src)
    ck.sum_into(dst, src)
    assert_bits_equal(dst, want)


def test_sum_into_float16_nan_and_overflow_cases(ck):
    # Every pair of some specials, each pair in every lane position: NaN+NaN picks numpy's operand.
    special = [0x0000, 0x8000, 0x3c00, 0x7bff, 0xfbff, 0x7c00, 0xfc00, 0x7c01, 0x7e00, 0xfd55,
               0x7fff, 0x0001, 0x8001, 0x0400]
    a, b = (x.ravel() for x in np.meshgrid(special, special))
    for offset in range(9):
        dst = f16_from_bits(*([0x3c00] * offset + a.tolist()))
        src = f16_from_bits(*([0x3c00] * offset + b.tolist()))
        want = dst.copy()
        with np.errstate(all="ignore"):
            ref.ref_sum_into(want, src)
        ck.sum_into(dst, src)
        assert_bits_equal(dst, want)


def test_sum_into_float16_known_values(ck):
    dst = np.array([65504, 1, 2048, 0], dtype=np.float16)
    ck.sum_into(dst, np.array([65504, 2 ** -11, 1, -0.0], dtype=np.float16))
    # overflow to inf; 1 + 2^-11 ties to even (1); 2048 + 1 ties to even (2048); 0 + -0 = 0
    assert bits(dst).tolist() == [0x7c00, 0x3c00, 0x6800, 0x0000]


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_sum_into_same_array_doubles(compiled, dtype):
    a = np.arange(1023, dtype=dtype)
    compiled.sum_into(a, a)
    assert_bits_equal(a, (np.arange(1023) * 2).astype(dtype))


# --- copy_into / scale_into ---------------------------------------------------------------------

@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int8, np.uint64, np.complex64])
def test_copy_into(compiled, n, dtype):
    src = np.random.default_rng(n).integers(0, 100, n).astype(dtype)
    dst = np.zeros(n, dtype=dtype)
    compiled.copy_into(dst, src)
    assert_bits_equal(dst.view(np.uint8), src.view(np.uint8))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("alpha", [0.25, 1 / 3, -1.5, 0.0, 1e-30])
def test_scale_into_matches_numpy(compiled, n, alpha):
    src = random_f32(n, seed=n)
    dst, want = np.empty(n, np.float32), np.empty(n, np.float32)
    with np.errstate(all="ignore"):
        ref.ref_scale_into(want, src, alpha)
    compiled.scale_into(dst, src, alpha)
    assert_bits_equal(dst, want)
    compiled.scale_into(src, src, alpha)  # in place
    assert_bits_equal(src, want)


# --- argument checks (compiled and numpy twin alike) -------------------------------------------

def implementations():
    impls = [pytest.param(ref, id="reference")]
    if _kernels is not None:
        impls.append(pytest.param(_kernels, id="compiled"))
    return impls


def call(impl, name, *args):
    fn = getattr(impl, name, None) or getattr(impl, f"ref_{name}")
    return fn(*args)


F32 = np.zeros(16, np.float32)
F16 = np.zeros(16, np.float16)


@pytest.mark.parametrize("impl", implementations())
@pytest.mark.parametrize("name, args, error, message", [
    ("sum_into", (np.zeros(32, np.float32)[::2], F32), ValueError, "C-contiguous"),
    ("sum_into", (F32.copy(), np.zeros(32, np.float32)[::2]), ValueError, "C-contiguous"),
    ("sum_into", (F32.copy(), np.zeros(16, np.float64)), TypeError, "dtype mismatch"),
    ("sum_into", (F32.copy(), np.zeros(15, np.float32)), ValueError, "size mismatch"),
    ("sum_into", (np.zeros((4, 4), np.float32), F32), ValueError, "1-D"),
    ("sum_into", ([0.0] * 16, F32), TypeError, "numpy.ndarray"),
    ("sum_into", (np.zeros(16, np.int32), np.zeros(16, np.int32)), TypeError, "supports float16"),
    ("sum_into", (np.zeros(16, ">f4"), np.zeros(16, ">f4")), TypeError, "byte order"),
    ("copy_into", (F32.copy(), F16), TypeError, "dtype mismatch"),
    ("copy_into", (np.zeros(4, object), np.zeros(4, object)), TypeError, "object"),
    ("copy_into", (F32.copy(), np.zeros(32, np.float32)[::2]), ValueError, "C-contiguous"),
    ("scale_into", (F32.copy(), np.zeros(16, np.float64), 0.5), TypeError, "float32"),
    ("scale_into", (np.zeros(16, np.float64), np.zeros(16, np.float64), 0.5), TypeError, "float32"),
    ("f32_to_f16", (np.zeros(32, np.float32)[::2],), ValueError, "C-contiguous"),
    ("f32_to_f16", (F16,), TypeError, "float32"),
    ("f32_to_f16", (F32, np.zeros(16, np.float32)), TypeError, "float16"),
    ("f32_to_f16", (F32, np.zeros(15, np.float16)), ValueError, "size mismatch"),
    ("f16_to_f32", (F32,), TypeError, "float16"),
    ("f16_to_f32", (np.zeros(32, np.float16)[1::2],), ValueError, "C-contiguous"),
])
def test_bad_arguments_raise_clear_errors(impl, name, args, error, message):
    with pytest.raises(error, match=message):
        call(impl, name, *args)


@pytest.mark.parametrize("impl", implementations())
def test_read_only_unaligned_and_overlapping_arguments(impl):
    read_only = np.zeros(16, np.float32)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        call(impl, "sum_into", read_only, F32)
    unaligned = np.frombuffer(bytearray(68), dtype=np.float32, offset=1, count=16)
    with pytest.raises(ValueError, match="aligned"):
        call(impl, "f32_to_f16", unaligned)
    buf = np.zeros(32, np.float32)
    with pytest.raises(ValueError, match="partially overlap"):
        call(impl, "sum_into", buf[:16], buf[8:24])
    with pytest.raises(ValueError, match="overlap"):
        call(impl, "f32_to_f16", buf[:16], buf.view(np.float16)[8:24])


# --- facade --------------------------------------------------------------------------------------

def test_facade_exports_and_matches_reference():
    assert kernels.COMPILED is (_kernels is not None)
    assert kernels.has_f16c() is (_kernels is not None and _kernels.has_f16c())
    src = random_f32(1023, seed=1)
    assert_bits_equal(kernels.f32_to_f16(src), ref.ref_f32_to_f16(src))
    halves = random_f16(1023, seed=2)
    assert_bits_equal(kernels.f16_to_f32(halves), ref.ref_f16_to_f32(halves))
    finite = np.nan_to_num(src, nan=0.0, posinf=0.0, neginf=0.0)
    acc, want = finite.copy(), finite.copy()
    kernels.sum_into(acc, finite)
    ref.ref_sum_into(want, finite)
    assert_bits_equal(acc, want)
    kernels.scale_into(acc, acc, 0.5)
    assert_bits_equal(acc, finite)
    kernels.copy_into(acc, src)
    assert_bits_equal(acc, src)


def test_facade_falls_back_to_numpy_with_one_warning(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "geomx._kernels", None)  # makes the import fail
    monkeypatch.delattr(geomx, "_kernels", raising=False)
    try:
        with caplog.at_level(logging.WARNING, logger="geomx.kernels"):
            fallback = importlib.reload(kernels)
        assert fallback.COMPILED is False
        assert fallback.has_f16c() is False
        assert fallback.sum_into is fallback.ref_sum_into
        assert [r.levelname for r in caplog.records if r.name == "geomx.kernels"] == ["WARNING"]
        src = random_f32(100, seed=3)
        assert_bits_equal(fallback.f32_to_f16(src), src.astype(np.float16))
    finally:
        monkeypatch.undo()
        importlib.reload(kernels)
