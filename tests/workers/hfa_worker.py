"""HFA oracle worker: each worker takes local steps w <- w - g(slice, step) (a deterministic update, so
the oracle needs no autograd), pushes ``w / num_workers`` every K1 steps and continues from what it
pulls. The numpy model of two-level averaging (party every K1 steps, global every K1*K2) must match
exactly: all values are dyadic, so float32 is exact."""
import argparse
import sys

import mxnet as mx
import numpy as np

import geomx  # noqa: F401

SHAPES = {0: (4, 6), 1: (9,)}


def step_grad(slice_, step, k):
    n = int(np.prod(SHAPES[k]))
    return (((np.arange(n) + 3 * slice_ + step) % 9) - 4).astype(np.float32).reshape(SHAPES[k])


def init(k):
    return (np.arange(int(np.prod(SHAPES[k]))) % 4).astype(np.float32).reshape(SHAPES[k])


def oracle(parties, per_party, k1, k2, steps):
    """Each worker's weights after ``steps`` local steps (synchronisations included)."""
    n = parties * per_party
    w = [{k: init(k) for k in SHAPES} for _ in range(n)]
    milestone = {k: init(k) for k in SHAPES}
    for s in range(1, steps + 1):
        for i in range(n):
            for k in SHAPES:
                w[i][k] = w[i][k] - step_grad(i, s, k)
        if s % k1:
            continue
        j = s // k1
        for k in SHAPES:
            avgs = []
            for p in range(parties):
                members = range(p * per_party, (p + 1) * per_party)
                avgs.append(sum(w[i][k] / np.float32(per_party) for i in members))
            if j % k2:
                for p in range(parties):
                    for i in range(p * per_party, (p + 1) * per_party):
                        w[i][k] = avgs[p]
            else:
                total = sum((a - milestone[k]) / np.float32(parties) for a in avgs)
                milestone[k] = milestone[k] + total
                for i in range(n):
                    w[i][k] = milestone[k]
    return w


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--slice", type=int, required=True)
    p.add_argument("--steps", type=int, default=12)
    args = p.parse_args()
    kv = mx.kv.create("dist_sync")
    k1, k2 = kv.hfa_periods
    if kv.is_master_worker:
        for k in SHAPES:
            kv.init(k, mx.nd.array(init(k)))
        return 0
    per_party = kv.num_workers
    parties = kv.num_all_workers // per_party
    w = {k: mx.nd.zeros(s) for k, s in SHAPES.items()}
    for k in SHAPES:
        kv.broadcast(k, w[k], out=w[k])
    for s in range(1, args.steps + 1):
        for k in SHAPES:
            w[k] -= mx.nd.array(step_grad(args.slice, s, k))
        if s % k1 == 0:
            for k in SHAPES:
                kv.pushpull(k, w[k] / per_party, out=w[k])
            expected = oracle(parties, per_party, k1, k2, s)[args.slice]
            for k in SHAPES:
                got = w[k].asnumpy()
                if not np.array_equal(got, expected[k]):
                    print(f"HFA MISMATCH step {s} key {k}: {got.ravel()[:4]} vs {expected[k].ravel()[:4]}", flush=True)
                    return 1
    print(f"HFA OK slice {args.slice} K1={k1} K2={k2}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
