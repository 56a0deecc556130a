"""Push/pull benchmark on loopback: geomx versus MXNet's native ps-lite ``dist_sync``, side by side.

Both systems run ``benchmarks/pushpull_worker.py`` with 4 training workers:

* geomx: ``Topology(parties=2, workers_per_party=2, global_servers=1)`` (2 parties x 2 workers, one
  local server per party, one global server; plus the central party's master worker, which only
  sets the optimizer and initialises the keys), started with ``geomx.launch.run``;
* native: one ps-lite scheduler + one server (``python -c "import mxnet"``) and 4 workers with
  ``DMLC_ROLE=worker`` running the worker script with ``--native``.

Every worker times ``--iters`` iterations (after ``--warmup``) of "pushpull every key, then
``mx.nd.waitall()``". Per run, the benchmark takes each worker's median and reports the slowest
worker (max over workers). Prints a Markdown table and writes a JSON file.

Usage::

    python benchmarks/bench_pushpull.py --params 1.6M,25M --iters 20 --warmup 3 --out bench_out/pushpull.json
"""
from __future__ import annotations

import argparse
import datetime
import http.client
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "pushpull_worker.py")
RESULT_TAG = "PUSHPULL_RESULT "

sys.path.insert(0, HERE)
from native_launch import native_procs, run_processes  # noqa: E402
from pushpull_worker import model_shapes, num_params  # noqa: E402  (no MXNet import at module level)


def parse_size(text: str) -> int:
    t = text.strip().upper()
    mult = 1
    if t.endswith("K"):
        mult, t = 1_000, t[:-1]
    elif t.endswith("M"):
        mult, t = 1_000_000, t[:-1]
    elif t.endswith("G"):
        mult, t = 1_000_000_000, t[:-1]
    return int(round(float(t) * mult))


def _git_head() -> Optional[str]:
    try:
        return subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def parse_results(text: str) -> List[dict]:
    out = []
    for line in text.splitlines():
        i = line.find(RESULT_TAG)
        if i >= 0:
            out.append(json.loads(line[i + len(RESULT_TAG):]))
    return out


# -- geomx ---------------------------------------------------------------------------------------

def run_geomx(params: int, args, extra_env: Dict[str, str]) -> dict:
    from geomx.launch import Topology, run  # no MXNet import in the launcher

    env = dict(extra_env)
    if args.geomx_src:
        # Benchmark another checkout of geomx (e.g. `git archive <commit> geomx | tar -x -C DIR`).
        env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.abspath(args.geomx_src),
                                                        os.environ.get("PYTHONPATH")) if p)
    topo = Topology(parties=2, workers_per_party=2, global_servers=1, env=env)
    cmd = [sys.executable, WORKER, "--params", str(params), "--iters", str(args.iters),
           "--warmup", str(args.warmup), "--seed", str(args.seed), "--slice", "{slice}"]
    scraper = None
    if args.scrape:
        from geomx.launch.topology import free_port_range

        count = len(topo.processes(cmd))
        topo.metrics_base = free_port_range(count)
        scraper = Scraper([topo.metrics_base + i for i in range(count)], args.scrape)
    if args.profile_dir:
        cmd += ["--profile", os.path.join(args.profile_dir, f"geomx_{params}_worker{{slice}}.prof")]
    stream = io.StringIO()
    cwd = os.getcwd()
    t0 = time.perf_counter()
    try:
        if args.geomx_src:
            # `python -m geomx.node` puts the working directory before PYTHONPATH.
            os.chdir(args.geomx_src)
        status = run(topo, cmd, timeout=args.timeout, stream=stream, grace=20.0)
    finally:
        os.chdir(cwd)
        if scraper is not None:
            scraper.stop()
    wall = time.perf_counter() - t0
    text = stream.getvalue()
    out = {"status": status, "wall_s": wall, "results": parse_results(text), "log": text}
    if scraper is not None:
        out["scrapes"] = scraper.answered
    return out


class Scraper:
    """Reads every process's ``/metrics`` each ``interval`` seconds while a run lasts, as a Prometheus
    server would (``--scrape``): what serving and collecting the metrics costs the data path."""

    def __init__(self, ports: List[int], interval: float):
        self.ports, self.interval = ports, interval
        self.answered = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for port in self.ports:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                        r.read()
                    self.answered += 1
                except (OSError, http.client.HTTPException):
                    pass  # not up yet, or gone (mid-answer)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# -- native MXNet ps-lite ------------------------------------------------------------------------

def run_native(params: int, args, extra_env: Dict[str, str], num_workers: int = 4) -> dict:
    worker_argvs = []
    for i in range(num_workers):
        cmd = [sys.executable, WORKER, "--native", "--native-op", args.native_op, "--params", str(params),
               "--iters", str(args.iters), "--warmup", str(args.warmup), "--seed", str(args.seed),
               "--slice", str(i)]
        if args.profile_dir:
            cmd += ["--profile", os.path.join(args.profile_dir, f"native_{params}_worker{{slice}}.prof")]
        worker_argvs.append(cmd)
    run = run_processes(native_procs(worker_argvs, extra_env), args.timeout)
    run["results"] = parse_results(run["log"])
    return run


# -- summary -------------------------------------------------------------------------------------

def summarise(system: str, params: int, run: dict, expected_workers: int = 4) -> dict:
    res = run["results"]
    ok = run["status"] == 0 and len(res) == expected_workers and all(r.get("finite") for r in res)
    row = {"system": system, "params": params, "status": run["status"], "ok": ok,
           "workers": len(res), "wall_s": round(run["wall_s"], 2)}
    if "scrapes" in run:
        row["scrapes"] = run["scrapes"]  # /metrics readings answered during the run (--scrape)
    if res:
        medians = [statistics.median(r["iter_ms"]) for r in res]
        row.update({
            "worker_median_ms": [round(m, 2) for m in medians],
            "median_ms": round(max(medians), 2),
            "bytes_per_push": res[0]["bytes_per_push"],
            "setup_s": max(r["setup_s"] for r in res),
            "iter_ms": {str(r["worker"]): r["iter_ms"] for r in res},
        })
        mb = res[0]["bytes_per_push"] / 1e6
        row["mb_pushed_per_worker"] = round(mb, 3)
        # Per worker, every iteration pushes the model and pulls it back.
        row["throughput_mb_s"] = round(2 * mb / (row["median_ms"] / 1e3), 1)
    return row


def fmt_size(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def markdown(rows: List[dict], ratios: Dict[int, Optional[float]]) -> str:
    lines = ["| model (float32 params) | system | median ms/iter (max over workers) | MB pushed/worker/iter "
             "| push+pull MB/s per worker | native/geomx |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = ratios.get(r["params"])
        size = f"{fmt_size(r['params'])} ({r.get('mb_pushed_per_worker', '?')} MB)"
        if not r["ok"]:
            lines.append(f"| {size} | {r['system']} | FAILED (status {r['status']}, {r['workers']} results) "
                         "| | | |")
            continue
        lines.append(f"| {size} | {r['system']} | {r['median_ms']:.1f} | {r['mb_pushed_per_worker']:.2f} | "
                     f"{r['throughput_mb_s']:.0f} | "
                     f"{'' if r['system'] != 'geomx' or ratio is None else f'{ratio:.2f}'} |")
    return "\n".join(lines)


def _timed_cpu(run_fn, *run_args) -> Tuple[dict, float]:
    """``run_fn(*run_args)`` and the CPU seconds (user + system) its child processes used; every child is
    waited for before the runners return, so RUSAGE_CHILDREN has counted them all."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    run = run_fn(*run_args)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return run, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="1.6M,25M", help="comma-separated model sizes (float32 parameters)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--timeout", type=float, default=150.0, help="per-run timeout in seconds")
    p.add_argument("--systems", default="native,geomx", help="which systems to run, in order")
    p.add_argument("--native-op", choices=["pushpull", "push-pull"], default="pushpull",
                   help="native step: kv.pushpull (default) or kv.push + kv.pull")
    p.add_argument("--omp-threads", type=int, default=1,
                   help="OMP_NUM_THREADS for every process of both systems (default 1: 2-vCPU box)")
    p.add_argument("--profile-dir", default=None, help="cProfile the timed loop of every worker into DIR")
    p.add_argument("--keep-logs", default=None, metavar="DIR", help="write every process's output to DIR")
    p.add_argument("--geomx-src", default=None, metavar="DIR",
                   help="put DIR first on PYTHONPATH of every geomx process (benchmark another checkout "
                        "whose geomx package is DIR/geomx); default: the installed geomx")
    p.add_argument("--scrape", type=float, default=0.0, metavar="SECONDS",
                   help="geomx: serve every process's metrics and read them all every SECONDS during the run, "
                        "as a Prometheus server would (default 0: not served)")
    p.add_argument("--cpu-extra-iters", type=int, default=0, metavar="N",
                   help="also measure CPU time per iteration, summed over every process of a system: run "
                        "each system again with N more timed iterations and divide the difference in the "
                        "processes' CPU time by N (start-up and imports cancel out). Unlike wall time, this "
                        "does not depend on what else the machine runs")
    p.add_argument("--out", default="bench_out/pushpull.json")
    args = p.parse_args(argv)
    if args.geomx_src:
        args.geomx_src = os.path.abspath(args.geomx_src)
    if args.profile_dir:
        args.profile_dir = os.path.abspath(args.profile_dir)

    sizes = [parse_size(s) for s in args.params.split(",") if s.strip()]
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    for s in systems:
        if s not in ("native", "geomx"):
            p.error(f"unknown system {s!r}")
    if args.profile_dir:
        os.makedirs(args.profile_dir, exist_ok=True)
    extra_env = {"OMP_NUM_THREADS": str(args.omp_threads)}

    rows: List[dict] = []
    ratios: Dict[int, Optional[float]] = {}
    cpu_ratios: Dict[int, float] = {}
    t_all = time.perf_counter()
    for size in sizes:
        actual = num_params(model_shapes(size))
        by_system = {}
        for system in systems:
            print(f"# running {system}: {fmt_size(actual)} parameters ({len(model_shapes(size))} tensors), "
                  f"{args.warmup} warm-up + {args.iters} timed iterations ...", file=sys.stderr, flush=True)
            runner = run_geomx if system == "geomx" else run_native
            run, cpu_s = _timed_cpu(runner, size, args, extra_env)
            if args.keep_logs:
                os.makedirs(args.keep_logs, exist_ok=True)
                with open(os.path.join(args.keep_logs, f"{system}_{actual}.log"), "w") as f:
                    f.write(run["log"])
            row = summarise(system, actual, run)
            row["loadavg_1min_after"] = round(os.getloadavg()[0], 2)
            if not row["ok"]:
                tail = "\n".join(run["log"].splitlines()[-30:])
                print(f"# {system} FAILED (status {run['status']}); last output:\n{tail}", file=sys.stderr)
            else:
                print(f"#   {system}: {row['median_ms']:.1f} ms/iter (workers {row['worker_median_ms']}), "
                      f"run took {row['wall_s']:.1f}s", file=sys.stderr, flush=True)
            if args.cpu_extra_iters > 0 and row["ok"]:
                longer = argparse.Namespace(**{**vars(args), "iters": args.iters + args.cpu_extra_iters,
                                               "profile_dir": None})
                run2, cpu2_s = _timed_cpu(runner, size, longer, extra_env)
                if summarise(system, actual, run2)["ok"]:
                    row["cpu_ms_per_iter"] = round((cpu2_s - cpu_s) / args.cpu_extra_iters * 1e3, 1)
                    print(f"#   {system}: {row['cpu_ms_per_iter']:.1f} CPU ms/iter over all processes",
                          file=sys.stderr, flush=True)
            rows.append(row)
            by_system[system] = row
        n, g = by_system.get("native"), by_system.get("geomx")
        ratios[actual] = (round(n["median_ms"] / g["median_ms"], 3)
                          if n and g and n["ok"] and g["ok"] else None)
        if n and g and n.get("cpu_ms_per_iter") and g.get("cpu_ms_per_iter"):
            cpu_ratios[actual] = round(n["cpu_ms_per_iter"] / g["cpu_ms_per_iter"], 3)

    table = markdown(rows, ratios)
    print(table)
    for size, r in cpu_ratios.items():
        print(f"CPU time per iteration, all processes, {fmt_size(size)}: native/geomx = {r}")
    report = {
        "benchmark": "pushpull",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "config": {"params": sizes, "iters": args.iters, "warmup": args.warmup, "seed": args.seed,
                   "native_op": args.native_op, "omp_threads": args.omp_threads,
                   "geomx_src": args.geomx_src, "geomx_commit": _git_head(), "scrape_s": args.scrape,
                   "geomx_topology": "parties=2, workers_per_party=2, global_servers=1",
                   "native_topology": "1 scheduler, 1 server, 4 workers (ps-lite dist_sync)",
                   "tensors": {str(fmt_size(num_params(model_shapes(s)))): model_shapes(s) for s in sizes}},
        "rows": rows,
        "ratio_native_over_geomx": {str(k): v for k, v in ratios.items()},
        "cpu_ratio_native_over_geomx": {str(k): v for k, v in cpu_ratios.items()},
        "total_s": round(time.perf_counter() - t_all, 1),
        "table_markdown": table,
    }
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"\n(wrote {args.out}; total {report['total_s']} s)", file=sys.stderr)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
