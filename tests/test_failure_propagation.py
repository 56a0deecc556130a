"""A training script that dies of an exception stops the whole topology quickly, and every other
node's error names the failed worker and the exception (no heartbeat timeout involved)."""
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import SLOW_WORKER, Cluster

from geomx.launch import Topology

pytestmark = pytest.mark.system


def test_crashing_worker_stops_topology_fast(topology_run):
    start = time.monotonic()
    # Long heartbeat timeout: the fast stop must come from the failure notice, not from liveness.
    result = topology_run("exact_worker.py", ["--slice", "{slice}", "--rounds", "50", "--crash-slice", "1"],
                          parties=2, workers_per_party=2, timeout=100,
                          env={"PS_HEARTBEAT_TIMEOUT": "60"})
    elapsed = time.monotonic() - start
    assert result.code != 0
    assert elapsed < 45, f"took {elapsed:.0f}s"
    assert result.lines("RuntimeError: injected failure")
    # The other worker of the crashed party learns why it cannot continue.
    assert any("failed: RuntimeError: injected failure" in line for line in result.lines("ERROR"))
    # No training worker got to the end (each reported how far it got; slice 1 raised after round 0).
    assert not [r for r in result.reports if r.get("exact") and not r["master"]], result.reports
    assert [r.get("round") for r in result.reports if r["slice"] == 1 and not r["master"]] == [0], result.reports


def test_worker_dying_with_requests_unanswered_exits(tmp_path):
    """A script that dies while its pushes and pulls wait for a server that will never answer them
    (here: frozen with SIGSTOP; in CI once: a local server that had just stopped): MXNet waits for
    every pending operation at interpreter exit, pulls included, so the kvstore's close must fail
    them, or the process never ends (CI had such a worker still running 30 s after the rest of the
    topology had stopped)."""
    topo = Topology(parties=2, workers_per_party=1, env={"PS_HEARTBEAT_TIMEOUT": "60"})
    go = tmp_path / "server-frozen"
    cmd = [sys.executable, SLOW_WORKER, "--slice", "{slice}", "--rounds", "10",
           "--crash-pending-slice", "1", "--crash-pending-after", str(go)]
    with Cluster(topo, cmd) as cluster:
        cluster.log.wait_for(r"^\[party1/worker0\] ROUND 0 OK", 60)
        os.kill(cluster.procs["party1/server"].pid, signal.SIGSTOP)  # answers nothing from now on
        go.touch()  # only now does the worker issue its round 1
        cluster.log.wait_for(r"^\[party1/worker0\] RuntimeError: injected failure with pulls pending", 30)
        crashed_at = time.monotonic()
        worker = cluster.procs["party1/worker0"]
        try:
            code = worker.wait(20)
        except subprocess.TimeoutExpired:
            code = None
        assert code == 1, (f"the worker was still running {time.monotonic() - crashed_at:.0f} s after its script "
                           f"died:\n{cluster.output('party1/worker0')[-4000:]}")
