"""A slow exact-oracle worker for the fault tests: the rounds of exact_worker.py (push then pull of
integer-valued arrays, checked with zero tolerance) with a sleep after each round, so that a test can
act on a topology while it trains.

Prints ``PID <pid>`` at start, ``RANK <rank>`` once connected, ``ROUND <t> OK`` after each checked
round and ``EXACT OK ...`` at the end (exit 0). The master worker only initialises the keys, as in
exact_worker.py.
"""
import argparse
import os
import sys
import time

import mxnet as mx
import numpy as np
from exact_worker import SHAPES, base, init_value

import geomx  # noqa: F401  - registers the store


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--slice", type=int, required=True)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--sleep", type=float, default=0.5, help="seconds to sleep after each round")
    args = p.parse_args()
    print("PID", os.getpid(), flush=True)
    kv = mx.kv.create("dist_sync")
    print("RANK", kv.rank, flush=True)
    n_all = kv.num_all_workers
    coeff_sum = n_all * (n_all + 1) // 2
    keys = sorted(SHAPES)
    if kv.is_master_worker:
        for k in keys:
            kv.init(k, mx.nd.array(init_value(k)))
        print("master initialised", flush=True)
        return 0
    for k in keys:
        kv.init(k, mx.nd.zeros(SHAPES[k]))
    outs = {k: mx.nd.zeros(SHAPES[k]) for k in keys}
    for k in keys:
        kv.pull(k, out=outs[k])
    for k in keys:
        if not np.array_equal(outs[k].asnumpy(), init_value(k)):
            print(f"MISMATCH init key {k}", flush=True)
            return 1
    for t in range(args.rounds):
        for k in keys:
            kv.push(k, mx.nd.array((args.slice + 1) * (t + 1) * base(k)), priority=-k)
            kv.pull(k, out=outs[k], priority=-k)
        for k in keys:
            expected = (coeff_sum * (t + 1) * base(k)).astype(np.float32)
            if not np.array_equal(outs[k].asnumpy(), expected):
                print(f"MISMATCH round {t} key {k}", flush=True)
                return 1
        print(f"ROUND {t} OK slice {args.slice}", flush=True)
        time.sleep(args.sleep)
    kv.barrier()
    print(f"EXACT OK slice {args.slice} rank {kv.rank} rounds {args.rounds}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
