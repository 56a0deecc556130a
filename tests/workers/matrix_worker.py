"""The combination matrix's worker (tests/test_combinations.py): one worker for every sync algorithm,
codec and server optimizer, whose pulled values are checked after every round against a single-process
model of the whole data path, with zero tolerance:

- the parties' sums are integer-valued (exact in float32 and, below 2048, in float16);
- each party's WAN codec is the codec library's own encoder with its residual (one per party, as each
  local server holds), and the global sum of what the parties sent is what comes back (sparse sums travel
  exactly; fp16 keys are summed in float32 and rounded once);
- the server optimizer is MXNet's updater over whole keys in this process (element-wise: P3 slices and
  the parts of several global servers must give the same bits);
- MixedSync (dist_async): the parties take turns (a token file), so the order of arrivals is known and
  even order-dependent optimizers (Adam, DC-ASGD with per-party backups) have one exact answer; each
  party must receive exactly what the model says after its own push (under BSC: the sparsified change
  from what it held, with a per-party downlink residual);
- HFA: local steps ``w -= g``, ``w / workers`` pushed every K1 steps, party averages every K1 steps and
  global averages of the milestones' deltas every K1*K2 (dyadic values: exact);
- ESync: the steps each worker is given come from the state server, so every worker prints them with a
  digest of its model and the test checks the models against the same averaging model
  (``esync_models``).

Switches that travel in the environment (P3, DGT, TSEngine, CURVE, several global servers) do not change
the answer: that is what the matrix checks. Prints ``MATRIX OK slice N`` at the end (exit 0), or a
``MISMATCH`` line (exit 1).
"""
import argparse
import hashlib
import json
import os
import sys
import time

import mxnet as mx
import numpy as np

import geomx  # noqa: F401  - registers the store
from geomx import compression
from geomx.kvclient import partition

BOUND = 1000  # the codecs' size_lower_bound; the test sets MXNET_KVSTORE_BIGARRAY_BOUND to it too
SHAPES = {0: (6, 5), 1: (40, 50), 2: (3000,)}  # key 0 small; keys 1, 2 large (split, sliced, sparsified)
OPTIMIZERS = {
    "sgd": lambda: mx.optimizer.SGD(learning_rate=1.0),  # the global server's numpy path
    "momentum": lambda: mx.optimizer.SGD(learning_rate=0.5, momentum=0.5, wd=0.01),
    # epsilon 1e-4, not 1e-8: on float16 keys (FP16, MPQ's small keys) 1e-8 is 0 and an element with no
    # gradient yet would be 0 / 0 (MXNet's Adam does that in one process too).
    "adam": lambda: mx.optimizer.Adam(learning_rate=0.01, epsilon=1e-4),
    "dcasgd": lambda: mx.optimizer.DCASGD(learning_rate=0.5, lamda=0.04),
}


def numel(k):
    return int(np.prod(SHAPES[k]))


def dtype_of(codec, k):
    small = numel(k) < BOUND
    return np.float16 if codec == "fp16" or (codec == "mpq" and small) else np.float32


def codec_params(codec, bound_from_servers=False):
    """The master's codec; with ``bound_from_servers`` it names no size_lower_bound (GeoMX's layout:
    MXNET_KVSTORE_SIZE_LOWER_BOUND=BOUND on the servers only), and the model still uses BOUND."""
    out = {"type": codec} if bound_from_servers else {"type": codec, "size_lower_bound": BOUND}
    if codec in ("bsc", "mpq"):
        out["threshold"] = 0.05
    return out


def grad(slice_, t, k, codec="none"):
    """Worker ``slice_``'s push of key ``k`` in round ``t``: integers in [-99, 99] ([-11, 11] for float16
    keys, whose optimizers' intermediate terms, DC-ASGD's g * g * drift for one, overflow float16 with
    larger ones: inf in one process and in the topology alike, which no comparison can check)."""
    n = numel(k)
    g = ((np.arange(n) * (slice_ + 3) + 7 * t) % 23 - 11).astype(np.float32)
    if dtype_of(codec, k) == np.float32:
        g[(np.arange(n) + t) % 5 == 0] *= 9  # a few large entries for the sparsifier to find
    return g


def init_value(k):
    return ((np.arange(numel(k)) % 7) - 3).astype(np.float32)


class Uplinks:
    """Each party's WAN codec, as its local server holds it."""

    def __init__(self, codec, parties):
        self.codec = codec
        params = codec_params(codec)
        self.codecs = [compression.create(params, link="wan") if codec != "none" else None
                       for _ in range(parties)]

    def sparse(self, k):
        """Whether key ``k`` travels as a sparse payload (BSC's path: MixedSync answers it with a delta)."""
        c = self.codecs[0]
        return c is not None and dtype_of(self.codec, k) == np.float32 and c.for_tensor(numel(k)) == "bsc"

    def send(self, party, k, value):
        """What the global server receives from ``party`` for its float32 sum ``value``, in float32."""
        dt = dtype_of(self.codec, k)
        a = value.astype(dt)
        if self.sparse(k):
            a = compression.decode_payload(self.codecs[party].encode(k, a), a.size)
        return a.astype(np.float32)


def party_sum(party, per_party, t, k, codec):
    return sum(grad(w, t, k, codec) for w in range(party * per_party, (party + 1) * per_party))


def fsa_model(codec, optimizer, parties, per_party, rounds):
    """What each party's workers pull after each round under FSA (``[party][round][key]``). With a
    sparse codec (BSC, MPQ) and an optimizer, each party's local server steps its own copy of the
    optimizer on ``parties`` times its party's sum, from the weights it holds, and sends a
    ``1 / parties`` share of the change through its codec; the global servers add the sum of the shares
    to the weights, and each party adds that sum to what it holds, plus what its
    codec kept back of its own share (its weights are then the global weights plus its residual;
    LocalServer.held_back). With a sparse codec and no optimizer each party pulls the sum plus what its
    codec kept back of its own sum that round."""
    party_optimizer = optimizer != "none" and compression.codec_class(codec).sparse
    up = Uplinks(codec, parties)
    updater = mx.optimizer.get_updater(OPTIMIZERS[optimizer]()) if optimizer != "none" else None
    party_updaters = [mx.optimizer.get_updater(OPTIMIZERS[optimizer]()) for _ in range(parties)] \
        if party_optimizer else []
    weights = {k: mx.nd.array(init_value(k), dtype=dtype_of(codec, k)) for k in SHAPES}
    stores = [{k: weights[k].asnumpy() for k in SHAPES} for _ in range(parties)]  # each party's weights
    out = [[] for _ in range(parties)]
    for t in range(rounds):
        pulled = [{} for _ in range(parties)]
        for k in SHAPES:
            dt = dtype_of(codec, k)
            if party_optimizer:
                shares, kept = [], []
                for p in range(parties):
                    w32 = stores[p][k].astype(np.float32)
                    stepped = mx.nd.array(w32)
                    g = party_sum(p, per_party, t, k, codec).astype(dt).astype(np.float32) * np.float32(parties)
                    party_updaters[p](k, mx.nd.array(g), stepped)
                    share = ((stepped.asnumpy() - w32) / np.float32(parties)).astype(dt)
                    shares.append(up.send(p, k, share))
                    kept.append(share - shares[-1] if up.sparse(k) else None)
                delta = sum(shares).astype(dt)
                for p in range(parties):
                    value = stores[p][k] + delta
                    if kept[p] is not None:
                        value += kept[p]
                    stores[p][k] = pulled[p][k] = value
                continue
            sums = [party_sum(p, per_party, t, k, codec) for p in range(parties)]
            sent = [up.send(p, k, sums[p]) for p in range(parties)]
            total = sum(sent).astype(dt)
            if updater is None:
                # No optimizer: each party's workers pull the sum plus what their party's codec kept
                # back of its own sum this round (LocalServer.held_back).
                for p in range(parties):
                    pulled[p][k] = total + (sums[p] - sent[p]) if up.sparse(k) else total
                continue
            updater(k, mx.nd.array(total, dtype=total.dtype), weights[k])
            for p in range(parties):
                pulled[p][k] = weights[k].asnumpy()
        for p in range(parties):
            out[p].append(pulled[p])
    return out


def mixedsync_model(codec, optimizer, parties, per_party, upto, global_servers=1):
    """What the party that made push number ``upto`` holds afterwards (turns: round-major, then party).
    Each global server sends each party the change of its own part of a key, through a downlink codec
    of its own for that party (so with several servers each part keeps its own top-r)."""
    up = Uplinks(codec, parties)
    down = [Uplinks(codec, parties) for _ in range(global_servers)]
    make = OPTIMIZERS[optimizer]
    updater = mx.optimizer.get_updater(make())
    weights = {k: mx.nd.array(init_value(k), dtype=dtype_of(codec, k)) for k in SHAPES}
    held = {(p, k): init_value(k).astype(dtype_of(codec, k)) for p in range(parties) for k in SHAPES}
    for i in range(upto):
        t, p = divmod(i, parties)
        for k in SHAPES:
            g = up.send(p, k, party_sum(p, per_party, t, k, codec)).astype(dtype_of(codec, k))
            if optimizer == "dcasgd":  # compensated against what this party holds (its backup)
                if k not in updater.states:
                    updater.states[k] = make().create_state(k, weights[k])
                    updater.states_synced[k] = True
                updater.states[k][1][:] = held[(p, k)]
            updater(k, mx.nd.array(g, dtype=g.dtype), weights[k])
            value = weights[k].asnumpy()
            if up.sparse(k):  # the change from what the party holds, sparsified with its own residual
                now = held[(p, k)].copy()
                for j, off, n in partition(k, numel(k), global_servers, BOUND):
                    change = down[j].codecs[p].encode(k, value[off:off + n] - now[off:off + n])
                    now[off:off + n] += compression.decode_payload(change, n)
                held[(p, k)] = now
            else:
                held[(p, k)] = value
    last = (upto - 1) % parties
    return {k: held[(last, k)] for k in SHAPES}


def local_step(slice_, s, k):
    """HFA's and ESync's deterministic local step (no autograd): dyadic, so every average is exact."""
    return ((((np.arange(numel(k)) + 3 * slice_ + s) % 9) - 4) / 4).astype(np.float32)


def party_averages(w, k, parties, per_party):
    """Each party's average of its workers' ``w[i][k]`` (what its local server sums from ``w / workers``)."""
    return [sum(w[i][k] / np.float32(per_party) for i in range(p * per_party, (p + 1) * per_party))
            for p in range(parties)]


def global_average(up, k, avgs, milestone):
    """HFA's and ESync's global round: the milestone plus the parties' deltas from it over ``parties``,
    each through its party's codec."""
    parties = len(avgs)
    deltas = [up.send(p, k, (avgs[p] - milestone) / np.float32(parties)) for p in range(parties)]
    return milestone + sum(deltas[1:], deltas[0])


def hfa_model(codec, parties, per_party, k1, k2, steps):
    """Each worker's weights after ``steps`` local steps under HFA; the milestones' deltas cross the WAN
    through each party's codec."""
    n = parties * per_party
    up = Uplinks(codec, parties)
    w = [{k: init_value(k) for k in SHAPES} for _ in range(n)]
    milestone = {k: init_value(k) for k in SHAPES}
    for s in range(1, steps + 1):
        for i in range(n):
            for k in SHAPES:
                w[i][k] = w[i][k] - local_step(i, s, k)
        if s % k1:
            continue
        for k in SHAPES:
            avgs = party_averages(w, k, parties, per_party)
            if (s // k1) % k2:
                for i in range(n):
                    w[i][k] = avgs[i // per_party]
            else:
                milestone[k] = global_average(up, k, avgs, milestone[k])
                for i in range(n):
                    w[i][k] = milestone[k]
    return w


def esync_models(codec, parties, per_party, steps_by_round):
    """The global model after each ESync round, given ``steps_by_round[r][worker]`` (what the workers
    printed): every worker takes its steps from the last global model, parties average their workers,
    the global servers sum the parties' deltas from the milestone over ``parties`` (each through its
    party's codec, as under HFA)."""
    n = parties * per_party
    up = Uplinks(codec, parties)
    model = {k: init_value(k) for k in SHAPES}
    out = []
    for r, steps in enumerate(steps_by_round):
        w = []
        for i in range(n):
            wi = {k: model[k].copy() for k in SHAPES}
            for s in range(steps[i]):
                for k in SHAPES:
                    wi[k] = wi[k] - local_step(i, r * 1000 + s, k)
            w.append(wi)
        model = {k: global_average(up, k, party_averages(w, k, parties, per_party), model[k]) for k in SHAPES}
        out.append(digest(model))
    return out


def digest(model):
    return hashlib.sha1(b"".join(np.asarray(model[k], np.float32).tobytes() for k in sorted(SHAPES))).hexdigest()[:16]


def mismatch(when, k, got, want):
    got, want = np.asarray(got).reshape(-1), np.asarray(want).reshape(-1)
    if got.dtype != want.dtype:
        print(f"MISMATCH {when} key {k}: dtype {got.dtype} != {want.dtype}", flush=True)
        return True
    bad = np.flatnonzero(got != want)
    if bad.size:
        print(f"MISMATCH {when} key {k}: {bad.size} of {got.size} elements differ, first at {bad[0]}: "
              f"{got[bad[0]]!r} != {want[bad[0]]!r}", flush=True)
        return True
    return False


def wait_for(predicate, what, timeout=120):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} never came")
        time.sleep(0.005)


def read_turn(path):
    try:
        with open(path) as f:
            return int(f.read().strip() or -1)
    except (FileNotFoundError, ValueError):
        return -1


def run_fsa(kv, args, parties, per_party):
    # A central worker (in no party) pulls what every party pulls: it trains only without a party optimizer.
    expected = fsa_model(args.codec, args.optimizer, parties, per_party, args.rounds)[
        min(args.slice // per_party, parties - 1)]
    outs = {k: mx.nd.zeros(SHAPES[k], dtype=dtype_of(args.codec, k)) for k in SHAPES}
    for t in range(args.rounds):
        for k in SHAPES:
            g = grad(args.slice, t, k, args.codec).astype(dtype_of(args.codec, k)).reshape(SHAPES[k])
            kv.pushpull(k, mx.nd.array(g, dtype=g.dtype), out=outs[k], priority=-k)
        for k in SHAPES:
            if mismatch(f"round {t}", k, outs[k].asnumpy(), expected[t][k]):
                return 1
    return 0


def run_mixedsync(kv, args, parties, per_party):
    party, first = divmod(args.slice, per_party)
    outs = {k: mx.nd.zeros(SHAPES[k], dtype=dtype_of(args.codec, k)) for k in SHAPES}
    # Every party starts from the initial weights: the turns begin once all workers hold them.
    open(f"{args.turn}.init{args.slice}", "w").close()
    wait_for(lambda: all(os.path.exists(f"{args.turn}.init{w}") for w in range(parties * per_party)),
             "the other workers' initial pull")
    for t in range(args.rounds):
        turn = t * parties + party
        wait_for(lambda turn=turn: read_turn(args.turn) == turn, f"turn {turn}")
        for k in SHAPES:
            g = grad(args.slice, t, k, args.codec).astype(dtype_of(args.codec, k)).reshape(SHAPES[k])
            kv.pushpull(k, mx.nd.array(g, dtype=g.dtype), out=outs[k])
        got = {k: outs[k].asnumpy() for k in SHAPES}  # waits for the replies (or raises their error)
        expected = mixedsync_model(args.codec, args.optimizer, parties, per_party, turn + 1, args.global_servers)
        for k in SHAPES:
            if mismatch(f"turn {turn}", k, got[k], expected[k]):
                return 1
        if first == 0:  # the party's first worker passes the token on (its party's push is applied)
            tmp = f"{args.turn}.{args.slice}"
            with open(tmp, "w") as f:
                f.write(str(turn + 1))
            os.replace(tmp, args.turn)
    return 0


def run_hfa(kv, args, parties, per_party):
    k1, k2 = kv.hfa_periods
    w = {k: mx.nd.zeros(SHAPES[k], dtype=dtype_of(args.codec, k)) for k in SHAPES}
    for k in SHAPES:
        kv.broadcast(k, w[k], out=w[k])
    for s in range(1, args.steps + 1):
        for k in SHAPES:
            w[k] -= mx.nd.array(local_step(args.slice, s, k).reshape(SHAPES[k]), dtype=w[k].dtype)
        if s % k1 == 0:
            for k in SHAPES:
                kv.pushpull(k, w[k] / per_party, out=w[k])
            expected = hfa_model(args.codec, parties, per_party, k1, k2, s)[args.slice]
            for k in SHAPES:
                want = expected[k].astype(dtype_of(args.codec, k))  # dyadic: exact in float16 too
                if mismatch(f"step {s}", k, w[k].asnumpy(), want):
                    return 1
    return 0


def run_esync(kv, args, parties, per_party):
    w = {k: mx.nd.zeros(SHAPES[k], dtype=dtype_of(args.codec, k)) for k in SHAPES}
    for k in SHAPES:
        kv.broadcast(k, w[k], out=w[k])
    for r in range(args.rounds):
        steps = kv.esync_steps()
        for s in range(steps):
            for k in SHAPES:
                w[k] -= mx.nd.array(local_step(args.slice, r * 1000 + s, k).reshape(SHAPES[k]), dtype=w[k].dtype)
        for k in SHAPES:
            kv.pushpull(k, w[k] / per_party, out=w[k])
        model = {k: w[k].asnumpy().reshape(-1) for k in SHAPES}
        print(f"ESYNC round {r} slice {args.slice} steps {steps} model {digest(model)}", flush=True)
    return 0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--slice", type=int, required=True)
    p.add_argument("--case", required=True, help="JSON: sync, codec, optimizer, global_servers")
    p.add_argument("--rounds", type=int, default=3, help="FSA, MixedSync, ESync: rounds")
    p.add_argument("--steps", type=int, default=8, help="HFA: local steps (averages every K1)")
    p.add_argument("--turn", default=None, help="MixedSync: the token file that orders the parties' pushes")
    p.add_argument("--bound-from-servers", action="store_true",
                   help="the master sends no size_lower_bound (the servers' variable must apply)")
    args = p.parse_args()
    case = json.loads(args.case)
    args.sync, args.codec, args.optimizer = case["sync"], case["codec"], case["optimizer"]
    args.global_servers = int(case["global_servers"])
    kv = mx.kv.create("dist_async" if args.sync == "mixedsync" else "dist_sync")
    averaging = args.sync in ("hfa", "esync")
    if kv.is_master_worker:
        if args.optimizer != "none":
            kv.set_optimizer(OPTIMIZERS[args.optimizer]())
        if args.codec != "none":
            kv.set_gradient_compression(codec_params(args.codec, args.bound_from_servers))
        for k in SHAPES:
            value = init_value(k) if (args.optimizer != "none" or averaging) else np.zeros(numel(k), np.float32)
            kv.init(k, mx.nd.array(value.reshape(SHAPES[k]), dtype=dtype_of(args.codec, k)))
        print("master initialised", flush=True)
        return 0
    per_party = kv.num_workers
    parties = kv.num_all_workers // per_party
    for k in SHAPES:
        kv.init(k, mx.nd.zeros(SHAPES[k], dtype=dtype_of(args.codec, k)))
    run = {"fsa": run_fsa, "mixedsync": run_mixedsync, "hfa": run_hfa, "esync": run_esync}[args.sync]
    code = run(kv, args, parties, per_party)
    if code == 0:
        print(f"MATRIX OK slice {args.slice}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
