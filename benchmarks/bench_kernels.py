"""Time each compiled geomx kernel against its numpy twin on one thread and print a Markdown table.

Both sides are single-threaded (numpy ufuncs and casts do not use threads); the process is
pinned to one core.  Run from the repository root after building the extension:

    python benchmarks/bench_kernels.py [--sizes 10000000 1600000] [--repeats 21]
"""
import argparse
import os
import statistics
import sys
import time
from typing import Callable

import numpy as np

from geomx import kernels
from geomx.kernels import reference as ref


def median_seconds(numpy_fn: Callable[[], object], compiled_fn: Callable[[], object],
                   repeats: int) -> tuple[float, float]:
    """Median wall times of ``numpy_fn()`` and ``compiled_fn()``, after one warm-up run each.

    The two are timed alternately so that load from other processes hits both alike.
    """
    numpy_fn()
    compiled_fn()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, bucket in zip((numpy_fn, compiled_fn), times):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def cases(n: int, ck) -> list[tuple[str, str, Callable[[], object], Callable[[], object]]]:
    """(kernel, dtype, numpy call, compiled call) for arrays of ``n`` elements."""
    rng = np.random.default_rng(0)
    f32 = rng.standard_normal(n, dtype=np.float32)
    f32_b = rng.standard_normal(n, dtype=np.float32)
    f64, f64_b = f32.astype(np.float64), f32_b.astype(np.float64)
    f16, f16_b = f32.astype(np.float16), f32_b.astype(np.float16)
    out16, out32 = np.empty(n, np.float16), np.empty(n, np.float32)
    # The accumulators are re-added every repeat; values stay finite (about repeats * 4 at most).
    acc32, acc64, acc16 = f32.copy(), f64.copy(), f16.copy()
    return [
        ("sum_into", "float32", lambda: ref.ref_sum_into(acc32, f32_b), lambda: ck.sum_into(acc32, f32_b)),
        ("sum_into", "float64", lambda: ref.ref_sum_into(acc64, f64_b), lambda: ck.sum_into(acc64, f64_b)),
        ("sum_into", "float16", lambda: ref.ref_sum_into(acc16, f16_b), lambda: ck.sum_into(acc16, f16_b)),
        ("copy_into", "float32", lambda: ref.ref_copy_into(out32, f32), lambda: ck.copy_into(out32, f32)),
        ("scale_into", "float32", lambda: ref.ref_scale_into(out32, f32, 0.25),
         lambda: ck.scale_into(out32, f32, 0.25)),
        ("f32_to_f16 (into out)", "float32", lambda: ref.ref_f32_to_f16(f32, out16),
         lambda: ck.f32_to_f16(f32, out16)),
        ("f32_to_f16 (new array)", "float32", lambda: f32.astype(np.float16), lambda: ck.f32_to_f16(f32)),
        ("f16_to_f32 (into out)", "float16", lambda: ref.ref_f16_to_f32(f16, out32),
         lambda: ck.f16_to_f32(f16, out32)),
        ("f16_to_f32 (new array)", "float16", lambda: f16.astype(np.float32), lambda: ck.f16_to_f32(f16)),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000_000, 1_600_000],
                        help="array lengths (elements)")
    parser.add_argument("--repeats", type=int, default=21, help="timed runs per kernel (median)")
    args = parser.parse_args()

    if not kernels.COMPILED:
        print("geomx._kernels is not built: run `pip install -e . --no-build-isolation`", file=sys.stderr)
        return 1
    from geomx import _kernels as ck

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core: no migration noise
    print(f"numpy {np.__version__}, F16C: {ck.has_f16c()}, one thread, median of {args.repeats} runs\n")
    print("| kernel | dtype | n | numpy ms | compiled ms | speedup (numpy / compiled) |")
    print("|---|---|---:|---:|---:|---:|")
    for n in args.sizes:
        for name, dtype, numpy_fn, compiled_fn in cases(n, ck):
            t_np, t_c = median_seconds(numpy_fn, compiled_fn, args.repeats)
            print(f"| {name} | {dtype} | {n:,} | {t_np * 1e3:.3f} | {t_c * 1e3:.3f} | {t_np / t_c:.2f}x |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
