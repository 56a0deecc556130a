"""Training worker of the benchmark suite (``benchmarks/suite.py``); geomx and native MXNet run it.

Two models (``--model``): ``cnn`` is the examples' CNN (``examples/utils.build_cnn``, ~0.18M
parameters); ``big`` is a wider CNN (~5.4M parameters, 21.6 MB of float32) whose step is dominated by
communication on a slow WAN.

Two modes:

* ``throughput``: fixed-seed synthetic batches (``--batch-size`` images 1x28x28, random labels);
  ``--warmup`` + ``--iters`` timed iterations. Each iteration: forward+backward then
  ``mx.nd.waitall()`` (compute time), push every gradient then pull every weight, ``waitall`` (total).
* ``accuracy``: this worker's shard of scikit-learn ``load_digits`` (``examples/utils.load_data``);
  ``--max-iters`` iterations; the worker with ``--slice 0`` evaluates on the 300 test images every
  ``--eval-every`` iterations. Its training clock excludes evaluation time.

The worker with ``--slice 0`` prints ``SUITE_MARK start`` / ``SUITE_MARK end`` around the timed
iterations (the suite snapshots the WAN counters there); every training worker prints one
``SUITE_RESULT {json}`` line.

* geomx (default): ``import geomx``; the central party's master worker sets the optimizer,
  initialises the keys and leaves; training workers ``init`` + ``pull``.
* ``--native``: MXNet's own ps-lite ``dist_sync`` (geomx is never imported). Every worker calls
  ``set_optimizer`` and ``kv.init`` (rank 0's value is sent, then a barrier). The store is used
  directly (no ``gluon.Trainer``), so the platform notes' Trainer init workaround is not needed.

Optimization rows select features with ``--kv-type`` (e.g. ``dist_async``) and ``--compression JSON``
(``kv.set_gradient_compression``), set by the master worker like in the original examples.

``--hfa`` (with ``MXNET_KVSTORE_USE_HFA=1``, ``MXNET_KVSTORE_HFA_K1``/``K2`` in the environment): the
flow of ``examples/cnn_hfa.py``. No optimizer on the servers; every iteration a local Adam step
(``gluon.Trainer`` with ``kvstore=None``); every K1-th iteration (counted over warm-up and timed
iterations together) ``kv.pushpull(k, w / kv.num_workers, out=w)`` for every key. In accuracy mode
each evaluation records whether it came right after a global average (iteration % (K1*K2) == 0),
i.e. whether it evaluated the global model or worker 0's local one.

``--esync`` (with ``GEOMX_USE_ESYNC=1``; accuracy mode only): the flow of ``examples/cnn_esync.py``, one
iteration being one local Adam step; after ``kv.esync_steps()`` of them (the party's assignment) a
pushpull of ``weights / kv.num_workers`` and of the workers' mean step count, which decides when all
stop together. ``--optimizer dcasgd``: MXNet's DCASGD on the global server (with ``--kv-type
dist_async``: MixedSync + DC-ASGD).

``--dump-init FILE`` writes the model's initial weights (those every row starts from), a probe batch with
the model's output on it, and the digits arrays into one ``.npz`` and exits: the torch DDP rows
(``benchmarks/ddp_worker.py``, which never imports MXNet) start from it.

Every result carries ``loop_s``: the wall-clock time of the timed loop (throughput mode) or the sum
of the iteration times (accuracy mode), so the suite can report iterations per second per worker,
and ``cpu_s`` / ``max_rss_mb`` (the process's CPU time and peak resident memory).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))

RESULT_TAG = "SUITE_RESULT "
MARK_TAG = "SUITE_MARK "
#: Adam's learning rate of every row (the servers' or the workers' own); benchmarks/ddp_worker.py uses it too.
DEFAULT_LR = 0.01


def build_big(ctx, seed: int = 0):
    """~5.4M parameters: Conv(32,3)-Pool-Conv(64,3)-Pool-Dense(2048)-Dense(1024)-Dense(10)."""
    import mxnet as mx
    import numpy as np
    from mxnet import gluon

    mx.random.seed(seed)
    np.random.seed(seed)
    net = gluon.nn.Sequential()
    with net.name_scope():
        net.add(gluon.nn.Conv2D(32, 3, activation="relu"), gluon.nn.MaxPool2D(2, 2),
                gluon.nn.Conv2D(64, 3, activation="relu"), gluon.nn.MaxPool2D(2, 2),
                gluon.nn.Dense(2048, activation="relu"), gluon.nn.Dense(1024, activation="relu"),
                gluon.nn.Dense(10))
    net.initialize(mx.init.Xavier(), ctx=ctx)
    net(mx.nd.zeros((1, 1, 28, 28), ctx=ctx))
    return net


def build_lastbig(ctx, seed: int = 0):
    """The P3 row's model: compute-heavy convolutions first, then one large output layer (2.1M of its
    2.2M parameters): Conv(32,5)-Conv(64,5)-Pool-Conv(64,3)-Pool-Dense(2048). Labels 0-9 use the
    first ten of its 2048 outputs."""
    import mxnet as mx
    import numpy as np
    from mxnet import gluon

    mx.random.seed(seed)
    np.random.seed(seed)
    net = gluon.nn.Sequential()
    with net.name_scope():
        net.add(gluon.nn.Conv2D(32, 5, activation="relu"), gluon.nn.Conv2D(64, 5, activation="relu"),
                gluon.nn.MaxPool2D(2, 2), gluon.nn.Conv2D(64, 3, activation="relu"), gluon.nn.MaxPool2D(2, 2),
                gluon.nn.Dense(2048))
    net.initialize(mx.init.Xavier(), ctx=ctx)
    net(mx.nd.zeros((1, 1, 28, 28), ctx=ctx))
    return net


def build_model(name: str, ctx):
    import utils

    if name == "cnn":
        return utils.build_cnn(ctx)
    if name == "big":
        return build_big(ctx)
    if name == "lastbig":
        return build_lastbig(ctx)
    raise ValueError(f"unknown model {name!r}")


def dump_init(model: str, path: str, seed: int) -> int:
    """``--dump-init FILE``: what the torch DDP rows (benchmarks/ddp_worker.py) need from MXNet, in one
    ``.npz``: the initial weights every geomx / native row starts from (``p0``, ``p1``, ... in
    ``collect_params`` order, default layout), a probe batch and the MXNet model's output on it (the
    torch twin must reproduce it), and the digits arrays of ``utils.load_arrays`` (``x_train`` ...)."""
    import mxnet as mx
    import numpy as np
    import utils

    net = build_model(model, mx.cpu())
    params = list(net.collect_params().values())
    probe = np.random.RandomState(seed).rand(4, 1, 28, 28).astype(np.float32)
    out = {f"p{i}": q.data().asnumpy() for i, q in enumerate(params)}
    out["names"] = np.array([q.name for q in params])
    out["probe"] = probe
    out["probe_out"] = net(mx.nd.array(probe)).asnumpy()
    out["x_train"], out["y_train"], out["x_test"], out["y_test"] = utils.load_arrays("digits")
    np.savez(path, **out)
    print(f"dumped {len(params)} parameters ({sum(int(np.prod(q.shape)) for q in params)} values) of {model} "
          f"to {path}", flush=True)
    return 0


def add_run_args(p: argparse.ArgumentParser) -> None:
    """The flags of a run that every row's worker takes (suite.worker_argv): this file's and ddp_worker.py's."""
    p.add_argument("--model", choices=["cnn", "big", "lastbig"], default="cnn")
    p.add_argument("--mode", choices=["throughput", "accuracy"], default="throughput")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--max-iters", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=DEFAULT_LR)
    p.add_argument("--seed", type=int, default=42)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--native", action="store_true")
    add_run_args(p)
    p.add_argument("--slice", type=int, default=0, help="global worker index")
    p.add_argument("--num-workers", type=int, default=4, help="training workers worldwide (data sharding)")
    p.add_argument("--kv-type", default="dist_sync")
    p.add_argument("--compression", default=None, help="JSON for kv.set_gradient_compression")
    p.add_argument("--local-optimizer", action="store_true",
                   help="no optimizer on the servers: pull the aggregated gradient, Adam step locally "
                        "(the flow of examples/cnn_bsc.py; fp16 needs it; with bsc / mpq the servers' optimizer runs "
                        "on the parties' local servers otherwise)")
    p.add_argument("--wire-dtype", default="float32",
                   help="dtype of the keys: float32, float16 (fp16 compression), or mixed:N (MPQ: float16 "
                        "for tensors of fewer than N elements, float32 for the others)")
    p.add_argument("--overlap", action="store_true",
                   help="pipelined steps (the P3 rows): push the gradients in backward order (last layer "
                        "first, as MXNet's engine produces them), pull every weight, and do not wait: the "
                        "next forward pass waits only for the weights it reaches")
    p.add_argument("--optimizer", choices=["adam", "dcasgd"], default="adam",
                   help="the servers' optimizer: adam (lr --lr) or dcasgd (MXNet's DCASGD, momentum 0, "
                        "lamda 0.04, lr --lr; the MixedSync + DC-ASGD row, docs/Synchronization.md)")
    p.add_argument("--esync", action="store_true",
                   help="ESync flow (examples/cnn_esync.py): each round kv.esync_steps() local Adam steps, then "
                        "pushpull of weights / kv.num_workers; one iteration = one local step; needs "
                        "GEOMX_USE_ESYNC=1")
    p.add_argument("--dump-init", default=None, metavar="FILE",
                   help="write the model's initial weights, a probe and the digits arrays to FILE (.npz) for the "
                        "torch DDP rows (benchmarks/ddp_worker.py), then exit; no store is created")
    p.add_argument("--hfa", action="store_true",
                   help="HFA flow (examples/cnn_hfa.py): local Adam every iteration, pushpull of "
                        "weights / kv.num_workers every K1 iterations; needs MXNET_KVSTORE_USE_HFA=1")
    args = p.parse_args(argv)
    if args.dump_init:
        return dump_init(args.model, args.dump_init, args.seed)

    import mxnet as mx
    import numpy as np
    from mxnet import autograd, gluon

    if not args.native:
        import geomx  # noqa: F401  - registers geomx's store for mx.kv.create("dist_sync")
    import utils

    if args.hfa or args.esync:
        import geomx.config

        # Without HFA (ESync) the servers would treat the pushed weights as gradients (as examples/cnn_hfa.py).
        if args.hfa and (args.native or not geomx.config.load().hfa.enabled):
            print("suite_worker.py --hfa: geomx only, with MXNET_KVSTORE_USE_HFA=1, MXNET_KVSTORE_HFA_K1 and "
                  "MXNET_KVSTORE_HFA_K2 on every server and worker", file=sys.stderr, flush=True)
            return 2
        if args.esync and (args.native or not geomx.config.load().esync.enabled):
            print("suite_worker.py --esync: geomx only, with GEOMX_USE_ESYNC=1 on every server and worker",
                  file=sys.stderr, flush=True)
            return 2
    ctx = mx.cpu()
    arrays = utils.load_arrays("digits") if args.mode == "accuracy" else None
    t_setup = time.perf_counter()
    kv = mx.kv.create(args.kv_type)
    is_master = bool(getattr(kv, "is_master_worker", False))
    if args.optimizer == "dcasgd":
        optimizer = mx.optimizer.DCASGD(learning_rate=args.lr, momentum=0.0, lamda=0.04)
    else:
        optimizer = mx.optimizer.Adam(learning_rate=args.lr)
    averaging = args.hfa or args.esync  # the servers average models; no optimizer on them
    if args.hfa:
        k1, k2 = kv.hfa_periods
    if args.native or is_master:
        if args.compression:
            kv.set_gradient_compression(json.loads(args.compression))
        if not args.local_optimizer and not averaging:
            kv.set_optimizer(optimizer)
    net = build_model(args.model, ctx)
    params = list(net.collect_params().values())
    if args.wire_dtype.startswith("mixed:"):
        bound = int(args.wire_dtype.split(":", 1)[1])
        dtypes = ["float16" if int(np.prod(q.shape)) < bound else "float32" for q in params]
    else:
        dtypes = [args.wire_dtype] * len(params)
    halves = [d != "float32" for d in dtypes]
    # float16 keys travel from/to float16 buffers; the model itself stays float32.
    bufs = [mx.nd.zeros(q.shape, ctx=ctx, dtype=d) if h else None for q, d, h in zip(params, dtypes, halves)]
    if args.native:
        # Init from fresh default-layout copies. Initialising from the parameters themselves (which
        # the model's dummy forward pass may have left in MKLDNN layout) crashed the native server
        # with "init N first" on the emulated WAN: a pull overtook rank 0's init push.
        keys = list(range(len(params)))
        kv.init(keys, [mx.nd.array(q.data().asnumpy()) for q in params])
        kv.pull(keys, out=[q.data() for q in params])
    else:
        for idx, param in enumerate(params):
            half = halves[idx]
            kv.init(idx, param.data() if not half else param.data().astype(dtypes[idx]))
            if not is_master:
                if half:
                    kv.pull(idx, out=bufs[idx])
                    bufs[idx].astype("float32").copyto(param.data())
                else:
                    kv.pull(idx, out=param.data())
    if args.esync:
        kv.init(len(params), mx.nd.zeros((1,)))  # the progress key (see below)
    if is_master:
        mx.nd.waitall()
        print("master worker initialised %d keys" % len(params), flush=True)
        return 0
    mx.nd.waitall()
    setup_s = time.perf_counter() - t_setup
    nparams = int(sum(int(np.prod(q.shape)) for q in params))
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    marker = args.slice == 0
    trainer = None
    if args.local_optimizer or averaging:
        trainer = gluon.Trainer(net.collect_params(), "adam", {"learning_rate": args.lr}, kvstore=None)
    hfa_state = {"it": 0}
    if averaging:
        local_workers = kv.num_workers  # this party's workers: the local server sums their pushes
    # ESync: one more key, every worker's local steps so far averaged like the weights, so that all
    # workers see the same value after the same round and stop together (examples/cnn_esync.py).
    progress_key = len(params)
    esync_state = {"steps_left": 0, "mean_steps": 0.0, "progress": mx.nd.zeros((1,)), "synced": False}

    def finished(it: int) -> bool:
        if args.esync:  # only right after a global round, on the average over all workers
            return esync_state["synced"] and esync_state["mean_steps"] >= args.max_iters
        return it >= args.max_iters

    def step(data, label):
        t0 = time.perf_counter()
        with autograd.record():
            loss = loss_fn(net(data), label)
        loss.backward()
        mx.nd.waitall()
        t1 = time.perf_counter()
        batch = data.shape[0]
        if args.esync:
            trainer.step(batch)
            hfa_state["it"] += 1
            if esync_state["steps_left"] <= 1:
                for idx, param in enumerate(params):
                    kv.pushpull(idx, param.data() / local_workers, out=param.data(), priority=-idx)
                kv.pushpull(progress_key, mx.nd.array([hfa_state["it"] / local_workers]),
                            out=esync_state["progress"])
                esync_state["mean_steps"] = float(esync_state["progress"].asscalar())
                esync_state["steps_left"] = kv.esync_steps()  # assigned in that round's reply
                esync_state["synced"] = True
            else:
                esync_state["steps_left"] -= 1
                esync_state["synced"] = False
        elif args.hfa:
            trainer.step(batch)
            hfa_state["it"] += 1
            if hfa_state["it"] % k1 == 0:
                for idx, param in enumerate(params):
                    kv.pushpull(idx, param.data() / local_workers, out=param.data(), priority=-idx)
        elif trainer is None:
            order = list(enumerate(params))
            for idx, param in reversed(order) if args.overlap else order:
                kv.push(idx, param.grad() / batch, priority=-idx)
            for idx, param in enumerate(params):
                kv.pull(idx, out=param.data(), priority=-idx)
            if args.overlap:
                # No waitall: the next forward pass reads each weight when its pull has delivered it.
                t2 = time.perf_counter()
                return (t1 - t0) * 1e3, (t2 - t0) * 1e3
        else:
            # Pull the aggregated (summed) gradient; step(num_workers) applies the average.
            for idx, param in enumerate(params):
                g = param.grad() / batch
                kv.push(idx, g.astype(dtypes[idx]) if halves[idx] else g, priority=-idx)
            for idx, param in enumerate(params):
                kv.pull(idx, out=bufs[idx] if halves[idx] else param.grad(), priority=-idx)
            for param, buf in zip(params, bufs):
                if buf is not None:
                    buf.astype("float32").copyto(param.grad())
            trainer.step(args.num_workers)
        mx.nd.waitall()
        t2 = time.perf_counter()
        return (t1 - t0) * 1e3, (t2 - t0) * 1e3

    result = {"system": "native" if args.native else "geomx", "worker": args.slice, "model": args.model,
              "hfa": list(kv.hfa_periods) if args.hfa else None,
              "params": nparams, "batch": args.batch_size, "setup_s": round(setup_s, 3), "mode": args.mode}

    if args.mode == "throughput":
        if args.esync:
            print("suite_worker.py --esync: accuracy mode only (the parties' step counts differ, so a fixed "
                  "number of iterations per worker would not end in the same global round)", file=sys.stderr)
            return 2
        rng = np.random.RandomState(args.seed + args.slice)
        data = mx.nd.array(rng.rand(args.batch_size, 1, 28, 28).astype(np.float32))
        label = mx.nd.array(rng.randint(0, 10, args.batch_size).astype(np.float32))
        for _ in range(args.warmup):
            step(data, label)
        if marker:
            print(MARK_TAG + "start", flush=True)
        compute, total = [], []
        t_loop = time.perf_counter()
        for _ in range(args.iters):
            c, t = step(data, label)
            compute.append(round(c, 3))
            total.append(round(t, 3))
        mx.nd.waitall()  # --overlap: the last iteration's pulls belong to the timed loop
        loop_s = time.perf_counter() - t_loop
        if marker:
            print(MARK_TAG + "end", flush=True)
        result.update(iter_ms=total, compute_ms=compute, loop_s=round(loop_s, 4))
    else:
        train_data, test_data = utils.load_data(args.batch_size, args.num_workers, args.slice, arrays=arrays,
                                                seed=args.seed)
        evals, compute, total = [], [], []
        clock, it = 0.0, 0
        if marker:
            print(MARK_TAG + "start", flush=True)
        while not finished(it):
            for data, label in train_data:
                c, t = step(data, label)
                compute.append(round(c, 3))
                total.append(round(t, 3))
                clock += t / 1e3
                it += 1
                if marker and (it % args.eval_every == 0 or finished(it)):
                    acc = utils.evaluate(net, test_data, ctx)
                    ev = {"t": round(clock, 3), "it": it, "acc": round(acc, 4)}
                    if args.hfa:
                        ev["global"] = it % (k1 * k2) == 0  # right after a global average
                    evals.append(ev)
                    print(f"[iter {it}] train time {clock:.2f}s test acc {acc:.4f}", flush=True)
                if finished(it):
                    break
        if marker:
            print(MARK_TAG + "end", flush=True)
        result.update(iter_ms=total, compute_ms=compute, evals=evals, loop_s=round(clock, 4))

    finite = all(bool(np.isfinite(q.data().asnumpy()).all()) for q in params)
    result["finite"] = finite
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["cpu_s"] = round(usage.ru_utime + usage.ru_stime, 3)
    result["max_rss_mb"] = round(usage.ru_maxrss / 1024.0, 1)  # Linux: kilobytes
    print(RESULT_TAG + json.dumps(result), flush=True)
    if args.native:
        kv._barrier()  # leave together; the store's destructor tells the scheduler we are done
    return 0


if __name__ == "__main__":
    sys.exit(main())
