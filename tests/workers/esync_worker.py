"""ESync worker: local steps as assigned by the state server (kv.esync_steps()), then a global model
average. One party is made slow (a sleep per local step); prints the steps it was assigned and a
digest of the model after every global round."""
import argparse
import hashlib
import sys
import time

import mxnet as mx

import geomx  # noqa: F401

SHAPES = {0: (4, 6), 1: (9,)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--slice", type=int, required=True)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--slow-party", type=int, default=1)
    p.add_argument("--step-sleep", type=float, default=0.2)
    args = p.parse_args()
    kv = mx.kv.create("dist_sync")
    if kv.is_master_worker:
        for k, s in SHAPES.items():
            kv.init(k, mx.nd.ones(s))
        return 0
    party = args.slice // kv.num_workers
    w = {k: mx.nd.zeros(s) for k, s in SHAPES.items()}
    for k in SHAPES:
        kv.broadcast(k, w[k], out=w[k])
    for rnd in range(args.rounds):
        steps = kv.esync_steps()
        for _ in range(steps):
            for k in SHAPES:
                w[k] -= 0.01 * (args.slice + 1)
            if party == args.slow_party:
                time.sleep(args.step_sleep)
            else:
                time.sleep(args.step_sleep / 8)
        for k in SHAPES:
            kv.pushpull(k, w[k] / kv.num_workers, out=w[k])
        digest = hashlib.sha1(b"".join(w[k].asnumpy().tobytes() for k in sorted(SHAPES))).hexdigest()[:12]
        print(f"ESYNC round {rnd} party {party} steps {steps} model {digest}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
