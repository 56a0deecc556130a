"""Checkpoint and restore of the global tier, on real processes (127.0.0.1).

The exact worker (tests/workers/exact_worker.py) checks every pulled value against its closed form
with zero tolerance, so a lost, doubled or reordered update after the global server's restart fails
the run.
"""
from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from helpers import (
    FAST_HEARTBEATS,
    REPO,
    Cluster,
    LineLog,
    assert_no_process_left,
    exact_slices,
    pid_with_environ,
    slow_cmd,
)

from geomx import checkpoint
from geomx.checkpoint import Checkpoint, CheckpointError, KeyRecord
from geomx.launch import Topology, run


def sample(rank: int = 0, scale: float = 1.0) -> Checkpoint:
    keys = [KeyRecord(3, (np.arange(12, dtype=np.float32) * scale), 5, 5, offset=30, total=50),
            KeyRecord(7, np.full(4, scale, np.float16), 4, 4),
            KeyRecord(1 << 62 | 12345, np.arange(3, dtype=np.float64), 5, 0)]
    states = ({"states": {"3": {"dtype": "<f4", "shape": [2], "offset": 0, "nbytes": 8}}},
              np.arange(8, dtype=np.uint8))
    return Checkpoint(rank=rank, num_global_server=2, keys=keys, optimizer={"name": "sgd", "params": {}},
                      num_update=5, states=states, stopped=[["central-clients", "776f726b657230"]],
                      pushing=[["global-clients", "6c6f63616c"]])


# -- the file format --------------------------------------------------------------------------------

@pytest.mark.unit
def test_checkpoint_round_trip(tmp_path):
    path = checkpoint.file_name(str(tmp_path), 1)
    size = checkpoint.save(sample(rank=1), path)
    assert size == os.path.getsize(path)
    back = checkpoint.load(path)
    want = sample(rank=1)
    assert (back.rank, back.num_global_server, back.optimizer, back.num_update) == (1, 2, want.optimizer, 5)
    assert back.stopped == want.stopped and back.pushing == want.pushing
    for got, exp in zip(back.keys, want.keys):
        assert (got.key, got.completed, got.update_count, got.offset, got.total) == \
            (exp.key, exp.completed, exp.update_count, exp.offset, exp.total)
        assert got.value.dtype == exp.value.dtype and np.array_equal(got.value, exp.value)
    assert back.states[0] == want.states[0] and np.array_equal(back.states[1], want.states[1])
    assert [p.name for p in tmp_path.iterdir()] == ["global_server1.npz"]  # no temporary file left


def _corruptions(good: bytes):
    flipped = bytearray(good)
    # A byte inside the first value array's data (after the header member): the zip CRC catches it.
    flipped[len(good) // 2] ^= 0xFF
    return {
        "truncated to half": good[: len(good) // 2],
        "truncated by one byte": good[:-1],
        "empty": b"",
        "a flipped byte": bytes(flipped),
        "not a zip": b"\x93NUMPY garbage" * 10,
    }


@pytest.mark.unit
@pytest.mark.parametrize("case", ["truncated to half", "truncated by one byte", "empty", "a flipped byte",
                                  "not a zip"])
def test_corrupt_checkpoint_is_refused(tmp_path, case):
    path = tmp_path / "global_server0.npz"
    checkpoint.save(sample(), str(path))
    path.write_bytes(_corruptions(path.read_bytes())[case])
    with pytest.raises(CheckpointError, match=rf"checkpoint {re.escape(str(path))} (is unreadable|refused)"):
        checkpoint.load(str(path))


@pytest.mark.unit
def test_checkpoint_with_inconsistent_header_is_refused(tmp_path):
    path = str(tmp_path / "c.npz")
    arrays = {"header": np.frombuffer(b'{"format": "geomx-checkpoint/1", "rank": 0, "num_global_server": 1, '
                                      b'"keys": [{"key": 1, "numel": 5, "dtype": "<f4", "completed": 2}], '
                                      b'"stopped": [], "pushing": []}', np.uint8),
              "v0": np.zeros(4, np.float32)}
    np.savez(path, **arrays)
    with pytest.raises(CheckpointError, match=r"value of key 1 is <f4 \(4,\), the header says <f4 \(5,\)"):
        checkpoint.load(path)
    np.savez(path, header=np.frombuffer(b'{"format": "geomx-optimizer-states/1"}', np.uint8))
    with pytest.raises(CheckpointError, match="format is 'geomx-optimizer-states/1'"):
        checkpoint.load(path)
    np.savez(path, v0=np.zeros(3, object))
    with pytest.raises(CheckpointError):
        checkpoint.load(path)  # no header; and object arrays are never unpickled


_SAVER = """
import sys, numpy as np
from geomx import checkpoint
path, n = sys.argv[1], int(sys.argv[2])
gen = 0
while True:
    gen += 1
    keys = [checkpoint.KeyRecord(0, np.full(n, gen, np.float32), gen)]
    checkpoint.save(checkpoint.Checkpoint(rank=0, num_global_server=1, keys=keys), path)
    print(gen, flush=True)
"""


@pytest.mark.system
def test_crash_during_save_keeps_the_last_good_checkpoint(tmp_path):
    """SIGKILL a process that rewrites a 32 MB checkpoint over and over (so it is almost always in the
    middle of a save): the file is always a complete checkpoint of one generation, never a torn one."""
    path = str(tmp_path / "global_server0.npz")
    n = 8 << 20
    torn_saves = 0
    for delay in (0.1, 0.3, 0.5):
        proc = subprocess.Popen([sys.executable, "-c", _SAVER, path, str(n)], stdout=subprocess.PIPE,
                                env={**os.environ, "PYTHONPATH": str(REPO)}, text=True)
        assert proc.stdout.readline().strip() == "1"  # one complete checkpoint exists
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ckpt = checkpoint.load(path)
        gen = ckpt.keys[0].completed
        assert gen >= 1 and np.array_equal(ckpt.keys[0].value, np.full(n, gen, np.float32))
        # A save cut short leaves its temporary file (a new one each time), never a half checkpoint.
        names = [p.name for p in tmp_path.iterdir()]
        assert all(name == "global_server0.npz" or name.startswith(".geomx-ckpt-") for name in names)
        torn_saves = len(names) - 1
    assert torn_saves >= 1, "no kill landed in the middle of a save; the test proved nothing"


# -- restart on a live topology ---------------------------------------------------------------------

def _restart_topology(tmp_path, global_servers=1, local_servers=1, **env):
    return Topology(parties=2, workers_per_party=1, global_servers=global_servers, local_servers=local_servers,
                    env=dict(
        FAST_HEARTBEATS, GEOMX_START_TIMEOUT="60", GEOMX_CHECKPOINT_DIR=str(tmp_path), **env))


@pytest.mark.system
@pytest.mark.parametrize("every,kill_after,wait_for_detection,global_servers,victim,local_servers,optimizer", [
    (3, 4, True, 1, 0, 1, "sgd"),
    # Two global servers with key 2 split between them; the second one dies and is back before the
    # schedulers even notice (it takes the old one's place at once).
    (1, 2, False, 2, 1, 1, "sgd"),
    # Adam on the global servers (issue 26): its moments and update counts come back from the
    # checkpoint, and the replayed rounds are updated from there, as if nothing had happened.
    (3, 4, False, 2, 0, 1, "adam"),
])
def test_global_server_restarted_from_checkpoint_loses_no_update(tmp_path, every, kill_after, wait_for_detection,
                                                                 global_servers, victim, local_servers, optimizer):
    """SIGKILL a global server mid-training and restart it from its checkpoint: the workers' every
    pulled value (integer gradients; SGD with lr 1, or Adam) equals the uninterrupted run's exactly (the
    closed form, or one MXNet updater in the worker). With a checkpoint every 3 rounds and the kill after
    round 4, the parties replay rounds the checkpoint lacks."""
    rounds = 8
    topo = _restart_topology(tmp_path, global_servers, local_servers, GEOMX_CHECKPOINT_EVERY=str(every),
                             GEOMX_RESTART_TIMEOUT="60", MXNET_KVSTORE_BIGARRAY_BOUND="1000")
    cmd = slow_cmd(rounds, 0.3) + ["--optimizer", optimizer]
    name = f"global_server{victim}"
    with Cluster(topo, cmd) as cluster:
        cluster.log.wait_for(rf"^\[party1/worker0\] ROUND {kill_after} OK", 90)
        # The process's rank in the global tier (not necessarily the number in its name).
        rank = int(re.search(r"\[global_server(\d+)\] serving", cluster.output(name)).group(1))
        ckpt_file = checkpoint.file_name(str(tmp_path), rank)
        cluster.kill(name)
        assert cluster.procs[name].wait(5) == -signal.SIGKILL
        if global_servers > 1:
            # The other server's checkpoint: refused at once, since that server is alive.
            cluster.restart(name, GEOMX_CHECKPOINT_RESTORE=checkpoint.file_name(str(tmp_path), 1 - rank))
            assert cluster.procs[name].wait(60) == 1
            assert re.search(rf"restart of server global_server as rank {1 - rank} refused: the server of that rank "
                             r"\(.*\) is alive", cluster.output(name)), cluster.output(name)
        if wait_for_detection:
            for sched in ("global_scheduler", "central/scheduler"):
                cluster.log.wait_for(rf"^\[{re.escape(sched)}\] .*global_server .*presumed dead; waiting up to 60s", 30)
        saved = checkpoint.load(ckpt_file)
        assert saved.rank == rank and min(k.completed for k in saved.keys) >= every
        cluster.restart(name, GEOMX_CHECKPOINT_RESTORE=ckpt_file)
        assert cluster.wait_all(120), f"still running: {cluster.running()}\n{cluster.log.text()[-8000:]}"
        out = cluster.log.text()
        for proc_name, proc in cluster.procs.items():
            assert proc.returncode == 0, f"{proc_name} exited with {proc.returncode}:\n{out[-10000:]}"
        assert len(re.findall(rf"^\[party\d/worker0\] EXACT OK .* rounds {rounds}$", out, re.M)) == 2, out[-8000:]
        assert re.search(rf"^\[{name}\] .*restored from .*global_server{rank}\.npz: rank {rank}, "
                         rf"{len(saved.keys)} key\(s\)",
                         out, re.M), out[-8000:]
        for sched in ("global_scheduler", "central/scheduler"):
            assert re.search(rf"^\[{re.escape(sched)}\] .*global_server \(rank {rank}\) restarted", out, re.M), \
                out[-8000:]
        for party in (0, 1):
            replays = re.findall(rf"^\[party{party}/server\d*\] .*server {rank} restarted at .*; replayed (\d+) "
                                 r"answered push\(es\) after its checkpoint and resent (\d+) unanswered", out, re.M)
            assert len(replays) == local_servers, out[-8000:]
            if every > 1:
                # The rounds completed after the checkpoint were lost with the server: the parties
                # had to send them again (4 keys x at least one round).
                assert sum(int(answered) for answered, _ in replays) >= 4, replays
        assert_no_process_left(cluster)


def _global_server_pid(checkpoint_dir, rank: int) -> int:
    """The process id of the global server of ``rank`` that checkpoints into ``checkpoint_dir``."""
    return pid_with_environ("DMLC_ROLE_GLOBAL=global_server", f"GEOMX_CHECKPOINT_DIR={checkpoint_dir}",
                            f"GEOMX_GLOBAL_SERVER_RANK={rank}")


@pytest.mark.system
def test_the_launcher_restarts_a_killed_global_server_from_its_checkpoint(tmp_path, caplog):
    """geomx-launch starts a SIGKILLed global server again from its latest checkpoint, by itself: the
    parties ride it out and every pulled value equals the uninterrupted run's (checkpoint every 3
    rounds, killed after round 4: the parties replay round 4). A second kill is restarted too."""
    caplog.set_level(logging.INFO, logger="geomx.launch")
    topo = _restart_topology(tmp_path, GEOMX_CHECKPOINT_EVERY="3", GEOMX_RESTART_TIMEOUT="60")
    out = LineLog()
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(rc=run(topo, slow_cmd(12, 0.3), stream=out, timeout=240)),
                              daemon=True)
    runner.start()
    try:
        for after, restart in ((4, 1), (8, 2)):
            out.wait_for(rf"^\[party1/worker0\] ROUND {after} OK", 120)
            os.kill(_global_server_pid(tmp_path, 0), signal.SIGKILL)
            deadline = time.monotonic() + 60
            while len(re.findall(r"^\[global_scheduler\] .*server global_server \(rank 0\) restarted", out.text(),
                                 re.M)) < restart:
                assert time.monotonic() < deadline and runner.is_alive(), out.text()[-8000:]
                time.sleep(0.1)
            assert f"restart {restart} of 3" in caplog.text, caplog.text
    finally:
        runner.join(240)
    text = out.text()
    assert result.get("rc") == 0, text[-8000:]
    assert "MISMATCH" not in text
    assert sorted(re.findall(r"^\[(party\d/worker0)\] EXACT OK", text, re.M)) == ["party0/worker0", "party1/worker0"]
    assert re.search(r"global_server0 was killed \(SIGKILL\); starting it again in [\d.]+ s, from its checkpoint",
                     caplog.text), caplog.text


@pytest.mark.system
def test_global_server_not_restarted_in_time_ends_with_a_clear_error(tmp_path):
    topo = _restart_topology(tmp_path, GEOMX_CHECKPOINT_EVERY="2", GEOMX_RESTART_TIMEOUT="4")
    with Cluster(topo, slow_cmd(30, 0.3)) as cluster:
        cluster.log.wait_for(r"^\[party0/worker0\] ROUND 2 OK", 90)
        killed_at = cluster.kill("global_server0")
        assert cluster.wait_all(40), f"still running: {cluster.running()}\n{cluster.log.text()[-8000:]}"
        took = time.monotonic() - killed_at
        out = cluster.log.text()
        pattern = (r"global_server \(rank 0, [\d.:]+\) died and was not restarted within 4s "
                   r"\(GEOMX_RESTART_TIMEOUT\)")
        assert re.search(rf"^\[global_scheduler\] .*ERROR.*{pattern}", out, re.M), out[-8000:]
        for name in ("party0/server", "party1/server", "party0/worker0", "party1/worker0"):
            assert cluster.procs[name].returncode != 0, cluster.output(name)
            assert re.search(pattern, cluster.output(name)), cluster.output(name)
        # heartbeat timeout (3 s) + restart timeout (4 s) + the failure spreading, not a hang
        assert took < 30
        assert_no_process_left(cluster)


@pytest.mark.system
def test_restart_from_corrupt_checkpoint_is_refused_at_start(tmp_path):
    """A global server told to start from a truncated checkpoint exits at once with an error naming
    the file (it never joins the tier with half a model)."""
    path = tmp_path / "global_server0.npz"
    checkpoint.save(sample(), str(path))
    path.write_bytes(path.read_bytes()[:-100])
    spec = next(s for s in Topology(parties=1, workers_per_party=1).processes(["true"])
                if s.name == "global_server0")
    env = {**spec.env, "GEOMX_CHECKPOINT_RESTORE": str(path), "GEOMX_START_TIMEOUT": "5"}
    proc = subprocess.run(spec.argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert re.search(rf"checkpoint {re.escape(str(path))} is unreadable \(truncated or corrupt\?\)", proc.stderr)


@pytest.mark.system
def test_checkpoint_on_request_then_whole_topology_restart(tmp_path, topology_run):
    """``kv.save_checkpoint()`` after round 2 writes exactly the closed form at round 2 (checked by
    the worker). The run then finishes (the last checkpoint is taken at the parties' STOP); a new
    topology whose global server starts from that file continues at round 4, exactly."""
    env = dict(GEOMX_CHECKPOINT_DIR=str(tmp_path), GEOMX_CHECKPOINT_EVERY="1000")
    first = topology_run("exact_worker.py", ["--slice", "{slice}", "--rounds", "4", "--optimizer", "sgd",
                                             "--checkpoint-at", "2"], env=env, parties=2, workers_per_party=1)
    assert first.code == 0, first.output[-6000:]
    assert [r["checkpoint"]["round"] for r in first.reports if "checkpoint" in r] == [2], first.reports
    assert [r["checkpoint"]["servers"] for r in first.reports if "checkpoint" in r] == [1], first.reports
    saved = checkpoint.load(checkpoint.file_name(str(tmp_path), 0))
    assert sorted(k.completed for k in saved.keys) == [4, 4, 4, 4]

    second = topology_run("exact_worker.py", ["--slice", "{slice}", "--rounds", "7", "--optimizer", "sgd",
                                              "--first-round", "4"], env=env, parties=2, workers_per_party=1,
                          node_env={"global_server0": {
                              "GEOMX_CHECKPOINT_RESTORE": checkpoint.file_name(str(tmp_path), 0)}})
    assert second.code == 0, second.output[-6000:]
    assert exact_slices(second) == [0, 1], (second.reports, second.output[-6000:])
    assert second.lines("restored into a new topology"), second.output[-6000:]
