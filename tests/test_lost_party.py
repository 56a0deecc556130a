"""Under MixedSync a party that dies does not stop the others: the global tier drops it and the
surviving party trains to the end (under FSA the same loss ends the run, see test_faults.py)."""
import sys

import pytest
from helpers import FAST_HEARTBEATS, WORKERS, Cluster, assert_no_process_left

from geomx.launch import Topology

pytestmark = pytest.mark.system


def test_killed_party_under_mixedsync_does_not_stop_the_others():
    topo = Topology(parties=2, workers_per_party=1, env=dict(FAST_HEARTBEATS, GEOMX_START_TIMEOUT="60"))
    cmd = [sys.executable, str(WORKERS / "async_train_worker.py"), "--slice", "{slice}", "--rounds", "25"]
    cluster = Cluster(topo, cmd)
    with cluster:
        cluster.log.wait_for(r"^\[party1/worker0\] ROUND 1 OK", 90)
        cluster.kill("party1/worker0")
        assert cluster.wait_all(90), f"still running: {cluster.running()}\n{cluster.log.text()[-6000:]}"
        out = cluster.log.text()
        codes = {name: p.returncode for name, p in cluster.procs.items()}
        # The surviving party and the whole global tier finish normally.
        for name in ("party0/worker0", "party0/server", "party0/scheduler", "global_server0",
                     "global_scheduler", "central/scheduler", "central/master_worker"):
            assert codes[name] == 0, f"{name} exited {codes[name]}:\n{cluster.output(name)[-3000:]}"
        assert "ASYNC RUN OK" in cluster.output("party0/worker0")
        assert "carries on" in cluster.output("global_scheduler")
        # The dead party's own processes end with an error naming the dead worker.
        assert codes["party1/server"] != 0 and codes["party1/scheduler"] != 0
        assert "presumed dead" in cluster.output("party1/server")
        assert_no_process_left(cluster)
    print(out[-1500:])
