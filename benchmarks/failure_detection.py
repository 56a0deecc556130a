"""Time to detect a dead node and to stop the rest of the topology, per role, on loopback.

For each role (worker, local server, global server, party scheduler, central scheduler, global
scheduler) and each heartbeat setting, a topology of 2 parties x 1 worker trains
(tests/workers/exact_worker.py, slowed down); once a round is done the role's process is SIGKILLed and
the script records

* detect: seconds from the kill to the first log line that declares it dead (``presumed dead``);
* all stopped: seconds from the kill until every other process has exited (each with an error).

It uses the same hand-started cluster as tests/test_faults.py (tests/helpers.py's Cluster; not the
launcher, which would stop everything as soon as one process dies and so hide how geomx itself reacts).

    python benchmarks/failure_detection.py                       # default and short heartbeats
    python benchmarks/failure_detection.py --settings 0.5/3 --roles worker,global_scheduler
"""
from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))

from helpers import Cluster, slow_cmd  # noqa: E402

from geomx.launch import Topology  # noqa: E402

VICTIMS = {
    "worker": "party1/worker0",
    "local_server": "party1/server",
    "global_server": "global_server0",
    "party_scheduler": "party1/scheduler",
    "central_scheduler": "central/scheduler",
    "global_scheduler": "global_scheduler",
}


def measure(role: str, interval: float, timeout: float) -> dict:
    env = {"PS_HEARTBEAT_INTERVAL": str(interval), "PS_HEARTBEAT_TIMEOUT": str(timeout),
           "GEOMX_START_TIMEOUT": "90"}
    victim = VICTIMS[role]
    cluster = Cluster(Topology(parties=2, workers_per_party=1, env=env), slow_cmd(400, 0.25))
    with cluster:
        cluster.log.wait_for(r"^\[party1/worker0\] ROUND 1 OK", 180)
        seen = len(cluster.log.lines())
        killed = cluster.kill(victim)
        detect = None
        while time.monotonic() - killed < timeout + 60:
            lines = cluster.log.lines()
            if detect is None and any("presumed dead" in line for line in lines[seen:]):
                detect = time.monotonic() - killed
            if detect is not None and not cluster.running():
                break
            time.sleep(0.02)
        stopped = time.monotonic() - killed if not cluster.running() else None
        left = cluster.running()
        codes = {n: p.returncode for n, p in cluster.procs.items() if n != victim}
    return {"role": role, "victim": victim, "interval": interval, "timeout": timeout, "detect_s": detect,
            "stopped_s": stopped, "left": left, "all_failed": all(c not in (0, None) for n, c in codes.items()
                                                                    if n != "central/master_worker")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--roles", default=",".join(VICTIMS))
    p.add_argument("--settings", default="1/20,0.5/3",
                   help="PS_HEARTBEAT_INTERVAL/PS_HEARTBEAT_TIMEOUT pairs (default: geomx's 1/20 and 0.5/3)")
    args = p.parse_args(argv)
    rows = []
    for setting in args.settings.split(","):
        interval, timeout = (float(x) for x in setting.split("/"))
        for role in args.roles.split(","):
            r = measure(role.strip(), interval, timeout)
            print(f"# {r}", file=sys.stderr, flush=True)
            rows.append(r)
    print("| killed | heartbeat interval / timeout (s) | dead node declared after (s) | every other process "
          "exited after (s) | all others exited non-zero |")
    print("|---|---|---|---|---|")
    for r in rows:
        fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        left = f" (left: {', '.join(r['left'])})" if r["left"] else ""
        print(f"| {r['role'].replace('_', ' ')} (`{r['victim']}`) | {r['interval']:g} / {r['timeout']:g} | "
              f"{fmt(r['detect_s'])} | {fmt(r['stopped_s'])}{left} | {'yes' if r['all_failed'] else 'no'} |")
    print(f"\n(load average after: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    return 0 if all(r["stopped_s"] is not None for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
