"""Size and time of a global server's checkpoint for a model of ``--params`` float32 parameters
(default 25M), through the real save path (``GlobalServer.save_checkpoint``: snapshot of values,
optimizer states and update counts on the server's loop, then npz write, fsync and atomic rename on
its writer thread; the time is snapshot to durable file, of which the loop is busy only for the
snapshot, shown separately) and the real load path
(``checkpoint.load`` + ``GlobalServer.restore``). Prints a Markdown table, one row per optimizer.

The model is cut into ``--keys`` tensors of about equal size (like a network's layers). One
optimizer step is taken on every key first so that the optimizer states exist. Times are the
median (and min) of ``--repeats`` saves. Run from the repository root after building:

    python benchmarks/bench_checkpoint.py [--params 25000000] [--keys 50] [--dir /tmp/ckpt] [--repeats 5]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("MXNET_ENGINE_TYPE", "NaiveEngine")  # as a global server runs it

import mxnet as mx  # noqa: E402
import numpy as np  # noqa: E402
import zmq  # noqa: E402

from geomx import checkpoint  # noqa: E402
from geomx.config import GLOBAL_SERVER, CheckpointConfig, NodeConfig  # noqa: E402
from geomx.optimizer_spec import optimizer_to_spec  # noqa: E402
from geomx.servers import GlobalServer  # noqa: E402
from geomx.servers.keystate import KeyState  # noqa: E402
from geomx.transport import EventLoop  # noqa: E402

OPTIMIZERS = {
    "none (values only)": None,
    "sgd, momentum 0.9": lambda: mx.optimizer.SGD(learning_rate=0.1, momentum=0.9),
    "adam": lambda: mx.optimizer.Adam(learning_rate=0.001),
}


def server_with_model(directory: str, params: int, keys: int, make_opt) -> GlobalServer:
    cfg = NodeConfig(role=GLOBAL_SERVER, num_global_server=1, num_global_worker=1, num_server=1, num_worker=1,
                     checkpoint=CheckpointConfig(dir=directory))
    server = GlobalServer(cfg, EventLoop(zmq.Context.instance(), name="bench"))
    if make_opt is not None:
        server._set_optimizer(optimizer_to_spec(make_opt()), from_master=True)
    rng = np.random.default_rng(0)
    bounds = np.linspace(0, params, keys + 1).astype(int)
    for k in range(keys):
        n = int(bounds[k + 1] - bounds[k])
        ks = server.keys[k] = KeyState(k, n, np.dtype(np.float32))
        ks.store = rng.standard_normal(n, dtype=np.float32)
        ks.initialized = True
        if make_opt is not None:
            server.policy.round_result(ks, rng.standard_normal(n, dtype=np.float32))  # creates the optimizer state
        ks.completed = 1
    return server


def median_min(xs):
    return statistics.median(xs), min(xs)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--params", type=int, default=25_000_000)
    p.add_argument("--keys", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = p.parse_args()
    directory = args.dir or tempfile.mkdtemp(prefix="geomx-bench-ckpt-")
    os.makedirs(directory, exist_ok=True)
    print(f"{args.params} float32 parameters in {args.keys} keys; directory {directory}; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    print()
    print("| optimizer | checkpoint size | save, snapshot to durable file (median / min) | save throughput | "
          "server loop busy (snapshot, median) | load + restore (median) |")
    print("|---|---|---|---|---|---|")
    try:
        for name, make_opt in OPTIMIZERS.items():
            server = server_with_model(directory, args.params, args.keys, make_opt)
            saves, loads, snaps = [], [], []
            for _ in range(args.repeats):
                saves.append(server.save_checkpoint("benchmark", wait=True)["seconds"])
                start = time.perf_counter()
                server.snapshot()
                snaps.append(time.perf_counter() - start)
            path = checkpoint.file_name(directory, 0)
            size = os.path.getsize(path)
            for _ in range(max(1, args.repeats // 2)):
                start = time.perf_counter()
                fresh = GlobalServer(server.cfg, server.loop)
                fresh.restore(checkpoint.load(path), path)
                loads.append(time.perf_counter() - start)
            med, low = median_min(saves)
            print(f"| {name} | {size / 1e6:.1f} MB ({size / (4 * args.params):.2f} x the weights) | "
                  f"{med:.3f} s / {low:.3f} s | {size / med / 1e6:.0f} MB/s | {statistics.median(snaps):.3f} s | "
                  f"{statistics.median(loads):.3f} s |",
                  flush=True)
    finally:
        if args.dir is None:
            shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
