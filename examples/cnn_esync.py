"""ESync example: the CNN trained in global rounds where each party takes as many local steps as
its speed allows, so that fast and slow parties reach the global average at about the same time.

Flow: as in ``cnn_hfa.py`` the optimizer (Adam) runs locally on every worker (a Gluon ``Trainer``
with ``kvstore=None``) and the servers only average models; the master worker only initialises the
keys. Each round a worker asks ``kv.esync_steps()`` how many local steps its party was assigned,
takes that many, then pushes ``weights / workers_in_its_party`` and pulls back the new global model
(party average, then the average of the parties' deltas, as HFA with K2 = 1). The global server
(the state server) measures every party's local steps per second and assigns
``round(speed / slowest speed)`` steps, within ``[1, GEOMX_ESYNC_MAX_STEPS]``; 1 until it has
measured every party. See ``docs/Synchronization.md``.

Training stops when the workers have taken, on average, as many local steps as ``--epoch`` passes
over one shard (or ``--max-iters``): the total number of samples is the same as for ``cnn.py`` with
the same flags, but fast parties contribute more of them. The average travels in one more key
(each worker pushes ``its steps / workers_in_its_party``, which the servers average like the
weights), so every worker sees the same value after the same round and they all stop together. The
test set is evaluated every ``--eval-every`` rounds, right after a global average, and at the end;
the steps assigned to the party are printed at the same times. ``--step-delay`` sleeps after every
local step, to emulate a slower device (``scripts/cpu/run_esync.sh`` slows one party down this way).

Every non-scheduler process needs ``GEOMX_USE_ESYNC=1``::

    python -m geomx.launch -p 2 -w 2 --env GEOMX_USE_ESYNC=1 -- python examples/cnn_esync.py --cpu -ds {slice}
"""

from __future__ import annotations

import math
import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)  # for utils (which also finds geomx in a source checkout)

import argparse  # noqa: E402

import mxnet as mx  # noqa: E402
import utils  # noqa: E402
from mxnet import gluon  # noqa: E402


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = utils.build_parser("geomx ESync example (CNN, local Adam, speed-adapted local steps)")
    parser.add_argument("--max-iters", type=int, default=0,
                        help="stop when the workers have taken this many local steps on average "
                             "(0 = the batches in --epoch passes over one shard)")
    parser.add_argument("--step-delay", type=_non_negative_float, default=0.0,
                        help="seconds to sleep after every local step (emulates a slower device; 0)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    utils.setup_logging()
    import geomx  # registers geomx's store for dist_sync
    import geomx.config

    ctx = utils.get_context(args.cpu)
    # Load the data before joining the topology, so a missing data set fails fast and clearly.
    arrays = utils.load_arrays(args.dataset, args.data_dir)
    if not geomx.config.load().esync.enabled:
        print("cnn_esync.py: set GEOMX_USE_ESYNC=1 on every server and worker (see scripts/cpu/run_esync.sh)",
              file=sys.stderr, flush=True)
        return 2
    kv, is_master, num_all_workers = utils.create_kvstore("dist_sync")
    # No kv.set_optimizer: under ESync the global servers only average models (they refuse an optimizer).
    time.sleep(1)

    net = utils.build_cnn(ctx, seed=args.seed)
    params = list(net.collect_params().values())
    utils.init_keys(kv, params)  # key i = params[i]; the other workers pull the master's weights
    # One more key: the workers' average number of local steps so far (the stopping rule).
    progress_key = len(params)
    progress = mx.nd.zeros((1,))
    kv.init(progress_key, progress)

    if is_master:
        return 0

    train_data, test_data = utils.load_shard(args, num_all_workers, arrays)
    # Every worker computes the same budget (every shard has the same size); they all stop after the
    # round in which the average of their local steps reaches it.
    budget = args.max_iters or args.epoch * int(math.ceil(len(train_data._dataset) / args.batch_size))
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    trainer = gluon.Trainer(net.collect_params(), "adam", {"learning_rate": args.learning_rate},
                            kvstore=None)
    local_workers = kv.num_workers  # workers in this party: the local server sums their pushes

    print(f"Start training on {num_all_workers} workers, my rank is {kv.rank}.", flush=True)
    print(f"ESync: training until the workers average {budget} local steps.", flush=True)
    stream = utils.iterate(train_data, progress=False)  # endless: the budget decides when to stop
    reporter = utils.Reporter(net, test_data, ctx, kv)
    iteration = 0
    epoch = 0
    rnd = 0
    mean_steps = 0.0
    while mean_steps < budget:
        rnd += 1
        steps = kv.esync_steps()  # assigned by the state server in the previous round's reply
        if rnd == 1 or rnd % args.eval_every == 0:
            print(f"[ESync] round {rnd}: {steps} local step(s) for this party", flush=True)
        for _ in range(steps):
            epoch, iteration, (data, label) = next(stream)
            batch = utils.compute_gradients(net, loss_fn, data, label, ctx)
            trainer.step(batch)
            if args.step_delay:
                mx.nd.waitall()
                time.sleep(args.step_delay)
        # Global average: this party's average (weights / workers summed at the local server), then
        # the parties' deltas averaged at the global server; everyone continues from the result.
        for idx, param in enumerate(params):
            kv.pushpull(idx, param.data() / local_workers, out=param.data(), priority=-idx)
        kv.pushpull(progress_key, mx.nd.array([iteration / local_workers]), out=progress)
        mean_steps = float(progress.asscalar())

        if rnd % args.eval_every == 0:
            reporter.report(epoch, iteration)

    reporter.report_final(epoch, iteration)  # unless the last round was evaluated
    print(f"ESync: {rnd} global rounds, {iteration} local steps here, {mean_steps:g} per worker on "
          f"average.", flush=True)
    mx.nd.waitall()
    return 0


if __name__ == "__main__":
    sys.exit(main())
