"""Vanilla HiPS example: a small CNN trained with the optimizer running on the global server.

Flow (as GeoMX's ``examples/cnn.py``): create the kvstore, the master worker installs the optimizer,
every worker initialises one key per parameter (the non-master workers then pull the master's
values), the master worker leaves, and the training workers push mean gradients and pull the new
weights every iteration.

    python examples/cnn.py --cpu                        # one process of a topology (see scripts/)
    python examples/cnn.py --cpu --kvstore local -ep 1  # single-process sanity run, no geomx servers
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
# Running from a source checkout: make the repository's geomx importable when it is not installed.
if importlib.util.find_spec("geomx") is None:
    sys.path.append(os.path.dirname(_HERE))

import argparse  # noqa: E402

import mxnet as mx  # noqa: E402
from mxnet import autograd, gluon  # noqa: E402
from tqdm import tqdm  # noqa: E402

import utils  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = utils.build_parser("geomx vanilla HiPS example (CNN)")
    parser.add_argument("-ms", "--mixed-sync", action="store_true",
                        help="MixedSync: asynchronous across parties (dist_async)")
    parser.add_argument("-dc", "--dcasgd", action="store_true",
                        help="use DCASGD on the global server (implies asynchronous training)")
    parser.add_argument("--max-iters", type=int, default=0,
                        help="stop after this many iterations in total (0 = no limit)")
    parser.add_argument("--kvstore", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    kv_type = args.kvstore or ("dist_async" if (args.mixed_sync or args.dcasgd) else "dist_sync")
    distributed = kv_type.startswith("dist")
    if distributed:
        import geomx  # noqa: F401  (registers geomx's store for dist_sync / dist_async)

    ctx = utils.get_context(args.cpu)
    # Load the data before joining the topology, so a missing data set fails fast and clearly.
    arrays = utils.load_arrays(args.dataset, args.data_dir)
    kv = mx.kv.create(kv_type)
    is_master = bool(getattr(kv, "is_master_worker", False))
    num_all_workers = int(getattr(kv, "num_all_workers", kv.num_workers))

    # Unlike the original (which checks --mixed-sync first), --mixed-sync --dcasgd gives DCASGD.
    if args.dcasgd:
        optimizer = mx.optimizer.DCASGD(learning_rate=args.learning_rate)
    else:
        optimizer = mx.optimizer.Adam(learning_rate=args.learning_rate)
    # The master worker installs the optimizer on the global server(s). Without servers (a local
    # store, for sanity runs) this process is its own "master": the store itself runs the optimizer.
    if is_master or not distributed:
        kv.set_optimizer(optimizer)
    if distributed:
        time.sleep(1)

    net = utils.build_cnn(ctx)
    params = list(net.collect_params().values())
    for idx, param in enumerate(params):
        kv.init(idx, param.data())
        if not is_master:
            kv.pull(idx, out=param.data())

    if is_master:
        return 0

    train_data, test_data = utils.load_data(
        args.batch_size, num_all_workers, args.data_slice_idx, dataset=args.dataset,
        data_dir=args.data_dir, split_by_class=args.split_by_class, arrays=arrays)
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()

    print(f"Start training on {num_all_workers} workers, my rank is {kv.rank}.", flush=True)
    show_bar = sys.stderr.isatty()
    start = time.time()
    iteration = 0
    last_eval = 0
    done = False
    for epoch in range(args.epoch):
        for data, label in tqdm(train_data, desc=f"epoch {epoch}", disable=not show_bar, file=sys.stderr,
                                leave=False):
            data = data.as_in_context(ctx)
            label = label.as_in_context(ctx)
            with autograd.record():
                loss = loss_fn(net(data), label)
            loss.backward()
            batch = data.shape[0]
            # Push every key first, then pull every key: the store overlaps them, and the priorities
            # (earlier layers first) match the original's per-key calls.
            for idx, param in enumerate(params):
                kv.push(idx, param.grad() / batch, priority=-idx)
            for idx, param in enumerate(params):
                kv.pull(idx, out=param.data(), priority=-idx)
            iteration += 1

            if iteration % args.eval_every == 0:
                acc = utils.evaluate(net, test_data, ctx)
                last_eval = iteration
                print("[Time %.3f][Epoch %d][Iteration %d] Test Acc %.4f"
                      % (time.time() - start, epoch, iteration, acc), flush=True)
            if args.max_iters and iteration >= args.max_iters:
                done = True
                break
        if done:
            break

    if iteration and last_eval != iteration:
        acc = utils.evaluate(net, test_data, ctx)
        print("[Time %.3f][Epoch %d][Iteration %d] Test Acc %.4f"
              % (time.time() - start, epoch, iteration, acc), flush=True)
    mx.nd.waitall()
    return 0


if __name__ == "__main__":
    sys.exit(main())
