"""Final accuracy of examples/cnn.py (digits, Adam on the global server) with and without a global
server killed mid-training and restarted from its checkpoint. Prints both runs' final test accuracy
per worker, and whether they are identical.

    python benchmarks/restart_accuracy.py [--parties 2] [--epochs 3] [--kill-at 20] [--every 5]

The interrupted run SIGKILLs global_server0 once a worker reports iteration ``--kill-at`` and starts
it again with GEOMX_CHECKPOINT_RESTORE (tests/helpers.py's Cluster runs the processes).
"""
from __future__ import annotations

import argparse
import io
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from helpers import Cluster  # noqa: E402

from geomx import checkpoint  # noqa: E402
from geomx.launch import Topology, run  # noqa: E402

FINAL = re.compile(r"^\[(party\d+/worker\d+)\] .*\[Epoch \d+\]\[Iteration (\d+)\] Test Acc ([\d.]+)")


def finals(text: str) -> dict:
    """worker -> (last iteration, accuracy) from its last accuracy line."""
    out = {}
    for line in text.splitlines():
        m = FINAL.search(line)
        if m:
            out[m.group(1)] = (int(m.group(2)), float(m.group(3)))
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--parties", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--kill-at", type=int, default=20)
    p.add_argument("--every", type=int, default=5)
    args = p.parse_args()
    cmd = [sys.executable, str(REPO / "examples" / "cnn.py"), "--cpu", "-ds", "{slice}", "-ep", str(args.epochs),
           "--eval-every", "10"]

    def topology(directory: str) -> Topology:
        return Topology(parties=args.parties, workers_per_party=1, env={
            "GEOMX_CHECKPOINT_DIR": directory, "GEOMX_CHECKPOINT_EVERY": str(args.every),
            "PS_HEARTBEAT_INTERVAL": "0.5", "PS_HEARTBEAT_TIMEOUT": "3", "GEOMX_RESTART_TIMEOUT": "120"})

    with tempfile.TemporaryDirectory() as d1, tempfile.TemporaryDirectory() as d2:
        stream = io.StringIO()
        start = time.monotonic()
        code = run(topology(d1), cmd, timeout=900, stream=stream)
        plain = finals(stream.getvalue())
        print(f"uninterrupted: exit {code}, {time.monotonic() - start:.0f}s, {plain}", flush=True)

        start = time.monotonic()
        with Cluster(topology(d2), cmd) as cluster:
            cluster.log.wait_for(rf"^\[party0/worker0\] .*\[Iteration {args.kill_at}\] Test Acc", 600)
            cluster.kill("global_server0")
            cluster.procs["global_server0"].wait(10)
            time.sleep(4)  # let the schedulers notice (PS_HEARTBEAT_TIMEOUT 3 s)
            cluster.restart("global_server0",
                            GEOMX_CHECKPOINT_RESTORE=checkpoint.file_name(d2, 0))
            ended = cluster.wait_all(900)
            text = cluster.log.text()
            codes = {n: p.returncode for n, p in cluster.procs.items()}
        restarted = finals(text)
        print(f"interrupted:   ended {ended}, exit codes {set(codes.values())}, {time.monotonic() - start:.0f}s, "
              f"{restarted}", flush=True)
        for line in text.splitlines():
            if "restored from" in line or "replayed" in line or "restarted" in line:
                print("   ", line)
    same = plain == restarted and code == 0 and set(codes.values()) == {0}
    print("final accuracy identical:", same)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
