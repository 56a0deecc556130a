"""A worker for the observability tests, on the framework-neutral core: ``--rounds`` exact rounds of
integer pushes (checked against their sum, zero tolerance), its progress, a loss and an accuracy reported each round,
then ``TRAINED`` and a wait until the file ``--hold`` exists, so the test can read every node's metrics
while the topology is alive and no longer training.
"""
import argparse
import os
import time

import numpy as np

from geomx.errors import GeoMXError
from geomx.store import Store

SIZES = {0: 1000, 1: 50_000}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--slice", type=int, required=True)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--hold", required=True)
    args = p.parse_args()
    store = Store()
    for k, n in SIZES.items():
        store.init(k, n, np.float32, np.zeros(n, np.float32)).result()
    if not store.is_master_worker:
        coeff = sum(range(1, store.num_all_workers + 1))
        for t in range(args.rounds):
            pending = {k: store.pushpull(k, np.full(n, (args.slice + 1) * (t + 1), np.float32))
                       for k, n in SIZES.items()}
            for k, fut in pending.items():
                if not np.array_equal(fut.result(), np.full(SIZES[k], coeff * (t + 1), np.float32)):
                    print(f"MISMATCH round {t} key {k}", flush=True)
                    return 1
            store.report_progress(t + 1, args.rounds)
            store.report_loss(1.0 / (t + 1))
            store.report_accuracy((t + 1) / args.rounds)
        # Bad progress reports are refused by name and change nothing (the test reads steps == rounds).
        for bad in ((-1, None), (True, None), (1.5, None), (1, 0), (1, 2.0)):
            try:
                store.report_progress(*bad)
            except GeoMXError as exc:
                assert str(exc).startswith("report_progress needs"), exc
            else:
                print(f"report_progress{bad} was taken", flush=True)
                return 1
    print("TRAINED", flush=True)
    deadline = time.monotonic() + 300
    while not os.path.exists(args.hold):  # the test's signal: it has read the metrics
        if time.monotonic() > deadline:
            print("the test never released this worker", flush=True)
            return 1
        time.sleep(0.05)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
