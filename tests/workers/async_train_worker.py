"""MixedSync worker for the lost-party test: pushpull rounds under dist_async with a sleep after each;
prints ``ROUND t OK`` per round and ``ASYNC RUN OK`` at the end."""
import argparse
import sys
import time

import mxnet as mx

import geomx  # noqa: F401

SHAPES = {0: (8, 4), 1: (16,)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--slice", type=int, required=True)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--sleep", type=float, default=0.3)
    args = p.parse_args()
    kv = mx.kv.create("dist_async")
    if kv.is_master_worker:
        kv.set_optimizer(mx.optimizer.SGD(learning_rate=0.1))
        for k, s in SHAPES.items():
            kv.init(k, mx.nd.ones(s))
        return 0
    outs = {k: mx.nd.zeros(s) for k, s in SHAPES.items()}
    for k in SHAPES:
        kv.init(k, outs[k])
    for t in range(args.rounds):
        for k, s in SHAPES.items():
            kv.pushpull(k, mx.nd.ones(s), out=outs[k])
        mx.nd.waitall()
        print(f"ROUND {t} OK", flush=True)
        time.sleep(args.sleep)
    print("ASYNC RUN OK", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
