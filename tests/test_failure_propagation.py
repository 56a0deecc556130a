"""A training script that dies of an exception stops the whole topology quickly, and every other
node's error names the failed worker and the exception (no heartbeat timeout involved)."""
import time


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
    assert not result.lines("EXACT OK")
