"""Benchmark suite: native MXNet dist_sync versus geomx (and each of its optimizations) on one emulated WAN.

One invocation builds one emulated WAN (``geomx.testing.wan``: a network namespace per data center, tbf-capped
links) and runs every row of :data:`ROWS` on it, one after the other:

* ``native``: MXNet 1.9.1's ps-lite ``dist_sync``: scheduler + one server in the central DC, the
  workers of party p in party p's DC, so every worker pushes and pulls across the WAN;
* ``geomx-fsa``: vanilla HiPS (fully synchronous: local server per party, one global server in the
  central DC), started with ``geomx.launch.run`` with each party in its namespace;
* later optimizations: one :class:`Row` each (env vars / node env / worker flags = their documented
  switches);
* ``ddp`` / ``ddp-fp16`` (not in the default ``--rows``; issue 32): PyTorch DistributedDataParallel over
  gloo on the same WAN, model (a torch twin with MXNet's initial weights), data, batch and Adam
  (``benchmarks/ddp_worker.py``): one rank per training worker, ranks ordered by site, the TCPStore
  rendezvous in the central DC, no central training worker; ``ddp-fp16`` adds DDP's
  ``fp16_compress_hook``. torch is not a geomx dependency (``pip install torch==2.13.0``); without it
  the suite says so and skips these rows.

Per row and model (``cnn``: the examples' CNN; ``big``: ~5.4M parameters), a throughput run on
fixed-seed synthetic batches; for the ``cnn`` model also a time-to-accuracy run on ``load_digits``.
Metrics: median time per iteration (slowest worker), samples/s, WAN bytes per iteration (kernel
counters of the links, between the first worker's start/end marks), the lower bound
max(compute, bytes on the bottleneck link / its rate), measured/bound, time to the target test
accuracy, final accuracy, and speedup over native (native time / row time).

Each throughput run also gives every worker's iterations per second over its own timed loop and their
mean per party (MixedSync's fast party against FSA's), and WAN bytes per sample; a second table
compares them, and time to accuracy, with ``geomx-fsa`` (HFA: also the time at which the *global*
model, evaluated right after a global average, reached the target).

Output: Markdown tables (stdout), a JSON file, a PNG (time-to-accuracy curves + speedup bars).

    sudo python benchmarks/suite.py --quick                      # < 10 min on 2 cores
    sudo python benchmarks/suite.py                              # full mode (see docs/Benchmarks.md)
    sudo python benchmarks/suite.py --wan party0=100mbit,party1=10mbit --rows native,geomx-fsa
    sudo python benchmarks/suite.py --wan party0=100mbit,party1=10mbit --models cnn --repeats 1
        --rows geomx-fsa,geomx-mixedsync,geomx-hfa --tta-iters 60    # (one line) issue 5's rows
    sudo python benchmarks/suite.py --parties 4 --workers 1 --wan all=100mbit,party3=40mbit --models big
        --no-accuracy --rows geomx-fsa,geomx-tsengine                # (one line) TSEngine's row
    sudo python benchmarks/suite.py --wan all=20mbit,delay=50ms --rows native,geomx-fsa,ddp,ddp-fp16
                                                                 # torch DDP against geomx (issue 32)
"""
from __future__ import annotations

import argparse
import atexit
import dataclasses
import datetime
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Mapping, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "suite_worker.py")
DDP_WORKER = os.path.join(HERE, "ddp_worker.py")
# Rows whose workers are torch processes (benchmarks/ddp_worker.py), from MXNet's initial weights.
TORCH_SYSTEMS = ("ddp", "geomx-torch")
sys.path.insert(0, HERE)

import ddp_worker  # noqa: E402  (no torch import at module level)
import summary as summarymod  # noqa: E402
from native_launch import free_port, native_procs, run_processes  # noqa: E402
from suite_worker import MARK_TAG, RESULT_TAG  # noqa: E402  (no MXNet import at module level)
from summary import fmt as _f  # noqa: E402

from geomx import metrics  # noqa: E402
from geomx.testing import wan as wanmod  # noqa: E402
from geomx.testing.wan import LinkCounters  # noqa: E402

# --------------------------------------------------------------------------------------------------
# Rows: one entry per system / optimization. Later issues add one entry each.
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Row:
    """A configuration to benchmark.

    ``env``: variables for every process (geomx: ``Topology.env``); ``node_env``: fnmatch pattern on
    the process name -> variables (geomx: ``Topology.node_env``, e.g. ``{"party*/server": {...}}``);
    ``worker_args``: extra flags for ``suite_worker.py`` (e.g. ``--kv-type dist_async``,
    ``--compression '{"type": "bsc"}'``); ``flags``: the switch as a user gives it (documentation).
    ``iters`` / ``warmup`` / ``tta_iters``: this row's own iteration counts, used instead of the
    suite's (HFA needs whole global rounds: a multiple of K1 * K2 iterations).
    """

    name: str
    # "native", "geomx", "ddp" (torch DistributedDataParallel, benchmarks/ddp_worker.py) or "geomx-torch"
    # (geomx.torch's DistributedOptimizer, benchmarks/ddp_worker.py --geomx, under geomx-launch)
    system: str
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    node_env: Mapping[str, Mapping[str, str]] = dataclasses.field(default_factory=dict)
    worker_args: Sequence[str] = ()
    flags: str = ""
    note: str = ""
    iters: Optional[int] = None
    warmup: Optional[int] = None
    global_servers: int = 1
    tta_iters: Optional[int] = None
    default: bool = True  # in the default --rows
    separate_global_servers: bool = False  # each global server behind a link of its own (gsN)
    local_servers: int = 1  # per party
    curve: bool = False  # CURVE on every link, throwaway keys (geomx-launch --curve)


def _hfa_env(k1: int, k2: int) -> Dict[str, str]:
    return {"MXNET_KVSTORE_USE_HFA": "1", "MXNET_KVSTORE_HFA_K1": str(k1), "MXNET_KVSTORE_HFA_K2": str(k2)}


ROWS: List[Row] = [
    Row("native", "native", flags="mx.kv.create('dist_sync') without geomx",
        note="MXNet 1.9.1 ps-lite dist_sync; one server in the central DC; every worker crosses the WAN"),
    Row("geomx-fsa", "geomx", flags="(default)",
        note="vanilla HiPS: fully synchronous, a local server per party, one global server"),
    Row("geomx-fsa-whole", "geomx", env={"GEOMX_WAN_SLICE_BYTES": "0"}, default=False,
        flags="GEOMX_WAN_SLICE_BYTES=0 (global servers)",
        note="FSA without cut-through rounds: each key crosses the WAN whole, up and then down"),
    # BSC and MPQ as a user turns them on in an FSA script (issue 28): the servers' Adam stays, so each
    # party's local server runs it and the WAN carries its sparsified steps (docs/Compression.md, "The
    # optimizer before the codec"). The -local rows are GeoMX's cnn_bsc.py flow: the workers' own Adam.
    Row("geomx-bsc", "geomx",
        worker_args=("--compression", '{"type": "bsc", "threshold": 0.01, "size_lower_bound": 1000}'),
        flags="master: kv.set_gradient_compression({'type': 'bsc', 'threshold': 0.01, "
              "'size_lower_bound': 1000}); the servers' Adam (docs/Compression.md)",
        note="bi-sparse compression, 1% of each tensor >= 1000 elements on the WAN; the optimizer on the "
             "parties' local servers"),
    Row("geomx-bsc-local", "geomx",
        worker_args=("--local-optimizer", "--compression",
                     '{"type": "bsc", "threshold": 0.01, "size_lower_bound": 1000}'),
        flags="as geomx-bsc, no optimizer on the servers: local Adam (examples/cnn_bsc.py)",
        note="bi-sparse compression, the workers' Adam on the sparsified gradient", default=False),
    Row("geomx-fp16", "geomx",
        worker_args=("--local-optimizer", "--wire-dtype", "float16", "--compression", '{"type": "fp16"}'),
        flags="master: kv.set_gradient_compression({'type': 'fp16'}); float16 keys; local Adam",
        note="float16 on the wire"),
    Row("geomx-mpq", "geomx",
        worker_args=("--compression", '{"type": "mpq", "threshold": 0.01, "size_lower_bound": 1000}'),
        flags="master: kv.set_gradient_compression({'type': 'mpq', 'threshold': 0.01, "
              "'size_lower_bound': 1000}); float32 keys; the servers' Adam",
        note="mixed precision: small tensors fp16 on the WAN, large ones BSC-sparse; the optimizer on the "
             "parties' local servers"),
    Row("geomx-mpq-local", "geomx",
        worker_args=("--local-optimizer", "--wire-dtype", "mixed:1000", "--compression",
                     '{"type": "mpq", "threshold": 0.01, "size_lower_bound": 1000}'),
        flags="as geomx-mpq with float16 keys below 1000 elements and local Adam (examples/cnn_mpq.py)",
        note="mixed precision, the workers' Adam on the sparsified gradient", default=False),
    Row("geomx-2gs", "geomx", global_servers=2, env={"MXNET_KVSTORE_BIGARRAY_BOUND": "100000"},
        flags="DMLC_NUM_GLOBAL_SERVER=2 (launcher -s 2); tensors >= 100000 elements split over both",
        note="MultiGPS: keys spread over two global servers in the central party"),
    Row("geomx-2gs-links", "geomx", global_servers=2, separate_global_servers=True,
        env={"MXNET_KVSTORE_BIGARRAY_BOUND": "100000"},
        flags="DMLC_NUM_GLOBAL_SERVER=2 (launcher -s 2 --separate-global-servers); one machine and link per "
              "global server; tensors >= 100000 elements split over both",
        note="MultiGPS as deployed: two global servers, each behind its own central-rate link", default=False),
    Row("geomx-2gs-links-even", "geomx", global_servers=2, separate_global_servers=True,
        env={"MXNET_KVSTORE_BIGARRAY_BOUND": "10000"},
        flags="as geomx-2gs-links with MXNET_KVSTORE_BIGARRAY_BOUND=10000: tensors >= 10000 elements split over "
              "both, so each link carries about half the bytes",
        note="MultiGPS as deployed, the bytes split evenly between the two central links", default=False),
    Row("geomx-2ls", "geomx", local_servers=2, env={"MXNET_KVSTORE_BIGARRAY_BOUND": "100000"},
        flags="DMLC_NUM_SERVER=2 in every party (launcher -l 2)",
        note="two local servers per party (keys divided between them)", default=False),
    Row("geomx-mixedsync", "geomx", worker_args=("--kv-type", "dist_async"),
        flags="mx.kv.create('dist_async') (docs/Synchronization.md)",
        note="MixedSync: synchronous inside a party, asynchronous across parties"),
    Row("geomx-dcasgd", "geomx", worker_args=("--kv-type", "dist_async", "--optimizer", "dcasgd", "--lr", "0.1"),
        flags="mx.kv.create('dist_async') + kv.set_optimizer(mx.optimizer.DCASGD(learning_rate=0.1, momentum=0, "
              "lamda=0.04)) (docs/Synchronization.md)",
        note="MixedSync + DC-ASGD: the global server compensates each party's stale gradient", default=False),
    Row("geomx-esync", "geomx", env={"GEOMX_USE_ESYNC": "1"}, worker_args=("--esync",), default=False,
        flags="GEOMX_USE_ESYNC=1 (every process); local Adam, kv.esync_steps() local steps per global average "
              "(examples/cnn_esync.py)",
        note="ESync: each party takes as many local steps per global average as its speed allows"),
    # Combinations (docs/Configurations.md lists what is refused): BSC with P3's slices and priorities.
    Row("geomx-bsc-p3", "geomx", env={"ENABLE_P3": "1"},
        worker_args=("--compression",
                     '{"type": "bsc", "threshold": 0.01, "size_lower_bound": 1000}'),
        flags="geomx-bsc + ENABLE_P3=1", note="bi-sparse compression over P3's sliced, prioritised links",
        default=False),
    Row("geomx-bsc-2gs", "geomx", global_servers=2, env={"MXNET_KVSTORE_BIGARRAY_BOUND": "100000"},
        worker_args=("--compression",
                     '{"type": "bsc", "threshold": 0.01, "size_lower_bound": 1000}'),
        flags="geomx-bsc + DMLC_NUM_GLOBAL_SERVER=2", note="bi-sparse compression, keys over two global servers",
        default=False),
    # HFA: the variables go to every process (the schedulers ignore them). Throughput runs cover
    # exactly two global rounds (warm-up 0), so WAN bytes per sample average whole rounds.
    Row("geomx-hfa", "geomx", env=_hfa_env(20, 10), worker_args=("--hfa",),
        flags="MXNET_KVSTORE_USE_HFA=1 MXNET_KVSTORE_HFA_K1=20 MXNET_KVSTORE_HFA_K2=10; local Adam, "
              "kv.pushpull(k, w / kv.num_workers, out=w) every K1 iterations (examples/cnn_hfa.py)",
        note="HFA, K1*K2 = 200: party average every 20 iterations, global average every 200",
        iters=400, warmup=0, tta_iters=400),
    Row("geomx-hfa-5x4", "geomx", env=_hfa_env(5, 4), worker_args=("--hfa",),
        flags="MXNET_KVSTORE_USE_HFA=1 MXNET_KVSTORE_HFA_K1=5 MXNET_KVSTORE_HFA_K2=4; local Adam",
        note="HFA, K1*K2 = 20: party average every 5 iterations, global average every 20",
        iters=200, warmup=0, tta_iters=120, default=False),
    # P3 against the same pipelined step without it (docs/Scheduling.md): gradients pushed in
    # backward order, no wait at the end of a step, so the next forward overlaps the transfers.
    # Meant for the ``lastbig`` model (one large output layer after compute-heavy convolutions).
    Row("geomx-pipelined", "geomx", worker_args=("--overlap",), default=False,
        flags="(default FSA) + suite_worker.py --overlap",
        note="FSA, gradients pushed in backward order, next forward overlaps the pulls; P3's baseline"),
    Row("geomx-p3", "geomx", env={"ENABLE_P3": "1"}, worker_args=("--overlap",), default=False,
        flags="ENABLE_P3=1 (every process) + suite_worker.py --overlap",
        note="P3: 40000-element slices, first layers first on every link, per-slice global updates"),
    # TSEngine across parties; its case is a congested central link (the global server's incast):
    #   --parties 4 --workers 1 --wan all=100mbit,party3=40mbit --models big --rows geomx-fsa,geomx-tsengine
    Row("geomx-tsengine", "geomx", env={"ENABLE_INTER_TS": "1", "MAX_GREED_RATE_TS": "0.9"},
        flags="ENABLE_INTER_TS=1 MAX_GREED_RATE_TS=0.9 (docs/Scheduling.md)",
        note="TSEngine: parties' sums climb an aggregation tree, results are relayed party to party",
        default=False),
    # DGT (docs/DGT.md): the party's push to the global server as blocks; the top K = 50% by score on
    # TCP, the rest on 3 lower-priority channels. Meant for a congested WAN (--competing-flow).
    Row("geomx-dgt-udp", "geomx", env={"ENABLE_DGT": "1", "DMLC_K": "0.5", "DMLC_UDP_CHANNEL_NUM": "3"},
        flags="ENABLE_DGT=1 DMLC_K=0.5 DMLC_UDP_CHANNEL_NUM=3 (global and local servers)",
        note="DGT mode 1: low-priority blocks over UDP; missing after 50 ms = zero, late = next round",
        default=False),
    Row("geomx-dgt-tcp", "geomx", env={"ENABLE_DGT": "2", "DMLC_K": "0.5", "DMLC_UDP_CHANNEL_NUM": "3"},
        flags="ENABLE_DGT=2 DMLC_K=0.5 DMLC_UDP_CHANNEL_NUM=3 (global and local servers)",
        note="DGT mode 2: low-priority blocks on a second TCP link; late ones fold into the next round",
        default=False),
    Row("geomx-curve", "geomx", curve=True, default=False,
        flags="geomx-launch --curve (GEOMX_CURVE_SECRET_KEY + GEOMX_CURVE_PUBLIC_KEYS_DIR on every process)",
        note="geomx-fsa with CURVE encryption + authentication on every link, inside the parties too"),
    Row("geomx-curve-wan-only", "geomx", curve=True, default=False, env={"GEOMX_CURVE_INSIDE_PARTY": "0"},
        flags="geomx-launch --curve --env GEOMX_CURVE_INSIDE_PARTY=0",
        note="geomx-fsa with CURVE on the links between parties only"),
    # torch DDP on the same WAN, model, data, batch and Adam (issue 32; benchmarks/ddp_worker.py): rank
    # p*W+i = worker i of party p, in party p's namespace; TCPStore in the central DC; gloo on wan0.
    Row("ddp", "ddp", default=False,
        flags="torch DistributedDataParallel(model) over gloo, torch.optim.Adam; ranks ordered by site, "
              "TCPStore rendezvous in the central DC",
        note="PyTorch DDP: gloo's ring all-reduce over every training worker (no central worker)"),
    Row("ddp-fp16", "ddp", worker_args=("--comm-hook", "fp16"), default=False,
        flags="ddp + ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)",
        note="PyTorch DDP, gradients all-reduced as float16"),
    Row("ddp-powersgd", "ddp", worker_args=("--comm-hook", "powersgd"), default=False,
        flags="ddp + ddp.register_comm_hook(PowerSGDState(None, matrix_approximation_rank=1, "
              "start_powerSGD_iter=10), powerSGD_hook) (throughput runs: start_powerSGD_iter=2, in the warm-up)",
        note="PyTorch DDP with torch's own WAN-friendly hook: rank-1 PowerSGD after 10 plain iterations"),
    # geomx.torch (issue 29; benchmarks/ddp_worker.py --geomx): the DDP rows' torch model, weights, data and
    # Adam, the workers started by geomx-launch as in the geomx rows.
    *[Row(f"geomx-torch-{name}", "geomx-torch", env=env, worker_args=("--geomx", *args), default=False,
          flags=flags, note=note, **extra) for name, env, args, flags, note, extra in [
        ("fsa", {}, ("server",), "gx.DistributedOptimizer(Adam) (mode server)",
         "geomx.torch, FSA: the global server runs torch.optim.Adam's rule", {}),
        ("p3", {"ENABLE_P3": "1"}, ("server",), "geomx-torch-fsa + ENABLE_P3=1",
         "geomx.torch, P3's slices and priorities", {}),
        ("fp16", {}, ("local", "--compression", '{"type": "fp16"}'),
         "gx.DistributedOptimizer(Adam, mode='local', compression={'type': 'fp16'})",
         "geomx.torch, float16 on every link, each worker's Adam", {}),
        ("bsc", {}, ("local", "--compression", '{"type": "bsc", "threshold": 0.01, "size_lower_bound": 1000}'),
         "gx.DistributedOptimizer(Adam, mode='local', compression={'type': 'bsc', 'threshold': 0.01, "
         "'size_lower_bound': 1000})", "geomx.torch, bi-sparse compression, each worker's Adam", {}),
        ("mpq", {}, ("local", "--compression", '{"type": "mpq", "threshold": 0.01, "size_lower_bound": 1000}'),
         "gx.DistributedOptimizer(Adam, mode='local', compression={'type': 'mpq', ...})",
         "geomx.torch, mixed precision, each worker's Adam", {}),
        ("hfa", _hfa_env(20, 10), ("local",), "MXNET_KVSTORE_USE_HFA=1 K1=20 K2=10; gx.DistributedOptimizer(Adam)",
         "geomx.torch, HFA: party average every 20 iterations, global every 200",
         dict(iters=400, warmup=0, tta_iters=400)),
        ("2gs-links-even", {"MXNET_KVSTORE_BIGARRAY_BOUND": "10000"}, ("server",),
         "geomx-torch-fsa + launcher -s 2 --separate-global-servers, MXNET_KVSTORE_BIGARRAY_BOUND=10000",
         "geomx.torch, FSA over two global servers, each behind its own link, the bytes split evenly",
         dict(global_servers=2, separate_global_servers=True)),
    ]],
]

MODELS = {"cnn": "examples' CNN (utils.build_cnn, ~0.18M params)",
          "big": "wider CNN (suite_worker.build_big, ~5.4M params)",
          "lastbig": "convolutions then one large output layer (suite_worker.build_lastbig, ~2.2M params)"}


def row_by_name(name: str) -> Row:
    for r in ROWS:
        if r.name == name:
            return r
    raise KeyError(f"unknown row {name!r}; rows: {', '.join(r.name for r in ROWS)}")


# --------------------------------------------------------------------------------------------------
# Summaries (pure; unit-tested)
# --------------------------------------------------------------------------------------------------

def round_trips(readings: Dict[str, dict]) -> Optional[dict]:
    """The local servers' push -> global reply times, from their last metrics (``GEOMX_METRICS_DIR``
    dumps, geomx.metrics.load_dumps): the worst party's p50/p90."""
    p50, p90 = "geomx_wan_round_trip_p50_seconds", "geomx_wan_round_trip_p90_seconds"
    found = [(metrics.value(r, p50), metrics.value(r, p90)) for r in readings.values()
             if r["node"]["role"] == "local_server" and metrics.has(r, p50)]
    if not found:
        return None
    return {"push_p50_s": max(p50 for p50, _ in found), "push_p90_s": max(p90 for _, p90 in found)}


def resources(readings: Dict[str, dict]) -> Dict[str, dict]:
    """CPU time and peak memory of each geomx node but the workers (whose results carry theirs), from
    their last metrics: ``party/node`` -> {"cpu_s", "max_rss_mb"}."""
    return {name: {"cpu_s": metrics.value(r, "geomx_process_cpu_seconds_total"),
                   "max_rss_mb": metrics.value(r, "geomx_process_peak_resident_memory_bytes") / 2**20}
            for name, r in readings.items() if r["node"]["role"] not in ("worker", "master_worker")}


def parse_results(text: str) -> List[dict]:
    out = []
    for line in text.splitlines():
        i = line.find(RESULT_TAG)
        if i >= 0:
            out.append(json.loads(line[i + len(RESULT_TAG):]))
    return out


def worker_rates(results: Sequence[dict], workers_per_party: Optional[int]) -> dict:
    """Iterations per second of each worker over its own timed loop, and their mean per party.

    A worker's rate is ``len(iter_ms) / loop_s`` (``loop_s``: wall time of its timed loop; the sum of
    its iteration times when absent). Party of worker ``i`` = ``i // workers_per_party``. Under
    MixedSync the parties run at different rates, which the slowest-worker median hides.
    """
    per_worker = {}
    for r in sorted(results, key=lambda r: r["worker"]):
        loop_s = r.get("loop_s") or sum(r["iter_ms"]) / 1e3
        per_worker[int(r["worker"])] = len(r["iter_ms"]) / loop_s if loop_s > 0 else None
    out = {"worker_iters_per_s": {str(k): v for k, v in per_worker.items()},
           "worker_mean_s": {str(k): (1.0 / v if v else None) for k, v in per_worker.items()}}
    if workers_per_party:
        parties: Dict[str, List[float]] = {}
        for w, v in per_worker.items():
            if v is not None:
                parties.setdefault(f"party{w // workers_per_party}", []).append(v)
        out["party_iters_per_s"] = {p: statistics.mean(v) for p, v in sorted(parties.items())}
    rates = [v for v in per_worker.values() if v]
    if rates:
        out["mean_s"] = 1.0 / min(rates)  # slowest worker's mean time per iteration
    return out


def summarise_throughput(results: Sequence[dict], counters: Optional[Mapping[str, LinkCounters]],
                         iters: int, rates: Mapping[str, Optional[float]],
                         workers_per_party: Optional[int] = None) -> dict:
    """Per-iteration metrics from the workers' results and the WAN counters of the timed span."""
    medians = [statistics.median(r["iter_ms"]) for r in results]
    computes = [statistics.median(r["compute_ms"]) for r in results]
    median_s = max(medians) / 1e3
    compute_s = max(computes) / 1e3
    batch = results[0]["batch"]
    # Tail of the iteration time (slowest worker's 90th percentile): what DGT is meant to cut.
    p90_s = max(statistics.quantiles(r["iter_ms"], n=10)[-1] if len(r["iter_ms"]) > 1 else r["iter_ms"][0]
                for r in results) / 1e3
    row = {"median_s": median_s, "p90_s": p90_s, "worker_median_s": [m / 1e3 for m in medians], "compute_s": compute_s,
           "samples_per_s": len(results) * batch / median_s}
    row.update(worker_rates(results, workers_per_party))
    if counters:
        per_iter = {dc: LinkCounters(c.up / iters, c.down / iters) for dc, c in counters.items()}
        b = wanmod.lower_bound(compute_s, per_iter, rates)
        d = wanmod.lower_bound(compute_s, per_iter, rates, duplex=True)
        row.update({
            # Every byte enters the WAN once (one link's up) and leaves once (another's down).
            "wan_bytes_per_iter": sum(c.up for c in per_iter.values()),
            # Every worker ran ``iters`` iterations of ``batch`` samples in the span (synchronous
            # rows; under MixedSync the span is worker 0's and the parties' counts differ).
            "wan_bytes_per_sample": sum(c.up for c in per_iter.values()) / (len(results) * batch),
            "link_bytes_per_iter": {dc: {"up": c.up, "down": c.down} for dc, c in per_iter.items()},
            "bottleneck": b["bottleneck"],
            "wan_s": b["wan_s"],
            "bound_s": b["bound_s"],
            "closeness": median_s / b["bound_s"] if b["bound_s"] > 0 else None,
            # Physical floor of a full-duplex link: max(up, down) / rate.
            "bound_duplex_s": d["bound_s"],
        })
    return row


def summarise_accuracy(evals: Sequence[dict], target: float) -> dict:
    hit = next((e for e in evals if e["acc"] >= target), None)
    out = {"time_to_target_s": hit["t"] if hit else None, "iters_to_target": hit["it"] if hit else None,
           "final_acc": evals[-1]["acc"] if evals else None, "evals": list(evals)}
    if any("global" in e for e in evals):
        # HFA: evaluations right after a global average saw the global model; the others worker 0's
        # own (local) model. Time to target counting only the global model:
        g = next((e for e in evals if e.get("global") and e["acc"] >= target), None)
        out["time_to_target_global_s"] = g["t"] if g else None
        out["iters_to_target_global"] = g["it"] if g else None
    return out


def markdown(report: dict) -> str:
    target = report.get("config", {}).get("target_acc")
    tgt = f"{target * 100:.0f}%" if target else "target"
    lines = ["| model | row | s/iter (median) | samples/s | WAN MB/iter | bottleneck | bound s/iter "
             "| measured / bound | duplex bound s/iter "
             f"| speedup vs native | time to {tgt} (s) | final acc | spread of repeats |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        if not r.get("ok"):
            lines.append(f"| {r.get('model')} | {r.get('row')} | FAILED (status {r.get('status')}) "
                         "| | | | | | | | | | |")
            continue
        wan_mb = r.get("wan_bytes_per_iter")
        spread = "-" if r.get("spread") is None else f"{r['spread'] * 100:.1f}%"
        lines.append(
            # (no throughput columns for a row that only ran for accuracy: --models none)
            f"| {r['model']} | {r['row']} | {_f(r.get('median_s'), '.3f')} | {_f(r.get('samples_per_s'), '.1f')} "
            f"| {_f(None if wan_mb is None else wan_mb / 1e6, '.2f')} | {r.get('bottleneck') or '-'} "
            f"| {_f(r.get('bound_s'), '.3f')} | {_f(r.get('closeness'), '.2f')} | {_f(r.get('bound_duplex_s'), '.3f')} "
            f"| {_f(r.get('ratio'), '.2f')}{'x' if r.get('ratio') is not None else ''} "
            f"| {_f(r.get('time_to_target_s'), '.1f')} | {_f(r.get('final_acc'), '.3f')} "
            f"| {spread} |")
    return "\n".join(lines)


def fast_party(report: dict) -> Optional[str]:
    """The party with the fastest link in the report's rates (an uncapped link counts as fastest)."""
    rates = report.get("config", {}).get("rates") or {}
    parties = sorted(k for k in rates if k.startswith("party"))
    if not parties:
        return None
    return max(parties, key=lambda p: (float("inf") if rates[p] is None else rates[p], -parties.index(p)))


def markdown_sync(report: dict, baseline: str = "geomx-fsa") -> str:
    """Per-party iteration rates, WAN bytes per sample and time to accuracy, each against ``baseline``.

    For the synchronization rows (issue 5): MixedSync's fast party against FSA's, HFA's bytes per
    sample and time to target against FSA's.
    """
    target = report.get("config", {}).get("target_acc")
    tgt = f"{target * 100:.0f}%" if target else "target"
    fast = fast_party(report)
    parties = sorted({p for r in report["rows"] for p in (r.get("party_iters_per_s") or {})})
    head = ["model", "row"] + [f"{p} it/s" + (" (fast link)" if p == fast else "") for p in parties]
    head += [f"{fast or 'fast party'} vs {baseline}", "WAN bytes/sample", f"{baseline} bytes / row bytes",
             f"time to {tgt} (s)", f"global model: time to {tgt} (s)", f"{baseline} time / row time",
             "final acc"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["rows"]:
        if not r.get("ok"):
            lines.append(f"| {r.get('model')} | {r.get('row')} | FAILED (status {r.get('status')}) |"
                         + " |" * (len(head) - 3))
            continue
        base = next((x for x in report["rows"] if x["row"] == baseline and x["model"] == r["model"]
                     and x.get("ok")), None)
        pr = r.get("party_iters_per_s") or {}
        cells = [r["model"], r["row"]] + [_f(pr.get(p), ".2f") for p in parties]
        bpr = (base or {}).get("party_iters_per_s") or {}
        fr = pr.get(fast) / bpr[fast] if fast and pr.get(fast) and bpr.get(fast) else None
        cells.append(_f(fr, ".2f") + ("x" if fr is not None else ""))
        bps, bbps = r.get("wan_bytes_per_sample"), (base or {}).get("wan_bytes_per_sample")
        cells.append(_f(bps, ".0f"))
        br = bbps / bps if bps and bbps else None
        cells.append(_f(br, ".1f") + ("x" if br is not None else ""))
        tt, tg = r.get("time_to_target_s"), r.get("time_to_target_global_s")
        # Rows other than HFA evaluate the model worker 0 trains with: the global one under FSA.
        ref = tg if "time_to_target_global_s" in r else tt
        cells += [_f(tt, ".1f"), _f(ref, ".1f")]
        btt = (base or {}).get("time_to_target_s")
        tr = btt / ref if btt and ref else None
        cells.append(_f(tr, ".2f") + ("x" if tr is not None else ""))
        cells.append(_f(r.get("final_acc"), ".3f"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_busy(report: dict) -> str:
    """Per row, the fraction of the timed span each capped link was busy up and down, and the time
    per iteration against the link's full-duplex floor (max(up, down) bytes / rate)."""
    rates = report.get("config", {}).get("rates") or {}
    dcs = sorted({dc for r in report["rows"] for dc in (r.get("busy") or {})})
    lines = ["| model | row | s/iter | duplex bound s/iter | measured / duplex bound | "
             + " | ".join(f"{dc} busy up / down | {dc} used up / down" for dc in dcs) + " |",
             "|---|---|---|---|---|" + "---|---|" * len(dcs)]
    for r in report["rows"]:
        busy = r.get("busy")
        if not busy:
            continue
        bound = r.get("bound_duplex_s")
        ratio = r["median_s"] / bound if bound else None
        cells = []
        for dc in dcs:
            moved = (r.get("link_bytes_per_iter") or {}).get(dc)
            rate = rates.get(dc)
            cells.append(f"{busy[dc]['up']:.2f} / {busy[dc]['down']:.2f}" if dc in busy else "-")
            per_s = 8 / rate / r["median_s"] if rate else 0.0
            cells.append(f"{moved['up'] * per_s:.2f} / {moved['down'] * per_s:.2f}" if moved and rate else "-")
        lines.append(f"| {r['model']} | {r['row']} | {_f(r.get('median_s'), '.3f')} | {_f(bound, '.3f')} "
                     f"| {_f(ratio, '.2f')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_tail(report: dict, baseline: str = "geomx-fsa") -> str:
    """For the DGT rows: median and p90 iteration time, p90 against ``baseline``, and accuracy cost."""
    lines = ["| model | row | s/iter (median) | s/iter (p90) | {0} p90 / row p90 | push→reply p50 (s) "
             "| push→reply p90 (s) | {0} / row (push p90) | final acc | acc - {0} |".format(baseline),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        if not r.get("ok") or "p90_s" not in r:
            continue
        base = next((x for x in report["rows"] if x["row"] == baseline and x["model"] == r["model"]
                     and x.get("ok")), None) or {}
        ratio = base["p90_s"] / r["p90_s"] if base.get("p90_s") and r["p90_s"] else None
        acc, bacc = r.get("final_acc"), base.get("final_acc")
        pr = base["push_p90_s"] / r["push_p90_s"] if base.get("push_p90_s") and r.get("push_p90_s") else None
        lines.append(f"| {r['model']} | {r['row']} | {r['median_s']:.3f} | {r['p90_s']:.3f} "
                     f"| {_f(ratio, '.2f')}{'x' if ratio is not None else ''} | {_f(r.get('push_p50_s'), '.3f')} "
                     f"| {_f(r.get('push_p90_s'), '.3f')} | {_f(pr, '.2f')}{'x' if pr is not None else ''} "
                     f"| {_f(acc, '.3f')} "
                     f"| {_f(None if acc is None or bacc is None else acc - bacc, '+.3f')} |")
    return "\n".join(lines)


def plot(report: dict, path: str) -> bool:
    """Time-to-accuracy curves and speedup bars into ``path``; False when matplotlib is missing."""
    plt = summarymod.pyplot()
    if plt is None:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    curves = 0
    for r in report["rows"]:
        if r.get("ok") and r.get("evals"):
            curves += 1
            ax1.plot([e["t"] for e in r["evals"]], [e["acc"] for e in r["evals"]], marker=".",
                     label=f"{r['row']} ({r['model']})")
    target = report.get("config", {}).get("target_acc")
    if target:
        ax1.axhline(target, color="grey", linestyle=":", linewidth=1)
    ax1.set_xlabel("training time (s)")
    ax1.set_ylabel("test accuracy (load_digits)")
    ax1.set_title("time to accuracy")
    if curves:
        ax1.legend(fontsize=8)
    bars = [r for r in report["rows"] if r.get("ok") and r.get("ratio") is not None]
    labels = [f"{r['row']}\n{r['model']}" for r in bars]
    ax2.bar(range(len(bars)), [r["ratio"] for r in bars],
            color=["#999999" if r["row"] == "native" else "#2a7ab9" for r in bars])
    ax2.set_xticks(range(len(bars)))
    ax2.set_xticklabels(labels, fontsize=8)
    ax2.axhline(1.0, color="black", linewidth=0.8)
    ax2.set_ylabel("speedup per iteration vs native")
    ax2.set_title(report.get("config", {}).get("wan", "speedup"))
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------------------
# Running rows
# --------------------------------------------------------------------------------------------------

class _MarkWatcher:
    """Sees every output line; snapshots the WAN counters at the first start/end marks."""

    def __init__(self, w: Optional["wanmod.Wan"]):
        self.w = w
        self.marks: Dict[str, Dict[str, LinkCounters]] = {}
        self.times: Dict[str, float] = {}
        self.lock = threading.Lock()

    def line(self, line: str) -> None:
        i = line.find(MARK_TAG)
        if i < 0:
            return
        kind = line[i + len(MARK_TAG):].strip()
        with self.lock:
            if kind in self.marks:
                return
            self.times[kind] = time.monotonic()
            self.marks[kind] = self.w.counters() if self.w is not None else {}

    def span(self) -> Optional[Dict[str, LinkCounters]]:
        if "start" in self.marks and "end" in self.marks and self.w is not None:
            return wanmod.counter_delta(self.marks["end"], self.marks["start"])
        return None


class _LineStream(io.TextIOBase):
    """A text stream for ``geomx.launch.run`` that keeps the text and feeds complete lines to a callback."""

    def __init__(self, on_line, echo: bool = False):
        self.on_line = on_line
        self.echo = echo
        self.parts: List[str] = []
        self.pending = ""

    def write(self, s: str) -> int:
        self.parts.append(s)
        if self.echo:
            sys.stderr.write(s)
        self.pending += s
        while "\n" in self.pending:
            line, self.pending = self.pending.split("\n", 1)
            self.on_line(line)
        return len(s)

    def getvalue(self) -> str:
        return "".join(self.parts)


def worker_argv(row: Row, model: str, mode: str, args, slice_arg: str, native: bool) -> List[str]:
    script = DDP_WORKER if row.system in TORCH_SYSTEMS else WORKER
    cmd = [sys.executable, script, "--model", model, "--mode", mode, "--slice", slice_arg,
           "--batch-size", str(args.batch_size), "--seed", str(args.seed),
           "--num-workers", str(args.parties * args.workers)]
    if mode == "throughput":
        iters, warmup = (args.big_iters, args.big_warmup) if model == "big" else (args.iters, args.warmup)
        iters = row.iters if row.iters is not None else iters
        warmup = row.warmup if row.warmup is not None else warmup
        cmd += ["--iters", str(iters), "--warmup", str(warmup)]
    else:
        tta = row.tta_iters if row.tta_iters is not None else args.tta_iters
        cmd += ["--max-iters", str(tta), "--eval-every", str(args.eval_every)]
    if native:
        cmd.append("--native")
    return cmd + list(row.worker_args)


class _CompetingFlows:
    """``--competing-flow``: one bulk TCP flow from every party's DC to the central DC while a run
    lasts, sharing each party's upload link with its pushes (benchmarks/bulk_flow.py)."""

    PORT = 7099

    def __init__(self, w: Optional["wanmod.Wan"], parties: int):
        self.procs: List[subprocess.Popen] = []
        if w is None:
            raise SystemExit("suite: --competing-flow needs an emulated WAN (not --wan off)")
        script = os.path.join(HERE, "bulk_flow.py")
        self._start(w.exec_argv("central") + [sys.executable, script, "sink", str(self.PORT)])
        for p in range(parties):
            self._start(w.exec_argv(f"party{p}") + [sys.executable, script, "source", w.address("central"),
                                                    str(self.PORT)])

    def _start(self, argv: List[str]) -> None:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        self.procs.append(proc)
        line = proc.stdout.readline().strip()  # type: ignore[union-attr]
        if line != "ready":
            self.close()
            raise SystemExit(f"suite: competing flow did not start: {line or proc.poll()}")

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.kill()
            proc.wait()
        self.procs = []


def run_row(row: Row, model: str, mode: str, args, w: Optional["wanmod.Wan"]) -> dict:
    flows = _CompetingFlows(w, args.parties) if args.competing_flow else None
    try:
        return _run_row(row, model, mode, args, w)
    finally:
        if flows is not None:
            flows.close()


def _launch(row: Row, model: str, mode: str, args, w: Optional["wanmod.Wan"], watcher: "_MarkWatcher",
            base_env: Dict[str, str], nworkers: int) -> tuple:
    """Run the row's processes to the end; (exit status, their output, geomx nodes' last metrics)."""
    readings: Dict[str, dict] = {}
    if row.system == "native":
        argvs = [worker_argv(row, model, mode, args, str(i), native=True) for i in range(nworkers)]
        dcs = [f"party{i // args.workers}" for i in range(nworkers)]
        kw = {}
        if w is not None:
            kw = dict(root_host=w.address("central"), root_prefix=w.exec_argv("central"),
                      worker_hosts=[w.address(dc) for dc in dcs], worker_prefixes=[w.exec_argv(dc) for dc in dcs])
        run = run_processes(native_procs(argvs, base_env, **kw), args.timeout, on_line=watcher.line)
        status, text = run["status"], run["log"]
    elif row.system == "ddp":
        try:
            init = ddp_init_file(model, args.seed)
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            init, status, text = None, 1, f"[suite] {exc}\n"
        if init is not None:
            argvs = [worker_argv(row, model, mode, args, str(i), native=False) + ["--init", init]
                     for i in range(nworkers)]
            dcs = [f"party{i // args.workers}" for i in range(nworkers)]  # rank i = worker i % W of party i // W
            kw = dict(store_host="127.0.0.1", iface="lo")
            if w is not None:
                kw = dict(store_host=w.address("central"), store_prefix=w.exec_argv("central"),
                          worker_prefixes=[w.exec_argv(dc) for dc in dcs], iface=wanmod.DC_IFACE)
            port = free_port()
            ready = os.path.join(os.path.dirname(init), f"store-{port}-{time.time_ns()}.ready")
            procs = ddp_worker.ddp_procs(argvs, base_env, store_port=port, timeout=args.timeout, ready_file=ready,
                                         **kw)
            run = run_processes(procs, args.timeout, on_line=watcher.line, tag="ddp")
            status, text = run["status"], run["log"]
    else:
        from geomx.launch import Topology
        from geomx.launch import run as launch_run

        topo = Topology(parties=args.parties, workers_per_party=args.workers, global_servers=row.global_servers,
                        separate_global_servers=row.separate_global_servers, local_servers=row.local_servers,
                        env=base_env,
                        node_env={k: dict(v) for k, v in row.node_env.items()})
        if w is not None:
            topo.dc_hosts = {dc: w.address(dc) for dc in w.dcs}
            topo.dc_prefix = {dc: w.exec_argv(dc) for dc in w.dcs}
        stream = _LineStream(watcher.line)
        with tempfile.TemporaryDirectory(prefix="geomx-suite-keys-") as keys, \
                tempfile.TemporaryDirectory(prefix="geomx-suite-metrics-") as dumps:
            if row.curve:
                topo.make_curve_keys(keys)
            topo.env = dict(topo.env, GEOMX_METRICS_DIR=dumps)  # each node's last figures, at its exit
            argv = worker_argv(row, model, mode, args, "{slice}", native=False)
            if row.system == "geomx-torch":
                argv += ["--init", ddp_init_file(model, args.seed)]
            status = launch_run(topo, argv, timeout=args.timeout, stream=stream, grace=20.0)
            readings = metrics.load_dumps(dumps)
        text = stream.getvalue()
    return status, text, readings


def _run_row(row: Row, model: str, mode: str, args, w: Optional["wanmod.Wan"]) -> dict:
    watcher = _MarkWatcher(w)
    base_env = {"OMP_NUM_THREADS": str(args.omp_threads)}
    base_env.update(row.env)
    nworkers = args.parties * args.workers
    t0 = time.perf_counter()
    # Per link and direction, how much of the timed span it was busy (docs/Benchmarks.md, "Both
    # directions of a link").
    sampling = w is not None and mode == "throughput"
    if sampling:
        w.start_sampling()
    try:
        status, text, readings = _launch(row, model, mode, args, w, watcher, base_env, nworkers)
    finally:
        samples = w.stop_sampling() if sampling else []
    wall = time.perf_counter() - t0
    results = parse_results(text)
    ok = status == 0 and len(results) == nworkers and all(r.get("finite") for r in results)
    out = {"row": row.name, "model": model, "mode": mode, "status": status, "ok": ok, "wall_s": round(wall, 1),
           "workers": len(results)}
    if not ok:
        tail = "\n".join(text.splitlines()[-25:])
        print(f"# {row.name}/{model}/{mode} FAILED (status {status}, {len(results)} results); last output:\n{tail}",
              file=sys.stderr)
        out["log_tail"] = tail
        return out
    if args.keep_logs:
        os.makedirs(args.keep_logs, exist_ok=True)
        with open(os.path.join(args.keep_logs, f"{row.name}_{model}_{mode}.log"), "w") as f:
            f.write(text)
    span = watcher.span()
    rates = w.rates() if w is not None else {}
    out.update(round_trips(readings) or {})
    # CPU time and peak memory of every process: geomx nodes' last metrics, and the workers' results.
    out["resources"] = resources(readings)
    for r in results:
        if "cpu_s" in r:
            out["resources"][f"worker{r['worker']}"] = {"cpu_s": r["cpu_s"], "max_rss_mb": r["max_rss_mb"]}
    if mode == "throughput":
        iters = len(results[0]["iter_ms"])
        out.update(summarise_throughput(results, span, iters, rates, workers_per_party=args.workers))
        if samples and "start" in watcher.times and "end" in watcher.times:
            start = watcher.times["start"]
            out["busy"] = wanmod.busy_fractions(samples, rates, start, watcher.times["end"])
            # Three iterations of each capped link, 10 ms a character (docs/Benchmarks.md shows them).
            out["timeline"] = {dc: wanmod.timeline(samples, rate, dc, start, start + 3 * out["median_s"])
                               for dc, rate in rates.items() if rate is not None}
        out["setup_s"] = max(r["setup_s"] for r in results)
        out["params"] = results[0]["params"]
    else:
        evals = next((r["evals"] for r in results if r["worker"] == 0), [])
        out.update(summarise_accuracy(evals, args.target_acc))
        out["tta_median_s"] = max(statistics.median(r["iter_ms"]) for r in results) / 1e3
        out["tta_iters"] = len(next(r["iter_ms"] for r in results if r["worker"] == 0))
        # Slowest worker's mean time per iteration (HFA/ESync: local steps and averaging rounds together).
        out["tta_mean_s"] = max(r["loop_s"] / len(r["iter_ms"]) for r in results)
        rr = worker_rates(results, args.workers)
        out["tta_party_iters_per_s"] = rr.get("party_iters_per_s")
        if span:
            out["wan_bytes_total"] = sum(c.up for c in span.values())
            out["wan_bytes_per_iter"] = out["wan_bytes_total"] / out["tta_iters"]
            # Samples of worker 0's span (every worker runs the same number of iterations).
            out["wan_bytes_per_sample"] = out["wan_bytes_total"] / (
                sum(len(r["iter_ms"]) for r in results) * results[0]["batch"])
    return out


_DDP_INIT: Dict[tuple, str] = {}


def ddp_init_file(model: str, seed: int) -> str:
    """MXNet's initial weights of ``model``, a probe and the digits arrays, for the DDP rows
    (``suite_worker.py --dump-init``, outside the WAN; once per model and seed, removed at exit)."""
    key = (model, seed)
    if key not in _DDP_INIT:
        d = tempfile.mkdtemp(prefix="geomx-suite-ddp-")
        atexit.register(shutil.rmtree, d, True)
        path = os.path.join(d, f"init_{model}.npz")
        proc = subprocess.run([sys.executable, WORKER, "--dump-init", path, "--model", model, "--seed", str(seed)],
                              capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"suite_worker.py --dump-init failed:\n{proc.stdout}{proc.stderr}")
        _DDP_INIT[key] = path
    return _DDP_INIT[key]


def skip_unavailable(rows: Sequence[Row]) -> tuple:
    """``(rows that can run, [{"row", "reason"}])``: the torch rows need torch with gloo in this
    interpreter's environment (the workers run ``sys.executable``)."""
    if not any(r.system in TORCH_SYSTEMS for r in rows):
        return list(rows), []
    reason = ddp_worker.torch_missing_in(sys.executable)
    if reason is None:
        return list(rows), []
    skipped = [{"row": r.name, "reason": reason} for r in rows if r.system in TORCH_SYSTEMS]
    for s in skipped:
        print(f"# {s['row']}: SKIPPED: {s['reason']}", file=sys.stderr, flush=True)
    return [r for r in rows if r.system not in TORCH_SYSTEMS], skipped


def _print_skipped(args) -> None:
    for s in getattr(args, "skipped_rows", None) or []:
        print(f"\n{s['row']}: skipped: {s['reason']}")


def accuracy_run(row: Row, args, w: Optional["wanmod.Wan"], k: int) -> dict:
    seed = args.seed + k if args.tta_seeds else args.seed
    print(f"# {row.name} / cnn / time to accuracy (run {k + 1}/{args.tta_repeats}, "
          f"{row.tta_iters if row.tta_iters is not None else args.tta_iters} iterations, seed {seed}) ...",
          file=sys.stderr, flush=True)
    # With --tta-seeds the k-th run starts from seed + k (initial weights and data order): repeats with one
    # seed are the same computation and differ only in timing, while where a curve crosses the target
    # moves with the seed (docs/Benchmarks.md, "torch DDP on the same WAN").
    r = run_row(row, "cnn", "accuracy", argparse.Namespace(**{**vars(args), "seed": seed}), w)
    r["seed"] = seed
    if r.get("ok"):
        print(f"#   time to {args.target_acc:.0%}: {_f(r.get('time_to_target_s'), '.1f')} s, "
              f"final {_f(r.get('final_acc'), '.3f')}, {r['tta_mean_s']:.3f} s/iter, "
              f"WAN {_f((r.get('wan_bytes_per_iter') or 0) / 1e6, '.2f')} MB/iter, run {r['wall_s']} s",
              file=sys.stderr, flush=True)
    return r


def _config(args, rows: Sequence[Row], rates: Mapping[str, Optional[float]]) -> dict:
    skipped = getattr(args, "skipped_rows", None)  # rows left out (the DDP rows without torch)
    return {"wan": args.wan, "rates": dict(rates), "parties": args.parties, "workers_per_party": args.workers,
            "batch_size": args.batch_size, "iters": args.iters, "warmup": args.warmup,
            "big_iters": args.big_iters, "big_warmup": args.big_warmup, "repeats": args.repeats,
            "tta_iters": args.tta_iters, "tta_repeats": args.tta_repeats, "eval_every": args.eval_every,
            "target_acc": args.target_acc, "omp_threads": args.omp_threads, "quick": args.quick,
            "competing_flow": args.competing_flow, "rows": [dataclasses.asdict(r) for r in rows],
            "geomx_commit": _git_head(), **({"skipped_rows": skipped} if skipped else {})}


def run_summary(args, rows: Sequence[Row], w: Optional["wanmod.Wan"], t_all: float) -> int:
    """``--summary``: every row ``--tta-repeats`` times, the rows interleaved (repeat 1 of every row,
    then repeat 2, ...: a drift of the machine spreads over all rows); the JSON report is rewritten after
    every run, so an interrupted summary keeps what it measured."""
    runs: Dict[str, List[dict]] = {r.name: [] for r in rows}
    report: dict = {}
    load_before = os.getloadavg()
    for k in range(args.tta_repeats):
        for row in rows:
            runs[row.name].append(accuracy_run(row, args, w, k))
            merged = []
            for r in rows:
                if runs[r.name]:
                    m = summarymod.merge_accuracy_runs(runs[r.name])
                    m["run_details"] = [{x: v for x, v in run.items() if x != "log_tail"} for run in runs[r.name]]
                    merged.append(m)
            summarymod.add_ratios(merged)
            report = {"benchmark": "summary", "date": datetime.datetime.now().isoformat(timespec="seconds"),
                      "command": " ".join(["benchmarks/suite.py"] + (sys.argv[1:] if sys.argv else [])),
                      "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                  "python": platform.python_version(), "loadavg_before": load_before,
                                  "loadavg_now": os.getloadavg()},
                      "config": _config(args, rows, w.rates() if w is not None else {}),
                      "rows": merged, "total_s": round(time.perf_counter() - t_all, 1)}
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1, default=str)
    table = summarymod.markdown(report)
    print(table)
    _print_skipped(args)
    md = os.path.splitext(args.out)[0] + ".md"
    with open(md, "w") as f:
        f.write(table + "\n")
    if args.plot:
        os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
        summarymod.plot(report, args.plot)
    print(f"\n(wrote {args.out}, {md} and {args.plot}; total {report['total_s']} s)", file=sys.stderr)
    return 0 if all(r.get("ok_runs") == args.tta_repeats for r in report["rows"]) else 1


def merge_repeats(runs: List[dict]) -> dict:
    """One row from repeated throughput runs: the median run, with the spread (max/min - 1) of medians."""
    good = [r for r in runs if r.get("ok")]
    if not good:
        return runs[-1]
    good.sort(key=lambda r: r["median_s"])
    mid = dict(good[len(good) // 2])
    meds = [r["median_s"] for r in good]
    mid["repeats"] = meds
    mid["spread"] = (max(meds) / min(meds) - 1.0) if len(meds) > 1 else None
    return mid


def _git_head() -> Optional[str]:
    try:
        return subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="few iterations, one repeat: < 10 minutes on 2 cores")
    p.add_argument("--summary", action="store_true",
                   help="the summary of docs/Benchmarks.md: every row of benchmarks/summary.py's SUMMARY_ROWS, "
                        f"accuracy runs only, --tta-repeats 3, WAN {summarymod.SUMMARY_WAN}; writes "
                        "bench_out/summary.{json,md} and docs/images/summary.png")
    p.add_argument("--wan", default=None, help="link spec (geomx.testing.wan; default 20mbit on every party link, "
                   "central uncapped; --summary: " + summarymod.SUMMARY_WAN + "); 'off' runs on loopback "
                   "without namespaces (no bytes, no bound)")
    p.add_argument("--rows", default=None,
                   help="rows to run, in order (default: all but " +
                        ", ".join(r.name for r in ROWS if not r.default) + ")")
    p.add_argument("--models", default=None, help="throughput models (cnn, big; 'none': accuracy runs only)")
    p.add_argument("--tta-repeats", type=int, default=None, help="accuracy runs per row (1; --summary 3)")
    p.add_argument("--no-accuracy", action="store_true", help="skip the time-to-accuracy runs")
    p.add_argument("--parties", type=int, default=2)
    p.add_argument("--workers", type=int, default=2, help="workers per party")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--iters", type=int, default=None, help="timed iterations, cnn (full 20, quick 8)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up iterations, cnn (full 3, quick 2)")
    p.add_argument("--big-iters", type=int, default=None, help="timed iterations, big (full 5, quick 2)")
    p.add_argument("--big-warmup", type=int, default=None, help="warm-up iterations, big (full 1, quick 1)")
    p.add_argument("--repeats", type=int, default=None, help="throughput runs per row (full 2, quick 1)")
    p.add_argument("--tta-iters", type=int, default=None, help="iterations of the accuracy run (full 120, quick 50)")
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--target-acc", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--tta-seeds", action="store_true",
                   help="accuracy run k of each row starts from seed + k (default: every run from --seed)")
    p.add_argument("--omp-threads", type=int, default=1)
    p.add_argument("--timeout", type=float, default=None, help="per-run timeout, s (full 900, quick 400)")
    p.add_argument("--keep-logs", default=None, metavar="DIR")
    p.add_argument("--competing-flow", action="store_true",
                   help="run a bulk TCP flow from every party to the central DC during every run "
                        "(a congested WAN, for the DGT rows)")
    p.add_argument("--out", default=None, help="JSON report (bench_out/suite.json; --summary: bench_out/summary.json)")
    p.add_argument("--plot", default=None, help="PNG (bench_out/suite.png; --summary: docs/images/summary.png)")
    args = p.parse_args(argv)
    q = args.quick
    for name, default, summary in (
            ("wan", "20mbit", summarymod.SUMMARY_WAN),
            ("rows", ",".join(r.name for r in ROWS if r.default), ",".join(summarymod.SUMMARY_ROWS)),
            ("models", "cnn,big", "none"), ("tta_repeats", 1, 3),
            ("out", "bench_out/suite.json", "bench_out/summary.json"),
            ("plot", "bench_out/suite.png", os.path.join(REPO, "docs", "images", "summary.png"))):
        if getattr(args, name) is None:
            setattr(args, name, summary if args.summary else default)
    for name, full, quick in (("iters", 20, 8), ("warmup", 3, 2), ("big_iters", 5, 2), ("big_warmup", 1, 1),
                              ("repeats", 2, 1), ("tta_iters", 120, 50), ("timeout", 900.0, 400.0)):
        if getattr(args, name) is None:
            setattr(args, name, quick if q else full)

    rows = [row_by_name(n.strip()) for n in args.rows.split(",") if n.strip()]
    rows, args.skipped_rows = skip_unavailable(rows)
    models = [m.strip() for m in args.models.split(",") if m.strip() and m.strip() != "none"]
    for m in models:
        if m not in MODELS:
            p.error(f"unknown model {m!r}")

    w = None
    if args.wan != "off":
        try:
            # Global servers with links of their own (row geomx-2gs-links) need data centers gsN.
            gs_dcs = max([r.global_servers for r in rows if r.separate_global_servers] or [0])
            spec = wanmod.parse_spec(args.wan, args.parties, gs_dcs)
            w = wanmod.Wan.create(wanmod.dc_names(args.parties, gs_dcs), spec)
        except wanmod.WanError as exc:
            print(f"suite: {exc}", file=sys.stderr)
            return 2
    t_all = time.perf_counter()
    report_rows: List[dict] = []
    if args.summary:
        try:
            print(f"# emulated WAN: {w.describe() if w is not None else 'off'}", file=sys.stderr, flush=True)
            return run_summary(args, rows, w, t_all)
        finally:
            if w is not None:
                w.close()
    try:
        if w is not None:
            print(f"# emulated WAN: {w.describe()}", file=sys.stderr, flush=True)
        for model in models:
            for row in rows:
                runs = []
                for k in range(args.repeats):
                    print(f"# {row.name} / {model} / throughput (run {k + 1}/{args.repeats}) ...",
                          file=sys.stderr, flush=True)
                    r = run_row(row, model, "throughput", args, w)
                    if r.get("ok"):
                        parts = ", ".join(f"{p} {v:.2f} it/s" for p, v in (r.get("party_iters_per_s") or {}).items())
                        print(f"#   {r['median_s']:.3f} s/iter, bound {_f(r.get('bound_s'), '.3f')} s, "
                              f"WAN {_f(r.get('wan_bytes_per_iter', 0) / 1e6, '.2f')} MB/iter, "
                              f"{_f(r.get('wan_bytes_per_sample'), '.0f')} B/sample, {parts}, "
                              f"run {r['wall_s']} s", file=sys.stderr, flush=True)
                    runs.append(r)
                report_rows.append(merge_repeats(runs))
        if not args.no_accuracy:
            for row in rows:
                runs = [accuracy_run(row, args, w, k) for k in range(args.tta_repeats)]
                r = runs[0] if len(runs) == 1 else dict(summarymod.merge_accuracy_runs(runs), runs=runs)
                target = next((x for x in report_rows if x["row"] == row.name and x["model"] == "cnn"), None)
                if target is None:
                    target = {"row": row.name, "model": "cnn", "ok": r.get("ok"), "status": r.get("status")}
                    report_rows.append(target)
                target["accuracy_run"] = {k: v for k, v in r.items() if k != "evals"}
                for k in ("time_to_target_s", "iters_to_target", "final_acc", "evals"):
                    target[k] = r.get(k)
                for k in ("time_to_target_global_s", "iters_to_target_global"):
                    if k in r:
                        target[k] = r[k]
    finally:
        rates = w.rates() if w is not None else {}
        if w is not None:
            w.close()
    # Speedups against native on the same model.
    for r in report_rows:
        nat = next((x for x in report_rows if x["row"] == "native" and x["model"] == r["model"]), None)
        if nat and nat.get("ok") and r.get("ok") and r.get("median_s"):
            r["ratio"] = nat["median_s"] / r["median_s"]
            if nat.get("time_to_target_s") and r.get("time_to_target_s"):
                r["tta_ratio"] = nat["time_to_target_s"] / r["time_to_target_s"]
    report = {
        "benchmark": "suite",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([os.path.relpath(sys.argv[0], REPO) if sys.argv[0] else "suite.py"] + sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_after": os.getloadavg()},
        "config": dict(_config(args, rows, rates), models={m: MODELS[m] for m in models},
                       bound="max(compute, (up+down bytes)/rate on the bottleneck link), per iteration"),
        "rows": report_rows,
        "total_s": round(time.perf_counter() - t_all, 1),
    }
    table = markdown(report)
    report["table_markdown"] = table
    print(table)
    sync = markdown_sync(report)
    report["sync_table_markdown"] = sync
    print("\nPer party (iterations/s over each worker's own timed loop, mean per party), WAN bytes per "
          "sample, time to accuracy; ratios against geomx-fsa:\n")
    print(sync)
    if any(r.get("busy") for r in report_rows):
        busy = markdown_busy(report)
        report["busy_table_markdown"] = busy
        print("\nPer capped link and direction: busy = share of the timed span's 10 ms samples carrying at "
              "least a tenth of the rate; used = bytes / (rate x time):\n")
        print(busy)
        for r in report_rows:
            for dc, (up, down) in sorted((r.get("timeline") or {}).items()):
                print(f"\n{r['row']} {dc} up:   {up}\n{r['row']} {dc} down: {down}")
    if any(r.get("row", "").startswith("geomx-dgt") for r in report_rows):
        tail = markdown_tail(report)
        report["tail_table_markdown"] = tail
        print("\nTail of the iteration time (slowest worker's p90) and accuracy; ratios against geomx-fsa:\n")
        print(tail)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1, default=str)
    if args.plot:
        plot(report, args.plot)
    _print_skipped(args)
    print(f"\n(wrote {args.out} and {args.plot}; total {report['total_s']} s)", file=sys.stderr)
    return 0 if all(r.get("ok") for r in report_rows) else 1


if __name__ == "__main__":
    sys.exit(main())
