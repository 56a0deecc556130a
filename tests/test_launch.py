"""Tests for geomx.launch: real child processes, small Python one-liners as nodes/workers."""

from __future__ import annotations

import io
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time

import pytest
from helpers import REPO, assert_all_dead, kill_group, live_group_members

from geomx.launch import Ports, Topology, main, run

# A non-worker stand-in: prints its pid, optionally ignores SIGTERM, sleeps NODE_EXIT_AFTER
# seconds (default: "forever") and exits with NODE_EXIT_CODE.
NODE = r"""
import os, signal, sys, time
if os.environ.get("IGNORE_TERM"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("PID", os.getpid(), flush=True)
time.sleep(float(os.environ.get("NODE_EXIT_AFTER", "1000")))
sys.exit(int(os.environ.get("NODE_EXIT_CODE", "0")))
"""

# A worker stand-in: argv = slice party rank. Prints its pid and arguments (stdout) and a line
# on stderr; the worker whose slice is FAIL_SLICE exits with FAIL_CODE (or kills itself with
# FAIL_SIGNAL) after FAIL_AFTER s; the
# worker whose slice is SPAWN_SLICE starts a grandchild sleeper (same process group) first.
WORKER = r"""
import os, subprocess, sys, time
slice_, party, rank = sys.argv[1:4]
if os.environ.get("SPAWN_SLICE") == slice_:
    g = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1000)"])
    print("PID", g.pid, flush=True)
print("PID", os.getpid(), flush=True)
env_slice = os.environ["GEOMX_DATA_SLICE"]
print("hello slice=%s party=%s rank=%s env=%s" % (slice_, party, rank, env_slice), flush=True)
print("to stderr", file=sys.stderr, flush=True)
if os.environ.get("FAIL_SLICE") == slice_:
    time.sleep(float(os.environ.get("FAIL_AFTER", "0")))
    if os.environ.get("FAIL_SIGNAL"):
        os.kill(os.getpid(), int(os.environ["FAIL_SIGNAL"]))
    sys.exit(int(os.environ.get("FAIL_CODE", "3")))
time.sleep(float(os.environ.get("WORKER_SLEEP", "0")))
"""

NODE_CMD = [sys.executable, "-c", NODE]
WORKER_CMD = [sys.executable, "-c", WORKER, "{slice}", "{party}", "{rank}"]


def pids_in(output: str):
    return [int(m) for m in re.findall(r"^\[[^\]]+\] PID (\d+)$", output, flags=re.M)]


def small(**env) -> Topology:
    """1 party x 1 worker: 7 processes."""
    return Topology(parties=1, workers_per_party=1, env=env, node_command=NODE_CMD)


# ----------------------------------------------------------------------------------------
# Process specs (no processes started)
# ----------------------------------------------------------------------------------------


def dmlc(env):
    return {k: v for k, v in env.items() if k.startswith(("DMLC_", "GEOMX_"))}


@pytest.mark.unit
def test_process_env_exact(monkeypatch):
    for k in list(os.environ):
        if k.startswith("DMLC_"):
            monkeypatch.delenv(k)
    # Stale role variables from the parent must not leak; other variables are inherited.
    monkeypatch.setenv("DMLC_ROLE", "bogus")
    monkeypatch.setenv("DMLC_ROLE_MASTER_WORKER", "1")
    monkeypatch.setenv("DMLC_INTERFACE", "eth0")
    monkeypatch.setenv("SOME_PARENT_VAR", "kept")
    topo = Topology(parties=2, workers_per_party=2, global_servers=2, env={"PS_VERBOSE": "1"},
                    node_env={"party*/server": {"ENABLE_P3": "1"}})
    ports = Ports(global_root=9092, central_root=9093, parties=[9094, 9095])
    cmd = ["python", "cnn.py", "--data-slice-idx", "{slice}", "--tag=p{party}r{rank}"]
    specs = topo.processes(cmd, ports)
    by = {s.name: s for s in specs}
    assert [s.name for s in specs] == [
        "global_scheduler", "central/scheduler", "party0/scheduler", "party1/scheduler",
        "global_server0", "global_server1", "party0/server", "party1/server",
        "central/master_worker", "party0/worker0", "party0/worker1", "party1/worker0", "party1/worker1",
    ]
    h = "127.0.0.1"
    assert dmlc(by["global_scheduler"].env) == dict(
        DMLC_ROLE_GLOBAL="global_scheduler", DMLC_PS_GLOBAL_ROOT_URI=h, DMLC_PS_GLOBAL_ROOT_PORT="9092",
        DMLC_NUM_GLOBAL_SERVER="2", DMLC_NUM_GLOBAL_WORKER="2", DMLC_NODE_HOST=h,
        GEOMX_PARTY_SERVERS=f"{h}:9094=1,{h}:9095=1", GEOMX_PARTY="central")
    for i in range(2):
        assert dmlc(by[f"global_server{i}"].env) == dict(
            DMLC_ROLE_GLOBAL="global_server", DMLC_ROLE="server",
            DMLC_PS_GLOBAL_ROOT_URI=h, DMLC_PS_GLOBAL_ROOT_PORT="9092",
            DMLC_PS_ROOT_URI=h, DMLC_PS_ROOT_PORT="9093", DMLC_NUM_SERVER="2", DMLC_NUM_WORKER="1",
            DMLC_NUM_GLOBAL_SERVER="2", DMLC_NUM_GLOBAL_WORKER="2", DMLC_NUM_ALL_WORKER="4",
            DMLC_ENABLE_CENTRAL_WORKER="0", DMLC_NODE_HOST=h, GEOMX_GLOBAL_SERVER_RANK=str(i),
            GEOMX_PARTY="central")
    assert dmlc(by["central/scheduler"].env) == dict(
        DMLC_ROLE="scheduler", DMLC_PS_ROOT_URI=h, DMLC_PS_ROOT_PORT="9093", DMLC_NUM_SERVER="2",
        DMLC_NUM_WORKER="1", DMLC_NODE_HOST=h, GEOMX_PARTY="central")
    assert dmlc(by["central/master_worker"].env) == dict(
        DMLC_ROLE="worker", DMLC_ROLE_MASTER_WORKER="1", DMLC_PS_ROOT_URI=h, DMLC_PS_ROOT_PORT="9093",
        DMLC_NUM_SERVER="2", DMLC_NUM_WORKER="1", DMLC_NUM_ALL_WORKER="4", DMLC_ENABLE_CENTRAL_WORKER="0",
        GEOMX_DATA_SLICE="0", GEOMX_PARTY="central", DMLC_NODE_HOST=h)
    for p, port in enumerate(["9094", "9095"]):
        assert dmlc(by[f"party{p}/scheduler"].env) == dict(
            DMLC_ROLE="scheduler", DMLC_PS_ROOT_URI=h, DMLC_PS_ROOT_PORT=port, DMLC_NUM_SERVER="1",
            DMLC_NUM_WORKER="2", DMLC_NODE_HOST=h, GEOMX_PARTY=f"party{p}")
        assert dmlc(by[f"party{p}/server"].env) == dict(
            DMLC_ROLE="server", DMLC_PS_ROOT_URI=h, DMLC_PS_ROOT_PORT=port,
            DMLC_PS_GLOBAL_ROOT_URI=h, DMLC_PS_GLOBAL_ROOT_PORT="9092", DMLC_NUM_SERVER="1",
            DMLC_NUM_WORKER="2", DMLC_NUM_GLOBAL_SERVER="2", DMLC_NUM_GLOBAL_WORKER="2", DMLC_NODE_HOST=h,
            GEOMX_PARTY=f"party{p}")
        for i in range(2):
            s = by[f"party{p}/worker{i}"]
            assert dmlc(s.env) == dict(
                DMLC_ROLE="worker", DMLC_PS_ROOT_URI=h, DMLC_PS_ROOT_PORT=port, DMLC_NUM_SERVER="1",
                DMLC_NUM_WORKER="2", DMLC_NUM_ALL_WORKER="4", GEOMX_DATA_SLICE=str(p * 2 + i),
                GEOMX_PARTY=f"party{p}", DMLC_NODE_HOST=h)
            assert s.argv == ["python", "cnn.py", "--data-slice-idx", str(p * 2 + i), f"--tag=p{p}r{i}"]
            assert s.is_worker
    assert by["central/master_worker"].argv[3:] == ["0", "--tag=pcentralr0"]
    for s in specs:
        assert s.env["SOME_PARENT_VAR"] == "kept"
        assert s.env["PS_VERBOSE"] == "1"
        assert "DMLC_INTERFACE" not in s.env
        assert ("ENABLE_P3" in s.env) == s.name.endswith("/server")
        if not s.is_worker:
            assert s.argv == [sys.executable, "-m", "geomx.node"]


@pytest.mark.unit
def test_central_workers_slices():
    topo = Topology(parties=2, workers_per_party=3, central_workers=2)
    specs = {s.name: s for s in topo.processes(["w", "{slice}", "{party}", "{rank}"])}
    assert specs["central/master_worker"].argv == ["w", "6", "central", "0"]
    assert specs["central/master_worker"].env["DMLC_ROLE_MASTER_WORKER"] == "1"
    assert specs["central/worker1"].argv == ["w", "7", "central", "1"]
    assert "DMLC_ROLE_MASTER_WORKER" not in specs["central/worker1"].env
    for name in ("central/master_worker", "central/worker1", "global_server0"):
        assert specs[name].env["DMLC_ENABLE_CENTRAL_WORKER"] == "1"
        assert specs[name].env["DMLC_NUM_ALL_WORKER"] == "8"
    assert specs["central/scheduler"].env["DMLC_NUM_WORKER"] == "2"
    slices = sorted(int(s.env["GEOMX_DATA_SLICE"]) for s in specs.values() if s.is_worker)
    assert slices == list(range(8))
    # Ports: distinct, shared consistently.
    ports = {specs["global_scheduler"].env["DMLC_PS_GLOBAL_ROOT_PORT"]}
    for n in ("central/scheduler", "party0/scheduler", "party1/scheduler"):
        ports.add(specs[n].env["DMLC_PS_ROOT_PORT"])
    assert len(ports) == 4
    port = specs["party1/scheduler"].env["DMLC_PS_ROOT_PORT"]
    assert specs["party1/worker2"].env["DMLC_PS_ROOT_PORT"] == port


@pytest.mark.unit
def test_invalid_topology():
    with pytest.raises(ValueError, match="parties"):
        Topology(parties=0).processes(["x"])
    with pytest.raises(ValueError, match="workers_per_party"):
        Topology(workers_per_party=0).processes(["x"])


# ----------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------


@pytest.mark.unit
def test_dry_run(capsys):
    rc = main(["--dry-run", "-p", "2", "-w", "2", "-s", "2", "--env", "PS_VERBOSE=1",
               "--node-env", "global_server*:MXNET_KVSTORE_SIZE_LOWER_BOUND=1000",
               "--", "python", "cnn.py", "--data-slice-idx", "{slice}"])
    assert rc == 0
    out = capsys.readouterr().out.splitlines()
    names = [line[2:].split(" ")[0] for line in out if line.startswith("# ")]
    assert names[0] == "global_scheduler" and "party1/worker1" in names and len(names) == 13
    text = "\n".join(out)
    assert "DMLC_ROLE_GLOBAL=global_server" in text
    worker = out[out.index("# party1/worker0 (worker)") + 1]
    assert "DMLC_ROLE=worker" in worker and "GEOMX_DATA_SLICE=2" in worker and "PS_VERBOSE=1" in worker
    assert worker.endswith("python cnn.py --data-slice-idx 2")
    server = out[out.index("# global_server1") + 1]
    assert "MXNET_KVSTORE_SIZE_LOWER_BOUND=1000" in server and server.endswith("-m geomx.node")
    assert "MXNET_KVSTORE_SIZE_LOWER_BOUND" not in worker
    assert "PATH=" not in text.replace("_PATH=", "")  # only the selected variables


@pytest.mark.system
def test_dry_run_module_entry_point():
    p = subprocess.run([sys.executable, "-m", "geomx.launch", "--dry-run", "-p", "1", "-w", "1", "--",
                        "echo", "{slice}"], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    assert "# party0/worker0 (worker)" in p.stdout


@pytest.mark.unit
@pytest.mark.parametrize(
    "argv, flag",
    [
        (["-p", "0", "--", "x"], "-p/--parties"),
        (["--workers", "0", "--", "x"], "-w/--workers"),
        (["-s", "0", "--", "x"], "-s/--global-servers"),
        (["--env", "NOEQUALS", "--", "x"], "--env"),
        (["--node-env", "K=V", "--", "x"], "--node-env"),
        (["-p", "2"], "COMMAND"),
        (["-p", "2", "--"], "COMMAND"),
    ],
)
def test_cli_errors(capsys, argv, flag):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert flag in capsys.readouterr().err


# ----------------------------------------------------------------------------------------
# Running real processes
# ----------------------------------------------------------------------------------------


@pytest.mark.system
def test_success_and_log_prefixing(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="geomx.launch")
    topo = Topology(parties=2, workers_per_party=2, node_command=NODE_CMD, env={"NODE_EXIT_AFTER": "0.5"})
    out = io.StringIO()
    t0 = time.monotonic()
    rc = run(topo, WORKER_CMD, stream=out, log_dir=str(tmp_path), grace=10, timeout=20)
    assert rc == 0, out.getvalue()
    assert time.monotonic() - t0 < 5
    text = out.getvalue()
    for p in range(2):
        for i in range(2):
            s = p * 2 + i
            assert f"[party{p}/worker{i}] hello slice={s} party={p} rank={i} env={s}\n" in text
            assert f"[party{p}/worker{i}] to stderr\n" in text
    assert "[central/master_worker] hello slice=0 party=central rank=0 env=0\n" in text
    assert re.search(r"^\[global_server0\] PID \d+$", text, flags=re.M)
    # every line carries a prefix
    assert all(re.match(r"^\[[a-z0-9_/]+\] ", line) for line in text.splitlines())
    raw = (tmp_path / "party1" / "worker1.log").read_text()
    assert "hello slice=3 party=1 rank=1 env=3\n" in raw and "[" not in raw
    assert (tmp_path / "global_scheduler.log").read_text().startswith("PID ")
    assert_all_dead(pids_in(text))


@pytest.mark.system
def test_worker_failure_stops_everything(caplog):
    topo = Topology(parties=2, workers_per_party=2, node_command=NODE_CMD,
                    env={"FAIL_SLICE": "3", "FAIL_AFTER": "1.0", "FAIL_CODE": "3", "SPAWN_SLICE": "1",
                         "WORKER_SLEEP": "1000"})
    out = io.StringIO()
    t0 = time.monotonic()
    rc = run(topo, WORKER_CMD, stream=out, timeout=20)
    elapsed = time.monotonic() - t0
    assert rc == 3
    assert elapsed < 4, elapsed
    assert "party1/worker1 exited with code 3; stopping the topology" in caplog.text
    pids = pids_in(out.getvalue())
    assert len(pids) == 13  # 12 processes + the grandchild of party0/worker1
    assert_all_dead(pids)
    # The children's process groups hold no live process either (the grandchild included).
    assert [pid for pid in pids if live_group_members(pid)] == []


@pytest.mark.system
def test_node_failure_and_signal_exit_code(caplog):
    topo = small(WORKER_SLEEP="1000", NODE_EXIT_AFTER="1000")
    topo.node_env = {"party0/server": {"NODE_EXIT_AFTER": "0.5", "NODE_EXIT_CODE": "2"}}
    out = io.StringIO()
    assert run(topo, WORKER_CMD, stream=out, timeout=20) == 2
    assert "party0/server exited with code 2; stopping the topology" in caplog.text
    assert_all_dead(pids_in(out.getvalue()))

    topo = small(WORKER_SLEEP="1000", FAIL_SLICE="0", FAIL_AFTER="0.5", FAIL_SIGNAL=str(int(signal.SIGKILL)))
    out = io.StringIO()
    assert run(topo, WORKER_CMD, stream=out, timeout=20) == 128 + signal.SIGKILL
    assert "exited with code 137 (killed by SIGKILL); stopping the topology" in caplog.text
    assert_all_dead(pids_in(out.getvalue()))


@pytest.mark.system
def test_stragglers_are_killed_after_grace(caplog):
    # Nodes never exit; one of them even ignores SIGTERM and needs SIGKILL.
    topo = small()
    topo.node_env = {"party0/server": {"IGNORE_TERM": "1"}}
    out = io.StringIO()
    t0 = time.monotonic()
    rc = run(topo, WORKER_CMD, stream=out, grace=0.5, kill_timeout=1.0, timeout=20)
    assert rc != 0
    assert time.monotonic() - t0 < 5
    assert "global_scheduler had to be terminated after every worker succeeded" in caplog.text
    assert "party0/server did not stop within 1 s of SIGTERM; sending SIGKILL" in caplog.text
    pids = pids_in(out.getvalue())
    assert len(pids) == 7
    assert_all_dead(pids)


@pytest.mark.system
def test_timeout(caplog):
    out = io.StringIO()
    t0 = time.monotonic()
    rc = run(small(WORKER_SLEEP="1000"), WORKER_CMD, stream=out, timeout=1.0)
    assert rc == 124
    assert 1.0 <= time.monotonic() - t0 < 4
    assert "timeout of 1 s exceeded" in caplog.text
    assert_all_dead(pids_in(out.getvalue()))


@pytest.mark.system
def test_missing_worker_executable(caplog):
    rc = run(small(), ["/nonexistent/geomx-worker"], stream=io.StringIO(), timeout=20)
    assert rc == 127
    assert "could not start central/master_worker" in caplog.text


@pytest.mark.system
@pytest.mark.parametrize("sig, expected", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_to_launcher(sig, expected):
    node_cmd = shlex.join(NODE_CMD)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [sys.executable, "-m", "geomx.launch", "-p", "1", "-w", "1", "--node-command", node_cmd,
         "--env", "WORKER_SLEEP=1000", "--env", "SPAWN_SLICE=0", "--timeout", "30", "--", *WORKER_CMD],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        end = time.monotonic() + 15
        while len(pids_in("".join(lines))) < 9 and time.monotonic() < end and proc.poll() is None:
            time.sleep(0.05)
        pids = pids_in("".join(lines))
        assert len(pids) == 9, "".join(lines)  # 7 processes + 2 grandchildren (slice 0 twice)
        proc.send_signal(sig)
        rc = proc.wait(timeout=15)
        err = proc.stderr.read()
        assert rc == expected, err
        assert f"[launch] launcher received {signal.Signals(sig).name}; stopping the topology" in err
        assert_all_dead(pids)
    finally:
        kill_group(proc)


# ----------------------------------------------------------------------------------------
# The schedulers' ports
# ----------------------------------------------------------------------------------------


@pytest.mark.system
def test_scheduler_ports_cannot_be_taken_before_the_schedulers_bind():
    # Every scheduler's node command first binds its own port the way another program starting at the
    # same moment could. The launcher holds each port in a listening socket the scheduler inherits, so
    # no such bind succeeds and the topology trains; a port that was merely picked free was taken, and
    # the scheduler failed with "Address already in use".
    workers = REPO / "tests" / "workers"
    topo = Topology(parties=1, workers_per_party=1,
                    node_command=[sys.executable, str(workers / "port_thief.py")])
    out = io.StringIO()
    rc = run(topo, [sys.executable, str(workers / "exact_worker.py"), "--slice", "{slice}", "--rounds", "2",
                    "--mode", "push-pull"], stream=out, timeout=120)
    text = out.getvalue()
    assert rc == 0, text[-4000:]
    assert len(re.findall(r"THIEF could not take port \d+: Address already in use", text)) == 3, text[-4000:]
    assert "THIEF took" not in text
    assert len([line for line in text.splitlines() if "EXACT OK" in line]) == 1


@pytest.mark.unit
def test_reserved_ports_are_closed_by_the_launcher():
    topo = small()
    ports = topo.reserve_ports()
    specs = topo.processes(WORKER_CMD, ports)
    held = [s for s in specs if s.listener is not None]
    assert [s.name for s in held] == ["global_scheduler", "central/scheduler", "party0/scheduler"]
    for s in held:
        assert int(s.env["GEOMX_LISTEN_FD"]) == s.listener.fileno()
    assert not any("GEOMX_LISTEN_FD" in s.env for s in specs if s.listener is None)
    ports.close()
    # A dry run and explicit ports hand nothing down.
    assert not any("GEOMX_LISTEN_FD" in s.env for s in topo.processes(WORKER_CMD))


# ----------------------------------------------------------------------------------------
# The remote wrapper of SSH-started processes (geomx/launch/remote.py)
# ----------------------------------------------------------------------------------------


@pytest.mark.system
def test_remote_wrapper_passes_the_exit_status():
    def status(*argv):
        # The input stays open while the command runs (its end would stop the command).
        proc = subprocess.Popen([sys.executable, "-m", "geomx.launch.remote", "--", *argv], cwd=REPO,
                                stdin=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            return proc.wait(timeout=30)
        finally:
            proc.stdin.close()

    assert status(sys.executable, "-c", "import sys; sys.exit(3)") == 3
    assert status(sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)") == \
        128 + signal.SIGKILL
    assert status("/nonexistent/x") == 127


def _wrapped_sleeper():
    """The remote wrapper running a command that starts a grandchild and sleeps: (wrapper, [both pids])."""
    proc = subprocess.Popen([sys.executable, "-m", "geomx.launch.remote", "--", sys.executable, "-c", WORKER,
                             "0", "p", "0"], cwd=REPO,
                            env=dict(os.environ, SPAWN_SLICE="0", WORKER_SLEEP="1000", GEOMX_DATA_SLICE="0"),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    end = time.monotonic() + 15
    while len(pids_in("".join("[w] " + line for line in lines))) < 2 and time.monotonic() < end:
        time.sleep(0.05)
    pids = pids_in("".join("[w] " + line for line in lines))
    assert len(pids) == 2, lines  # the command and its grandchild
    return proc, pids


@pytest.mark.system
def test_remote_wrapper_stops_its_group_when_its_input_ends():
    # Closing the wrapper's input (what the launcher does to stop a remote process, and what a broken SSH
    # connection does) ends the command and its grandchild.
    proc, pids = _wrapped_sleeper()
    assert proc.poll() is None
    proc.stdin.close()
    assert proc.wait(timeout=15) == 128 + signal.SIGTERM
    assert_all_dead(pids)


@pytest.mark.system
def test_remote_wrapper_killed_takes_its_command_along():
    """Issue 27 item 5: a SIGKILLed wrapper (nothing runs in it any more) must not leave its command
    running untracked: its guard stops the command's whole group (SIGTERM, SIGKILL after KILL_AFTER)."""
    from geomx.launch.remote import KILL_AFTER

    proc, pids = _wrapped_sleeper()
    proc.kill()
    assert proc.wait(timeout=5) == -signal.SIGKILL
    assert_all_dead(pids, within=KILL_AFTER + 5)
    proc.stdin.close()


@pytest.mark.unit
def test_metrics_ports_in_start_order_and_the_scrape_configuration(capsys):
    topo = Topology(parties=2, workers_per_party=1, metrics_base=30000)
    specs = topo.processes(["python", "x.py"], Ports(global_root=9092, central_root=9093, parties=[9094, 9095]))
    assert [s.env["GEOMX_METRICS_PORT"] for s in specs] == [str(30000 + n) for n in range(len(specs))]
    assert len(specs) == topo.num_processes
    assert main(["-p", "2", "-w", "1", "--metrics-port", "30000", "--print-prometheus", "--", "python", "x.py"]) == 0
    config = capsys.readouterr().out
    assert [line.split('"')[1] for line in config.splitlines() if "- targets:" in line] == \
        [f"127.0.0.1:{30000 + n}" for n in range(len(specs))]
    assert '{geomx_process: "party1/worker0", geomx_role: "worker", geomx_site: "party1"}' in config
    assert '{geomx_process: "central/master_worker", geomx_role: "master_worker", geomx_site: "central"}' in config
    with pytest.raises(SystemExit):
        main(["-p", "2", "--print-prometheus", "--", "x"])
    assert "--print-prometheus needs --metrics-port BASE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["-p", "2", "--metrics-port", "65530", "--", "x"])
    assert "ports run past 65535" in capsys.readouterr().err
