"""Exercises the store's API in a real topology: properties, broadcast, barrier, pushpull with Adam
on the global server, optimizer-state save/load in distributed mode, and refused settings. Reported
(tests/workers/results.py): ``slice``, ``master``, then ``ok`` (and ``failure``: what failed)."""
import argparse
import sys

import mxnet as mx
import numpy as np
from results import report

import geomx  # noqa: F401
from geomx.errors import GeoMXError


def fail(msg):
    print("API FAIL", msg, flush=True)
    report(ok=False, failure=str(msg))
    sys.exit(1)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--slice", type=int, required=True)
    p.add_argument("--states", required=True, help="path prefix for saved states")
    args = p.parse_args()
    kv = mx.kv.create("dist_sync")
    report(slice=args.slice, master=kv.is_master_worker)
    shapes = {0: (4, 5), 1: (3,)}
    if kv.is_master_worker:
        kv.set_optimizer(mx.optimizer.Adam(learning_rate=0.01))
        for k, shape in shapes.items():
            kv.init(k, mx.nd.ones(shape) * (k + 1))
        return 0
    if kv.type != "dist_sync" or kv.num_workers != 2 or kv.num_all_workers != 4 or kv.rank not in (0, 1):
        fail(f"properties: {kv.type} {kv.num_workers} {kv.num_all_workers} {kv.rank}")
    if kv.is_master_worker or not kv.is_capable("optimizer"):
        fail("capabilities")
    outs = {k: mx.nd.zeros(s) for k, s in shapes.items()}
    for k, shape in shapes.items():
        kv.broadcast(k, mx.nd.zeros(shape), out=outs[k])
        if not np.array_equal(outs[k].asnumpy(), np.full(shape, k + 1.0, np.float32)):
            fail(f"broadcast key {k}")
    for t in range(3):
        for k, shape in shapes.items():
            kv.pushpull(k, mx.nd.ones(shape) * (args.slice + t), out=outs[k])
    mx.nd.waitall()
    kv.barrier()
    if args.slice == 0:
        first, second = args.states + ".a.npz", args.states + ".b.npz"
        kv.save_optimizer_states(first)
        kv.load_optimizer_states(first)
        kv.save_optimizer_states(second)
        a, b = np.load(first), np.load(second)
        if sorted(a.files) != sorted(b.files) or not all(np.array_equal(a[f], b[f]) for f in a.files):
            fail("states differ after a save/load/save cycle")
        if a["server0"].size < 2 * 4 * (20 + 3):  # Adam: mean and variance per element, float32
            fail(f"states too small: {a['server0'].size} bytes")
    kv.barrier()
    for k, shape in shapes.items():
        kv.pushpull(k, mx.nd.ones(shape), out=outs[k])
    mx.nd.waitall()
    try:
        kv.set_gradient_compression({"type": "bogus"})
        fail("unknown compression type accepted")
    except GeoMXError as exc:
        if "bogus" not in str(exc):
            fail(f"unclear error: {exc}")
    try:
        kv.push(99, mx.nd.ones((2,)))
        fail("push of an uninitialised key accepted")
    except GeoMXError as exc:
        if "99" not in str(exc):
            fail(f"unclear error: {exc}")
    print("API OK", args.slice, flush=True)
    report(ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
