"""Under MixedSync a party that dies does not stop the others: the global tier drops it and the
surviving party trains to the end. Under FSA the same loss ends the run (test_faults.py), unless
GEOMX_LOST_PARTY=continue."""
import os
import re
import signal
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


def _site(path, site, worker, log):
    """``geomx-launch --topology PATH --site SITE -- WORKER`` as a data center's operator starts it."""
    import os
    import subprocess

    from helpers import REPO

    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in [k for k in env if k.startswith("DMLC_")]:
        del env[k]
    return subprocess.Popen([sys.executable, "-m", "geomx.launch", "--topology", str(path), "--site", site,
                             "--timeout", "170",
                             # the central site's only worker (the master) ends after its INITs
                             "--grace", "150", "--", *worker], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.parametrize("security", ["none", "curve"])
def test_a_lost_party_restarted_with_its_site_rejoins_and_the_oracle_of_each_membership_holds(tmp_path, security):
    """GEOMX_LOST_PARTY=continue, three sites started separately (tests/test_topology_file.py): party1's
    worker fails after round 0, so party1 is lost and its launcher ends; round 1 on are party0's pushes
    scaled to both parties. Party1's site is then started again with `geomx-launch --site party1`: its
    local server registers again (with CURVE under party1's own key), takes party1's slot, receives the
    current model, and joins at the next round; from there every round is party0's push plus the
    rejoined worker's. Each worker checks every value it pulls exactly (tests/workers/exact_worker.py,
    rejoin_run); party0 waits at round 5 until the rejoin is acknowledged, so it trains on with it."""
    import time

    from helpers import REPO, free_port_range, kill_group

    base = free_port_range(30)
    text = (REPO / "examples" / "topologies" / "one-machine.toml").read_text()
    for i, old in enumerate(("9310-9319", "9320-9329", "9330-9339")):
        text = text.replace(old, f"{base + 10 * i}-{base + 10 * i + 9}")
    head = 'lost_party = "continue"\n'
    if security == "curve":
        from geomx import security as keys

        keys.generate_topology_keys(str(tmp_path / "keys"), ["central", "party0", "party1"])
        head += f'keys_dir = "{tmp_path / "keys"}"\n'
    env = "".join(f'{k} = "{v}"\n' for k, v in dict(FAST_HEARTBEATS, GEOMX_START_TIMEOUT="60").items())
    path = tmp_path / "sites.toml"
    path.write_text(head + text + "\n[env]\n" + env)
    gate = tmp_path / "rejoined"
    worker = [sys.executable, str(REPO / "tests" / "workers" / "exact_worker.py"), "--slice", "{slice}",
              "--rounds", "30", "--sleep", "0.05", "--lost-slice", "1", "--lost-scale", "2", "--rejoin-push", "1000",
              "--wait-round", "5", "--wait-file", str(gate)]
    logs = {name: open(tmp_path / f"{name}.log", "w+") for name in ("central", "party0", "party1", "party1-again")}
    procs = {site: _site(path, site, worker + (["--crash-slice", "1"] if site == "party1" else []), logs[site])
             for site in ("party1", "party0", "central")}

    def read(name):
        logs[name].flush()
        return (tmp_path / f"{name}.log").read_text()

    try:
        first = procs["party1"].wait(timeout=120)
        procs["party1-again"] = _site(path, "party1", worker + ["--rejoining"], logs["party1-again"])
        deadline = time.monotonic() + 120
        while "[party1/worker0] INITIALISED" not in read("party1-again"):
            assert time.monotonic() < deadline and procs["central"].poll() is None, \
                {name: read(name)[-3000:] for name in logs}
            time.sleep(0.1)
        gate.write_text("")
        codes = {name: p.wait(timeout=150) for name, p in procs.items()}
    finally:
        for p in procs.values():
            kill_group(p)
    out = {name: read(name) for name in logs}
    assert first != 0 and "injected failure" in out["party1"], out["party1"][-3000:]
    assert codes == {"party1": first, "party0": 0, "central": 0, "party1-again": 0}, \
        {name: o[-4000:] for name, o in out.items()}
    assert not any("MISMATCH" in o for o in out.values())
    assert re.search(r"\[party0/worker0\] REJOIN SEEN from round ([5-9]|1\d)\b", out["party0"]), out["party0"][-3000:]
    assert "[party0/worker0] EXACT OK" in out["party0"]
    joined = re.search(r"\[party1/worker0\] JOINED at round (\d+)", out["party1-again"])
    assert joined and "[party1/worker0] EXACT OK" in out["party1-again"], out["party1-again"][-3000:]
    # Its local server took party1's slot again, and the global server counted it from that round on.
    slot = re.search(r"\[global_scheduler\] .*party [\d.:]+ rejoins: local_server takes rank (\d) again",
                     out["central"])
    assert slot, out["central"][-4000:]
    assert re.search(rf"\[global_server0\] .*key 0: the rejoined party \(rank {slot.group(1)}\) takes part from round "
                     rf"{joined.group(1)}\b", out["central"]), out["central"][-4000:]
    assert ("CURVE is off" in out["central"]) == (security == "none")


@pytest.mark.parametrize("how", ["fails", "sigkill"])
def test_with_rejoin_the_launcher_starts_a_lost_party_again_and_it_rejoins_exactly(caplog, tmp_path, how):
    """GEOMX_LOST_PARTY=rejoin, one launcher for the whole topology: party1's worker fails after round
    0 (its party says why at once), or is SIGKILLed after round 1 (nobody says goodbye: the global tier
    still counts party1 when its new local server registers, and takes the new one once the old one
    stays silent); the launcher lets party1's processes end, then starts them all again
    (GEOMX_PARTY_RESTART=1 tells the worker), party1 rejoins with nobody touching the run, and the run
    ends with exit 0. Every value each worker pulls is checked exactly against its round's membership,
    as in the --site test above."""
    import logging
    import threading

    from helpers import SLOW_WORKER, LineLog

    from geomx.launch import run

    caplog.set_level(logging.INFO, logger="geomx.launch")
    topo = Topology(parties=2, workers_per_party=1, env=dict(FAST_HEARTBEATS, GEOMX_START_TIMEOUT="60",
                                                               GEOMX_LOST_PARTY="rejoin"))
    out = LineLog()
    result: dict = {}
    gate = tmp_path / "rejoined"
    cmd = [sys.executable, SLOW_WORKER, "--slice", "{slice}", "--rounds", "30", "--sleep", "0.05",
           "--crash-slice", "1" if how == "fails" else "-1", "--lost-slice", "1", "--lost-scale", "2",
           "--rejoin-push", "1000", "--wait-round", "5", "--wait-file", str(gate)]
    runner = threading.Thread(target=lambda: result.setdefault("rc", run(topo, cmd, stream=out, timeout=240)))
    runner.start()
    try:
        if how == "sigkill":
            out.wait_for(r"^\[party1/worker0\] ROUND 1 OK", 120, done=lambda: not runner.is_alive())
            os.kill(int(out.wait_for(r"^\[party1/worker0\] PID (\d+)", 5).group(1)), signal.SIGKILL)
        out.wait_for(r"^\[party1/worker0\] INITIALISED", 150, done=lambda: not runner.is_alive())
    finally:
        gate.write_text("")  # party0 trains on from round 5 (also when the wait failed: the run ends)
        runner.join(200)
    text = out.text()
    assert result.get("rc") == 0, text[-8000:]
    assert "MISMATCH" not in text and ("injected failure" in text) == (how == "fails"), text[-8000:]
    assert "starting party party1 again (1 of 3) so that it rejoins the run (GEOMX_LOST_PARTY=rejoin)" in caplog.text
    assert re.search(r"\[party0/worker0\] REJOIN SEEN from round \d+", text), text[-8000:]
    assert "[party1/worker0] JOINED at round" in text and text.count("EXACT OK") == 2, text[-8000:]
    assert "the run ended without party" not in caplog.text
    if how == "sigkill":
        # The old local server was still counted when the new one registered: replaced once silent.
        assert re.search(r"\[global_scheduler\] .*was replaced: its party's site started again", text), text[-8000:]
