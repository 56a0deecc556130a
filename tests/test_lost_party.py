"""Under MixedSync a party that dies does not stop the others: the global tier drops it and the
surviving party trains to the end. Under FSA the same loss ends the run (test_faults.py), unless
GEOMX_LOST_PARTY=continue."""
import re
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


def test_a_failed_party_under_fsa_with_continue_leaves_the_others_training_exactly(caplog):
    """GEOMX_LOST_PARTY=continue under FSA, through the launcher: party1's worker fails before its
    second round, so party1's local server fails and leaves the global tier. The launcher lets party1's
    processes end without stopping the run; the global tier completes the rounds party1 never pushed
    with party0's push scaled to the full count of parties (x2), and every value party0 pulls is that
    closed form exactly; the run ends with exit 0 and says which party it went on without."""
    import logging

    from helpers import SLOW_WORKER, LineLog

    from geomx.launch import run

    caplog.set_level(logging.INFO, logger="geomx.launch")
    topo = Topology(parties=2, workers_per_party=1, env=dict(FAST_HEARTBEATS, GEOMX_START_TIMEOUT="60",
                                                               GEOMX_LOST_PARTY="continue"))
    out = LineLog()
    cmd = [sys.executable, SLOW_WORKER, "--slice", "{slice}", "--rounds", "6", "--sleep", "0.1",
           "--crash-slice", "1", "--lost-slice", "1", "--lost-scale", "2"]
    rc = run(topo, cmd, stream=out, timeout=180)
    text = out.text()
    assert rc == 0, text[-8000:]
    assert "MISMATCH" not in text and "[party0/worker0] EXACT OK" in text, text[-8000:]
    assert "injected failure" in text  # party1's worker did fail
    assert "the tier carries on without party" in text and "GEOMX_LOST_PARTY=continue" in text, text[-8000:]
    assert re.search(r"\[global_server0\] .*party [\d.:]+ is gone .*its rounds go on with 1 party, each round's sum "
                     r"scaled to 2", text), text[-8000:]
    assert "the run goes on without party party1 (GEOMX_LOST_PARTY=continue)" in caplog.text, caplog.text
    assert "the run ended without party party1" in caplog.text, caplog.text


def test_a_lost_party_with_stop_ends_the_run_after_a_final_checkpoint(tmp_path):
    """GEOMX_LOST_PARTY=stop (the default) with checkpoints on: party1's worker fails after round 0,
    the run stops with that error, and the global server first saves what the tier completed (round 0
    of every key), so that a new run can start from it."""
    from helpers import SLOW_WORKER, LineLog

    from geomx import checkpoint
    from geomx.launch import run

    topo = Topology(parties=2, workers_per_party=1, env=dict(
        FAST_HEARTBEATS, GEOMX_START_TIMEOUT="60", GEOMX_CHECKPOINT_DIR=str(tmp_path), GEOMX_CHECKPOINT_EVERY="50"))
    out = LineLog()
    cmd = [sys.executable, SLOW_WORKER, "--slice", "{slice}", "--rounds", "6", "--sleep", "0.1", "--crash-slice", "1"]
    rc = run(topo, cmd, stream=out, timeout=180)
    text = out.text()
    assert rc != 0 and "injected failure" in text, text[-8000:]
    assert re.search(r"\[global_server0\] .*checkpoint \(final, the run stops: .*injected failure.*\) of \d+ key\(s\) "
                     r"at rounds 1\.\.1", text), text[-8000:]
    saved = checkpoint.load(checkpoint.file_name(str(tmp_path), 0))
    assert [k.completed for k in saved.keys] == [1] * len(saved.keys) and saved.keys
