"""The exact-oracle worker on the framework-neutral core alone (geomx.store, numpy): no MXNet, no torch.

Round t, worker w (its data slice) pushes ``(w + 1) * (t + 1) * base_k`` (integers). ``--optimizer none``:
each pushpull returns the round's sum, ``S * (t + 1) * base_k`` with S the sum of (w + 1); ``sgd``: the
global servers run SGD with lr 1 (a torch-rule spec), so the weights after round t are
``init_k - S * base_k * (1 + ... + (t + 1))``. Zero tolerance; ``EXACT OK`` at the end. Reported
(tests/workers/results.py): ``slice``, ``master``, then ``exact`` and ``rounds``, or ``mismatch``.
"""
import argparse
import sys

import numpy as np
from results import report

from geomx import commands  # noqa: F401  (the core, nothing else)
from geomx.store import Store

SIZES = {0: 12, 1: 7, 2: 300_000, 3: 1}


def base(k):
    return ((np.arange(SIZES[k]) % 13) - 6).astype(np.float32) + k


def init_value(k):
    return (np.arange(SIZES[k]) % 101).astype(np.float32)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--slice", type=int, required=True)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--optimizer", choices=["none", "sgd"], default="none")
    args = p.parse_args()
    store = Store()
    report(slice=args.slice, master=store.is_master_worker)
    assert not any(m in sys.modules for m in ("mxnet", "torch")), "a framework was imported"
    if store.is_master_worker and args.optimizer == "sgd":
        store.set_optimizer({"name": "sgd", "rule": "torch", "lr": 1.0})
    futures = {k: store.init(k, n, np.float32, init_value(k)) for k, n in SIZES.items()}
    for k, fut in futures.items():
        assert np.array_equal(fut.result(), init_value(k)), f"key {k}: not the master worker's value"
    if store.is_master_worker:
        print("EXACT OK", flush=True)
        report(exact=True, rounds=0)
        return 0
    coeff = sum(range(1, store.num_all_workers + 1))
    for t in range(args.rounds):
        pending = {k: store.pushpull(k, base(k) * np.float32((args.slice + 1) * (t + 1))) for k in SIZES}
        for k, fut in pending.items():
            if args.optimizer == "none":
                want = base(k) * np.float32(coeff * (t + 1))
            else:
                want = init_value(k) - base(k) * np.float32(coeff * (t + 1) * (t + 2) // 2)
            got = fut.result()
            if not np.array_equal(got, want):
                print(f"MISMATCH round {t} key {k}: {np.abs(got - want).max()}", flush=True)
                report(mismatch=f"round {t} key {k}: {np.abs(got - want).max()}")
                return 1
        print(f"ROUND {t} OK", flush=True)
    print("EXACT OK", flush=True)
    report(exact=True, rounds=args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
