"""A worker for the P3 ordering test: a model whose last layer is large, pushed in backward order.

Per round the worker pushes key 2 (the large last layer) first, then, after ``--backward-s``
seconds standing in for the rest of the backward pass, keys 1 and 0, each with ``priority=-key``
as the examples do; then it pulls every key. No optimizer, one worker in all: each pulled value
must equal the push exactly. Prints ``ORDER OK`` at the end (exit 0). The test reads the
GEOMX_P3_TRACE timelines to see which key completed first.
"""
import argparse
import sys
import time

import mxnet as mx
import numpy as np

import geomx  # noqa: F401  - registers the store

SIZES = {0: 1000, 1: 1000, 2: 500_000}


def value(k, t):
    return ((np.arange(SIZES[k]) % 17) + 10 * k + t).astype(np.float32)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--backward-s", type=float, default=0.2)
    args = p.parse_args()
    kv = mx.kv.create("dist_sync")
    keys = sorted(SIZES)
    for k in keys:
        kv.init(k, mx.nd.zeros((SIZES[k],)))
    if kv.is_master_worker:
        return 0
    if kv.num_all_workers != 1:
        print("p3_order_worker.py needs exactly one training worker", flush=True)
        return 2
    outs = {k: mx.nd.zeros((SIZES[k],)) for k in keys}
    for t in range(args.rounds):
        for k in reversed(keys):  # backward order: the last layer's gradient is ready first
            kv.push(k, mx.nd.array(value(k, t)), priority=-k)
            if k == keys[-1]:
                time.sleep(args.backward_s)
        for k in keys:
            kv.pull(k, out=outs[k], priority=-k)
        for k in keys:
            if not np.array_equal(outs[k].asnumpy(), value(k, t)):
                print(f"MISMATCH round {t} key {k}", flush=True)
                return 1
    kv.barrier()
    print("ORDER OK", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
