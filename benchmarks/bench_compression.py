"""Time the codec kernels (geomx._compress) against numpy on one thread; print a Markdown table.

Rows, on ``--size`` float32 values (default 10M) with kept fraction ``--ratio`` (default 0.01):

- top-r selection: the BSC selection (sampled threshold + one compiled pass) against exact
  top-k with ``np.argpartition`` and against the same algorithm on the numpy twins, with the
  fraction of the exact top-k magnitude mass it keeps;
- scatter_add of k (index, value) pairs against ``np.add.at``;
- DGC momentum accumulation, and a whole BSC encode step (accumulate, select, mask);
- float32 -> float16 (the fp16 codec) against numpy ``astype``.

The process is pinned to one core. Times are medians (and minima) of alternating runs, so load
from other processes hits both sides alike. Run from the repository root after building:

    python benchmarks/bench_compression.py [--size 10000000] [--ratio 0.01] [--repeats 21]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable

import numpy as np

from geomx import compression as C
from geomx import kernels as array_kernels
from geomx.compression import kernels as K
from geomx.compression.feedback import SampledTopK


def timed(fns: list[Callable[[], object]], repeats: int) -> list[tuple[float, float]]:
    """(median, min) wall seconds of each function, run alternately after one warm-up each."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, bucket in zip(fns, times):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return [(statistics.median(t), min(t)) for t in times]


def ms(t: tuple[float, float]) -> str:
    return f"{t[0] * 1e3:.2f} ({t[1] * 1e3:.2f})"


def with_numpy_kernels(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run with the numpy twins patched into geomx.compression.kernels."""
    names = ("select_above", "sample_abs", "scatter_add", "dgc_accumulate")

    def run() -> object:
        saved = {name: getattr(K, name) for name in names}
        try:
            for name in names:
                setattr(K, name, getattr(K.reference, f"ref_{name}"))
            return fn()
        finally:
            for name, f in saved.items():
                setattr(K, name, f)

    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=10_000_000)
    parser.add_argument("--ratio", type=float, default=0.01)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--exact-repeats", type=int, default=5, help="repeats of the slow np.argpartition")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[-1]})
    if not K.COMPILED:
        print("geomx._compress is not built; build it first", file=sys.stderr)
        return 1

    n, r = args.size, args.ratio
    k = C.kept_count(n, r)
    rng = np.random.default_rng(0)
    # Gradient-like values: mostly small, a heavier tail (Student t, 3 degrees of freedom).
    v = rng.standard_t(3, n).astype(np.float32)
    topk = SampledTopK(r, seed=0)
    rows: list[tuple[str, str, str, str]] = []

    def exact() -> np.ndarray:
        return np.argpartition(np.abs(v), n - k)[n - k:]

    def sampled() -> C.Payload:
        return topk.encode(0, v)

    numpy_sampled = with_numpy_kernels(sampled)
    (t_sel, t_np_sel) = timed([sampled, numpy_sampled], args.repeats)
    (t_exact,) = timed([exact], args.exact_repeats)
    # Mass kept over several independent samples (the threshold is estimated afresh each time).
    mags = np.abs(v)
    exact_idx = np.sort(exact())
    exact_mass = float(mags[exact_idx].astype(np.float64).sum())
    fractions, captured, counts = [], [], []
    for _ in range(10):
        p = sampled()
        fractions.append(float(mags[p.indices].astype(np.float64).sum()) / exact_mass)
        common = np.intersect1d(p.indices, exact_idx, assume_unique=True)
        captured.append(float(mags[common].astype(np.float64).sum()) / exact_mass)
        counts.append(p.nnz / k)
    rows.append((f"top-{r:g} selection (sampled threshold + 1 pass)",
                 f"argpartition {ms(t_exact)}", ms(t_sel), f"{t_exact[0] / t_sel[0]:.1f}x"))
    rows.append(("same selection, numpy twin", ms(t_np_sel), ms(t_sel), f"{t_np_sel[0] / t_sel[0]:.1f}x"))

    p = sampled()
    dst = np.zeros(n, np.float32)
    t_add_at, t_scatter = timed([lambda: np.add.at(dst, p.indices, p.values),
                                 lambda: K.scatter_add(dst, p.indices, p.values)], args.repeats)
    rows.append((f"scatter_add of {p.nnz} pairs", f"np.add.at {ms(t_add_at)}", ms(t_scatter),
                 f"{t_add_at[0] / t_scatter[0]:.1f}x"))

    u1, v1, u2, v2 = (np.zeros(n, np.float32) for _ in range(4))
    g = (v * np.float32(1e-3)).astype(np.float32)
    t_np_dgc, t_dgc = timed([lambda: K.reference.ref_dgc_accumulate(u2, v2, g, 0.9),
                             lambda: K.dgc_accumulate(u1, v1, g, 0.9)], args.repeats)
    rows.append(("DGC accumulate (u = m*u + g; v += u)", ms(t_np_dgc), ms(t_dgc), f"{t_np_dgc[0] / t_dgc[0]:.1f}x"))

    codec = C.create({"type": "bsc", "threshold": r})
    np_codec = C.create({"type": "bsc", "threshold": r})
    t_np_enc, t_enc = timed([with_numpy_kernels(lambda: np_codec.encode(0, v)), lambda: codec.encode(0, v)],
                            args.repeats)
    rows.append(("whole BSC encode step (accumulate, select, mask)", ms(t_np_enc), ms(t_enc),
                 f"{t_np_enc[0] / t_enc[0]:.1f}x"))

    out16 = np.empty(n, np.float16)
    t_astype, t_f16 = timed([lambda: v.astype(np.float16), lambda: array_kernels.f32_to_f16(v, out16)],
                            args.repeats)
    rows.append(("fp16 codec: float32 -> float16", f"astype {ms(t_astype)}", ms(t_f16),
                 f"{t_astype[0] / t_f16[0]:.1f}x"))

    print(f"{n:,} float32 (Student t, 3 dof), kept fraction {r:g} (k = {k:,}), one thread, "
          f"{args.repeats} repeats ({args.exact_repeats} for argpartition); ms: median (min)\n")
    print("| operation | numpy | compiled | speed-up |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\nOver 10 fresh samples the selection sends {min(counts):.3f}k to {max(counts):.3f}k entries, "
          f"whose magnitude mass is {min(fractions):.2%} to {max(fractions):.2%} of the exact top-k mass; "
          f"the exact top-k entries among them hold {min(captured):.2%} to {max(captured):.2%} of it.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
