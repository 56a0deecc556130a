"""A worker for the exact-oracle tests: integer-valued pushes whose float32 sums are exact.

Every training worker w (global data-slice index) pushes ``(w + 1) * (t + 1) * base_k`` for key k in
round t. The closed forms (no optimizer: the round's sum; SGD lr=1: init minus the running sum), or with
Adam on the global server one MXNet updater over the same sums in this process, are checked with zero
tolerance after every pull. With ``--store dist_async`` (MixedSync, SGD) each update is
applied on arrival in an order nobody knows, so only the global server's final value is checked, by the
master worker (SGD with lr=1 subtracts exact integers: any order gives the same sum). Prints ``PID <pid>`` at start,
``RANK <rank>`` once connected, ``ROUND <t> OK`` after each round and ``EXACT OK`` at the end (exit 0).
``--sleep`` slows the rounds down so that a test can act on a topology while it trains.

Reported as data too (tests/workers/results.py): ``slice``, ``rank`` and ``master`` once connected,
``round`` (the last one checked), ``checkpoint`` (``round``, ``servers``, ``bytes`` of the one it checked),
``joined_at`` / ``rejoin_seen_at`` (a rejoin), and at the end ``exact`` with ``rounds``, or ``mismatch``
(what differed).
"""
import argparse
import os
import sys
import time

import mxnet as mx
import numpy as np
from results import report

import geomx  # noqa: F401  - registers the store

SHAPES = {0: (3, 4), 1: (7,), 2: (1000, 300), 3: (1,)}


def base(k):
    n = int(np.prod(SHAPES[k]))
    return ((np.arange(n) % 13) - 6).astype(np.float32).reshape(SHAPES[k]) + k


def init_value(k):
    return (np.arange(int(np.prod(SHAPES[k]))) % 101).astype(np.float32).reshape(SHAPES[k])


def mismatch(text):
    """A value is not its closed form: said on a MISMATCH line and reported."""
    print(f"MISMATCH {text}", flush=True)
    report(mismatch=text)


def adam():
    return mx.optimizer.Adam(learning_rate=0.01)


def check_checkpoint(kv, t, expected):
    """Ask for a checkpoint after round t and check what the (one) global server wrote: every key has
    completed t + 1 rounds (a later round cannot have completed: it needs this worker's push), and
    its value is the closed form, exactly."""
    from geomx import checkpoint

    saved = kv.save_checkpoint()
    for info in saved:
        ckpt = checkpoint.load(info["path"])
        if ckpt.rank != info["rank"] or sorted(r.key for r in ckpt.keys) != sorted(SHAPES):
            mismatch(f"checkpoint keys {[r.key for r in ckpt.keys]} in {info}")
            return False
        for rec in ckpt.keys:
            if rec.completed != t + 1 or not np.array_equal(rec.value, expected(rec.key, t).reshape(-1)):
                mismatch(f"checkpoint key {rec.key} at round {rec.completed}")
                return False
    print(f"CHECKPOINT OK round {t} servers {len(saved)} bytes {sum(i['bytes'] for i in saved)}", flush=True)
    report(checkpoint={"round": t, "servers": len(saved), "bytes": sum(i["bytes"] for i in saved)})
    return True


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--slice", type=int, required=True)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--optimizer", choices=["none", "sgd", "adam"], default="none",
                   help="the global server's optimizer: none (pulls are the round sums), SGD with lr 1 (a "
                        "closed form), or Adam (MXNet's own updater over the round sums in this process)")
    p.add_argument("--mode", choices=["push-pull", "pushpull", "list"], default="push-pull")
    p.add_argument("--crash-slice", type=int, default=-1, help="this worker raises after its first round")
    p.add_argument("--crash-pending-slice", type=int, default=-1,
                   help="this worker raises right after issuing its second round's pushes and pulls, "
                        "before any of them is answered")
    p.add_argument("--crash-pending-after", default=None, metavar="FILE",
                   help="with --crash-pending-slice: wait until FILE exists before the second round "
                        "(the test prepares the server first)")
    p.add_argument("--sleep", type=float, default=0.0, help="seconds to sleep after each round")
    p.add_argument("--first-round", type=int, default=0,
                   help="the global servers were restored from a checkpoint taken after this many rounds")
    p.add_argument("--checkpoint-at", type=int, default=-1,
                   help="after this round, slice 0 asks for a checkpoint (kv.save_checkpoint) and checks it")
    p.add_argument("--master-trains", action="store_true",
                   help="the master worker trains too (DMLC_ENABLE_CENTRAL_WORKER=1: it is one of the "
                        "central party's training workers)")
    p.add_argument("--master-sleep", type=float, default=0.0,
                   help="seconds the master worker sleeps after each round (the parties finish first)")
    p.add_argument("--store", choices=["dist_sync", "dist_async"], default="dist_sync")
    p.add_argument("--lost-slice", type=int, default=-1,
                   help="the party of this slice (one worker) is lost after round 0 (GEOMX_LOST_PARTY=continue): "
                        "later rounds sum the others' pushes, scaled by --lost-scale")
    p.add_argument("--lost-scale", type=float, default=1.0)
    p.add_argument("--rejoin-push", type=int, default=0,
                   help="with --lost-slice: that party's site is restarted and its worker (--rejoining) pushes "
                        "(slice + 1) * REJOIN_PUSH * base_k in every round from the one it joins; the others "
                        "accept each round's value in one of three phases, in order: everyone, the lost party "
                        "scaled away, the rejoined party's constant push, and must see the last")
    p.add_argument("--rejoining", action="store_true",
                   help="this worker's party rejoins a running topology: it learns the global round from "
                        "the first value it pulls after a push and runs to --rounds")
    p.add_argument("--wait-round", type=int, default=-1,
                   help="before this round, wait until --wait-file exists (the test lets a site rejoin first)")
    p.add_argument("--wait-file", default=None)
    p.add_argument("--report-loss", action="store_true",
                   help="kv.report_loss(4 / (t + 1)) before round t (DGT's adaptive K)")
    args = p.parse_args()
    # geomx-launch started this worker's lost party again (GEOMX_LOST_PARTY=rejoin): it rejoins.
    args.rejoining = args.rejoining or int(os.environ.get("GEOMX_PARTY_RESTART", "0")) > 0
    print("PID", os.getpid(), flush=True)
    kv = mx.kv.create(args.store)
    final_only = args.store == "dist_async"
    if final_only and args.optimizer != "sgd":
        p.error("--store dist_async needs --optimizer sgd (MixedSync runs the optimizer on arrival)")
    print("RANK", kv.rank, flush=True)
    report(slice=args.slice, rank=kv.rank, master=kv.is_master_worker)
    n_all = kv.num_all_workers
    coeff_sum = n_all * (n_all + 1) // 2  # sum over workers of (w + 1)
    keys = sorted(SHAPES)
    if kv.is_master_worker:
        if args.optimizer == "sgd":
            kv.set_optimizer(mx.optimizer.SGD(learning_rate=1.0, momentum=0.0, wd=0.0, rescale_grad=1.0))
        elif args.optimizer == "adam":
            kv.set_optimizer(adam())
        for k in keys:
            kv.init(k, mx.nd.array(init_value(k)))
        print("master initialised", flush=True)
        if not args.master_trains:
            return 0
    else:
        for k in keys:
            kv.init(k, mx.nd.zeros(SHAPES[k]))
    outs = {k: mx.nd.zeros(SHAPES[k]) for k in keys}
    for k in keys:
        kv.pull(k, out=outs[k])
    reference = {}  # key -> its values after each round, from one MXNet updater (Adam)

    def expected(k, t):
        """Key k's value after round t (t = -1: the initial value)."""
        if t < 0:
            return init_value(k)
        if args.optimizer == "none":
            if args.lost_slice >= 0 and t >= 1:
                return ((coeff_sum - (args.lost_slice + 1)) * args.lost_scale * (t + 1) * base(k)).astype(np.float32)
            return (coeff_sum * (t + 1) * base(k)).astype(np.float32)
        if args.optimizer == "adam":
            values = reference.setdefault(k, [])
            if not values:
                updater, weight = mx.optimizer.get_updater(adam()), mx.nd.array(init_value(k))
                for r in range(args.rounds):
                    updater(k, mx.nd.array(coeff_sum * (r + 1) * base(k)), weight)
                    values.append(weight.asnumpy())
            return values[t]
        return (init_value(k) - coeff_sum * sum(range(1, t + 2)) * base(k)).astype(np.float32)

    def matches(outs, t, when):
        """True when every pulled key holds its value after round t; else prints a MISMATCH line."""
        for k in keys:
            want = expected(k, t)
            got = outs[k].asnumpy()
            if not np.array_equal(got, want):
                bad = np.flatnonzero(got.reshape(-1) != want.reshape(-1))
                mismatch(f"{when} key {k}: {bad.size} elements differ, first at {bad[0]}: "
                         f"{got.reshape(-1)[bad[0]]} != {want.reshape(-1)[bad[0]]}")
                return False
        return True

    if args.rejoin_push:
        if args.rejoining:
            print("INITIALISED", flush=True)  # its INITs are answered: its rounds' start is fixed
        return rejoin_run(kv, args, keys, outs, coeff_sum)
    for k in keys:
        got = outs[k].asnumpy()
        # (Under MixedSync another party's update may be in already: nothing to check before the end.)
        if not final_only and not np.array_equal(got, expected(k, args.first_round - 1)):
            mismatch(f"init key {k}")
            return 1
    for t in range(args.first_round, args.rounds):
        if t == 1 and args.slice == args.crash_pending_slice and args.crash_pending_after:
            while not os.path.exists(args.crash_pending_after):
                time.sleep(0.05)
        if t == 1 and args.slice == args.crash_slice:
            raise RuntimeError("injected failure")
        if args.report_loss:
            kv.report_loss(4.0 / (t + 1))
        pushes = {k: mx.nd.array((args.slice + 1) * (t + 1) * base(k)) for k in keys}
        if args.mode == "push-pull":
            for k in keys:
                kv.push(k, pushes[k], priority=-k)
                kv.pull(k, out=outs[k], priority=-k)
        elif args.mode == "pushpull":
            for k in keys:
                kv.pushpull(k, pushes[k], out=outs[k], priority=-k)
        else:
            kv.push(keys, [pushes[k] for k in keys])
            kv.pull(keys, out=[outs[k] for k in keys])
        if t == 1 and args.slice == args.crash_pending_slice:
            raise RuntimeError("injected failure with pulls pending")
        if not final_only and not matches(outs, t, f"round {t}"):
            return 1
        print(f"ROUND {t} OK slice {args.slice}", flush=True)
        report(round=t)
        if t == args.checkpoint_at and args.slice == 0:
            if not check_checkpoint(kv, t, expected):
                return 1
        time.sleep(args.sleep + (args.master_sleep if kv.is_master_worker else 0.0))
    kv.barrier()
    if final_only and kv.is_master_worker:
        # The global server's value must reach the closed form exactly. Not at once: a party's last
        # aggregate may still be on its way when the barrier completes (its workers' pushpulls were
        # answered by their local server), and the parties hold their own views of the weights, so
        # the master worker, which pulls from the global server, polls for a bounded time.
        deadline = time.monotonic() + 30
        while True:
            for k in keys:
                kv.pull(k, out=outs[k])
            if all(np.array_equal(outs[k].asnumpy(), expected(k, args.rounds - 1)) for k in keys):
                break
            if time.monotonic() > deadline:
                matches(outs, args.rounds - 1, "final (after 30 s)")
                return 1
            time.sleep(0.1)
    print(f"EXACT OK slice {args.slice} rank {kv.rank} rounds {args.rounds}", flush=True)
    report(exact=True, rounds=args.rounds)
    return 0


def rejoin_run(kv, args, keys, outs, coeff_sum):
    """GEOMX_LOST_PARTY=continue with a party that comes back (optimizer none: each value is a round's
    sum). The party of --lost-slice (one worker, S = its slice) is lost after round 0 and its restarted
    worker pushes a constant; with P the rest's coefficient sum, round t's value is one of
    full: coeff_sum (t + 1) base, lost: P (t + 1) --lost-scale base, rejoined: (P (t + 1) + (S + 1) J) base,
    and the phases follow in that order with no round missing or counted twice."""
    lost, joined_push = args.lost_slice + 1, args.rejoin_push
    rest = coeff_sum - lost

    def forms(t):
        return [coeff_sum * (t + 1), rest * args.lost_scale * (t + 1), rest * (t + 1) + lost * joined_push]

    def value(k, coefficient):
        return (coefficient * base(k)).astype(np.float32)

    def round_of(outs):
        """The rejoiner's view: the round whose rejoined-phase value every key holds, or None."""
        c = float(outs[keys[0]].asnumpy().reshape(-1)[0] / base(keys[0]).reshape(-1)[0])
        t = round((c - lost * joined_push) / rest) - 1
        if t >= 0 and all(np.array_equal(outs[k].asnumpy(), value(k, forms(t)[2])) for k in keys):
            return t
        return None

    phase, seen_at, t = 0, None, 0
    while True:
        if t == args.wait_round and args.wait_file and not args.rejoining:
            while not os.path.exists(args.wait_file):
                time.sleep(0.05)
        if t == 1 and args.slice == args.crash_slice and not args.rejoining:
            raise RuntimeError("injected failure")
        mine = (args.slice + 1) * (joined_push if args.rejoining else t + 1)
        for k in keys:
            kv.push(k, mx.nd.array(mine * base(k)), priority=-k)
            kv.pull(k, out=outs[k], priority=-k)
        if args.rejoining:
            now = round_of(outs)
            if now is None or (seen_at is not None and now != t):
                mismatch(f"rejoined round: value of round {now}, expected round {t if seen_at else '?'}")
                return 1
            if seen_at is None:
                seen_at = t = now
                print(f"JOINED at round {t}", flush=True)
                report(joined_at=t)
        else:
            matched = [i for i, c in enumerate(forms(t)) if all(np.array_equal(outs[k].asnumpy(), value(k, c))
                                                                  for k in keys)]
            if not matched or matched[-1] < phase:
                mismatch(f"round {t}: {outs[keys[0]].asnumpy().reshape(-1)[:3]} is none of phases "
                         f"{phase}.. {[float(c) for c in forms(t)]} x base")
                return 1
            if matched[-1] == 2 and phase < 2:
                seen_at = t
                print(f"REJOIN SEEN from round {t}", flush=True)
                report(rejoin_seen_at=t)
            phase = matched[-1]
        print(f"ROUND {t} OK slice {args.slice}", flush=True)
        report(round=t)
        t += 1
        if t >= args.rounds:
            break
        time.sleep(args.sleep)
    if seen_at is None:
        mismatch("the rejoined party never took part")
        return 1
    kv.barrier()
    print(f"EXACT OK slice {args.slice} rank {kv.rank} rounds {args.rounds}", flush=True)
    report(exact=True, rounds=args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
