"""Bidirectional sparse compression (BSC) example: the CNN trained with gradients that cross the WAN
as top-r sparse updates in both directions.

Flow (as GeoMX's ``examples/cnn_bsc.py``): the master worker switches BSC on with
``kv.set_gradient_compression({"type": "bsc", "threshold": r})`` before any ``kv.init`` and sets no
optimizer (the global servers only sum the parties' sparse gradients); every worker initialises one
key per parameter (the non-master workers pull the master's initial weights), the master leaves,
and each training worker, every iteration, pushes ``grad / batch``, pulls the aggregated gradient
(the sum over all workers) into ``param.grad()`` and takes a local Adam step with
``trainer.step(num_all_workers)`` (a Gluon ``Trainer`` with ``kvstore=None``), then zeroes the
gradients. Inside a party everything travels dense; only the local server <-> global server link
carries sparse tensors, and only for tensors of at least ``MXNET_KVSTORE_SIZE_LOWER_BOUND`` elements
(default 200000: set it to 1000, as ``scripts/cpu/run_bisparse_compression.sh`` does, or pass
``--size-lower-bound``, for the demo CNN's tensors to be compressed)::

    python -m geomx.launch -p 2 -w 2 --env MXNET_KVSTORE_SIZE_LOWER_BOUND=1000 \\
        -- python examples/cnn_bsc.py --cpu -ds {slice} -bcr 0.01
"""

from __future__ import annotations

import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)  # for utils (which also finds geomx in a source checkout)

import argparse  # noqa: E402
from typing import Optional  # noqa: E402

import mxnet as mx  # noqa: E402
import utils  # noqa: E402
from mxnet import gluon  # noqa: E402


def ratio(text: str) -> float:
    """A compression ratio in (0, 1) (the original asserts ``0 < r < 1``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"the compression ratio must be in (0, 1), got {text}")
    return value


def build_compression_parser(description: str, with_ratio: bool) -> argparse.ArgumentParser:
    """:func:`utils.build_parser` plus the flags shared by the compression examples (cnn_bsc.py,
    cnn_fp16.py, cnn_mpq.py)."""
    parser = utils.build_parser(description)
    if with_ratio:
        parser.add_argument("-bcr", "--bisparse-compression-ratio", type=ratio, default=0.01,
                            help="fraction of a large tensor's entries sent across the WAN per "
                                 "iteration, in (0, 1) (0.01)")
    parser.add_argument("--size-lower-bound", type=int, default=None,
                        help="tensors with at least this many elements are large (compressed); "
                             "default: MXNET_KVSTORE_SIZE_LOWER_BOUND, else 200000")
    parser.add_argument("--max-iters", type=int, default=0,
                        help="stop after this many iterations in total (0 = no limit)")
    parser.add_argument("--optimizer", choices=("adam", "sgd"), default="adam",
                        help="the workers' local optimizer, applied to the pulled aggregate (adam)")
    return parser


def size_lower_bound(args: argparse.Namespace) -> Optional[int]:
    """``--size-lower-bound``, else ``MXNET_KVSTORE_SIZE_LOWER_BOUND``, else None (the global
    servers' own variable decides, else 200000, as in GeoMX)."""
    if args.size_lower_bound is not None:
        if args.size_lower_bound < 1:
            raise SystemExit(f"--size-lower-bound must be >= 1, got {args.size_lower_bound}")
        return args.size_lower_bound
    import geomx.config

    return geomx.config.load().size_lower_bound


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_compression_parser("geomx BSC example (CNN, bidirectional sparse compression on the WAN)",
                                      with_ratio=True)
    parser.add_argument("--compression", choices=("bsc", "none"), default="bsc",
                        help="none: the same flow (local Adam on the pulled gradient) without "
                             "compression, for comparison (bsc)")
    return parser.parse_args(argv)


def train(args: argparse.Namespace, compression: dict, dtype_of=None, describe=None) -> int:
    """The flow shared by the compression examples (cnn_bsc.py, cnn_fp16.py, cnn_mpq.py).

    ``compression`` is what the master worker passes to ``kv.set_gradient_compression``;
    ``dtype_of(param)`` is the dtype its key is initialised, pushed and pulled in ("float32" by
    default; the FP16 and MPQ examples send float16 tensors); ``describe(params)`` returns an extra
    line printed at the start of training.
    """
    utils.setup_logging()
    import geomx  # noqa: F401  (registers geomx's store for dist_sync)

    dtype_of = dtype_of or (lambda param: "float32")
    ctx = utils.get_context(args.cpu)
    # Load the data before joining the topology, so a missing data set fails fast and clearly.
    arrays = utils.load_arrays(args.dataset, args.data_dir)
    kv, is_master, num_all_workers = utils.create_kvstore("dist_sync")
    if is_master:
        # No optimizer on the global servers: they only aggregate gradients (and refuse an
        # optimizer under bsc / mpq); every worker updates its own copy of the model.
        kv.set_gradient_compression(compression)
    time.sleep(1)

    net = utils.build_cnn(ctx, seed=args.seed)
    params = list(net.collect_params().values())
    dtypes = [dtype_of(param) for param in params]
    # Buffers in each key's wire dtype (None: float32, the parameter's own arrays are used).
    buffers = [None if dt == "float32" else mx.nd.zeros(p.shape, ctx=ctx, dtype=dt)
               for p, dt in zip(params, dtypes)]
    # Key i = params[i] in its wire dtype; the other workers pull the master's weights.
    utils.init_keys(kv, params, buffers)

    if is_master:
        return 0

    train_data, test_data = utils.load_shard(args, num_all_workers, arrays)
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    # Local optimizer: the pulled gradient is the sum of every worker's mean gradient, so
    # step(num_all_workers) applies their average.
    trainer = gluon.Trainer(net.collect_params(), args.optimizer, {"learning_rate": args.learning_rate},
                            kvstore=None)
    print(f"Start training on {num_all_workers} workers, my rank is {kv.rank}.", flush=True)
    if describe is not None:
        print(describe(params), flush=True)
    reporter = utils.Reporter(net, test_data, ctx, kv)
    epoch = iteration = 0
    for epoch, iteration, (data, label) in utils.iterate(train_data, args.epoch, args.max_iters, kv=kv):
        batch = utils.compute_gradients(net, loss_fn, data, label, ctx)
        # Push every key, then pull every key (the aggregated gradient) into param.grad().
        for idx, (param, buf) in enumerate(zip(params, buffers)):
            grad = param.grad() / batch
            kv.push(idx, grad if buf is None else grad.astype(buf.dtype), priority=-idx)
        for idx, (param, buf) in enumerate(zip(params, buffers)):
            kv.pull(idx, out=param.grad() if buf is None else buf, priority=-idx)
        for param, buf in zip(params, buffers):
            if buf is not None:
                buf.astype("float32").copyto(param.grad())
        trainer.step(num_all_workers)
        net.collect_params().zero_grad()

        if iteration % args.eval_every == 0:
            reporter.report(epoch, iteration)

    reporter.report_final(epoch, iteration)
    mx.nd.waitall()
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    bound = size_lower_bound(args)
    if args.compression == "none":
        return train(args, {"type": "none"}, describe=lambda params: "No compression (--compression none).")
    ratio_ = args.bisparse_compression_ratio

    def describe(params):
        if bound is None:
            return (f"BSC: ratio {ratio_}, size lower bound: the global servers' "
                    "MXNET_KVSTORE_SIZE_LOWER_BOUND (else 200000).")
        large = sum(1 for p in params if p.data().size >= bound)
        return (f"BSC: ratio {ratio_}, size lower bound {bound}: {large} of {len(params)} tensors "
                f"sparse on the WAN.")

    compression = {"type": "bsc", "threshold": ratio_}
    if bound is not None:
        compression["size_lower_bound"] = bound
    return train(args, compression, describe=describe)


if __name__ == "__main__":
    sys.exit(main())
