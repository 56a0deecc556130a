"""The central site restarts its global scheduler: geomx-launch starts a SIGKILLed global scheduler
again (GEOMX_SCHEDULER_RESUME), the tier's nodes reconnect and come back to it with their ranks, and
training goes on exactly, with nobody touching the run."""
import logging
import os
import re
import signal
import threading
import time

import pytest
from helpers import LineLog, pid_with_environ, slow_cmd

from geomx.launch import Topology, run

pytestmark = pytest.mark.system


def test_the_launcher_restarts_a_killed_global_scheduler_and_training_goes_on_exactly(tmp_path, caplog):
    """Killed twice mid-run (the second time the restarted one): each time the launcher starts it again,
    the global server and both local servers come back to it with their ranks (`... is back as rank`),
    it goes on once all three are back, and every value the workers pull is the closed form."""
    caplog.set_level(logging.INFO, logger="geomx.launch")
    topo = Topology(parties=2, workers_per_party=1, env={
        "PS_HEARTBEAT_INTERVAL": "0.5", "PS_HEARTBEAT_TIMEOUT": "10", "GEOMX_START_TIMEOUT": "60",
        "GEOMX_TEST_RUN": str(tmp_path)})
    out = LineLog()
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(rc=run(topo, slow_cmd(30, 0.3), stream=out, timeout=240)),
                              daemon=True)
    runner.start()
    try:
        for after, restart in ((3, 1), (8, 2)):
            out.wait_for(rf"^\[party1/worker0\] ROUND {after} OK", 120)
            os.kill(pid_with_environ("DMLC_ROLE_GLOBAL=global_scheduler", f"GEOMX_TEST_RUN={tmp_path}"), signal.SIGKILL)
            deadline = time.monotonic() + 60
            while len(re.findall(r"^\[global_scheduler\] .*the scheduler restarted and all 3 nodes are back",
                                 out.text(), re.M)) < restart:
                assert time.monotonic() < deadline and runner.is_alive(), out.text()[-30000:]
                time.sleep(0.1)
    finally:
        runner.join(240)
    text = out.text()
    assert result.get("rc") == 0, text[-8000:]
    assert "MISMATCH" not in text and "presumed dead" not in text, text[-8000:]
    assert sorted(re.findall(r"^\[(party\d/worker0)\] EXACT OK", text, re.M)) == ["party0/worker0", "party1/worker0"]
    assert re.search(r"global_scheduler was killed \(SIGKILL\); starting it again in [\d.]+ s, the tier's nodes come "
                     r"back to it \(restart 2 of 3\)", caplog.text), caplog.text
    for node in ("server global_server", "worker local_server"):
        assert re.search(rf"^\[global_scheduler\] .*global tier: {node} is back as rank \d", text, re.M), text[-8000:]
