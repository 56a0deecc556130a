"""Codec library (geomx.compression): compiled kernels against their numpy twins, BSC against an
independent numpy model carrying residual and momentum state, frames, registry validation."""
import json
import math

import numpy as np
import pytest
from helpers import built_or_skip, fail_unbuilt_under_ci

from geomx import compression as C
from geomx.compression import feedback
from geomx.compression import kernels as K
from geomx.compression.base import half_scale
from geomx.compression.kernels import reference as ref

try:
    from geomx import _compress
except ImportError:
    _compress = None

pytestmark = pytest.mark.unit

NOT_BUILT = "geomx._compress is not built; run `pip install -e . --no-build-isolation`"
SIZES = [0, 1, 7, 15, 16, 17, 31, 33, 64, 1023, 100003]
TINY = float(np.nextafter(np.float32(0), np.float32(1)))


def test_extension_built_when_ci_is_set():
    fail_unbuilt_under_ci(_compress, NOT_BUILT)


@pytest.fixture(scope="module")
def ck():
    return built_or_skip(_compress, NOT_BUILT)


@pytest.fixture(params=["compiled", "numpy"])
def kernel_impl(request, monkeypatch):
    """Run a codec test with the compiled kernels, then with the numpy twins patched in."""
    if request.param == "compiled":
        if _compress is None:
            pytest.skip(NOT_BUILT)
        return "compiled"
    for name in ("select_above", "dgc_accumulate", "sample_abs", "scatter_add", "first_nonfinite"):
        monkeypatch.setattr(K, name, getattr(ref, f"ref_{name}"))
    return "numpy"


def _bits(a):
    return np.asarray(a).view(np.uint8).tobytes()


def _random(n, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(n).astype(dtype)


# ---------------------------------------------------------------------------------------------
# Kernels: compiled vs numpy twin


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("quantile", [0.0, 0.5, 0.99, 1.0])
@pytest.mark.parametrize("cap_kind", ["all", "few", "zero"])
def test_select_above_matches_twin(ck, n, quantile, cap_kind):
    v = _random(n, seed=n)
    thr = float(np.quantile(np.abs(v), quantile)) if n else 0.5
    cap = {"all": n, "few": max(1, n // 10), "zero": 0}[cap_kind]
    got = ck.select_above(v, thr, cap)
    want = ref.ref_select_above(v, thr, cap)
    assert got[2] == want[2]
    assert got[0].dtype == want[0].dtype == np.int32
    assert _bits(got[0]) == _bits(want[0]) and _bits(got[1]) == _bits(want[1])
    assert got[0].size == min(cap, want[2])


@pytest.mark.parametrize("n", [1, 7, 16, 17, 100])
def test_select_above_zeros_and_ties(ck, n):
    zeros = np.zeros(n, np.float32)
    zeros[::3] = -0.0
    for thr in (0.0, TINY, 1.0):
        got, want = ck.select_above(zeros, thr, n), ref.ref_select_above(zeros, thr, n)
        assert got[2] == want[2] == (n if thr == 0.0 else 0)
        assert _bits(got[0]) == _bits(want[0]) and _bits(got[1]) == _bits(want[1])
    ties = np.where(np.arange(n) % 2, np.float32(1.5), np.float32(-1.5)).astype(np.float32)
    for cap in (0, 1, n // 2, n):
        got, want = ck.select_above(ties, 1.5, cap), ref.ref_select_above(ties, 1.5, cap)
        assert got[2] == want[2] == n
        assert list(got[0]) == list(range(min(cap, n)))  # ties: the lowest indices win
        assert _bits(got[1]) == _bits(want[1])


@pytest.mark.parametrize("n", [1, 7, 16, 17, 40, 100003])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_select_above_rejects_nonfinite(ck, n, bad):
    for pos in sorted({0, n // 2, n - 1}):
        v = _random(n, seed=pos)
        v[pos] = bad
        for fn in (ck.select_above, ref.ref_select_above):
            with pytest.raises(ValueError, match=f"non-finite value .* at index {pos}"):
                fn(v, 100.0, n)  # a high threshold still catches it


def test_select_above_argument_errors(ck):
    v = _random(10)
    for fn in (ck.select_above, ref.ref_select_above):
        for thr in (-1.0, np.inf, np.nan, 1e39):
            with pytest.raises(ValueError, match="thr must be"):
                fn(v, thr, 3)
        with pytest.raises(ValueError, match="max_k"):
            fn(v, 0.5, -1)
        with pytest.raises(TypeError, match="float32"):
            fn(v.astype(np.float64), 0.5, 3)
        with pytest.raises(ValueError, match="1-D"):
            fn(v.reshape(2, 5), 0.5, 3)
        with pytest.raises(ValueError, match="C-contiguous"):
            fn(v[::2], 0.5, 3)
        with pytest.raises(TypeError, match="ndarray"):
            fn(list(v), 0.5, 3)


def test_index_dtype(ck):
    for n in (0, 1, 2**31 - 1, 2**31, 2**40):
        assert ck.index_dtype(n) == ref.ref_index_dtype(n)
    assert ref.ref_index_dtype(2**31 - 1) == np.int32 and ref.ref_index_dtype(2**31) == np.int64


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("m", [0.0, 0.9, 0.3])
def test_dgc_accumulate_matches_twin(ck, n, m):
    rng = np.random.default_rng(n)
    u1, v1 = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    u2, v2 = u1.copy(), v1.copy()
    for step in range(5):
        g = rng.standard_normal(n).astype(np.float32) * np.float32(10.0 ** (step - 2))
        ck.dgc_accumulate(u1, v1, g, m)
        ref.ref_dgc_accumulate(u2, v2, g, m)
        assert _bits(u1) == _bits(u2) and _bits(v1) == _bits(v2)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_dgc_accumulate_rejects_nonfinite_before_touching_state(ck, bad):
    for n, pos in ((1, 0), (100, 77), (1000, 999)):
        g = _random(n)
        g[pos] = bad
        for fn in (ck.dgc_accumulate, ref.ref_dgc_accumulate):
            u, v = np.ones(n, np.float32), np.ones(n, np.float32)
            with pytest.raises(ValueError, match=f"non-finite gradient value .* at index {pos}"):
                fn(u, v, g, 0.9)
            assert (u == 1).all() and (v == 1).all()


def test_dgc_accumulate_argument_errors(ck):
    u = np.zeros(10, np.float32)
    for fn in (ck.dgc_accumulate, ref.ref_dgc_accumulate):
        with pytest.raises(ValueError, match="size mismatch"):
            fn(u, np.zeros(9, np.float32), np.zeros(10, np.float32), 0.9)
        with pytest.raises(ValueError, match="overlap"):
            fn(u, u, np.zeros(10, np.float32), 0.9)
        ro = np.zeros(10, np.float32)
        ro.flags.writeable = False
        with pytest.raises(ValueError, match="read-only"):
            fn(ro, np.zeros(10, np.float32), np.zeros(10, np.float32), 0.9)


@pytest.mark.parametrize("n", [1, 7, 17, 1023, 100003])
def test_sample_abs_matches_twin(ck, n):
    v = _random(n, seed=n)
    for seed in (0, 1, 2**64 - 1, 123456789):
        for count in (0, 1, 33, 5000):
            for block in (1, 3, 8, 64):
                got, want = ck.sample_abs(v, count, seed, block), ref.ref_sample_abs(v, count, seed, block)
                assert _bits(got) == _bits(want)
            assert _bits(ck.sample_abs(v, count, seed)) == _bits(ref.ref_sample_abs(v, count, seed, 8))
    np.testing.assert_array_equal(ref.ref_sample_positions(n, 100, 42), model_splitmix_positions(n, 100, 42))
    for fn in (ck.sample_abs, ref.ref_sample_abs):
        with pytest.raises(ValueError, match="block must be"):
            fn(v, 3, 0, 0)
    with pytest.raises(ValueError, match="0 < size"):
        ck.sample_abs(np.zeros(0, np.float32), 3, 0)
    with pytest.raises(ValueError, match="0 < size"):
        ref.ref_sample_abs(np.zeros(0, np.float32), 3, 0)


def test_sample_positions_in_bounds_and_spread():
    for n in (1, 2, 3, 1000, 2**31 + 5, 2**32 - 1):
        pos = ref.ref_sample_positions(n, 20000, 7)
        assert pos.max() < n
    pos = ref.ref_sample_positions(1000, 800000, 7)
    counts = np.bincount(pos.astype(np.int64), minlength=1000)
    assert counts.min() > 600 and counts.max() < 1000  # about uniform, wrap included (800 expected)


def test_first_nonfinite_matches_twin(ck):
    for n in (0, 1, 63, 64, 65, 1000):
        v = _random(n)
        assert ck.first_nonfinite(v) == ref.ref_first_nonfinite(v) == -1
        for pos in sorted({0, n // 2, n - 1}) if n else []:
            for bad in (np.nan, np.inf, -np.inf):
                w = v.copy()
                w[pos] = bad
                w[n - 1] = np.inf
                assert ck.first_nonfinite(w) == ref.ref_first_nonfinite(w) == pos


@pytest.mark.parametrize("idx_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("n", [1, 7, 17, 1000])
def test_scatter_add_matches_add_at(ck, idx_dtype, n):
    rng = np.random.default_rng(n)
    for nnz in (0, 1, 5, 3 * n):  # 3n forces duplicates
        idx = rng.integers(0, n, nnz).astype(idx_dtype)
        vals = rng.standard_normal(nnz).astype(np.float32)
        base = rng.standard_normal(n).astype(np.float32)
        a, b, c = base.copy(), base.copy(), base.copy()
        ck.scatter_add(a, idx, vals)
        ref.ref_scatter_add(b, idx, vals)
        np.add.at(c, idx, vals)
        assert _bits(a) == _bits(b) == _bits(c)


def test_scatter_add_rejects_out_of_range_before_writing(ck):
    for fn in (ck.scatter_add, ref.ref_scatter_add):
        for bad in (-1, 10, 2**31 - 1):
            dst = np.zeros(10, np.float32)
            idx = np.array([1, 2, bad, 3], np.int64)
            with pytest.raises(ValueError, match=f"index {bad} at position 2 is out of range"):
                fn(dst, idx, np.ones(4, np.float32))
            assert (dst == 0).all()
        with pytest.raises(TypeError, match="int32 or int64"):
            fn(np.zeros(10, np.float32), np.array([1], np.uint32), np.ones(1, np.float32))
        with pytest.raises(ValueError, match="size mismatch"):
            fn(np.zeros(10, np.float32), np.array([1, 2], np.int32), np.ones(1, np.float32))
        with pytest.raises(TypeError, match="float32"):
            fn(np.zeros(10, np.float64), np.array([1], np.int32), np.ones(1, np.float32))


# ---------------------------------------------------------------------------------------------
# BSC against an independent numpy model


def model_splitmix_positions(n, count, seed, block=8):
    """Positions of the threshold sample, written from the splitmix64 definition: runs of
    ``block`` consecutive positions, wrapping at n."""
    out = []
    mask = (1 << 64) - 1
    j = 0
    while len(out) < count:
        j += 1
        z = (seed + j * 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        z ^= z >> 31
        start = ((z >> 32) * n) >> 32
        out.extend((start + t) % n for t in range(block))
    return np.array(out[:count], dtype=np.int64)


class BSCModel:
    """The documented BSC algorithm, in plain numpy, with its own per-key state."""

    def __init__(self, r, m=0.0, bound=200000, seed=0, warmup=10, start=0.05, half=True):
        self.r, self.m, self.bound, self.seed = r, np.float32(m), bound, seed
        self.half = half  # value_dtype float16: sent values rounded to float16 after a power-of-two scale
        self.warmup, self.start = warmup, start
        self.u, self.v, self.steps, self.rounds = {}, {}, {}, {}
        self.last_ratio = {}

    def ratio(self, key):
        """This round's kept fraction: geometric from ``start`` to r over ``warmup`` rounds."""
        t = self.rounds.get(key, 0)
        self.rounds[key] = t + 1
        if t >= self.warmup or self.start <= self.r:
            return self.r
        return self.start * (self.r / self.start) ** (t / self.warmup)

    @staticmethod
    def k(n, r):
        return max(1, math.ceil(round(r * n, 9)))

    def encode(self, key, g):
        g = g.astype(np.float32).ravel()
        n = g.size
        if n < self.bound:
            return "dense", g.copy(), None
        u = self.u.setdefault(key, np.zeros(n, np.float32))
        v = self.v.setdefault(key, np.zeros(n, np.float32))
        u[:] = self.m * u + g
        v[:] = v + u
        r = self.last_ratio[key] = self.ratio(key)
        k = self.k(n, r)
        if k >= n:
            thr, cap = 0.0, n
        else:
            s = max(1000, math.ceil(round(n / 100, 9)), math.ceil(round(250 / r, 9)))
            if s >= n:
                thr, cap = np.sort(np.abs(v))[::-1][k - 1], k
            else:
                step = self.steps.get(key, 0)
                self.steps[key] = step + 1
                seed = int(np.random.SeedSequence([self.seed, key, step]).generate_state(1, np.uint64)[0])
                sample = np.abs(v[model_splitmix_positions(n, s, seed)])
                ks = min(s, max(1, math.ceil(round(r * s, 9))))
                thr, cap = np.sort(sample)[::-1][ks - 1], min(n, 2 * k)
        sel = np.flatnonzero((np.abs(v) >= thr) & (v != 0))[:cap]
        vals = v[sel].copy()
        if self.half and vals.size:
            # the largest magnitude scaled into [2**14, 2**15), rounded to float16, scaled back
            scale = np.float32(2.0 ** (15 - math.frexp(float(np.max(np.abs(vals))))[1]))
            vals = (vals * scale).astype(np.float16).astype(np.float32) / scale
        v[sel] = v[sel] - vals  # the rounding error stays
        u[sel] = 0
        return "sparse", vals, sel


def _grads(rng, n, steps):
    # A varying scale per step plus a persistent direction exercises momentum and residual.
    base = rng.standard_normal(n).astype(np.float32)
    for t in range(steps):
        yield (0.3 * base + rng.standard_normal(n).astype(np.float32) * np.float32(1 + t % 3)).astype(np.float32)


@pytest.mark.parametrize("r", [0.01, 0.05])
@pytest.mark.parametrize("m", [0.9, 0.0, 0.5])
@pytest.mark.parametrize("warmup", [None, 0, 8])
@pytest.mark.parametrize("value_dtype", [None, "float32"])
def test_bsc_matches_model_over_steps(kernel_impl, r, m, warmup, value_dtype):
    # sizes: sampled threshold (60000), exactly ranked (3000 <= sample size), small dense (500)
    sizes = {0: 60000, 1: 3000, 2: 500, 7: 25000}
    bound = 1000
    params = {"type": "bsc", "threshold": r, "momentum": m, "size_lower_bound": bound, "seed": 5}
    half = value_dtype is None  # the default: float16 values
    if value_dtype is not None:
        params["value_dtype"] = value_dtype
    if warmup is None:  # the default warm-up: 10 rounds from 0.05 (none at r = 0.05)
        model = BSCModel(r, m, bound, seed=5, half=half)
    else:  # 8 rounds from 0.4, or none
        params.update(warmup_rounds=warmup, warmup_threshold=0.4)
        model = BSCModel(r, m, bound, seed=5, warmup=warmup, start=0.4, half=half)
    codec = C.create(params)
    rng = np.random.default_rng(1)
    streams = {key: list(_grads(rng, n, 22)) for key, n in sizes.items()}
    for step in range(22):
        for key in (7, 0, 2, 1) if step % 2 else (0, 1, 2, 7):  # the order does not matter
            g = streams[key][step]
            p = codec.encode(key, g)
            kind, vals, idx = model.encode(key, g)
            assert p.kind == kind
            if kind == "dense":
                assert _bits(p.values) == _bits(vals)
                continue
            assert p.indices.dtype == np.int32
            np.testing.assert_array_equal(p.indices, idx)
            assert _bits(p.values) == _bits(vals)
            n, rk = sizes[key], model.last_ratio[key]
            assert p.nnz <= (1 if C.sample_size(n, rk) >= n else 2) * model.k(n, rk)
            st = codec.feedback.state(key)
            np.testing.assert_array_equal(st.v, model.v[key])
            np.testing.assert_array_equal(st.u, model.u[key])


def test_bsc_sampled_selection_is_near_k():
    n, r = 500000, 0.01
    codec = C.create({"type": "bsc", "threshold": r, "warmup_rounds": 0})
    k = C.kept_count(n, r)
    counts = [codec.encode(0, g).nnz for g in _grads(np.random.default_rng(3), n, 20)]
    assert all(0.7 * k <= c <= 1.3 * k for c in counts), counts


def test_bsc_both_directions_matches_model(kernel_impl):
    """Two parties push sparse, the global server sums and sends the union back exactly."""
    n, r, parties, bound = 40000, 0.02, 2, 1000
    ups = [C.create({"type": "bsc", "threshold": r, "size_lower_bound": bound}) for _ in range(parties)]
    models = [BSCModel(r, 0.0, bound) for _ in range(parties)]  # the defaults
    rng = np.random.default_rng(9)
    for _ in range(20):
        grads = [rng.standard_normal(n).astype(np.float32) for _ in range(parties)]
        # local server -> global server, through the wire format
        received = []
        for codec, g in zip(ups, grads):
            meta, data = C.to_frames(codec.encode(4, g))
            received.append(C.from_frames(json.loads(json.dumps(meta)), data.tobytes(), n))
        total = C.sparse_sum(received, n)
        meta, data = C.to_frames(C.sparse_from_dense(total))
        pulled = C.decode_payload(C.from_frames(meta, data, n), n)
        # the model of the whole pipeline
        want = np.zeros(n, np.float32)
        for model, g in zip(models, grads):
            _, vals, idx = model.encode(4, g)
            want[idx] += vals
        assert _bits(pulled) == _bits(want)
        assert np.count_nonzero(pulled) <= parties * 2 * C.kept_count(n, models[0].last_ratio[4])


@pytest.mark.parametrize("m", [0.9, 0.0])
def test_bsc_keeping_everything_is_exact_dense(kernel_impl, m):
    """k == n (r > (n-1)/n): every step transmits exactly the gradient, summed exactly."""
    n = 1000
    r = 0.9995  # ceil(999.5) = 1000
    assert C.kept_count(n, r) == n
    codecs = [C.create({"type": "bsc", "threshold": r, "momentum": m, "size_lower_bound": 0}) for _ in range(2)]
    rng = np.random.default_rng(0)
    for _ in range(20):
        grads = [rng.integers(-50, 50, n).astype(np.float32) for _ in range(2)]  # zeros included
        payloads = [c.encode(1, g) for c, g in zip(codecs, grads)]
        for p, g in zip(payloads, grads):
            assert p.kind == "sparse"
            assert _bits(C.decode_payload(p, n)) == _bits(g + np.float32(0))
        assert _bits(C.sparse_sum(payloads, n)) == _bits(grads[0] + grads[1])
        for c in codecs:
            assert not c.feedback.state(1).v.any()


def test_bsc_all_zeros_sends_nothing_and_ties_respect_cap(kernel_impl):
    codec = C.create({"type": "bsc", "threshold": 0.01, "size_lower_bound": 0, "momentum": 0, "warmup_rounds": 0})
    for n in (1, 7, 5000, 300000):
        p = codec.encode(n, np.zeros(n, np.float32))
        assert p.kind == "sparse" and p.nnz == 0
        assert not C.decode_payload(p, n).any()
    for n in (7, 5000, 300000):
        k = C.kept_count(n, 0.01)
        p = codec.encode(10 + n, np.ones(n, np.float32))
        # every entry ties: exact ranking sends k, a sampled threshold at most 2k; lowest indices
        assert p.nnz == (k if n <= C.sample_size(n, 0.01) else min(n, 2 * k))
        np.testing.assert_array_equal(p.indices, np.arange(p.nnz))
    assert codec.encode(99, np.zeros(0, np.float32)).nnz == 0


def test_bsc_rejects_nonfinite_gradients_and_keeps_state(kernel_impl):
    n = 5000
    codec = C.create({"type": "bsc", "threshold": 0.05, "size_lower_bound": 0})
    twin = C.create({"type": "bsc", "threshold": 0.05, "size_lower_bound": 0})
    rng = np.random.default_rng(2)
    g = rng.standard_normal(n).astype(np.float32)
    codec.encode(0, g), twin.encode(0, g)
    for bad in (np.nan, np.inf, -np.inf):
        h = g.copy()
        h[1234] = bad
        with pytest.raises(ValueError, match="non-finite gradient value .* at index 1234"):
            codec.encode(0, h)
    p, q = codec.encode(0, g), twin.encode(0, g)  # the failed calls left no trace
    assert _bits(p.values) == _bits(q.values) and _bits(p.indices) == _bits(q.indices)
    # overflow of the accumulated state: clear error, the key's state reset
    big = np.full(n, 3e38, np.float32)
    codec.encode(1, big)
    with pytest.raises(ValueError, match="overflowed float32.*reset"):
        codec.encode(1, big)
    assert codec.feedback.state(1) is None
    with pytest.raises(ValueError, match="had 5000 elements and now has 10"):
        codec.encode(0, np.ones(10, np.float32))


def test_error_feedback_wraps_any_codec():
    """The wrapper is generic: around fp16 it feeds the rounding error back."""
    ef = C.ErrorFeedback(C.create({"type": "fp16"}), momentum=0.0)
    g = np.full(4, 1.0 + 2.0**-12, np.float32)  # not representable in float16
    sent = np.zeros(4, np.float64)
    for _ in range(4096):
        sent += C.decode_payload(ef.encode(0, g), 4)
    # what was sent plus what is still pending equals what was pushed
    np.testing.assert_allclose(sent + ef.state(0).v, 4096 * g.astype(np.float64), rtol=1e-6)
    assert ef.state(0).v.max() < 2.0**-10


# ---------------------------------------------------------------------------------------------
# fp16, mpq, none, for_tensor


def test_fp16_codec_is_numpy_rounding_and_exact_decode():
    codec = C.create({"type": "fp16"})
    g = _random(1001).reshape(7, 143) * np.float32(1000)
    p = codec.encode(0, g)
    assert p.kind == "fp16" and p.values.dtype == np.float16
    assert _bits(p.values) == _bits(g.ravel().astype(np.float16))
    d = codec.decode(p, g.size)
    assert d.dtype == np.float32 and _bits(d) == _bits(p.values.astype(np.float32))
    h = g.astype(np.float16)
    assert _bits(codec.encode(0, h).values) == _bits(h.ravel())


def test_mpq_codec_follows_the_table():
    codec = C.create({"type": "mpq", "threshold": 0.01, "size_lower_bound": 1000})
    small, large = _random(999), _random(1000)
    p = codec.encode(0, small)
    assert p.kind == "fp16" and _bits(p.values) == _bits(small.astype(np.float16))
    p = codec.encode(1, large)
    assert p.kind == "sparse" and p.values.dtype == np.float32
    party = C.create(codec.params(), link="party")
    assert party.encode(1, large).kind == "dense"
    assert party.encode(0, small).kind == "fp16"


TABLE = {  # (party large, party small, wan large, wan small)
    "none": ("dense", "dense", "dense", "dense"),
    "bsc": ("dense", "dense", "bsc", "dense"),
    "fp16": ("fp16", "fp16", "fp16", "fp16"),
    "mpq": ("dense", "fp16", "bsc", "fp16"),
}


@pytest.mark.parametrize("name", sorted(TABLE))
def test_for_tensor_table(name):
    params = {"type": name, "size_lower_bound": 200000}
    if name in ("bsc", "mpq"):
        params["threshold"] = 0.01
    codec = C.create(params)
    got = (codec.for_tensor(200000, "party"), codec.for_tensor(199999, "party"),
           codec.for_tensor(200000), codec.for_tensor(199999, "wan"))
    assert got == TABLE[name]
    assert C.create(params, link="party").for_tensor(200000) == TABLE[name][0]
    with pytest.raises(ValueError, match="link"):
        codec.for_tensor(10, "lan")


def test_dense_codec_shares_memory():
    g = _random(100).reshape(10, 10)
    p = C.create({"type": "none"}).encode(0, g)
    assert p.kind == "dense" and np.shares_memory(p.values, g)
    assert C.decode_payload(p, 100) is p.values


def test_sparse_sum_mixes_kinds():
    n = 50
    d = _random(n)
    s = C.Payload("sparse", np.array([1, 2, 3], np.float32), np.array([4, 4, 49], np.int64))
    f = C.Payload("fp16", d.astype(np.float16))
    out = C.sparse_sum([s, C.Payload("dense", d), f], n)
    want = d + d.astype(np.float16).astype(np.float32)
    want[4] += np.float32(1)
    want[4] += np.float32(2)
    want[49] += np.float32(3)
    np.testing.assert_allclose(out, want, rtol=1e-6)
    with pytest.raises(ValueError, match="does not fit"):
        C.sparse_sum([C.Payload("dense", d[:10])], n)
    with pytest.raises(ValueError, match="out of range"):
        C.sparse_sum([C.Payload("sparse", np.ones(1, np.float32), np.array([n], np.int32))], n)


# ---------------------------------------------------------------------------------------------
# Frames


def _payloads():
    rng = np.random.default_rng(4)
    return [
        C.Payload("sparse", rng.standard_normal(5).astype(np.float32), np.array([0, 3, 9, 2, 3], np.int32)),
        C.Payload("sparse", rng.standard_normal(3).astype(np.float32), np.array([1, 5, 9], np.int64)),
        C.Payload("sparse", np.zeros(0, np.float32), np.zeros(0, np.int32)),
        C.Payload("dense", rng.standard_normal(10).astype(np.float32)),
        C.Payload("dense", rng.standard_normal(10).astype(np.float64)),
        C.Payload("dense", rng.standard_normal(10).astype(np.float16)),
        C.Payload("fp16", rng.standard_normal(10).astype(np.float16)),
        # what a codec with value_dtype float16 sends: float16 numbers times a power of two
        C.Payload("sparse", np.array([3e-5, -1.5e-3, 2.5e-7], np.float32).astype(np.float16).astype(np.float32)
                  * np.float32(2.0 ** -20), np.array([0, 4, 9], np.int32)),
        C.Payload("sparse", np.array([7.0, -0.0625], np.float32), np.array([2, 2], np.int64)),
    ]


@pytest.mark.parametrize("i", range(9))
def test_frames_round_trip(i):
    p = _payloads()[i]
    meta, data = C.to_frames(p)
    assert data.dtype == np.uint8 and data.ndim == 1
    # increasing indices travel as 16-bit gaps, float16-representable sparse values (times a power of
    # two) as float16: 2 bytes each instead of 4
    index_bytes = 0 if p.indices is None else (2 if meta["index_dtype"] == "gap16" else p.indices.itemsize)
    value_bytes = 2 if (p.kind, meta["value_dtype"]) == ("sparse", "float16") else p.values.itemsize
    assert data.size == p.nnz * (index_bytes + value_bytes)
    assert (meta["index_dtype"] == "gap16") == (p.indices is not None and p.nnz > 0
                                                and bool(np.all(np.diff(p.indices) >= 0)))
    meta = json.loads(json.dumps(meta))
    for buf in (data, data.tobytes(), bytearray(data.tobytes()), memoryview(data.tobytes())):
        q = C.from_frames(meta, buf, 10)
        assert q.kind == p.kind and _bits(q.values) == _bits(p.values)
        assert q.values.dtype == p.values.dtype
        if p.indices is None:
            assert q.indices is None
        else:
            want = np.int32 if meta["index_dtype"] == "gap16" else p.indices.dtype
            assert q.indices.dtype == want and np.array_equal(q.indices, p.indices)
    # a misaligned buffer still decodes (copied)
    shifted = np.empty(data.size + 1, np.uint8)[1:]
    shifted[:] = data
    q = C.from_frames(meta, shifted, 10)
    assert _bits(q.values) == _bits(p.values)


def test_frames_unsorted_duplicate_indices_add_up():
    p = _payloads()[0]
    meta, data = C.to_frames(p)
    d = C.decode_payload(C.from_frames(meta, data, 10), 10)
    assert d[3] == p.values[1] + p.values[4]


def _sparse_frame():
    """A sparse frame in the plain layout (int32 indices, float32 values), built by hand: to_frames
    packs these indices and values smaller (gap16, float16), which GAP16_MALFORMED covers."""
    data = np.concatenate([np.array([1, 7], "<i4").view(np.uint8), np.ones(2, "<f4").view(np.uint8)])
    return {"kind": "sparse", "nnz": 2, "index_dtype": "int32", "value_dtype": "float32"}, data


MALFORMED = [
    ("meta not a dict", lambda m, d: (["sparse"], d, 10), "meta must be a dict"),
    ("missing key", lambda m, d: ({k: v for k, v in m.items() if k != "nnz"}, d, 10), "missing \\['nnz'\\]"),
    ("extra key", lambda m, d: ({**m, "size": 10}, d, 10), "unexpected \\['size'\\]"),
    ("unknown kind", lambda m, d: ({**m, "kind": "topk"}, d, 10), "kind must be one of"),
    ("kind not str", lambda m, d: ({**m, "kind": 1}, d, 10), "kind must be one of"),
    ("nnz negative", lambda m, d: ({**m, "nnz": -1}, d, 10), "nnz must be an int >= 0"),
    ("nnz bool", lambda m, d: ({**m, "nnz": True}, d, 10), "nnz must be an int >= 0"),
    ("nnz float", lambda m, d: ({**m, "nnz": 2.0}, d, 10), "nnz must be an int >= 0"),
    ("nnz str", lambda m, d: ({**m, "nnz": "2"}, d, 10), "nnz must be an int >= 0"),
    ("nnz over size", lambda m, d: (m, d, 1), "nnz=2 for a tensor of 1"),
    ("nnz vs bytes", lambda m, d: ({**m, "nnz": 3}, d, 10), "needs 24 bytes, got 16"),
    ("short data", lambda m, d: (m, d[:-1], 10), "needs 16 bytes, got 15"),
    ("long data", lambda m, d: (m, np.append(d, np.uint8(0)), 10), "needs 16 bytes, got 17"),
    ("value dtype", lambda m, d: ({**m, "value_dtype": "float64"}, d, 10), "value_dtype must be one of"),
    ("value dtype object", lambda m, d: ({**m, "value_dtype": "object"}, d, 10), "value_dtype must be one of"),
    ("value dtype int", lambda m, d: ({**m, "value_dtype": 4}, d, 10), "value_dtype must be one of"),
    ("index dtype", lambda m, d: ({**m, "index_dtype": "uint32"}, d, 10), "index_dtype must be one of"),
    ("index dtype null", lambda m, d: ({**m, "index_dtype": None}, d, 10), "index_dtype must be one of"),
    ("index out of range", lambda m, d: (m, d, 7), "index 7 is out of range for a tensor of 7"),
    ("negative index", lambda m, d: (m, np.concatenate([np.array([-1], "<i4").view(np.uint8), d[4:]]), 10),
     "index -1 is out of range"),
    ("data list", lambda m, d: (m, list(d), 10), "frame data must be bytes"),
    ("data float array", lambda m, d: (m, d.view(np.float32), 10), "1-D uint8"),
    ("size negative", lambda m, d: (m, d, -1), "size must be an int >= 0"),
    ("size bool", lambda m, d: (m, d, True), "size must be an int >= 0"),
]


@pytest.mark.parametrize("case", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_from_frames_rejects_malformed(case):
    _, mutate, message = case
    meta, data = _sparse_frame()
    args = mutate(dict(meta), data)
    with pytest.raises(ValueError, match=message):
        C.from_frames(*args)


def _compact_frame():
    meta, data = C.to_frames(C.Payload("sparse", np.array([1.0, -2.0], np.float32), np.array([1, 7], np.int32)))
    assert (meta["index_dtype"], meta["value_dtype"], data.size) == ("gap16", "float16", 8)
    return meta, data


GAP16_MALFORMED = [
    ("scale missing", lambda m, d: ({k: v for k, v in m.items() if k != "scale"}, d, 10), "needs an int 'scale'"),
    ("scale bool", lambda m, d: ({**m, "scale": True}, d, 10), "needs an int 'scale'"),
    ("scale float", lambda m, d: ({**m, "scale": 1.5}, d, 10), "needs an int 'scale'"),
    ("scale too large", lambda m, d: ({**m, "scale": 1000}, d, 10), "needs an int 'scale'"),
    ("scale on float32", lambda m, d: ({**m, "value_dtype": "float32"}, np.zeros(12, np.uint8), 10),
     "'scale' belongs to sparse frames with float16 values"),
    ("gaps past the end", lambda m, d: (m, d, 7), "index 7 is out of range for a tensor of 7"),
    ("gaps overflow", lambda m, d: (m, np.concatenate([np.array([65535, 65535], "<u2").view(np.uint8), d[4:]]),
                                    100000), "index 131070 is out of range"),
    ("short gap data", lambda m, d: (m, d[:-1], 10), "needs 8 bytes, got 7"),
    ("gap16 on dense", lambda m, d: ({"kind": "dense", "nnz": 10, "index_dtype": "gap16", "value_dtype": "float32"},
                                     np.zeros(40, np.uint8), 10), "index_dtype must be null"),
]


@pytest.mark.parametrize("case", GAP16_MALFORMED, ids=[c[0] for c in GAP16_MALFORMED])
def test_from_frames_rejects_malformed_compact(case):
    """Hostile compact frames (gap16 indices, float16 values with a scale) are refused by name."""
    _, mutate, message = case
    meta, data = _compact_frame()
    with pytest.raises(ValueError, match=message):
        C.from_frames(*mutate(dict(meta), data))


def test_compact_frames_carry_a_codecs_payload_exactly():
    """A BSC payload (increasing indices, float16-rounded values) travels in 4 bytes an entry and decodes
    to the same tensor; one whose gaps exceed 16 bits falls back to int32 indices."""
    n = 200000
    codec = C.create({"type": "bsc", "threshold": 0.01, "size_lower_bound": 0, "warmup_rounds": 0})
    g = np.random.default_rng(4).standard_normal(n).astype(np.float32)
    p = codec.encode(0, g)
    meta, data = C.to_frames(p)
    assert (meta["index_dtype"], meta["value_dtype"]) == ("gap16", "float16") and data.size == 4 * p.nnz
    q = C.from_frames(json.loads(json.dumps(meta)), data.tobytes(), n)
    assert _bits(C.decode_payload(q, n)) == _bits(C.decode_payload(p, n))
    far = C.Payload("sparse", np.array([1.0, 2.0], np.float32), np.array([3, 70000], np.int32))
    meta, data = C.to_frames(far)
    assert meta["index_dtype"] == "int32" and data.size == 2 * (4 + 2)
    assert np.array_equal(C.from_frames(meta, data, n).indices, far.indices)


def test_sum_of_parties_payloads_travels_as_float16_pairs_exactly():
    """The global server's downlink: the sum of two parties' BSC payloads (float16 values, each party at
    its own scale, many entries sent by both). Exact as float16 pairs (an entry that needs more bits
    sent twice, its halves adding up), in fewer bytes than float32 values; a value no pair holds
    exactly keeps the frame in float32."""
    n = 200000
    rng = np.random.default_rng(7)
    common = rng.standard_normal(n).astype(np.float32)
    payloads = []
    for party in range(2):
        codec = C.create({"type": "bsc", "threshold": 0.01, "size_lower_bound": 0, "warmup_rounds": 0})
        g = common + np.float32(0.5 + party) * rng.standard_normal(n).astype(np.float32)
        payloads.append(codec.encode(0, g))
    total = C.sparse_sum(payloads, n)
    down = C.sparse_from_dense(total)
    both = down.nnz < payloads[0].nnz + payloads[1].nnz
    assert both and half_scale(down.values) is None  # entries of both parties: not one float16 each
    meta, data = C.to_frames(down)
    assert (meta["index_dtype"], meta["value_dtype"]) == ("gap16", "float16")
    assert down.nnz < meta["nnz"] < 2 * down.nnz and data.size == 4 * meta["nnz"] < 6 * down.nnz
    q = C.from_frames(json.loads(json.dumps(meta)), data.tobytes(), n)
    assert _bits(C.decode_payload(q, n)) == _bits(total)
    # one value with alternating significand bits (5/3 in float32): no float16 pair holds its 24 bits,
    # so the frame is float32
    five_thirds = np.array([0x3FD55555], np.uint32).view(np.float32)
    odd = C.Payload("sparse", np.concatenate([down.values[:-1], five_thirds]), down.indices)
    meta, data = C.to_frames(odd)
    assert meta["value_dtype"] == "float32" and meta["nnz"] == odd.nnz
    assert _bits(C.decode_payload(C.from_frames(meta, data, n), n)) == _bits(C.decode_payload(odd, n))


def test_from_frames_rejects_malformed_dense():
    meta, data = C.to_frames(C.Payload("dense", np.ones(4, np.float32)))
    with pytest.raises(ValueError, match="nnz=4 for a tensor of 5"):
        C.from_frames(meta, data, 5)
    with pytest.raises(ValueError, match="index_dtype must be null"):
        C.from_frames({**meta, "index_dtype": "int32"}, data, 4)
    meta16, data16 = C.to_frames(C.Payload("fp16", np.ones(4, np.float16)))
    with pytest.raises(ValueError, match="fp16 frame value_dtype"):
        C.from_frames({**meta16, "value_dtype": "float32"}, data, 4)
    assert C.from_frames(meta16, data16, 4).values.dtype == np.float16


def test_to_frames_rejects_inconsistent_payloads():
    with pytest.raises(ValueError, match="needs indices"):
        C.to_frames(C.Payload("sparse", np.ones(2, np.float32)))
    with pytest.raises(ValueError, match="2 indices and 3 values"):
        C.to_frames(C.Payload("sparse", np.ones(3, np.float32), np.arange(2, dtype=np.int32)))
    with pytest.raises(ValueError, match="carries no indices"):
        C.to_frames(C.Payload("dense", np.ones(2, np.float32), np.arange(2, dtype=np.int32)))
    with pytest.raises(ValueError, match="values must be"):
        C.to_frames(C.Payload("fp16", np.ones(2, np.float32)))
    with pytest.raises(ValueError, match="int32 or int64"):
        C.to_frames(C.Payload("sparse", np.ones(2, np.float32), np.arange(2, dtype=np.uint16)))


# ---------------------------------------------------------------------------------------------
# Registry


@pytest.mark.parametrize("params", [
    {"type": "none"}, {"type": "fp16"}, {"type": "bsc", "threshold": 0.01},
    {"type": "mpq", "threshold": 0.05, "momentum": 0.0, "size_lower_bound": 1000, "seed": 3},
    {"type": "BSC", "threshold": 0.5, "momentum": 0.99},
])
def test_params_round_trip(params):
    codec = C.create(params)
    described = json.loads(json.dumps(codec.params()))
    again = C.create(described)
    assert type(again) is type(codec) and again.params() == codec.params()
    assert described["type"] == params["type"].lower()
    for k, v in params.items():
        if k != "type":
            assert described[k] == v


@pytest.mark.parametrize("bad", [0, 0.0, 1, 1.0, -0.1, 1.5, float("nan"), float("inf"), True, False,
                                 "0.01", None, [0.01]])
@pytest.mark.parametrize("name", ["bsc", "mpq"])
def test_bad_threshold_rejected(name, bad):
    with pytest.raises(ValueError, match="threshold"):
        C.create({"type": name, "threshold": bad})


def test_registry_validation():
    with pytest.raises(ValueError, match="unknown compression type 'topk'; known types: bsc, fp16, mpq, none"):
        C.create({"type": "topk"})
    with pytest.raises(ValueError, match="need a 'type'"):
        C.create({"threshold": 0.01})
    with pytest.raises(ValueError, match="'type' must be a string"):
        C.create({"type": 3})
    with pytest.raises(ValueError, match="must be a dict"):
        C.create("bsc")
    with pytest.raises(ValueError, match="needs 'threshold'"):
        C.create({"type": "bsc"})
    with pytest.raises(ValueError, match="unknown parameter\\(s\\) 'ratio' for codec 'bsc'"):
        C.create({"type": "bsc", "threshold": 0.01, "ratio": 0.01})
    with pytest.raises(ValueError, match="unknown parameter\\(s\\) 'threshold' for codec 'fp16'"):
        C.create({"type": "fp16", "threshold": 0.01})
    for m in (1, 1.0, -0.1, True, "0.9", float("nan")):
        with pytest.raises(ValueError, match="momentum"):
            C.create({"type": "bsc", "threshold": 0.01, "momentum": m})
    for b in (-1, 1.5, True, "1000"):
        with pytest.raises(ValueError, match="size_lower_bound"):
            C.create({"type": "bsc", "threshold": 0.01, "size_lower_bound": b})
    with pytest.raises(ValueError, match="seed"):
        C.create({"type": "bsc", "threshold": 0.01, "seed": -1})
    with pytest.raises(ValueError, match="link"):
        C.create({"type": "none"}, link="lan")
    for key, bad in (("warmup_rounds", -1), ("warmup_rounds", 2.5), ("warmup_threshold", 1.0),
                     ("warmup_threshold", 0)):
        with pytest.raises(ValueError, match=key):
            C.create({"type": "bsc", "threshold": 0.01, key: bad})
    for bad in (-1, 2.5, True, "128"):
        with pytest.raises(ValueError, match="min_kept"):
            C.create({"type": "mpq", "threshold": 0.01, "min_kept": bad})
    defaults = C.create({"type": "bsc", "threshold": 0.01}).params()
    assert (defaults["momentum"], defaults["warmup_rounds"], defaults["warmup_threshold"]) == (0.0, 10, 0.05)
    assert defaults["min_kept"] == 0
    assert C.create({"type": "bsc", "threshold": 0.01}).size_lower_bound == 200000


def test_register_new_codec():
    @C.register("negate_for_test")
    class Negate(C.Codec):
        @classmethod
        def from_params(cls, params, *, link="wan"):
            return cls(link=link)

        def params(self):
            return {"type": self.name}

        def for_tensor(self, numel, link=None):
            return "dense"

        def encode(self, key, grad):
            return C.Payload("dense", -grad.ravel())

    try:
        codec = C.create({"type": "negate_for_test"})
        assert isinstance(codec, Negate) and "negate_for_test" in C.known_types()
        assert codec.decode(codec.encode(0, np.ones(3, np.float32)), 3).tolist() == [-1, -1, -1]
        with pytest.raises(ValueError, match="already taken"):
            C.register("negate_for_test")(C.BSCCodec)
    finally:
        from geomx.compression import registry
        registry._REGISTRY.pop("negate_for_test")
    with pytest.raises(TypeError, match="Codec subclasses"):
        C.register("thing")(object)
    with pytest.raises(ValueError, match="lower-case identifiers"):
        C.register("Bad Name")


def test_key_validation():
    codec = C.create({"type": "bsc", "threshold": 0.01, "size_lower_bound": 0})
    with pytest.raises(TypeError, match="key must be an int"):
        codec.encode("w", np.ones(3, np.float32))
    with pytest.raises(ValueError, match="key must be >= 0"):
        codec.encode(-1, np.ones(3, np.float32))
    with pytest.raises(TypeError, match="floats"):
        codec.encode(0, np.ones(3, np.int32))


def test_kept_count_and_sample_size():
    assert C.kept_count(100, 0.01) == 1 and C.kept_count(200, 0.01) == 2 and C.kept_count(201, 0.01) == 3
    assert C.kept_count(10, 0.01) == 1 and C.kept_count(0, 0.5) == 0
    assert C.kept_count(1000, 0.9995) == 1000
    assert C.kept_count(1280, 0.001, 128) == 128 and C.kept_count(100, 0.001, 128) == 100
    assert C.kept_count(200_000, 0.01, 128) == 2000 and C.kept_count(0, 0.5, 128) == 0


@pytest.mark.parametrize("codec", ["bsc", "mpq"])
def test_floor_on_kept_entries(codec):
    """``min_kept``: a tensor whose kept fraction gives fewer entries sends the floor's number, the
    largest ones (exactly, where the threshold is exact; about that many, where it is sampled), and one
    whose fraction gives more is unchanged."""
    rng = np.random.RandomState(3)
    params = {"type": codec, "threshold": 0.001, "size_lower_bound": 1000, "warmup_rounds": 0}
    floored, plain = C.create({**params, "min_kept": 128}), C.create(params)
    v = rng.randn(1280).astype(np.float32)  # sample >= n: the exact threshold
    sent = floored.encode(0, v)
    assert np.array_equal(np.sort(sent.indices), np.sort(np.argsort(-np.abs(v))[:128]))
    assert plain.encode(0, v).indices.size == 2
    big = rng.randn(2_000_000).astype(np.float32)  # k = 2000 > 128: the floor changes nothing
    assert np.array_equal(floored.encode(1, big).indices, plain.encode(1, big).indices)
    sampled = C.create({**params, "min_kept": 10_000})  # k = 2000 -> 10000, from a sample of 250000
    n = sampled.encode(2, big).indices.size
    assert 8000 <= n <= 20_000, n
    tiny = C.create({**params, "size_lower_bound": 10, "min_kept": 128})
    w = rng.randn(50).astype(np.float32)
    assert tiny.encode(3, w).indices.size == 50  # a floor above the size sends every entry
    assert C.sample_size(10_000_000, 0.01) == 100_000
    assert C.sample_size(100, 0.01) == 25_000 and C.sample_size(10, 0.5) == 1000
    assert feedback.sample_size(200000, 0.001) == 250_000
