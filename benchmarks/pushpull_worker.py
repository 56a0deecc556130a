"""Worker of the push/pull benchmark (``benchmarks/bench_pushpull.py``); geomx and native MXNet run it.

Every worker initialises a CNN-shaped set of float32 tensors (``model_shapes``), then times
``--warmup`` + ``--iters`` iterations of: for every key (biggest first) push the gradient and pull the
updated weight into ``weight``, then ``mx.nd.waitall()``. It prints one JSON line starting with
``PUSHPULL_RESULT `` with the per-iteration times in milliseconds.

* geomx (default): ``import geomx`` makes ``mx.kv.create("dist_sync")`` return geomx's store; the
  central party's master worker sets the optimizer, initialises the keys and returns; training
  workers use ``kv.pushpull(k, grad, out=weight)``.
* ``--native``: MXNet's own ps-lite ``dist_sync`` (geomx is NOT imported). Every worker calls
  ``set_optimizer`` (MXNet 1.9.1 sends it to the servers from each worker; it is idempotent) and
  ``kv.init`` (only rank 0's value is sent, followed by a barrier inside ``init``); the step uses
  ``kv.pushpull`` (native 1.9.1 implements it for dist stores as push then pull) or, with
  ``--native-op push-pull``, ``kv.push`` + ``kv.pull``.

Both sides run the same SGD update on the server(s).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import List, Tuple

import numpy as np

#: Output sizes of the layers (biases) of the synthetic CNN: big dense layers and small conv layers.
_BIAS_SIZES = [1024, 512, 256, 128, 64]
#: Fractions of the weight parameters per weight tensor (largest first, like fc1 >> conv3 > ...).
_WEIGHT_FRACTIONS = [0.62, 0.22, 0.09, 0.045, 0.025]
_NAMES = ["fc1", "conv3", "fc2", "conv2", "conv1"]


def model_shapes(total: int) -> List[Tuple[str, Tuple[int, ...]]]:
    """About ``total`` float32 parameters as 10 tensors: 5 weights ``(rows, cols)`` and 5 biases."""
    if total < 20000:
        raise ValueError(f"model too small for the fixed layout: {total} parameters")
    n_w = total - sum(_BIAS_SIZES)
    shapes = []
    for name, frac, rows in zip(_NAMES, _WEIGHT_FRACTIONS, _BIAS_SIZES):
        cols = max(1, int(round(frac * n_w / rows)))
        shapes.append((f"{name}.weight", (rows, cols)))
    for name, rows in zip(_NAMES, _BIAS_SIZES):
        shapes.append((f"{name}.bias", (rows,)))
    return shapes


def num_params(shapes) -> int:
    return int(sum(int(np.prod(s)) for _, s in shapes))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--params", type=int, required=True, help="approximate number of float32 parameters")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--slice", type=int, default=-1, help="global worker index (geomx: {slice})")
    p.add_argument("--native", action="store_true", help="use MXNet's own ps-lite dist_sync")
    p.add_argument("--native-op", choices=["pushpull", "push-pull"], default="pushpull")
    p.add_argument("--profile", default=None, metavar="PATH",
                   help="cProfile the timed loop (main thread) into PATH (with {slice} substituted)")
    args = p.parse_args(argv)

    import mxnet as mx

    if not args.native:
        import geomx  # noqa: F401  - registers the store for mx.kv.create("dist_sync")

    shapes = model_shapes(args.params)
    keys = list(range(len(shapes)))
    optimizer = mx.optimizer.SGD(learning_rate=0.01, momentum=0.0, wd=0.0, rescale_grad=1.0)
    rng = np.random.RandomState(args.seed)
    init_values = [rng.standard_normal(s).astype(np.float32) * 0.05 for _, s in shapes]

    t_setup = time.perf_counter()
    kv = mx.kv.create("dist_sync")
    if args.native:
        kv.set_optimizer(optimizer)
        for k in keys:
            kv.init(k, mx.nd.array(init_values[k]))
        worker_id = kv.rank
    else:
        if kv.is_master_worker:
            kv.set_optimizer(optimizer)
            for k in keys:
                kv.init(k, mx.nd.array(init_values[k]))
            print("master worker initialised %d keys" % len(keys), flush=True)
            return 0
        for k in keys:
            kv.init(k, mx.nd.zeros(shapes[k][1]))
        worker_id = args.slice
    weights = [mx.nd.zeros(s) for _, s in shapes]
    for k in keys:
        kv.pull(k, out=weights[k])
    mx.nd.waitall()
    setup_s = time.perf_counter() - t_setup

    grng = np.random.RandomState(args.seed + 1000 + max(worker_id, 0))
    grads = [mx.nd.array(grng.standard_normal(s).astype(np.float32) * 1e-3) for _, s in shapes]
    mx.nd.waitall()

    if args.native and args.native_op == "push-pull":
        def step():
            for k in keys:
                kv.push(k, grads[k], priority=-k)
                kv.pull(k, out=weights[k], priority=-k)
    else:
        def step():
            for k in keys:
                kv.pushpull(k, grads[k], out=weights[k], priority=-k)

    for _ in range(args.warmup):
        step()
        mx.nd.waitall()

    prof = None
    if args.profile:
        import cProfile
        prof = cProfile.Profile()
        prof.enable()
    times_ms = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        step()
        mx.nd.waitall()
        times_ms.append((time.perf_counter() - t0) * 1e3)
    if prof is not None:
        prof.disable()
        prof.dump_stats(args.profile.replace("{slice}", str(worker_id)))

    finite = bool(all(np.isfinite(w.asnumpy()).all() for w in weights))
    result = {
        "system": "native" if args.native else "geomx",
        "worker": worker_id,
        "pid": os.getpid(),
        "params": num_params(shapes),
        "tensors": len(shapes),
        "bytes_per_push": 4 * num_params(shapes),
        "setup_s": round(setup_s, 3),
        "iter_ms": [round(t, 3) for t in times_ms],
        "finite": finite,
    }
    print("PUSHPULL_RESULT " + json.dumps(result), flush=True)
    if args.native:
        # Leave together; the store's destructor tells the scheduler this worker is done.
        kv._barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
