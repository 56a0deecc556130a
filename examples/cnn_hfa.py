"""HFA (Hierarchical Frequency Aggregation) example: the CNN trained with local optimizer steps and
model averaging at two levels.

Flow (as GeoMX's ``examples/cnn_hfa.py``): every worker takes a local Adam step on every iteration
(a Gluon ``Trainer`` with ``kvstore=None``: the optimizer and its state never leave the worker);
every K1 iterations it pushes ``weights / workers_in_its_party`` and pulls the result back. The local
server averages the party's models; every K2-th such average it sends the party's model delta to the
global server, which averages the parties' deltas, so that every K1 * K2 iterations all workers hold
one global model. The master worker only initialises the keys: there is no optimizer on the servers.
Test accuracy is evaluated (and printed) only every K1 * K2 iterations, when the models agree.

Every non-scheduler process needs ``MXNET_KVSTORE_USE_HFA=1``, ``MXNET_KVSTORE_HFA_K1`` and
``MXNET_KVSTORE_HFA_K2``; see ``scripts/cpu/run_hfa_sync.sh`` and ``docs/Synchronization.md``::

    python -m geomx.launch -p 2 -w 2 --env MXNET_KVSTORE_USE_HFA=1 --env MXNET_KVSTORE_HFA_K1=4 \\
        --env MXNET_KVSTORE_HFA_K2=2 -- python examples/cnn_hfa.py --cpu -ds {slice}
"""

from __future__ import annotations

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


def parse_args(argv=None) -> argparse.Namespace:
    parser = utils.build_parser("geomx HFA example (CNN, local Adam + two-level model averaging)")
    parser.add_argument("--max-iters", type=int, default=0,
                        help="stop after this many iterations in total (0 = no limit)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    utils.setup_logging()
    import geomx  # registers geomx's store for dist_sync
    import geomx.config

    ctx = utils.get_context(args.cpu)
    # Load the data before joining the topology, so a missing data set fails fast and clearly.
    arrays = utils.load_arrays(args.dataset, args.data_dir)
    # Without HFA the servers would treat the pushed weights as gradients: refuse before joining the
    # topology (the original asserts its three variables).
    if not geomx.config.load().hfa.enabled:
        print("cnn_hfa.py: set MXNET_KVSTORE_USE_HFA=1, MXNET_KVSTORE_HFA_K1 and MXNET_KVSTORE_HFA_K2 on "
              "every server and worker (see scripts/cpu/run_hfa_sync.sh)", file=sys.stderr, flush=True)
        return 2
    kv, is_master, num_all_workers = utils.create_kvstore("dist_sync")
    k1, k2 = kv.hfa_periods
    # No kv.set_optimizer: under HFA the global servers only average models (they refuse an optimizer).
    time.sleep(1)

    net = utils.build_cnn(ctx, seed=args.seed)
    params = list(net.collect_params().values())
    utils.init_keys(kv, params)  # key i = params[i]; the other workers pull the master's weights

    if is_master:
        return 0

    train_data, test_data = utils.load_shard(args, num_all_workers, arrays)
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    # Local optimizer: Adam on this worker only; its state is never synchronised.
    trainer = gluon.Trainer(net.collect_params(), "adam", {"learning_rate": args.learning_rate},
                            kvstore=None)
    local_workers = kv.num_workers  # workers in this party: the local server sums their pushes

    print(f"Start training on {num_all_workers} workers, my rank is {kv.rank}.", flush=True)
    print(f"HFA: K1={k1} (local steps between party averages), K2={k2} (party averages between "
          f"global averages): global model every {k1 * k2} iterations.", flush=True)
    reporter = utils.Reporter(net, test_data, ctx, kv)
    epoch = iteration = 0
    for epoch, iteration, (data, label) in utils.iterate(train_data, args.epoch, args.max_iters, kv=kv):
        batch = utils.compute_gradients(net, loss_fn, data, label, ctx)
        trainer.step(batch)

        if iteration % k1 == 0:
            # Push this worker's share of the party average, get the averaged model back (the
            # global model on every K2-th average).
            for idx, param in enumerate(params):
                kv.pushpull(idx, param.data() / local_workers, out=param.data(), priority=-idx)

        # Evaluate only right after a global average, when every worker holds the same model.
        if iteration % (k1 * k2 * args.eval_every) == 0:
            reporter.report(epoch, iteration)

    # If the last iteration was not a global synchronisation, this evaluates this worker's own model.
    reporter.report_final(epoch, iteration)
    mx.nd.waitall()
    return 0


if __name__ == "__main__":
    sys.exit(main())
