"""Scale-out: 2, 4 and 8 parties (1 worker each, the examples' CNN) with 1 and 2 global servers.

For each number of parties and row (``geomx-fsa``: one global server; ``geomx-2gs``: two, tensors of
>= 100000 elements split over both) two throughput runs of ``benchmarks/suite.py`` on the same kind
of emulated WAN (default 100 Mbit/s per party link + 25 ms one way, central uncapped): a short one
(``--short`` timed iterations) and a long one (``--long``). Per configuration:

* s/iter and WAN MB/iter of the long run (slowest worker's median; all links);
* CPU of the global server(s) per iteration = (CPU of the long run - CPU of the short run) /
  (iteration difference): start-up, MXNet's import and the optimizer's creation cancel out;
* peak memory (max RSS) per process kind: worker, local server, global server, scheduler.

    sudo python benchmarks/scaleout.py                       # ~12 min on 2 cores
    sudo python benchmarks/scaleout.py --parties 2,4 --wan 20mbit,delay=50ms

Writes ``bench_out/scaleout.json`` and prints a Markdown table. The per-process memory and the global
server's CPU per iteration feed the extrapolation in docs/Benchmarks.md ("Scale-out").
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import suite  # noqa: E402

KINDS = (("worker", "worker"), ("local server", "local_server"), ("global server", "global_server"),
         ("scheduler", "scheduler"))


def kind_of(name: str) -> Optional[str]:
    """Process kind from its name in the metrics (``party3/local_server0``, ``central/global_server1``) or
    a worker's result (``worker2``)."""
    for kind, part in KINDS:
        if part in name:
            return kind
    return None


def global_cpu(row: dict) -> float:
    return sum(v["cpu_s"] for k, v in row.get("resources", {}).items() if kind_of(k) == "global server")


def memory_by_kind(row: dict) -> Dict[str, float]:
    """Largest peak RSS (MB) per process kind in a run."""
    out: Dict[str, List[float]] = {}
    for name, v in row.get("resources", {}).items():
        kind = kind_of(name)
        if kind:
            out.setdefault(kind, []).append(v["max_rss_mb"])
    return {k: max(v) for k, v in out.items()}


def one(parties: int, row: str, iters: int, args) -> dict:
    out = os.path.join(args.out_dir, f"scale_p{parties}_{row}_{iters}.json")
    suite.main(["--wan", args.wan, "--parties", str(parties), "--workers", "1", "--rows", row,
                "--models", "cnn", "--no-accuracy", "--iters", str(iters), "--warmup", "2", "--repeats", "1",
                "--out", out, "--plot", ""])
    with open(out) as f:
        rows = json.load(f)["rows"]
    return rows[0]


def table(results: List[dict]) -> str:
    lines = ["| parties | global servers | s/iter | WAN MB/iter | global-server CPU ms/iter | worker MB "
             "| local server MB | global server MB | scheduler MB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if not r.get("ok"):
            lines.append(f"| {r['parties']} | {r['global_servers']} | FAILED | | | | | | |")
            continue
        mem = r["memory_mb"]
        lines.append(
            f"| {r['parties']} | {r['global_servers']} | {r['s_per_iter']:.3f} | {r['wan_mb_per_iter']:.2f} "
            f"| {r['gs_cpu_ms_per_iter']:.1f} | {mem.get('worker', 0):.0f} | {mem.get('local server', 0):.0f} "
            f"| {mem.get('global server', 0):.0f} | {mem.get('scheduler', 0):.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parties", default="2,4,8")
    p.add_argument("--rows", default="geomx-fsa,geomx-2gs")
    p.add_argument("--wan", default="100mbit,delay=25ms")
    p.add_argument("--short", type=int, default=10)
    p.add_argument("--long", type=int, default=40)
    p.add_argument("--out-dir", default="bench_out")
    args = p.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    results = []
    for parties in [int(x) for x in args.parties.split(",")]:
        for row in args.rows.split(","):
            short, long_ = one(parties, row, args.short, args), one(parties, row, args.long, args)
            r = {"parties": parties, "row": row, "global_servers": suite.row_by_name(row).global_servers,
                 "ok": bool(short.get("ok") and long_.get("ok"))}
            if r["ok"]:
                r.update(s_per_iter=long_["median_s"], wan_mb_per_iter=long_["wan_bytes_per_iter"] / 1e6,
                         gs_cpu_ms_per_iter=(global_cpu(long_) - global_cpu(short)) / (args.long - args.short) * 1e3,
                         gs_cpu_s=[global_cpu(short), global_cpu(long_)], memory_mb=memory_by_kind(long_),
                         compute_s=long_["compute_s"], bottleneck=long_.get("bottleneck"),
                         resources=long_.get("resources"))
            results.append(r)
            print(table(results), flush=True)
    report = {"benchmark": "scaleout", "wan": args.wan, "short": args.short, "long": args.long,
              "loadavg_after": os.getloadavg(), "median_gs_cpu_ms": statistics.median(
                  [r["gs_cpu_ms_per_iter"] for r in results if r.get("ok")] or [0.0]), "results": results}
    with open(os.path.join(args.out_dir, "scaleout.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(table(results))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
