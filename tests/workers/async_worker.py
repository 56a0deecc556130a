"""MixedSync oracle worker: one worker per party, parties take turns (a token file orders the pushes,
so the arrival order at the global server is known). After each push a party must receive exactly the
weights a numpy model of asynchronous application (SGD, or DC-ASGD with per-party backups) predicts."""
import argparse
import os
import sys
import time

import mxnet as mx
import numpy as np

import geomx  # noqa: F401
from geomx import compression

SHAPES = {0: (5, 3), 1: (11,)}
LR, LAMDA = 0.5, 0.04


def grad(slice_, t, k):
    n = int(np.prod(SHAPES[k]))
    return (((np.arange(n) * (slice_ + 2) + t) % 7) - 3).astype(np.float32).reshape(SHAPES[k]) / 4


def init(k):
    return (np.arange(int(np.prod(SHAPES[k]))) % 5).astype(np.float32).reshape(SHAPES[k])


BSC = {"type": "bsc", "threshold": 0.3, "size_lower_bound": 10}


def oracle(parties, upto, optimizer, bsc=False):
    """What the party that made push number ``upto`` holds afterwards (order: round-major, then
    party). With BSC each party's gradient is sparsified by its local server's codec and the
    weights come back as a sparsified change with a per-party downlink residual."""
    w = {k: init(k) for k in SHAPES}
    backup = {(p, k): init(k) for p in range(parties) for k in SHAPES}
    up = [compression.create(BSC) for _ in range(parties)]
    down = [compression.create(BSC) for _ in range(parties)]
    held = {(p, k): init(k).reshape(-1) for p in range(parties) for k in SHAPES}
    for i in range(upto):
        t, p = divmod(i, parties)
        for k in SHAPES:
            g = grad(p, t, k)
            if bsc:
                g = compression.decode_payload(up[p].encode(k, g.reshape(-1)), g.size).reshape(g.shape)
            if optimizer == "sgd":
                w[k] = (w[k] - np.float32(LR) * g).astype(np.float32)
            else:
                drift = w[k] - backup[(p, k)]
                step = -np.float32(LR) * (g + np.float32(0) * w[k] + np.float32(LAMDA) * g * g * drift)
                w[k] = (w[k] + step).astype(np.float32)
                backup[(p, k)] = w[k].copy()
            if bsc:
                change = down[p].encode(k, w[k].reshape(-1) - held[(p, k)])
                held[(p, k)] = held[(p, k)] + compression.decode_payload(change, w[k].size)
    if not bsc:
        return w
    last = (upto - 1) % parties
    return {k: held[(last, k)].reshape(SHAPES[k]) for k in SHAPES}


def wait_turn(path, want, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(path) as f:
                if f.read().strip() == str(want):
                    return
        except FileNotFoundError:
            pass
        time.sleep(0.005)
    raise TimeoutError(f"turn {want} never came")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--slice", type=int, required=True)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--optimizer", choices=["sgd", "dcasgd"], default="sgd")
    p.add_argument("--turn", required=True)
    p.add_argument("--bsc", action="store_true", help="BSC on the WAN")
    args = p.parse_args()
    kv = mx.kv.create("dist_async")
    if kv.is_master_worker:
        if args.optimizer == "sgd":
            kv.set_optimizer(mx.optimizer.SGD(learning_rate=LR))
        else:
            kv.set_optimizer(mx.optimizer.DCASGD(learning_rate=LR, lamda=LAMDA))
        if args.bsc:
            kv.set_gradient_compression(BSC)
        for k in SHAPES:
            kv.init(k, mx.nd.array(init(k)))
        return 0
    parties = kv.num_all_workers
    outs = {k: mx.nd.zeros(s) for k, s in SHAPES.items()}
    for k in SHAPES:
        kv.init(k, outs[k])
    # The oracle assumes every party starts from the initial weights: start pushing only once all
    # parties hold them (a party that joins late legitimately receives newer weights).
    open(f"{args.turn}.init{args.slice}", "w").close()
    deadline = time.monotonic() + 60
    while not all(os.path.exists(f"{args.turn}.init{q}") for q in range(parties)):
        if time.monotonic() > deadline:
            raise TimeoutError("the other parties never initialised")
        time.sleep(0.005)
    for t in range(args.rounds):
        turn = t * parties + args.slice
        wait_turn(args.turn, turn)
        for k in SHAPES:
            kv.pushpull(k, mx.nd.array(grad(args.slice, t, k)), out=outs[k])
        expected = oracle(parties, turn + 1, args.optimizer, args.bsc)
        for k in SHAPES:
            got = outs[k].asnumpy()
            if not np.allclose(got, expected[k], rtol=1e-6, atol=1e-6):
                print(f"ASYNC MISMATCH turn {turn} key {k}: {got.ravel()[:4]} vs {expected[k].ravel()[:4]}",
                      flush=True)
                return 1
        tmp = f"{args.turn}.{args.slice}"
        with open(tmp, "w") as f:
            f.write(str(turn + 1))
        os.replace(tmp, args.turn)
    print(f"ASYNC OK slice {args.slice}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
