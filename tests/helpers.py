"""The tests' shared helpers, in one place (fixtures are in conftest.py).

- paths: ``REPO``, ``WORKERS`` (tests/workers), ``EXAMPLES``;
- the compiled extensions: ``built_or_skip``, ``fail_unbuilt_under_ci``;
- wire headers built by hand: ``HEADER``, ``header()``;
- tests/workers/exact_worker.py: ``slow_cmd()``, the byte patterns ``INIT_BYTES`` / ``PUSH_BYTES``;
- a topology started by hand, process by process: ``Cluster`` (with ``LineLog``, ``FAST_HEARTBEATS``);
- processes: "nothing left running" checks (``assert_no_process_left``, ``assert_all_dead``,
  ``live_group_members``), ``kill_group``, ``rss_bytes``;
- ports: ``dead_port``, ``free_port_range``, ``listening``;
- servers inside the test process: ``SERVER_ENV``, ``initialised``;
- topology runs through geomx.launch.run: ``Result`` / ``run_topology`` (the ``topology_run`` fixture), with
  the workers' structured reports (``Result.reports``, ``exact_slices``; tests/workers/results.py), and the
  example scripts' runs and accuracy curves (``run_example``, ``run_concurrently``, ``curves``).

Tests import them by name (``from helpers import Cluster``): pytest puts tests/ on ``sys.path``.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import zmq

from geomx import metrics, wire
from geomx.launch import Topology, run
from geomx.launch.topology import free_port_range  # noqa: F401 - the tests take it from here
from geomx.wire import MsgType

# -- paths ----------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
WORKERS = REPO / "tests" / "workers"
EXAMPLES = REPO / "examples"

# -- the compiled extensions (geomx._kernels, geomx._compress) --------------------------------------
# (pytest is imported where used: the benchmarks import this module too.)

def fail_unbuilt_under_ci(module, not_built: str) -> None:
    """Under CI (``CI`` set) the compiled kernels must be tested: fail when ``module`` is None."""
    import pytest

    if module is None and os.environ.get("CI"):
        pytest.fail(f"{not_built} (CI is set, so the compiled kernels must be tested)")


def built_or_skip(module, not_built: str):
    """The compiled ``module``; a skip outside CI when it is missing (None), an error under CI."""
    import pytest

    if module is None:
        if os.environ.get("CI"):
            pytest.fail(not_built, pytrace=False)
        pytest.skip(not_built)
    return module


# -- wire headers built by hand -------------------------------------------------------------------

# geomx.wire's 60-byte header: magic, type, dtype, flags, sender, req_id, key, offset, numel, total,
# priority, version.
HEADER = struct.Struct("<4sBBHiQqQQQiI")


def header(mtype=MsgType.PUSH, dtype=0, flags=0, sender=0, req_id=0, key=0, offset=0, numel=0, total=0,
           priority=0, version=0, magic=wire.MAGIC) -> bytes:
    return HEADER.pack(magic, int(mtype), dtype, flags, sender, req_id, key, offset, numel, total, priority,
                       version)


# -- tests/workers/exact_worker.py ----------------------------------------------------------------

SLOW_WORKER = str(WORKERS / "exact_worker.py")


def slow_cmd(rounds: int, sleep: float) -> List[str]:
    return [sys.executable, SLOW_WORKER, "--slice", "{slice}", "--rounds", str(rounds), "--sleep", str(sleep)]


def exact_pattern(values: np.ndarray) -> bytes:
    return values.astype(np.float32).tobytes()


# Bytes that cross the party links (and the WAN) in clear: the initial value of key 2 of exact_worker.py
# (global server -> parties, in its INIT replies) and party 0's round-0 push of it (local server ->
# global server): both repeat these patterns throughout their 1.2 MB.
INIT_BYTES = exact_pattern(np.arange(101))
PUSH_BYTES = exact_pattern((np.arange(26) % 13) - 6 + 2)

# -- a topology started by hand -------------------------------------------------------------------

# Fast failure detection for the kill tests (PS_HEARTBEAT_TIMEOUT must exceed 2 x the interval).
FAST_HEARTBEATS = {"PS_HEARTBEAT_INTERVAL": "0.5", "PS_HEARTBEAT_TIMEOUT": "3"}


class LineLog:
    """A thread-safe text sink (a ``stream`` for launch.run) that can wait for a line."""

    def __init__(self):
        self._lines: List[str] = []
        self._cond = threading.Condition()

    def write(self, text: str) -> int:
        with self._cond:
            self._lines.extend(text.splitlines())
            self._cond.notify_all()
        return len(text)

    def flush(self) -> None:
        pass

    def lines(self) -> List[str]:
        with self._cond:
            return list(self._lines)

    def text(self) -> str:
        return "\n".join(self.lines())

    def wait_for(self, pattern: str, timeout: float, done=lambda: False) -> re.Match:
        rx = re.compile(pattern)
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self._lines:
                    m = rx.search(line)
                    if m:
                        return m
                left = end - time.monotonic()
                if left <= 0 or done():
                    raise AssertionError(f"no line matching {pattern!r} within {timeout}s; output:\n"
                                         + "\n".join(self._lines[-60:]))
                self._cond.wait(min(left, 0.2))


class Cluster:
    """The processes of a topology started by hand (not through launch.run, which would stop everything
    as soon as one process dies and so hide how geomx itself reacts), each in its own process group."""

    def __init__(self, topology: Topology, command: List[str]):
        self.specs = topology.processes(command)
        self.specs_by_name = {spec.name: spec for spec in self.specs}
        self.procs: Dict[str, subprocess.Popen] = {}
        self.log = LineLog()
        self._threads: List[threading.Thread] = []

    def start(self) -> "Cluster":
        for spec in self.specs:
            self._launch(spec.name, spec.argv, spec.env)
        return self

    def _launch(self, name: str, argv: List[str], env: Dict[str, str]) -> None:
        proc = subprocess.Popen(argv, env=env, cwd=REPO, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        t = threading.Thread(target=self._pump, args=(name, proc), daemon=True)
        t.start()
        self._threads.append(t)

    def restart(self, name: str, **env: str) -> None:
        """Start process ``name`` again (after it died), with ``env`` added to its environment; its
        output goes on under the same name."""
        assert self.procs[name].poll() is not None, f"{name} is still running"
        spec = self.specs_by_name[name]
        self._launch(name, spec.argv, {**spec.env, **env})

    def _pump(self, name: str, proc: subprocess.Popen) -> None:
        for raw in iter(proc.stdout.readline, b""):
            self.log.write(f"[{name}] " + raw.decode("utf-8", "replace"))
        proc.wait()
        self.log.write(f"[{name}] <exited with {proc.returncode}>\n")

    def running(self) -> List[str]:
        return [n for n, p in self.procs.items() if p.poll() is None]

    def wait_all(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while self.running() and time.monotonic() < end:
            time.sleep(0.05)
        return not self.running()

    def output(self, name: str) -> str:
        prefix = f"[{name}] "
        return "\n".join(line for line in self.log.lines() if line.startswith(prefix))

    def kill(self, name: str) -> float:
        os.kill(self.procs[name].pid, signal.SIGKILL)
        return time.monotonic()

    def stop(self) -> None:
        for p in self.procs.values():
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for p in self.procs.values():
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for t in self._threads:
            t.join(timeout=2)

    def __enter__(self) -> "Cluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# -- processes: nothing left running --------------------------------------------------------------

def group_gone(pgid: int) -> bool:
    """True when no process is left in the group (its leader, our child, has been reaped)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def assert_no_process_left(cluster: Cluster) -> None:
    """Every process of the topology and anything it started is gone (checked before any cleanup kill)."""
    end = time.monotonic() + 5
    while True:
        left = [n for n, p in cluster.procs.items() if p.poll() is None or not group_gone(p.pid)]
        if not left:
            return
        if time.monotonic() > end:
            raise AssertionError(f"processes left behind: {left}")
        time.sleep(0.1)


def pid_with_environ(*entries: str) -> int:
    """The process id of the one process whose environment holds every ``NAME=value`` of ``entries``
    (a topology's process, found by what its launcher set for it)."""
    want = {e.encode() for e in entries}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = set(f.read().split(b"\0"))
        except (OSError, ValueError):
            continue
        if entry.isdigit() and want <= env:
            return int(entry)
    raise AssertionError(f"no process with {', '.join(entries)} in its environment")


def alive(pid: int) -> bool:
    """True when ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def assert_all_dead(pids, within: float = 3.0) -> None:
    end = time.monotonic() + within
    while True:
        left = [p for p in pids if alive(p)]
        if not left:
            return
        if time.monotonic() > end:
            raise AssertionError(f"processes still alive: {left}")
        time.sleep(0.05)


def live_group_members(pgid: int):
    """Non-zombie processes in process group ``pgid`` (scans /proc; zombies left to a
    non-reaping PID 1 do not count)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry))
    return members


def kill_group(proc: subprocess.Popen) -> None:
    """The clean-up after a test's own process (started with ``start_new_session=True``): if it still
    runs, SIGKILL its whole process group and reap it."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


# -- raw ZMTP peers -------------------------------------------------------------------------------

ZMTP_NULL_GREETING = b"\xff" + b"\0" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\0") + b"\0" * 32
_READY_BODY = b"\x05READY" + bytes([11]) + b"Socket-Type" + struct.pack(">I", 6) + b"DEALER"
ZMTP_DEALER_READY = b"\x04" + bytes([len(_READY_BODY)]) + _READY_BODY
ZMTP_HANDSHAKE = len(ZMTP_NULL_GREETING) + len(ZMTP_DEALER_READY)
"""What a raw connection sends before its first message: libzmq holds exactly this much once it has
read it (it reads a greeting in pieces, so anything less is a handshake still arriving)."""


def zmtp_null_dealer(port: int, timeout: float = 20.0) -> socket.socket:
    """A raw ZMTP 3.0 connection (NULL mechanism, DEALER), written as a hostile or misconfigured peer
    writes it. Unlike a libzmq socket it stays connected whatever the listener answers, and it never
    retries: a test sees what the listener does with exactly this one connection."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.sendall(ZMTP_NULL_GREETING)
    s.sendall(ZMTP_DEALER_READY)
    return s


# -- ports ----------------------------------------------------------------------------------------

def dead_port() -> int:
    """A port nothing listens on: the servers' upstream requests stay pending, as on a slow WAN."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(ports) -> set:
    """(address, port) of the TCP sockets in LISTEN state at ``ports`` (from /proc/net/tcp)."""
    found = set()
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            addr, port = fields[1].split(":")
            if fields[3] == "0A" and int(port, 16) in ports:
                ip = socket.inet_ntoa(bytes.fromhex(addr)[::-1])
                found.add((ip, int(port, 16)))
    return found


# -- servers inside the test process --------------------------------------------------------------

# What config.load needs for a local or global server whose upstream is never reached.
SERVER_ENV = {"DMLC_PS_ROOT_URI": "127.0.0.1", "DMLC_PS_ROOT_PORT": "9", "DMLC_NUM_SERVER": "1",
              "DMLC_NUM_WORKER": "2", "DMLC_PS_GLOBAL_ROOT_URI": "127.0.0.1", "DMLC_PS_GLOBAL_ROOT_PORT": "9",
              "DMLC_NUM_GLOBAL_SERVER": "1", "DMLC_NUM_GLOBAL_WORKER": "2"}
# The variables that make SERVER_ENV one kind of server.
SERVER_ROLES = {"local server": {"DMLC_ROLE": "server"},
                "global server": {"DMLC_ROLE_GLOBAL": "global_server", "DMLC_ROLE": "server",
                                  "DMLC_NUM_ALL_WORKER": "4"}}


def server_config(kind: str = "local server", **env: str):
    """The configuration of a ``kind`` ("local server" or "global server") built in the test process, with
    ``env`` on top: every test that makes a server (or checks its variables) starts from this one."""
    from geomx import config

    return config.load({**SERVER_ENV, **SERVER_ROLES[kind], **env})


def initialised(server, keys=(0, 1, 2, 3)) -> None:
    """Give ``server`` initialised keys: the even ones 12 float32, the odd ones 6."""
    from geomx.servers.keystate import KeyState

    for k in keys:
        n = 12 if k % 2 == 0 else 6
        ks = server.keys[k] = KeyState(k, n, np.dtype(np.float32))
        ks.store = np.arange(n, dtype=np.float32)
        ks.initialized = True


# -- topology runs through geomx.launch.run -------------------------------------------------------

# Where the workers of a run_topology write their reports (tests/workers/results.py).
RESULTS_VARIABLE = "GEOMX_TEST_RESULTS"


class Result:
    """A topology run: its exit ``code``, every process's ``output`` (lines prefixed with its name), and
    ``reports``: what each worker reported through tests/workers/results.py (one dict per worker process
    that reported, in no particular order), and ``readings``: every node's last metrics (``party/node`` ->
    reading, geomx.metrics.load_dumps)."""

    def __init__(self, code: int, output: str, reports: Sequence[Dict[str, Any]] = (),
                 readings: Optional[Dict[str, dict]] = None):
        self.code = code
        self.output = output
        self.reports = list(reports)
        self.readings = readings or {}

    def of_role(self, role: str) -> List[dict]:
        """The last metrics of every node of ``role`` (``local_server``, ``global_server``, ...)."""
        return metrics.of_role(self.readings, role)

    def lines(self, needle: str):
        return [line for line in self.output.splitlines() if needle in line]


def read_reports(directory: str) -> List[Dict[str, Any]]:
    """The workers' reports in ``directory`` (tests/workers/results.py), ordered by data slice."""
    reports = [json.loads(path.read_text()) for path in sorted(Path(directory).glob("worker-*.json"))]
    return sorted(reports, key=lambda r: (r.get("slice", -1), r["pid"]))


def run_topology(script, args=(), timeout=120, env=None, **kw) -> Result:
    """Run ``tests/workers/<script>`` on every worker of ``Topology(env=env, **kw)``; the workers' reports
    come back in ``Result.reports``."""
    with tempfile.TemporaryDirectory(prefix="geomx-reports-") as reports, \
            tempfile.TemporaryDirectory(prefix="geomx-metrics-") as dumps:
        topo = Topology(env={"GEOMX_METRICS_DIR": dumps, **(env or {}), RESULTS_VARIABLE: reports}, **kw)
        stream = io.StringIO()
        code = run(topo, [sys.executable, str(WORKERS / script), *args], timeout=timeout, stream=stream)
        return Result(code, stream.getvalue(), read_reports(reports), metrics.load_dumps(dumps))


def exact_slices(result: Result) -> List[int]:
    """The data slices of the workers that reported their exact oracle held to the end (``exact``:
    tests/workers/exact_worker.py, core_exact_worker.py), after checking that none reported a mismatch."""
    mismatches = [r for r in result.reports if "mismatch" in r]
    assert not mismatches, (mismatches, result.output[-4000:])
    return sorted(r["slice"] for r in result.reports if r.get("exact"))


# -- the example scripts on real 2-party topologies, several at once, and their accuracy ----------
#
# Shared by the convergence tests (test_convergence.py, test_compression_convergence.py,
# test_dgt_topology.py). Training on load_digits is chaotic: one run's final accuracy on the 300 test
# images moves by 1-3 points with the seed or with the last bit of a kernel's rounding, so those tests
# compare means over ``SEEDS`` (the examples' ``--seed``: initial weights and data order), not single runs.

SEEDS = (0, 1, 2)
DIGITS_TRAIN_IMAGES = 1497  # load_digits' training split (the examples' default data set)


def iterations_per_epoch(workers, batch):
    """Iterations per epoch of each of ``workers`` workers at ``batch``: each gets an equal slice of
    load_digits' training images, the last batch partial."""
    return -(-(DIGITS_TRAIN_IMAGES // workers) // batch)


_ACC = re.compile(r"^\[(?P<name>[^\]]+)\] \[Time [0-9.]+\]\[Epoch \d+\]\[Iteration (?P<it>\d+)\] "
                  r"Test Acc (?P<acc>[0-9.]+)")


def run_example(script, args, parties, workers, env=None, timeout=300):
    """Run ``examples/<script>`` on every worker of a topology; return (code, output, seconds)."""
    topo = Topology(parties=parties, workers_per_party=workers, env=dict(env or {}))
    stream = io.StringIO()
    start = time.monotonic()
    code = run(topo, [sys.executable, str(EXAMPLES / script), *args], timeout=timeout, stream=stream)
    return code, stream.getvalue(), time.monotonic() - start


def run_concurrently(jobs, **topology):
    """{label: (code, output, seconds)} for ``jobs`` = {label: (script, args, env)}, all started at once."""
    results = {}

    def target(label, script, args, env):
        try:
            results[label] = run_example(script, args, env=env, **topology)
        except Exception as exc:  # reported by the caller's assertions
            results[label] = (-1, f"{type(exc).__name__}: {exc}", 0.0)

    threads = [threading.Thread(target=target, args=(label, *job)) for label, job in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def curves(output):
    """{worker name: [(iterations, accuracy), ...]} from the ``Test Acc`` lines."""
    out = {}
    for line in output.splitlines():
        m = _ACC.match(line)
        if m:
            out.setdefault(m.group("name"), []).append((int(m.group("it")), float(m.group("acc"))))
    return out


def checked_curves(label, result, expected_workers):
    """The run's curves, after checking that it exited 0 and every worker reported."""
    code, output, _ = result
    assert code == 0, f"{label}: exit status {code}\n{output[-4000:]}"
    accs = curves(output)
    assert len(accs) == expected_workers, f"{label}: no Test Acc line from every worker\n{output[-4000:]}"
    return accs


class DrivenLoop:
    """A node's event loop in the test's process, run by the test (``ctx``, ``loop``), and the test's
    own sockets to it (``socks``): what the in-process server and listener cases share.

    It owns its context: a subclass's ``__init__`` makes it with :meth:`_own_context` first and builds
    the rest inside ``with self._closed_on_error():``, so that a constructor that fails half-way
    leaves nothing open; :meth:`close` ends the context whatever else fails."""

    ctx: zmq.Context
    loop: Any = None  # geomx.transport.EventLoop
    socks: List[zmq.Socket]

    def _own_context(self) -> None:
        self.ctx = zmq.Context()
        self.socks = []

    @contextlib.contextmanager
    def _closed_on_error(self):
        try:
            yield
        except BaseException:
            self.close()
            raise

    def replies(self, sock, count: int, timeout: float = 30) -> List[wire.Message]:
        """Run the loop until ``sock`` has ``count`` replies (or ``timeout`` passed); the replies."""
        out: List[wire.Message] = []
        end = time.monotonic() + timeout
        while len(out) < count and time.monotonic() < end:
            self.loop.run_once(0.01)
            while sock.poll(0):
                out.append(wire.decode(sock.recv_multipart()))
        return out

    def close(self) -> None:
        try:
            for sock in self.socks:
                sock.close(linger=0)
            if self.loop is not None:
                self.loop.close()
        finally:
            self.ctx.destroy(linger=0)  # also closes whatever the lines above did not


# -- a real server in the test's process, its clients registered ------------------------------------

TOKEN = "0123456789abcdef" * 2  # as TierMember makes them: 32 hex digits


class InProcessServer(DrivenLoop):
    """A real local or global server in this process (its event loop driven by the test) whose
    clients are registered as the tier's scheduler would do it, and DEALERs to talk to it. ``master``:
    the central-party client is the master worker."""

    def __init__(self, kind: str, master: bool = False, **env: str):

        from geomx import transport
        from geomx.kvclient import KVClient
        from geomx.servers import GlobalServer, LocalServer

        self._own_context()
        with self._closed_on_error():
            self.loop = transport.EventLoop(self.ctx, name=kind, local_ipc=False)
            if kind == "local server":
                self.server = LocalServer(server_config("local server", **env), self.loop)
                self.server.connect_upstream(KVClient(self.loop, [("127.0.0.1", dead_port())], identity="ls",
                                                      sender=0, bigarray_bound=10 ** 6, wan=False, name="ls"))
                self.ports = {"party": self.server.port}
                self.server.allow(self.server.link.name, [TOKEN])
            else:
                self.server = GlobalServer(server_config("global server", **env), self.loop)
                self.ports = {"wan": self.server.wan_port, "lan": self.server.lan_port}
                self.server.allow(self.server.wan_link.name, [TOKEN])
                # The central party's scheduler names its master worker: here the registered client.
                self.server.allow(self.server.lan_link.name, [TOKEN], master=TOKEN if master else None)

    def client(self, identity: bytes, port: str) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, identity)
        sock.connect(f"tcp://127.0.0.1:{self.ports[port]}")
        self.socks.append(sock)
        return sock


def trace_rounds(events, node_prefix: str, cat: str, key: int) -> list:
    """The GEOMX_TRACE events (``geomx.trace.load_traces``) of ``key``'s ``cat`` messages at the nodes
    named ``node_prefix*`` (after their party: ``party0/worker0``), in time order, one list per round
    (a round starts again at offset 0)."""
    evs = sorted((e for e in events if e["node"].rsplit("/", 1)[-1].startswith(node_prefix) and e["cat"] == cat
                  and e["args"]["key"] == key), key=lambda e: (e["ts"], e["args"]["offset"]))
    rounds: list = []
    for e in evs:
        if not rounds or e["args"]["offset"] == 0:
            rounds.append([])
        rounds[-1].append(e)
    return rounds
