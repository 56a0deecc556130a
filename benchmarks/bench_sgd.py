"""The global server's SGD update, side by side: MXNet's updater (the path every other optimizer
takes: the round sum lent to MXNet zero-copy, ``Updater(index, grad, weight)``, the new weights
copied out with ``asnumpy``) against geomx's numpy path for SGD without momentum
(``geomx.optimizer_spec.sgd_step``). One process, MXNet's NaiveEngine and OMP_NUM_THREADS=1 as on a
global server (``python -m geomx.node``, which also keeps freed large blocks in glibc's heap),
the tensors of benchmarks/pushpull_worker.py's model.

    python benchmarks/bench_sgd.py [--params 1.6M,25M] [--repeats 21]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("MXNET_ENGINE_TYPE", "NaiveEngine")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_pushpull import parse_size  # noqa: E402
from pushpull_worker import model_shapes  # noqa: E402


def time_model(size: str, repeats: int) -> tuple:
    """Median ms per iteration (every tensor of the model once) of MXNet's updater and of sgd_step."""
    import mxnet as mx

    from geomx.optimizer_spec import sgd_step

    shapes = [int(np.prod(s)) for _, s in model_shapes(parse_size(size))]
    rng = np.random.RandomState(0)
    grads = [rng.standard_normal(n).astype(np.float32) for n in shapes]
    store = [rng.standard_normal(n).astype(np.float32) for n in shapes]
    updater = mx.optimizer.get_updater(mx.optimizer.create("sgd", learning_rate=0.01))
    weight_nd = [mx.nd.array(w) for w in store]
    np_opt = mx.optimizer.create("sgd", learning_rate=0.01)

    def mxnet_iteration():
        for k, g in enumerate(grads):
            updater(k, mx.nd.from_numpy(g, zero_copy=True), weight_nd[k])
            weight_nd[k].asnumpy()

    def numpy_iteration():
        for k, g in enumerate(grads):
            store[k] = sgd_step(np_opt, k, store[k], g)

    times = ([], [])
    for fn in (mxnet_iteration, numpy_iteration):
        fn()  # warm-up
    for _ in range(repeats):
        for fn, bucket in ((mxnet_iteration, times[0]), (numpy_iteration, times[1])):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return sum(shapes), statistics.median(times[0]) * 1e3, statistics.median(times[1]) * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--params", default="1.6M,25M")
    p.add_argument("--repeats", type=int, default=21)
    args = p.parse_args(argv)

    from geomx.transport import keep_large_buffers

    keep_large_buffers()  # as every geomx node does: each round's new arrays reuse the last round's
    print("| model | MXNet updater ms/iter | numpy sgd_step ms/iter | MXNet / numpy |")
    print("|---|---:|---:|---:|")
    for size in args.params.split(","):
        n, t_mx, t_np = time_model(size, args.repeats)
        print(f"| {size} ({n:,} float32) | {t_mx:.2f} | {t_np:.2f} | {t_mx / t_np:.1f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
