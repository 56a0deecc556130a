"""Compression pipeline oracle worker. The master sets a codec; every party worker pushes integer-valued
gradients and pulls the aggregate. Each worker simulates the whole pipeline with numpy and the codec
library (one WAN codec per party, as each local server holds; global sum; exact sparse downlink) and
requires the pulled values to match exactly."""
import argparse
import sys

import mxnet as mx
import numpy as np

import geomx  # noqa: F401
from geomx import compression

BOUND = 1000
SHAPES = {0: (10, 5), 1: (40, 100), 2: (3000,)}  # key 0 small, keys 1 and 2 large (>= BOUND)


def dtype_of(codec, k):
    small = int(np.prod(SHAPES[k])) < BOUND
    return np.float16 if codec == "fp16" or (codec == "mpq" and small) else np.float32


def grad(slice_, t, k, dtype):
    n = int(np.prod(SHAPES[k]))
    g = ((np.arange(n) * (slice_ + 3) + 7 * t) % 23 - 11).astype(np.float32)
    g[(np.arange(n) + t) % 5 == 0] *= 9  # a few large entries for the sparsifier to find
    return g.astype(dtype)


def params(codec, bound_from_servers=False):
    """The master's codec; with ``bound_from_servers`` it names no size_lower_bound (GeoMX's
    layout: MXNET_KVSTORE_SIZE_LOWER_BOUND=BOUND on the servers only) and the oracle uses BOUND."""
    out = {"type": codec, "size_lower_bound": BOUND}
    if codec in ("bsc", "mpq"):
        out["threshold"] = 0.05
    if bound_from_servers:
        del out["size_lower_bound"]
    return out


def oracle(codec, parties, per_party, rounds):
    """What every worker pulls, per round and key."""
    codecs = [compression.create(params(codec), link="wan") for _ in range(parties)]
    out = []
    for t in range(rounds):
        pulled = {}
        for k in SHAPES:
            dt = dtype_of(codec, k)
            sums = []
            for p in range(parties):
                a = sum(grad(w, t, k, np.float32) for w in range(p * per_party, (p + 1) * per_party))
                a = a.astype(dt).reshape(-1)
                if dt == np.float32 and codecs[p].for_tensor(a.size) != "dense":
                    a = compression.decode_payload(codecs[p].encode(k, a), a.size)
                sums.append(a.astype(np.float32))
            total = sum(sums[1:], sums[0])
            pulled[k] = total.astype(dt).reshape(SHAPES[k])
        out.append(pulled)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--slice", type=int, required=True)
    p.add_argument("--codec", choices=["bsc", "fp16", "mpq"], required=True)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--bound-from-servers", action="store_true",
                   help="the master sends no size_lower_bound (the servers' variable must apply)")
    args = p.parse_args()
    kv = mx.kv.create("dist_sync")
    if kv.is_master_worker:
        kv.set_gradient_compression(params(args.codec, args.bound_from_servers))
        for k, s in SHAPES.items():
            kv.init(k, mx.nd.zeros(s, dtype=dtype_of(args.codec, k)))
        return 0
    per_party = kv.num_workers
    parties = kv.num_all_workers // per_party
    outs = {k: mx.nd.zeros(s, dtype=dtype_of(args.codec, k)) for k, s in SHAPES.items()}
    for k in SHAPES:
        kv.init(k, outs[k])
    expected = oracle(args.codec, parties, per_party, args.rounds)
    for t in range(args.rounds):
        for k in SHAPES:
            g = grad(args.slice, t, k, dtype_of(args.codec, k)).reshape(SHAPES[k])
            kv.pushpull(k, mx.nd.array(g, dtype=g.dtype), out=outs[k])
        for k in SHAPES:
            got = outs[k].asnumpy()
            if got.dtype != expected[t][k].dtype or not np.array_equal(got, expected[t][k]):
                bad = np.flatnonzero(got.ravel() != expected[t][k].ravel())
                print(f"CODEC MISMATCH round {t} key {k}: {bad.size} differ", flush=True)
                return 1
    print(f"CODEC OK {args.codec} slice {args.slice}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
