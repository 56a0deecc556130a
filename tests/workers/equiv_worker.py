"""Distributed gluon training for the equivalence test: every training worker takes its slice of a
fixed global batch each step; ``--oracle`` trains the same model single-process on whole batches.
Final weights go to ``--out`` (an .npz). Reported (tests/workers/results.py): ``slice`` and ``master``,
then ``out``, the file of a training worker's weights."""
import argparse
import sys

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon
from results import report

STEPS, BATCH_PER_WORKER, FEATURES = 5, 8, 12


def build():
    mx.random.seed(7)
    net = gluon.nn.Sequential()
    net.add(gluon.nn.Dense(16, activation="relu"), gluon.nn.Dense(3))
    net.initialize(mx.init.Xavier())
    net(mx.nd.zeros((1, FEATURES)))
    return net


def batches(num_workers):
    rng = np.random.RandomState(3)
    for _ in range(STEPS):
        x = rng.uniform(-1, 1, (num_workers * BATCH_PER_WORKER, FEATURES)).astype(np.float32)
        y = rng.randint(0, 3, num_workers * BATCH_PER_WORKER).astype(np.float32)
        yield x, y


def train(net, trainer, data, lo, hi):
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    for x, y in data:
        with autograd.record():
            loss = loss_fn(net(mx.nd.array(x[lo:hi])), mx.nd.array(y[lo:hi]))
        loss.backward()
        trainer.step(BATCH_PER_WORKER)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--slice", type=int, default=0)
    p.add_argument("--optimizer", default="sgd")
    p.add_argument("--update-on-kvstore", choices=["yes", "no"], default="yes")
    p.add_argument("--kvstore-string", action="store_true", help="pass kvstore='dist_sync' as a string")
    p.add_argument("--bsc-keep-all", action="store_true",
                   help="BSC on the WAN with a ratio that keeps every entry (must equal dense aggregation)")
    p.add_argument("--oracle", type=int, default=0, help="single-process run over this many workers' data")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    opt_args = {"learning_rate": 0.1}
    if args.optimizer == "sgd":
        opt_args["momentum"] = 0.9
    net = build()
    params = net.collect_params()
    if args.oracle:
        trainer = gluon.Trainer(params, args.optimizer, opt_args, kvstore=None)
        train(net, trainer, batches(args.oracle), 0, args.oracle * BATCH_PER_WORKER)
    else:
        import geomx

        kv = "dist_sync" if args.kvstore_string else mx.kv.create("dist_sync")
        # float32 values: the default float16 rounds what is sent (the error waits in the residual for a
        # later round), which is not single-process training exactly
        compression = {"type": "bsc", "threshold": 0.9999, "size_lower_bound": 10,
                       "value_dtype": "float32"} if args.bsc_keep_all else None
        trainer = gluon.Trainer(params, args.optimizer, opt_args, kvstore=kv, compression_params=compression,
                                update_on_kvstore=args.update_on_kvstore == "yes")
        if args.kvstore_string:
            # Trainer creates the store itself; rescale_grad must already be final when it sends the
            # optimizer (gluon refuses a later change with a distributed store).
            trainer._optimizer.rescale_grad = 1.0 / BATCH_PER_WORKER
            trainer._init_kvstore()
            kv = trainer._kvstore
        report(slice=args.slice, master=kv.is_master_worker)
        if kv.is_master_worker:
            # Rescaling is part of the optimizer that travels to the global servers.
            trainer._optimizer.rescale_grad = 1.0 / BATCH_PER_WORKER
            geomx.initialize_trainer(trainer)
            return 0
        n = kv.num_all_workers
        train(net, trainer, batches(n), args.slice * BATCH_PER_WORKER, (args.slice + 1) * BATCH_PER_WORKER)
    np.savez(args.out, **{name: p.data().asnumpy() for name, p in sorted(params.items())})
    print("EQUIV DONE", args.slice, flush=True)
    report(out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
