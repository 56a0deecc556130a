"""Vanilla HiPS example: a small CNN trained with the optimizer running on the global server.

Flow (as GeoMX's ``examples/cnn.py``): create the kvstore, the master worker installs the optimizer,
every worker initialises one key per parameter (the non-master workers then pull the master's
values), the master worker leaves, and the training workers push mean gradients and pull the new
weights every iteration.

    python examples/cnn.py --cpu                        # one process of a topology (see scripts/)
    python examples/cnn.py --cpu --kvstore local -ep 1  # single-process sanity run, no geomx servers
"""

from __future__ import annotations

import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)  # for utils (which also finds geomx in a source checkout)

import argparse  # noqa: E402
import json  # noqa: E402

import mxnet as mx  # noqa: E402
import utils  # noqa: E402
from mxnet import gluon  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = utils.build_parser("geomx vanilla HiPS example (CNN)")
    parser.add_argument("-ms", "--mixed-sync", action="store_true",
                        help="MixedSync: asynchronous across parties (dist_async)")
    parser.add_argument("-dc", "--dcasgd", action="store_true",
                        help="use DCASGD on the global server (implies asynchronous training)")
    parser.add_argument("--max-iters", type=int, default=0,
                        help="stop after this many iterations in total (0 = no limit)")
    parser.add_argument("--report-loss", type=int, default=0, metavar="N",
                        help="every N iterations, report the batch loss with kv.report_loss (DGT's "
                             "ADAPTIVE_K_FLAG=1 lowers K as it falls; 0 = never)")
    parser.add_argument("--optimizer", choices=("adam", "sgd"), default="adam",
                        help="the servers' optimizer: adam, or sgd with --momentum (default adam)")
    parser.add_argument("--momentum", type=float, default=0.0, help="SGD's momentum (default 0)")
    parser.add_argument("--compression", type=json.loads, default=None, metavar="JSON",
                        help="the master worker's kv.set_gradient_compression, e.g. "
                             "'{\"type\": \"bsc\", \"threshold\": 0.01}': with bsc or mpq each party's local "
                             "server runs the optimizer and the WAN carries its sparsified steps "
                             "(docs/Compression.md); nothing else in this script changes")
    parser.add_argument("--kvstore", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    utils.setup_logging()

    kv_type = args.kvstore or ("dist_async" if (args.mixed_sync or args.dcasgd) else "dist_sync")
    distributed = kv_type.startswith("dist")
    if distributed:
        import geomx  # noqa: F401  (registers geomx's store for dist_sync / dist_async)

    ctx = utils.get_context(args.cpu)
    # Load the data before joining the topology, so a missing data set fails fast and clearly.
    arrays = utils.load_arrays(args.dataset, args.data_dir)
    kv, is_master, num_all_workers = utils.create_kvstore(kv_type)

    # Unlike the original (which checks --mixed-sync first), --mixed-sync --dcasgd gives DCASGD.
    if args.dcasgd:
        optimizer = mx.optimizer.DCASGD(learning_rate=args.learning_rate)
    elif args.optimizer == "sgd":
        optimizer = mx.optimizer.SGD(learning_rate=args.learning_rate, momentum=args.momentum)
    else:
        optimizer = mx.optimizer.Adam(learning_rate=args.learning_rate)
    # The master worker installs the optimizer on the global server(s). Without servers (a local
    # store, for sanity runs) this process is its own "master": the store itself runs the optimizer.
    if is_master and args.compression is not None:
        kv.set_gradient_compression(args.compression)  # before the keys are initialised
    if is_master or not distributed:
        kv.set_optimizer(optimizer)
    if distributed:
        time.sleep(1)

    net = utils.build_cnn(ctx, seed=args.seed)
    params = list(net.collect_params().values())
    utils.init_keys(kv, params)  # key i = params[i]; the other workers pull the master's weights

    if is_master:
        return 0

    train_data, test_data = utils.load_shard(args, num_all_workers, arrays)
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()

    print(f"Start training on {num_all_workers} workers, my rank is {kv.rank}.", flush=True)
    reporter = utils.Reporter(net, test_data, ctx, kv)
    epoch = iteration = 0
    for epoch, iteration, (data, label) in utils.iterate(train_data, args.epoch, args.max_iters, kv=kv):
        report = distributed and args.report_loss and iteration % args.report_loss == 0
        losses = [] if report else None
        batch = utils.compute_gradients(net, loss_fn, data, label, ctx, losses)
        # Push every key first, then pull every key: the store overlaps them, and the priorities
        # (earlier layers first) match the original's per-key calls. The global server's optimizer
        # turns the pushed mean gradients into new weights.
        for idx, param in enumerate(params):
            kv.push(idx, param.grad() / batch, priority=-idx)
        for idx, param in enumerate(params):
            kv.pull(idx, out=param.data(), priority=-idx)

        if losses and iteration % args.report_loss == 0:
            # A batch the model fits perfectly has a cross-entropy of 0, which float rounding can make
            # -1e-7; report_loss takes losses > 0 (DGT's adaptive K divides by the first one).
            kv.report_loss(max(float(losses[0].asscalar()), 1e-6))
        if iteration % args.eval_every == 0:
            reporter.report(epoch, iteration)

    reporter.report_final(epoch, iteration)
    mx.nd.waitall()
    return 0


if __name__ == "__main__":
    sys.exit(main())
