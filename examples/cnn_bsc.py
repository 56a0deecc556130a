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
import utils  # noqa: E402
from mxnet import autograd, gluon  # noqa: E402
from tqdm import tqdm  # noqa: E402


def ratio(text: str) -> float:
    """A compression ratio in (0, 1) (the original asserts ``0 < r < 1``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"the compression ratio must be in (0, 1), got {text}")
    return value


def add_common_flags(parser: argparse.ArgumentParser, with_ratio: bool) -> None:
    """Flags shared by the compression examples (cnn_bsc.py, cnn_fp16.py, cnn_mpq.py)."""
    if with_ratio:
        parser.add_argument("-bcr", "--bisparse-compression-ratio", type=ratio, default=0.01,
                            help="fraction of a large tensor's entries sent across the WAN per "
                                 "iteration, in (0, 1) (0.01)")
    parser.add_argument("--size-lower-bound", type=int, default=None,
                        help="tensors with at least this many elements are large (compressed); "
                             "default: MXNET_KVSTORE_SIZE_LOWER_BOUND, else 200000")
    parser.add_argument("--max-iters", type=int, default=0,
                        help="stop after this many iterations in total (0 = no limit)")


def size_lower_bound(args: argparse.Namespace) -> int:
    """``--size-lower-bound``, else ``MXNET_KVSTORE_SIZE_LOWER_BOUND`` (default 200000)."""
    if args.size_lower_bound is not None:
        if args.size_lower_bound < 1:
            raise SystemExit(f"--size-lower-bound must be >= 1, got {args.size_lower_bound}")
        return args.size_lower_bound
    import geomx.config

    return geomx.config.load().size_lower_bound


def parse_args(argv=None) -> argparse.Namespace:
    parser = utils.build_parser("geomx BSC example (CNN, bidirectional sparse compression on the WAN)")
    add_common_flags(parser, with_ratio=True)
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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import geomx  # noqa: F401  (registers geomx's store for dist_sync)

    dtype_of = dtype_of or (lambda param: "float32")
    ctx = utils.get_context(args.cpu)
    # Load the data before joining the topology, so a missing data set fails fast and clearly.
    arrays = utils.load_arrays(args.dataset, args.data_dir)
    kv = mx.kv.create("dist_sync")
    is_master = bool(kv.is_master_worker)
    num_all_workers = int(kv.num_all_workers)
    if is_master:
        # No optimizer on the global servers: they only aggregate gradients (and refuse an
        # optimizer under bsc / mpq); every worker updates its own copy of the model.
        kv.set_gradient_compression(compression)
    time.sleep(1)

    net = utils.build_cnn(ctx)
    params = list(net.collect_params().values())
    dtypes = [dtype_of(param) for param in params]
    # Buffers in each key's wire dtype (None: float32, the parameter's own arrays are used).
    buffers = [None if dt == "float32" else mx.nd.zeros(p.shape, ctx=ctx, dtype=dt)
               for p, dt in zip(params, dtypes)]
    for idx, (param, buf) in enumerate(zip(params, buffers)):
        kv.init(idx, param.data() if buf is None else param.data().astype(buf.dtype))
        if not is_master:
            if buf is None:
                kv.pull(idx, out=param.data())
            else:
                kv.pull(idx, out=buf)
                buf.astype("float32").copyto(param.data())

    if is_master:
        return 0

    train_data, test_data = utils.load_data(
        args.batch_size, num_all_workers, args.data_slice_idx, dataset=args.dataset,
        data_dir=args.data_dir, split_by_class=args.split_by_class, arrays=arrays)
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    # Local optimizer: the pulled gradient is the sum of every worker's mean gradient, so
    # step(num_all_workers) applies their average.
    trainer = gluon.Trainer(net.collect_params(), "adam", {"learning_rate": args.learning_rate},
                            kvstore=None)
    print(f"Start training on {num_all_workers} workers, my rank is {kv.rank}.", flush=True)
    if describe is not None:
        print(describe(params), flush=True)
    show_bar = sys.stderr.isatty()
    start = time.time()
    iteration = 0
    last_eval = 0
    done = False
    epoch = 0
    for epoch in range(args.epoch):
        for data, label in tqdm(train_data, desc=f"epoch {epoch}", disable=not show_bar, file=sys.stderr,
                                leave=False):
            data = data.as_in_context(ctx)
            label = label.as_in_context(ctx)
            with autograd.record():
                loss = loss_fn(net(data), label)
            loss.backward()
            batch = data.shape[0]
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


def main(argv=None) -> int:
    args = parse_args(argv)
    bound = size_lower_bound(args)
    if args.compression == "none":
        return train(args, {"type": "none"}, describe=lambda params: "No compression (--compression none).")
    ratio_ = args.bisparse_compression_ratio

    def describe(params):
        large = sum(1 for p in params if p.data().size >= bound)
        return (f"BSC: ratio {ratio_}, size lower bound {bound}: {large} of {len(params)} tensors "
                f"sparse on the WAN.")

    return train(args, {"type": "bsc", "threshold": ratio_, "size_lower_bound": bound}, describe=describe)


if __name__ == "__main__":
    sys.exit(main())
