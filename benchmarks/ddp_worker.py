"""PyTorch DistributedDataParallel worker of the benchmark suite: the rows ``ddp`` and ``ddp-fp16``.

``benchmarks/suite.py`` runs it on the same emulated WAN, model, data, batch, optimizer, evaluation
cadence and output lines as the geomx rows (``suite_worker.py``), so time per iteration, WAN bytes per
iteration (link counters between the ``SUITE_MARK`` lines) and time to accuracy come out of the suite's
existing machinery. torch is not a dependency of geomx: ``pip install torch==2.13.0`` (or
``pip install -e '.[bench-ddp]'``) in the benchmark environment; without it the suite skips these rows.

Placement (``ddp_procs``): one process per training worker, rank = the geomx slice = ``p * W + i`` for
worker ``i`` of party ``p`` (ranks ordered by site: party0's workers are ranks 0..W-1, then party1's, ...),
each inside its party's namespace; world size = parties x workers per party; no central training worker.
The rendezvous is a ``TCPStore`` served by one more process (``--serve-store``) in the central data
center's namespace, at that namespace's address, so every rank reaches it across the WAN like geomx's
schedulers. gloo binds and advertises the address of the namespace's WAN interface
(``GLOO_SOCKET_IFNAME=wan0``): traffic between the ranks of one party stays on that namespace's
loopback, traffic between parties crosses the emulated links (and the delaying relay, with ``delay=``).
gloo's all-reduce of a CPU tensor is a ring over ranks 0..N-1, so with ranks ordered by site each party
link carries about 2(N-1)/N of the model's bytes per iteration each way (N = world size).

The model: a torch twin of ``suite_worker.build_model`` (same layers, shapes and parameter order; the
counts are asserted against :data:`PARAM_COUNTS`, which are MXNet's). It starts from MXNet's initial
weights (``suite_worker.py --dump-init``: the weights every other row starts from), and the worker
checks that the twin reproduces MXNet's output on a probe batch before training. Data: the same arrays
(``utils.load_arrays("digits")``, from the same file), the same contiguous shards
(``utils.shard_indices``), the same per-epoch order (``RandomState(seed + slice).permutation``, as
``utils.load_data``'s sampler), the same batches (the last one of an epoch kept short). Throughput mode:
the same fixed-seed synthetic batch as ``suite_worker.py``. Optimizer: ``torch.optim.Adam`` with the
suite's learning rate (``--lr``, default ``suite_worker.DEFAULT_LR``), default betas and epsilon, like
MXNet's Adam on the global server; DDP averages the gradients over the ranks where geomx's global
server sums the workers' mean gradients (Adam's step does not depend on that scale, epsilon aside).

One iteration = ``zero_grad``, DDP forward, backward (which runs the all-reduce of every bucket and
waits for it), ``optimizer.step()``. DDP overlaps the all-reduce with the backward pass, so an
iteration has no separate compute part: ``compute_ms`` (the suite's lower bound) is the median of
forward + backward passes timed before the first timed iteration under ``ddp.no_sync()`` (no
communication), reported once per pass.

``ddp-fp16`` (``--comm-hook fp16``): ``ddp.register_comm_hook(None, fp16_compress_hook)`` (each bucket
cast to float16, all-reduced, divided by the world size, cast back).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import sys
import time
from typing import Dict, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from suite_worker import MARK_TAG, RESULT_TAG, add_run_args  # noqa: E402  (no MXNet import at module level)

#: Parameter counts of suite_worker.build_model's MXNet models (printed by ``suite_worker.py
#: --dump-init``); the torch twins must have exactly these.
PARAM_COUNTS = {"cnn": 178762, "big": 5406090, "lastbig": 2188224}
#: Key of the TCPStore counter the workers increment when they are done (the store's process then exits).
DONE_KEY = "geomx_suite_ddp_done"
#: The WAN interface of every data center namespace (geomx.testing.wan.DC_IFACE; not imported: no geomx here).
WAN_IFACE = "wan0"


def torch_missing() -> Optional[str]:
    """None when torch with gloo is importable by this interpreter, else why not."""
    try:
        import torch
        import torch.distributed as dist
    except ImportError as exc:
        return f"torch is not importable ({exc}); pip install torch==2.13.0 (or pip install -e '.[bench-ddp]')"
    if not dist.is_available() or not dist.is_gloo_available():
        return f"torch {torch.__version__} has no gloo backend"
    return None


def torch_missing_in(python: str = sys.executable) -> Optional[str]:
    """:func:`torch_missing` asked of ``python`` in a child process (the suite's check before it runs the
    DDP rows: the driver itself stays free of torch)."""
    import subprocess

    try:
        proc = subprocess.run([python, os.path.abspath(__file__), "--check-torch"], capture_output=True, text=True,
                              timeout=120)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"could not ask {python} for torch: {exc}"
    if proc.returncode == 0:
        return None
    return (proc.stdout.strip().splitlines() or [f"torch check failed (status {proc.returncode})"])[-1]


def ddp_procs(worker_argvs: Sequence[Sequence[str]], extra_env: Dict[str, str], *, store_host: str,
              store_port: int, store_prefix: Sequence[str] = (),
              worker_prefixes: Optional[Sequence[Sequence[str]]] = None, iface: str = WAN_IFACE,
              timeout: float = 900.0, ready_file: Optional[str] = None) -> list:
    """The store's process and one process per rank (``native_launch.Proc``, run by ``run_processes``).

    ``worker_argvs[r]`` is rank r's command (``--rank``/``--world-size``/store flags are appended);
    ``store_prefix`` / ``worker_prefixes[r]`` put the processes into their namespaces; ``iface`` is the
    interface gloo binds and advertises (``lo`` without an emulated WAN). ``ready_file``: the store's
    process creates it once it listens and the ranks wait for it before they connect (through the
    delaying relay a connection to a store not yet listening is accepted, then reset: noisy retries).
    """
    from native_launch import Proc

    n = len(worker_argvs)
    store = ["--store-host", store_host, "--store-port", str(store_port), "--world-size", str(n),
             "--timeout", str(timeout)] + (["--store-ready-file", ready_file] if ready_file else [])
    env = dict(extra_env, GLOO_SOCKET_IFNAME=iface)
    procs = [Proc("store", list(store_prefix) + [sys.executable, os.path.abspath(__file__), "--serve-store"] + store,
                  dict(env))]
    for r, argv in enumerate(worker_argvs):
        prefix = list(worker_prefixes[r]) if worker_prefixes else []
        procs.append(Proc(f"rank{r}", prefix + list(argv) + ["--rank", str(r)] + store, dict(env), True))
    return procs


def build_torch(name: str):
    """The torch twin of ``suite_worker.build_model(name)``: same layers, parameter shapes and order.

    MXNet's ``Conv2D(c, k, activation="relu")`` is ``Conv2d`` + ``ReLU`` (weights ``c x in x k x k`` in
    both), ``MaxPool2D(2, 2)`` floors like ``MaxPool2d(2, 2)``, ``Dense(u)`` flattens NCHW in the same
    order as ``Flatten`` and keeps its weight as ``u x in`` like ``Linear``.
    """
    from torch import nn

    relu = nn.ReLU
    if name == "cnn":  # examples/utils.build_cnn
        layers = [nn.Conv2d(1, 16, 5), relu(), nn.MaxPool2d(2, 2), nn.Conv2d(16, 32, 5), relu(), nn.MaxPool2d(2, 2),
                  nn.Flatten(), nn.Linear(32 * 4 * 4, 256), relu(), nn.Linear(256, 128), relu(), nn.Linear(128, 10)]
    elif name == "big":  # suite_worker.build_big
        layers = [nn.Conv2d(1, 32, 3), relu(), nn.MaxPool2d(2, 2), nn.Conv2d(32, 64, 3), relu(), nn.MaxPool2d(2, 2),
                  nn.Flatten(), nn.Linear(64 * 5 * 5, 2048), relu(), nn.Linear(2048, 1024), relu(),
                  nn.Linear(1024, 10)]
    elif name == "lastbig":  # suite_worker.build_lastbig
        layers = [nn.Conv2d(1, 32, 5), relu(), nn.Conv2d(32, 64, 5), relu(), nn.MaxPool2d(2, 2),
                  nn.Conv2d(64, 64, 3), relu(), nn.MaxPool2d(2, 2), nn.Flatten(), nn.Linear(64 * 4 * 4, 2048)]
    else:
        raise ValueError(f"unknown model {name!r}")
    net = nn.Sequential(*layers)
    count = sum(p.numel() for p in net.parameters())
    # Same parameter count as the MXNet model (178762 / 5406090 / 2188224), or the comparison is off.
    assert count == PARAM_COUNTS[name], f"torch {name}: {count} parameters, MXNet's has {PARAM_COUNTS[name]}"
    return net


def load_init(net, init: dict, name: str) -> None:
    """MXNet's initial weights into ``net``; then the probe batch must give MXNet's output."""
    import numpy as np
    import torch

    params = list(net.parameters())
    n = sum(1 for k in init if k.startswith("p") and k[1:].isdigit())
    if n != len(params):
        raise SystemExit(f"ddp_worker: {name}: {len(params)} torch parameters, {n} MXNet ones")
    with torch.no_grad():
        for i, q in enumerate(params):
            a = init[f"p{i}"]
            if tuple(a.shape) != tuple(q.shape):
                raise SystemExit(f"ddp_worker: {name}: parameter {i} ({init['names'][i]}) is {tuple(a.shape)} in "
                                 f"MXNet, {tuple(q.shape)} in torch")
            q.copy_(torch.from_numpy(np.ascontiguousarray(a)))
        out = net(torch.from_numpy(init["probe"])).numpy()
    if not np.allclose(out, init["probe_out"], rtol=1e-4, atol=1e-5):
        raise SystemExit(f"ddp_worker: {name}: the torch twin's output differs from MXNet's on the probe "
                         f"(max |diff| {float(np.abs(out - init['probe_out']).max()):.3g})")


def serve_store(args) -> int:
    """The rendezvous: a TCPStore at ``--store-host:--store-port`` until every rank has said it is done."""
    import torch.distributed as dist

    store = dist.TCPStore(args.store_host, args.store_port, None, True,
                          datetime.timedelta(seconds=args.timeout), wait_for_workers=False)
    print(f"TCPStore at {args.store_host}:{args.store_port} for {args.world_size} ranks", flush=True)
    if args.store_ready_file:
        with open(args.store_ready_file, "w") as f:
            f.write(f"{args.store_host}:{args.store_port}\n")
    deadline = time.monotonic() + args.timeout
    while store.add(DONE_KEY, 0) < args.world_size:
        if time.monotonic() > deadline:
            print("store: timeout", flush=True)
            return 124
        time.sleep(0.2)
    return 0



def train_loop(args, rank: int, init: dict, net, step, calibrate, barrier, result: dict) -> None:
    """The timed loop shared by DDP and geomx.torch (``--geomx``): throughput (the synthetic batch) or
    accuracy (the digits shards, evaluated on rank 0); fills ``result``. ``step(x, y)`` is one
    iteration in ms, ``calibrate(x, y)`` forward + backward passes without communication."""
    import numpy as np
    import torch

    world = args.world_size if args.geomx is None else args.num_workers
    marker = rank == 0
    rng = np.random.RandomState(args.seed + rank)  # suite_worker.py's synthetic batch, same draws
    synth_x = torch.from_numpy(rng.rand(args.batch_size, 1, 28, 28).astype(np.float32))
    synth_y = torch.from_numpy(rng.randint(0, 10, args.batch_size).astype(np.int64))
    if args.mode == "throughput":
        for _ in range(args.warmup):
            step(synth_x, synth_y)
        compute = calibrate(synth_x, synth_y)
        barrier()
        if marker:
            print(MARK_TAG + "start", flush=True)
        total = []
        t_loop = time.perf_counter()
        for _ in range(args.iters):
            total.append(round(step(synth_x, synth_y), 3))
        loop_s = time.perf_counter() - t_loop
        if marker:
            print(MARK_TAG + "end", flush=True)
        result.update(iter_ms=total, compute_ms=compute, loop_s=round(loop_s, 4))
    else:
        compute = calibrate(synth_x, synth_y)
        x_train, y_train = init["x_train"], init["y_train"].astype(np.int64)
        x_test = torch.from_numpy(init["x_test"])
        y_test = init["y_test"].astype(np.int64).reshape(-1)
        per = len(y_train) // world  # utils.shard_indices: contiguous shards
        shard = np.arange(rank * per, rank * per + per)
        order_rng = np.random.RandomState(args.seed + rank)  # utils._SeededRandomSampler
        evals, total = [], []
        clock, it = 0.0, 0
        barrier()
        if marker:
            print(MARK_TAG + "start", flush=True)
        while it < args.max_iters:
            perm = shard[order_rng.permutation(per)]
            for b in range(0, per, args.batch_size):
                idx = perm[b:b + args.batch_size]
                t = step(torch.from_numpy(x_train[idx]), torch.from_numpy(y_train[idx]))
                total.append(round(t, 3))
                clock += t / 1e3
                it += 1
                if marker and (it % args.eval_every == 0 or it >= args.max_iters):
                    with torch.no_grad():
                        pred = net(x_test).argmax(dim=1).numpy()
                    acc = float((pred == y_test).mean())
                    evals.append({"t": round(clock, 3), "it": it, "acc": round(acc, 4)})
                    print(f"[iter {it}] train time {clock:.2f}s test acc {acc:.4f}", flush=True)
                if it >= args.max_iters:
                    break
        if marker:
            print(MARK_TAG + "end", flush=True)
        result.update(iter_ms=total, compute_ms=compute, evals=evals, loop_s=round(clock, 4))


def timed_steps(args, model, opt, no_sync):
    """``step(x, y)``: one iteration (zero_grad, forward, backward, optimizer step) in ms;
    ``calibrate(x, y)``: ``args.calibrate`` forward + backward passes under ``no_sync()`` (no
    communication), in ms each, gradients zeroed after."""
    import torch.nn.functional as F

    def step(x, y) -> float:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=False)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        return (time.perf_counter() - t0) * 1e3

    def calibrate(x, y) -> List[float]:
        out = []
        for _ in range(args.calibrate):
            t0 = time.perf_counter()
            with no_sync():
                F.cross_entropy(model(x), y).backward()
            out.append(round((time.perf_counter() - t0) * 1e3, 3))
        opt.zero_grad(set_to_none=False)
        return out

    return step, calibrate


def report(result: dict, net) -> None:
    """The result line the suite parses: the loop's figures, finite weights, CPU time and peak memory."""
    import torch

    result["finite"] = all(bool(torch.isfinite(q).all()) for q in net.parameters())
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["cpu_s"] = round(usage.ru_utime + usage.ru_stime, 3)
    result["max_rss_mb"] = round(usage.ru_maxrss / 1024.0, 1)
    print(RESULT_TAG + json.dumps(result), flush=True)


def geomx_main(args, net, init: dict, nparams: int) -> int:
    """``--geomx MODE``: the same loop over geomx.torch (a worker started by geomx-launch): Adam in the
    global servers (mode server) or on each worker (mode local), HFA from the environment."""
    import torch

    import geomx.torch as gx

    t_setup = time.perf_counter()
    gx.init()
    compression = json.loads(args.compression) if args.compression else None
    opt = gx.DistributedOptimizer(torch.optim.Adam(net.parameters(), lr=args.lr),
                                  named_parameters=net.named_parameters(), mode=args.geomx, compression=compression)
    gx.broadcast_parameters(net.state_dict())
    if gx.is_master_worker():
        print(f"master worker initialised {len(list(net.parameters()))} keys", flush=True)
        return 0
    setup_s = time.perf_counter() - t_setup

    # Each gradient leaves as soon as backward has accumulated it; step() waits for the values.
    step, calibrate = timed_steps(args, net, opt, opt.no_sync)
    store = gx.store()
    result = {"system": "geomx-torch", "mode_geomx": args.geomx, "worker": args.slice, "model": args.model,
              "hfa": list(store.hfa_periods) if store.cfg.hfa.enabled else None, "params": nparams,
              "batch": args.batch_size, "setup_s": round(setup_s, 3), "mode": args.mode,
              "compute_note": "forward+backward under opt.no_sync(), timed before the loop"}
    train_loop(args, args.slice, init, net, step, calibrate, lambda: None, result)
    report(result, net)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check-torch", action="store_true", help="exit 0 when torch with gloo imports, else say why")
    p.add_argument("--serve-store", action="store_true", help="run the rendezvous (central data center)")
    p.add_argument("--store-host", default=None)
    p.add_argument("--store-port", type=int, default=None)
    p.add_argument("--world-size", type=int, default=None)
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--store-ready-file", default=None,
                   help="the store creates this file once it listens; ranks wait for it before connecting")
    p.add_argument("--init", default=None, help="suite_worker.py --dump-init's file (required for training)")
    p.add_argument("--comm-hook", choices=["none", "fp16", "powersgd"], default="none")
    p.add_argument("--geomx", choices=["server", "local"], default=None,
                   help="not DDP: geomx.torch's DistributedOptimizer in this mode (a worker of geomx-launch; the "
                        "rows geomx-torch-*)")
    p.add_argument("--compression", default=None, help="--geomx: the DistributedOptimizer's compression (JSON)")
    # The suite's worker flags (suite.worker_argv), with suite_worker.py's meaning.
    add_run_args(p)
    p.add_argument("--slice", type=int, default=None, help="global worker index (= the rank)")
    p.add_argument("--num-workers", type=int, default=None, help="training workers worldwide (= the world size)")
    p.add_argument("--calibrate", type=int, default=3, help="forward+backward passes timed without communication")
    args = p.parse_args(argv)
    if args.check_torch:
        reason = torch_missing()
        print(reason or "ok", flush=True)
        return 1 if reason else 0
    if args.geomx is None:
        if args.store_host is None or args.store_port is None or args.world_size is None:
            p.error("--store-host, --store-port and --world-size are required")
        if args.serve_store:
            return serve_store(args)
        if args.slice is not None and args.slice != args.rank:
            p.error(f"--slice {args.slice} and --rank {args.rank} differ: the rank is the data shard")
        if args.num_workers is not None and args.num_workers != args.world_size:
            p.error(f"--num-workers {args.num_workers} and --world-size {args.world_size} differ")
    if not args.init:
        p.error("--init FILE is required (suite_worker.py --dump-init FILE --model M)")

    import numpy as np
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(args.seed)
    rank, world = args.rank, args.world_size
    if args.geomx is not None:
        rank, world = args.slice, args.num_workers
    with np.load(args.init) as z:
        init = {k: z[k] for k in z.files}
    net = build_torch(args.model)
    load_init(net, init, args.model)
    nparams = sum(q.numel() for q in net.parameters())
    if rank == 0:
        print(f"torch {torch.__version__} {args.model}: {nparams} parameters (= MXNet's), probe output matches "
              f"MXNet's; gloo on {os.environ.get('GLOO_SOCKET_IFNAME')}, threads {torch.get_num_threads()}",
              flush=True)

    if args.geomx is not None:
        return geomx_main(args, net, init, nparams)
    t_setup = time.perf_counter()
    if args.store_ready_file:
        deadline = time.monotonic() + args.timeout
        while not os.path.exists(args.store_ready_file):
            if time.monotonic() > deadline:
                raise SystemExit(f"ddp_worker: the store did not start ({args.store_ready_file} never appeared)")
            time.sleep(0.05)
    timeout = datetime.timedelta(seconds=args.timeout)
    store = dist.TCPStore(args.store_host, args.store_port, world, False, timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
    ddp = DDP(net)
    if args.comm_hook == "fp16":
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import fp16_compress_hook

        ddp.register_comm_hook(None, fp16_compress_hook)
    elif args.comm_hook == "powersgd":
        # torch's own WAN-friendly hook: rank-1 PowerSGD with error feedback and warm start (its defaults).
        # Accuracy runs start it after 10 plain all-reduce iterations, the recipe torch's documentation gives;
        # throughput runs after 2 (the least it takes), inside the warm-up, so the timed iterations are
        # compressed ones.
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd

        start = 10 if args.mode == "accuracy" else 2
        state = powersgd.PowerSGDState(process_group=None, matrix_approximation_rank=1, start_powerSGD_iter=start)
        ddp.register_comm_hook(state, powersgd.powerSGD_hook)
    opt = torch.optim.Adam(ddp.parameters(), lr=args.lr)
    dist.barrier()
    setup_s = time.perf_counter() - t_setup

    # backward() all-reduces every bucket and waits for them.
    step, calibrate = timed_steps(args, ddp, opt, ddp.no_sync)
    result = {"system": "ddp", "comm_hook": args.comm_hook, "worker": rank, "model": args.model, "hfa": None,
              "params": nparams, "batch": args.batch_size, "setup_s": round(setup_s, 3), "mode": args.mode,
              "compute_note": "forward+backward under ddp.no_sync(), timed before the loop"}
    train_loop(args, rank, init, net, step, calibrate, dist.barrier, result)
    report(result, net)
    store.add(DONE_KEY, 1)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
