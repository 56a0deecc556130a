"""A single-process model of the compression flows, for studying codec settings quickly.

It computes what a real topology of 2 parties x 2 workers computes, in one process: each worker's
mean gradient on its own shard of load_digits (the examples' data order, model and seeds), each
party's WAN codec (the library's own codec, built by ``geomx.compression.create`` with the same
parameters, so its residual, warm-up, threshold samples and float16 rounding are the real ones), the
sum of the decoded payloads over the parties, and the step. Two flows (``--scheme``):

* ``grad``: ``examples/cnn_bsc.py``'s. The parties' gradient sums go through the codecs and each
  party's workers step their local optimizer (``trainer.step(num_all_workers)``, one model per party)
  on the sum plus what their party's codec kept back that round. With ``--lookahead 0`` (the sum alone,
  the library before 2026-12-07) its accuracy curves equalled the real topology's to the last printed
  digit on the development machine (seed 0, BSC 0.01, local Adam: 0.5033 0.7067 0.7900 ... 0.9667).
* ``update``: the optimizer on the servers under BSC/MPQ (docs/Compression.md, "The optimizer before
  the codec"). Each party steps its own optimizer (MXNet's Adam or momentum-SGD rule, in numpy) on
  its party's mean gradient, and its step goes through the codec; the weights take the mean of the
  decoded steps.

It counts the WAN bytes as framed on the wire (``geomx.compression.to_frames``): each party's payload
up, and the global sum (exact sparse, or dense) down to every party. It prints, per seed, the
iterations to ``--target`` test accuracy, the bytes until then and the final accuracy (the mean of the
last five evaluations), then the medians. Used for docs/Compression.md's tables, for example::

    python benchmarks/compression_flow_model.py --codec none --seeds 0 1 2 3 4
    python benchmarks/compression_flow_model.py --codec bsc --scheme update --seeds 0 1 2 3 4
    python benchmarks/compression_flow_model.py --codec bsc --optimizer sgd-momentum --lr 0.02 --iters 120
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))
sys.path.insert(0, HERE)

PARTIES, WORKERS_PER_PARTY = 2, 2


class PartyOptimizer:
    """One party's optimizer over flat float32 vectors: MXNet's Adam, SGD with momentum 0.9, or SGD."""

    def __init__(self, kind: str, lr: float, sizes):
        import numpy as np

        self.kind, self.lr, self.t = kind, lr, 0
        self.m = [np.zeros(n, np.float32) for n in sizes]
        self.v = [np.zeros(n, np.float32) for n in sizes]

    def step(self, i: int, g, first_key: bool):
        """The change to the weights of tensor ``i`` (its own state) for gradient ``g``."""
        import numpy as np

        if first_key:
            self.t += 1
        if self.kind == "adam":
            b1, b2, eps = 0.9, 0.999, 1e-8
            m, v = self.m[i], self.v[i]
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * g * g
            lr_t = self.lr * np.sqrt(1 - b2 ** self.t) / (1 - b1 ** self.t)
            return (-lr_t * m / (np.sqrt(v) + eps)).astype(np.float32)
        if self.kind == "sgd-momentum":
            m = self.m[i]
            m *= 0.9
            m -= self.lr * g
            return m.copy()
        return (-self.lr * g).astype(np.float32)


def run(args: argparse.Namespace, seed: int):
    """The accuracy curve of one seed and the WAN bytes sent up to each evaluation."""
    import mxnet as mx
    import numpy as np
    import utils
    from mxnet import autograd, gluon

    from geomx import compression

    workers = PARTIES * WORKERS_PER_PARTY
    arrays = utils.load_arrays()
    def build():
        if args.model == "big":
            import suite_worker  # benchmarks/, beside this file
            return suite_worker.build_big(mx.cpu(), seed=seed)
        return utils.build_cnn(mx.cpu(), seed=seed)

    # grad: one model per party (each party's workers pull the sum plus their own party's residual, so
    # the parties' models differ); update: one net, loaded with each party's weights in turn.
    nets = [build() for _ in range(PARTIES if args.scheme == "grad" else 1)]
    net = nets[0]
    params = list(net.collect_params().values())
    party_params = [list(n.collect_params().values()) for n in nets]
    sizes = [p.data().size for p in params]
    loaders = [utils.load_data(args.batch, workers, w, arrays=arrays, seed=seed)[0] for w in range(workers)]
    test_data = utils.load_data(args.batch, workers, 0, arrays=arrays, seed=seed)[1]
    batches = [iter(()) for _ in range(workers)]

    def next_batch(w):
        try:
            return next(batches[w])
        except StopIteration:  # the next epoch, reshuffled by the loader's own sampler
            batches[w] = iter(loaders[w])
            return next(batches[w])

    codec_params = {"type": args.codec, "size_lower_bound": args.bound}
    if args.codec in ("bsc", "mpq"):
        codec_params.update(threshold=args.ratio, momentum=args.momentum, min_kept=args.min_kept,
                            value_dtype=args.value_dtype)
        for name in ("warmup_rounds", "warmup_threshold"):  # unset: the library's default
            if getattr(args, name) is not None:
                codec_params[name] = getattr(args, name)
    codecs = [compression.create(codec_params, link="wan") for _ in range(PARTIES)]

    def wire_bytes(payload) -> int:
        return int(compression.to_frames(payload)[1].nbytes)

    if args.scheme == "grad":
        opt_params = {"learning_rate": args.lr}
        optimizer = args.optimizer
        if optimizer == "sgd-momentum":
            optimizer, opt_params["momentum"] = "sgd", 0.9
        trainers = [gluon.Trainer(n.collect_params(), optimizer, opt_params, kvstore=None) for n in nets]
    else:
        party_opts = [PartyOptimizer(args.optimizer, args.lr, sizes) for _ in range(PARTIES)]
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    curve, sent, total_bytes = [], [], 0
    weights = [p.data().asnumpy().reshape(-1) for p in params]

    def place(party):  # the party's weights plus ``lookahead`` times its residual, for its workers' gradients
        for i, p in enumerate(params):
            st = codecs[party].feedback.state(i) if hasattr(codecs[party], "feedback") else None
            # The codec holds whole steps back and the weights take 1 / PARTIES of each: the party's
            # residual in the weights' units is st.v / PARTIES (its share's, LocalServer.held_back).
            x = weights[i] if st is None else weights[i] + args.lookahead * st.v / PARTIES
            p.set_data(mx.nd.array(x.reshape(p.shape)))

    for it in range(1, args.iters + 1):
        sums = [[None] * len(params) for _ in range(PARTIES)]
        for w in range(workers):
            if args.scheme == "update" and args.lookahead and w % WORKERS_PER_PARTY == 0:
                place(w // WORKERS_PER_PARTY)  # without lookahead the net holds the weights already
            data, label = next_batch(w)
            party = w // WORKERS_PER_PARTY
            own = nets[party % len(nets)]
            with autograd.record():
                loss = loss_fn(own(data), label)
            loss.backward()
            for i, p in enumerate(party_params[party % len(nets)]):
                g = (p.grad() / data.shape[0]).asnumpy().reshape(-1)  # what the worker pushes
                sums[party][i] = g if sums[party][i] is None else sums[party][i] + g
        for i, p in enumerate(params):
            total = np.zeros(sizes[i], np.float32)
            held = [None] * PARTIES  # what each party's codec kept back of this round's input
            for party in range(PARTIES):
                x = sums[party][i]
                if args.scheme == "update":
                    x = party_opts[party].step(i, x / WORKERS_PER_PARTY, first_key=(i == 0))
                payload = codecs[party].encode(i, x)
                if args.mask_momentum and args.scheme == "update" and payload.kind == "sparse":
                    party_opts[party].m[i][payload.indices] = 0.0
                total_bytes += wire_bytes(payload)
                decoded = compression.decode_payload(payload, total.size)
                if payload.kind == "sparse":
                    held[party] = x - decoded
                total += decoded
            if codecs[0].for_tensor(sizes[i]) == "bsc":
                total_bytes += PARTIES * wire_bytes(compression.sparse_from_dense(total))
            else:
                total_bytes += PARTIES * wire_bytes(codecs[0].encode(10_000 + i, total))  # dense or fp16
            if args.scheme == "grad":  # the sum, plus ``lookahead`` times what the party's codec kept back
                for party in range(PARTIES):
                    pulled = total if held[party] is None else total + args.lookahead * held[party]
                    party_params[party][i].grad()[:] = mx.nd.array(pulled.reshape(p.shape))
            else:
                weights[i] = weights[i] + total / PARTIES
                p.set_data(mx.nd.array(weights[i].reshape(p.shape)))
        if args.scheme == "grad":
            for trainer in trainers:
                trainer.step(workers)
        if it % args.eval_every == 0:  # the mean of the parties' models
            curve.append(sum(utils.evaluate(n, test_data, mx.cpu()) for n in nets) / len(nets))
            sent.append(total_bytes)
    return curve, sent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("cnn", "big"), default="cnn",
                   help="cnn: the examples' CNN (0.18M parameters); big: the suite's 5.4M-parameter CNN")
    p.add_argument("--codec", choices=("none", "bsc", "mpq"), default="bsc")
    p.add_argument("--scheme", choices=("grad", "update"), default="grad",
                   help="grad: the workers' optimizer on the aggregate (cnn_bsc.py); update: each party's "
                        "optimizer before the codec (the servers' optimizer under BSC/MPQ)")
    p.add_argument("--optimizer", choices=("adam", "sgd", "sgd-momentum"), default="adam",
                   help="sgd-momentum: SGD with momentum 0.9")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--ratio", type=float, default=0.01, help="BSC threshold (kept fraction)")
    p.add_argument("--momentum", type=float, default=0.0, help="BSC momentum correction")
    p.add_argument("--mask-momentum", action="store_true",
                   help="update: zero the party optimizer's momentum of every entry the codec sent")
    p.add_argument("--lookahead", type=float, default=1.0,
                   help="update: a party's workers compute gradients at the weights plus this many times "
                        "their party's residual; grad: they pull the sum plus this many times what their "
                        "party's codec kept back that round (default 1, the library's: LocalServer.held_back; "
                        "0: the global weights, the sum alone)")
    p.add_argument("--warmup-rounds", type=int, default=None, help="the codec's (default: the library's)")
    p.add_argument("--warmup-threshold", type=float, default=None, help="the codec's (default: the library's)")
    p.add_argument("--min-kept", type=int, default=0,
                   help="the codec's min_kept: the fewest entries a compressed tensor sends a round")
    p.add_argument("--value-dtype", choices=("float16", "float32"), default="float16")
    p.add_argument("--bound", type=int, default=1000, help="size lower bound")
    p.add_argument("--batch", type=int, default=32, help="batch per worker")
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=1)
    p.add_argument("--target", type=float, default=0.9)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args(argv)
    return args


def reached(curve, sent, args: argparse.Namespace):
    """The iterations to ``args.target`` (inf if never), the MB sent until then and the final accuracy
    (the mean of the last five evaluations) of one run."""
    hit = next((k for k, acc in enumerate(curve) if acc >= args.target), None)
    if hit is None:
        return float("inf"), float("inf"), statistics.mean(curve[-5:])
    return (hit + 1) * args.eval_every, sent[hit] / 1e6, statistics.mean(curve[-5:])


def main(argv=None) -> int:
    args = parse_args(argv)
    rounds, megabytes, finals = [], [], []
    for seed in args.seeds:
        curve, sent = run(args, seed)
        for out, value in zip((rounds, megabytes, finals), reached(curve, sent, args)):
            out.append(value)
        print(f"seed {seed}: {args.target:.0%} at iteration {rounds[-1]}, {megabytes[-1]:.2f} MB on the WAN; "
              f"final {finals[-1]:.4f}; curve {' '.join(f'{a:.2f}' for a in curve)}", flush=True)
    print(json.dumps({"rounds": rounds, "mb": megabytes, "median_rounds": statistics.median(rounds),
                      "median_mb": round(statistics.median(megabytes), 3),
                      "median_final": round(statistics.median(finals), 4)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
