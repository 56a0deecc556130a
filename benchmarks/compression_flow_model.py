"""A single-process model of the compression examples' flow, for studying codec settings quickly.

It computes what a real topology of 2 parties x 2 workers running ``examples/cnn_bsc.py`` computes,
in one process: each worker's mean gradient on its own shard of load_digits (the examples' data
order, model and seeds), the party sums, each party's WAN codec (the library's own codec, built by
``geomx.compression.create`` with the same parameters, so its residual, warm-up and threshold samples
are the real ones), the sum of the decoded payloads over the parties, and the workers' local
optimizer step on that aggregate (``trainer.step(num_all_workers)``). On the development machine its
accuracy curves equal the real topology's to the last printed digit (seed 0, BSC 0.01, local Adam:
0.5033 0.7067 0.7900 ... 0.9667 both ways), so one setting costs seconds instead of a topology run.

MPQ's float16 small tensors are not modelled (``--codec`` is ``none`` or ``bsc``). Used for the
diagnosis in docs/Compression.md ("Why local Adam stalled"); for example::

    python benchmarks/compression_flow_model.py --codec bsc --optimizer adam --momentum 0.9 --warmup-rounds 0
    python benchmarks/compression_flow_model.py --codec bsc --optimizer sgd --lr 0.1 --seeds 0 1 2 3 4 5

Prints each seed's curve (test accuracy every ``--eval-every`` iterations) and score (the mean of
the last three evaluations), then the median score over the seeds.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))

PARTIES, WORKERS_PER_PARTY = 2, 2


def run(args: argparse.Namespace, seed: int) -> list[float]:
    """The accuracy curve of one seed."""
    import mxnet as mx
    import numpy as np
    import utils
    from mxnet import autograd, gluon

    from geomx import compression

    workers = PARTIES * WORKERS_PER_PARTY
    arrays = utils.load_arrays()
    net = utils.build_cnn(mx.cpu(), seed=seed)
    params = list(net.collect_params().values())
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
    if args.codec == "bsc":
        codec_params.update(threshold=args.ratio, momentum=args.momentum, warmup_rounds=args.warmup_rounds,
                            warmup_threshold=args.warmup_threshold)
    codecs = [compression.create(codec_params, link="wan") for _ in range(PARTIES)]
    opt_params = {"learning_rate": args.lr}
    optimizer = args.optimizer
    if optimizer == "sgd-momentum":
        optimizer, opt_params["momentum"] = "sgd", 0.9
    trainer = gluon.Trainer(net.collect_params(), optimizer, opt_params, kvstore=None)
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    curve = []
    for it in range(1, args.iters + 1):
        sums = [[None] * len(params) for _ in range(PARTIES)]
        for w in range(workers):
            data, label = next_batch(w)
            with autograd.record():
                loss = loss_fn(net(data), label)
            loss.backward()
            party = w // WORKERS_PER_PARTY
            for i, p in enumerate(params):
                g = (p.grad() / data.shape[0]).asnumpy().reshape(-1)  # what the worker pushes
                sums[party][i] = g if sums[party][i] is None else sums[party][i] + g
        for i, p in enumerate(params):
            total = np.zeros(p.data().size, np.float32)
            for party in range(PARTIES):
                payload = codecs[party].encode(i, sums[party][i])
                total += compression.decode_payload(payload, total.size)
            p.grad()[:] = mx.nd.array(total.reshape(p.shape))
        trainer.step(workers)
        if it % args.eval_every == 0:
            curve.append(utils.evaluate(net, test_data, mx.cpu()))
    return curve


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--codec", choices=("none", "bsc"), default="bsc")
    p.add_argument("--optimizer", choices=("adam", "sgd", "sgd-momentum"), default="adam",
                   help="the workers' local optimizer (sgd-momentum: SGD with momentum 0.9)")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--ratio", type=float, default=0.01, help="BSC threshold (kept fraction)")
    p.add_argument("--momentum", type=float, default=0.0, help="BSC momentum correction")
    p.add_argument("--warmup-rounds", type=int, default=30)
    p.add_argument("--warmup-threshold", type=float, default=0.25)
    p.add_argument("--bound", type=int, default=1000, help="size lower bound")
    p.add_argument("--batch", type=int, default=32, help="batch per worker")
    p.add_argument("--iters", type=int, default=120)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args(argv)
    scores = []
    for seed in args.seeds:
        curve = run(args, seed)
        scores.append(statistics.mean(curve[-3:]))
        print(f"seed {seed}: score {scores[-1]:.4f}; curve {' '.join(f'{a:.4f}' for a in curve)}", flush=True)
    print(f"median score over seeds {args.seeds}: {statistics.median(scores):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
