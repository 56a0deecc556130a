"""Starting MXNet's native ps-lite ``dist_sync`` (scheduler, servers, workers) for the benchmarks.

Shared by ``bench_pushpull.py`` (loopback) and ``suite.py`` (emulated WAN). The scheduler and the
servers are ``python -c "import mxnet"`` with ``DMLC_ROLE`` set (importing MXNet with that role starts
its native node and never returns); workers run a benchmark script that does NOT import geomx.

On an emulated WAN every process gets an argv prefix (``ip netns exec NS``) and ``DMLC_NODE_HOST`` set
to its namespace's address (ps-lite otherwise advertises another interface); the scheduler URI is the
central data center's address.

No MXNet import here.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence

#: Variables of a role that must not leak from this process's environment into the children.
_DMLC_PREFIXES = ("DMLC_", "GEOMX_DATA_SLICE")


@dataclasses.dataclass
class Proc:
    name: str
    argv: List[str]
    env: Dict[str, str]
    is_worker: bool = False


def clean_env(extra: Dict[str, str]) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_DMLC_PREFIXES)}
    env["PYTHONUNBUFFERED"] = "1"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def native_procs(worker_argvs: Sequence[Sequence[str]], extra_env: Dict[str, str], *,
                 root_host: str = "127.0.0.1", root_port: Optional[int] = None,
                 root_prefix: Sequence[str] = (), worker_hosts: Optional[Sequence[str]] = None,
                 worker_prefixes: Optional[Sequence[Sequence[str]]] = None) -> List[Proc]:
    """Scheduler + one server on ``root_host`` and one worker per argv.

    ``root_prefix`` / ``worker_prefixes[i]`` are argv prefixes (e.g. ``ip netns exec NS``);
    ``worker_hosts[i]`` is worker i's ``DMLC_NODE_HOST`` (default ``root_host``).
    """
    n = len(worker_argvs)
    port = root_port or free_port()
    base = dict(extra_env, DMLC_PS_ROOT_URI=root_host, DMLC_PS_ROOT_PORT=str(port),
                DMLC_NUM_SERVER="1", DMLC_NUM_WORKER=str(n))
    node = [sys.executable, "-c", "import mxnet"]
    procs = [Proc("scheduler", list(root_prefix) + node, dict(base, DMLC_ROLE="scheduler", DMLC_NODE_HOST=root_host)),
             Proc("server", list(root_prefix) + node, dict(base, DMLC_ROLE="server", DMLC_NODE_HOST=root_host))]
    for i, argv in enumerate(worker_argvs):
        host = worker_hosts[i] if worker_hosts else root_host
        prefix = list(worker_prefixes[i]) if worker_prefixes else []
        procs.append(Proc(f"worker{i}", prefix + list(argv), dict(base, DMLC_ROLE="worker", DMLC_NODE_HOST=host),
                          True))
    return procs


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def run_processes(procs: Sequence[Proc], timeout: float, *, on_line: Optional[Callable[[str], None]] = None,
                  grace: float = 10.0, tag: str = "native") -> dict:
    """Run ``procs`` until every one exits 0, one fails, or ``timeout`` passes.

    Output is collected line by line as ``[name] line`` (``on_line`` sees each line as it arrives).
    Every process runs in its own process group, which is SIGTERMed then SIGKILLed at the end.
    Returns ``{"status", "wall_s", "log"}``; status 124 on timeout, the failing code otherwise.
    """
    lines: List[str] = []
    lock = threading.Lock()
    started = []  # (Proc, Popen, reader thread)

    def pump(name: str, pipe) -> None:
        for raw in iter(pipe.readline, b""):
            line = f"[{name}] " + raw.decode("utf-8", "replace").rstrip("\n")
            with lock:
                lines.append(line)
            if on_line is not None:
                try:
                    on_line(line)
                except Exception as exc:  # noqa: BLE001 - never stop draining the pipe
                    print(f"[{tag}] on_line failed: {exc}", file=sys.stderr)
        pipe.close()

    status = 0
    t0 = time.perf_counter()
    try:
        for spec in procs:
            p = subprocess.Popen(spec.argv, env=clean_env(spec.env), stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                                 close_fds=True)
            t = threading.Thread(target=pump, args=(spec.name, p.stdout), daemon=True)
            t.start()
            started.append((spec, p, t))
        deadline = t0 + timeout
        grace_end = None
        while True:
            codes = [p.poll() for _, p, _ in started]
            failed = [(s.name, c) for (s, _, _), c in zip(started, codes) if c not in (None, 0)]
            if failed:
                status = failed[0][1] if failed[0][1] > 0 else 128 - failed[0][1]
                print(f"[{tag}] {failed[0][0]} exited with {failed[0][1]}; stopping", file=sys.stderr)
                break
            if all(c == 0 for c in codes):
                break
            if grace_end is None and all(p.poll() == 0 for s, p, _ in started if s.is_worker):
                # Workers done: scheduler and server normally exit within a second.
                grace_end = time.perf_counter() + grace
            if grace_end is not None and time.perf_counter() > grace_end:
                print(f"[{tag}] scheduler/server still running {grace:g} s after the workers; stopping them",
                      file=sys.stderr)
                break
            if time.perf_counter() > deadline:
                print(f"[{tag}] timeout of {timeout:g}s exceeded; stopping", file=sys.stderr)
                status = 124
                break
            time.sleep(0.05)
    finally:
        for _, p, _ in started:
            _kill_group(p.pid, signal.SIGTERM)
        end = time.monotonic() + 5
        while time.monotonic() < end and any(p.poll() is None for _, p, _ in started):
            time.sleep(0.02)
        for _, p, _ in started:
            _kill_group(p.pid, signal.SIGKILL)  # also any grandchildren left in the group
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                print(f"[{tag}] pid {p.pid} could not be reaped", file=sys.stderr)
        for _, _, t in started:
            t.join(timeout=2)
    wall = time.perf_counter() - t0
    with lock:
        text = "\n".join(lines) + "\n"
    return {"status": status, "wall_s": wall, "log": text}
