"""Start a whole GeoMX topology (global layer + parties) on one machine.

The topology is the one of the original GeoMX demo scripts (see
``shared/reference/geomx-behaviour.md`` §1.4), generalised:

* a central party with a global scheduler, ``global_servers`` global servers, a
  scheduler and a master worker (plus ``central_workers - 1`` more training
  workers when the central party trains);
* ``parties`` parties, each with a scheduler, one local server and
  ``workers_per_party`` workers.

Non-worker processes run ``node_command`` (by default ``python -m geomx.node``),
which reads its role from the environment; workers run the user's command, in
which ``{slice}``, ``{party}`` and ``{rank}`` are substituted.

Usage::

    python -m geomx.launch -p 2 -w 2 -- python examples/cnn.py --data-slice-idx {slice}
    python -m geomx.launch --dry-run -p 2 -w 2 -- python train.py

This module must stay free of MXNet imports so that the launcher starts fast.
"""

from __future__ import annotations

import argparse
import atexit
import fnmatch
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import IO, Dict, List, Optional, Sequence, Union

from . import __version__

__all__ = ["Topology", "ProcessSpec", "Ports", "free_ports", "run", "main", "DEFAULT_NODE_COMMAND"]

log = logging.getLogger("geomx.launch")

#: The command every non-worker process (schedulers, servers) runs by default.
DEFAULT_NODE_COMMAND = [sys.executable, "-m", "geomx.node"]

#: Variables the launcher controls. Values inherited from the parent environment are
#: dropped so that e.g. a launcher started from inside a worker does not leak its role.
ROLE_KEYS = frozenset(
    {
        "DMLC_ROLE",
        "DMLC_ROLE_GLOBAL",
        "DMLC_ROLE_MASTER_WORKER",
        "DMLC_PS_ROOT_URI",
        "DMLC_PS_ROOT_PORT",
        "DMLC_PS_GLOBAL_ROOT_URI",
        "DMLC_PS_GLOBAL_ROOT_PORT",
        "DMLC_NUM_SERVER",
        "DMLC_NUM_WORKER",
        "DMLC_NUM_GLOBAL_SERVER",
        "DMLC_NUM_GLOBAL_WORKER",
        "DMLC_NUM_ALL_WORKER",
        "DMLC_ENABLE_CENTRAL_WORKER",
        "DMLC_NODE_HOST",
        "DMLC_INTERFACE",
        "DMLC_RANK",
        "DMLC_GLOBAL_RANK",
        "GEOMX_DATA_SLICE",
    }
)

#: Prefixes of the variables shown by ``--dry-run``.
DRY_RUN_PREFIXES = ("DMLC_", "GEOMX_", "ENABLE_", "MXNET_")

#: Exit status when the launcher's timeout is exceeded (as coreutils ``timeout``).
EXIT_TIMEOUT = 124
#: Exit status when a non-worker had to be killed after every worker succeeded.
EXIT_STRAGGLER = 1


# --------------------------------------------------------------------------------------
# Topology description
# --------------------------------------------------------------------------------------


@dataclass
class ProcessSpec:
    """One process of the topology: its name (log prefix), argv and full environment."""

    name: str
    argv: List[str]
    env: Dict[str, str]
    is_worker: bool
    #: Data center the process belongs to: ``"central"``, ``"partyN"`` or ``"gsN"`` (used by ``--wan``).
    dc: str = ""


@dataclass
class Ports:
    """Scheduler ports: global scheduler, central party scheduler, one per party."""

    global_root: int
    central_root: int
    parties: List[int]


def free_ports(n: int, host: str = "127.0.0.1") -> List[int]:
    """Return ``n`` distinct TCP ports that were free on ``host`` a moment ago.

    All sockets stay bound until every port is chosen, so the ports are distinct.
    """
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _substitute(args: Sequence[str], slice_idx: int, party: Union[int, str], rank: int) -> List[str]:
    # Plain substring replacement (not str.format) so that other braces are left alone.
    out = []
    for a in args:
        a = a.replace("{slice}", str(slice_idx)).replace("{party}", str(party)).replace("{rank}", str(rank))
        out.append(a)
    return out


@dataclass
class Topology:
    """A GeoMX topology on one host.

    ``env`` is applied to every process; ``node_env`` maps an fnmatch pattern on the
    process name (``"party*/server"``, ``"global_server*"``, ``"*worker*"``...) to extra
    variables for the matching processes. ``node_command`` replaces the command of the
    non-worker processes (default ``python -m geomx.node``).
    """

    parties: int = 2
    workers_per_party: int = 2
    global_servers: int = 1
    central_workers: int = 0
    #: Local servers per party: one number for every party, or one per party.
    local_servers: Union[int, Sequence[int]] = 1
    #: Each global server in a data center of its own (``"gsN"``; with ``--wan``: its own link, as
    #: with one machine per global server) instead of the central one.
    separate_global_servers: bool = False
    host: str = "127.0.0.1"
    env: Dict[str, str] = field(default_factory=dict)
    node_env: Dict[str, Dict[str, str]] = field(default_factory=dict)
    node_command: Optional[List[str]] = None
    #: Emulated WAN placement (``--wan``): per data center (``"central"``, ``"partyN"``) the address
    #: its processes advertise and its schedulers listen on (default: ``host``) ...
    dc_hosts: Dict[str, str] = field(default_factory=dict)
    #: ... and an argv prefix that runs a process inside it (e.g. ``ip netns exec NS``).
    dc_prefix: Dict[str, List[str]] = field(default_factory=dict)
    #: CURVE (``--curve``): a directory with one key pair per data center, ``central.key[_secret]``,
    #: ``party0.key[_secret]``, ... (see :meth:`make_curve_keys`); it is every party's allow-list too.
    curve_dir: Optional[str] = None

    @property
    def dcs(self) -> List[str]:
        """Data centers: ``central``, ``party0`` .. ``party{P-1}``."""
        return ["central"] + [f"party{p}" for p in range(self.parties)]

    def make_curve_keys(self, directory: str) -> None:
        """Throwaway key pairs for every data center in ``directory``, and switch CURVE on."""
        from . import security

        security.generate_topology_keys(directory, self.dcs)
        self.curve_dir = directory

    def dc_host(self, dc: str) -> str:
        return self.dc_hosts.get(dc, self.host)

    def validate(self) -> None:
        if self.parties < 1:
            raise ValueError(f"parties must be >= 1, got {self.parties}")
        if self.workers_per_party < 1:
            raise ValueError(f"workers_per_party must be >= 1, got {self.workers_per_party}")
        if self.global_servers < 1:
            raise ValueError(f"global_servers must be >= 1, got {self.global_servers}")
        if self.central_workers < 0:
            raise ValueError(f"central_workers must be >= 0, got {self.central_workers}")
        if not isinstance(self.local_servers, int) and len(self.local_servers) != self.parties:
            raise ValueError(f"local_servers needs one count per party ({self.parties}), "
                             f"got {list(self.local_servers)}")
        if min(self.servers_per_party) < 1:
            raise ValueError(f"local_servers must be >= 1, got {self.local_servers}")

    @property
    def global_server_dcs(self) -> int:
        """Data centers of their own that the global servers need (``gs0``..)."""
        return self.global_servers if self.separate_global_servers else 0

    @property
    def servers_per_party(self) -> List[int]:
        """Local servers of each party."""
        if isinstance(self.local_servers, int):
            return [self.local_servers] * self.parties
        return [int(n) for n in self.local_servers]

    @property
    def num_all_workers(self) -> int:
        """``DMLC_NUM_ALL_WORKER``: training workers worldwide."""
        return self.parties * self.workers_per_party + self.central_workers

    @property
    def num_processes(self) -> int:
        central = 1 + self.global_servers + 1 + max(1, self.central_workers)
        return central + sum(1 + n + self.workers_per_party for n in self.servers_per_party)

    def pick_ports(self) -> Ports:
        ports = free_ports(2 + self.parties, self.host)
        return Ports(global_root=ports[0], central_root=ports[1], parties=ports[2:])

    def processes(
        self, command: Union[str, Sequence[str]], ports: Optional[Ports] = None
    ) -> List[ProcessSpec]:
        """All processes in start order: schedulers, then servers, then workers."""
        self.validate()
        if isinstance(command, str):
            command = shlex.split(command)
        command = list(command)
        if not command:
            raise ValueError("empty worker command")
        if ports is None:
            ports = self.pick_ports()
        if len(ports.parties) != self.parties:
            raise ValueError(f"need {self.parties} party ports, got {len(ports.parties)}")
        node_cmd = list(self.node_command) if self.node_command is not None else list(DEFAULT_NODE_COMMAND)

        host = chost = self.dc_host("central")
        P, W, NGS, CW = self.parties, self.workers_per_party, self.global_servers, self.central_workers
        G, C = ports.global_root, ports.central_root
        ALL = self.num_all_workers
        LS = self.servers_per_party
        NGW = sum(LS)  # DMLC_NUM_GLOBAL_WORKER: the global tier's workers are the local servers
        central_num_worker = max(1, CW)
        enable_cw = 1 if CW > 0 else 0

        schedulers: List[ProcessSpec] = []
        servers: List[ProcessSpec] = []
        workers: List[ProcessSpec] = []

        def dc_of(party) -> str:
            if isinstance(party, str):
                return party  # "central" or "gsN"
            return f"party{party}"

        def node(name: str, role_env: Dict[str, object], party="central") -> ProcessSpec:
            dc = dc_of(party)
            argv = list(self.dc_prefix.get(dc, [])) + list(node_cmd)
            return ProcessSpec(name, argv, self._env(name, role_env, dc), False, dc)

        def worker(name: str, role_env: Dict[str, object], slice_idx: int, party, rank: int) -> ProcessSpec:
            dc = dc_of(party)
            role_env = dict(role_env, GEOMX_DATA_SLICE=slice_idx)
            argv = list(self.dc_prefix.get(dc, [])) + _substitute(command, slice_idx, party, rank)
            return ProcessSpec(name, argv, self._env(name, role_env, dc), True, dc)

        # ---- central party / global layer
        schedulers.append(
            node(
                "global_scheduler",
                dict(
                    DMLC_ROLE_GLOBAL="global_scheduler",
                    DMLC_PS_GLOBAL_ROOT_URI=host,
                    DMLC_PS_GLOBAL_ROOT_PORT=G,
                    DMLC_NUM_GLOBAL_SERVER=NGS,
                    DMLC_NUM_GLOBAL_WORKER=NGW,
                ),
            )
        )
        schedulers.append(
            node(
                "central/scheduler",
                dict(
                    DMLC_ROLE="scheduler",
                    DMLC_PS_ROOT_URI=host,
                    DMLC_PS_ROOT_PORT=C,
                    DMLC_NUM_SERVER=NGS,
                    DMLC_NUM_WORKER=central_num_worker,
                ),
            )
        )
        for i in range(NGS):
            servers.append(
                node(
                    f"global_server{i}",
                    dict(
                        DMLC_ROLE_GLOBAL="global_server",
                        DMLC_ROLE="server",
                        DMLC_PS_GLOBAL_ROOT_URI=host,
                        DMLC_PS_GLOBAL_ROOT_PORT=G,
                        DMLC_PS_ROOT_URI=host,
                        DMLC_PS_ROOT_PORT=C,
                        DMLC_NUM_SERVER=NGS,
                        DMLC_NUM_WORKER=central_num_worker,
                        DMLC_NUM_GLOBAL_SERVER=NGS,
                        DMLC_NUM_GLOBAL_WORKER=NGW,
                        DMLC_NUM_ALL_WORKER=ALL,
                        DMLC_ENABLE_CENTRAL_WORKER=enable_cw,
                    ),
                    f"gs{i}" if self.separate_global_servers else "central",
                )
            )
        central_worker_env = dict(
            DMLC_ROLE="worker",
            DMLC_PS_ROOT_URI=host,
            DMLC_PS_ROOT_PORT=C,
            DMLC_NUM_SERVER=NGS,
            DMLC_NUM_WORKER=central_num_worker,
            DMLC_NUM_ALL_WORKER=ALL,
            DMLC_ENABLE_CENTRAL_WORKER=enable_cw,
        )
        master_env = dict(central_worker_env)
        master_env["DMLC_ROLE_MASTER_WORKER"] = 1
        workers.append(
            worker("central/master_worker", master_env, P * W if CW > 0 else 0, "central", 0)
        )
        for j in range(1, CW):
            workers.append(worker(f"central/worker{j}", central_worker_env, P * W + j, "central", j))

        # ---- parties
        for p in range(P):
            port = ports.parties[p]
            host = self.dc_host(f"party{p}")
            schedulers.append(
                node(
                    f"party{p}/scheduler",
                    dict(
                        DMLC_ROLE="scheduler",
                        DMLC_PS_ROOT_URI=host,
                        DMLC_PS_ROOT_PORT=port,
                        DMLC_NUM_SERVER=LS[p],
                        DMLC_NUM_WORKER=W,
                    ),
                    p,
                )
            )
            for i in range(LS[p]):
                servers.append(
                    node(
                        f"party{p}/server" if LS[p] == 1 else f"party{p}/server{i}",
                        dict(
                            DMLC_ROLE="server",
                            DMLC_PS_ROOT_URI=host,
                            DMLC_PS_ROOT_PORT=port,
                            DMLC_PS_GLOBAL_ROOT_URI=chost,
                            DMLC_PS_GLOBAL_ROOT_PORT=G,
                            DMLC_NUM_SERVER=LS[p],
                            DMLC_NUM_WORKER=W,
                            DMLC_NUM_GLOBAL_SERVER=NGS,
                            DMLC_NUM_GLOBAL_WORKER=NGW,
                        ),
                        p,
                    )
                )
            for i in range(W):
                workers.append(
                    worker(
                        f"party{p}/worker{i}",
                        dict(
                            DMLC_ROLE="worker",
                            DMLC_PS_ROOT_URI=host,
                            DMLC_PS_ROOT_PORT=port,
                            DMLC_NUM_SERVER=LS[p],
                            DMLC_NUM_WORKER=W,
                            DMLC_NUM_ALL_WORKER=ALL,
                        ),
                        p * W + i,
                        p,
                        i,
                    )
                )
        return schedulers + servers + workers

    def _env(self, name: str, role_env: Dict[str, object], dc: str = "central") -> Dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ROLE_KEYS}
        # Children write into pipes; without this Python children block-buffer their output.
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.update({k: str(v) for k, v in role_env.items()})
        env["DMLC_NODE_HOST"] = self.dc_host(dc)
        if self.curve_dir is not None:
            # A global server in a data center of its own ("gsN") still belongs to the central party.
            party = dc if dc.startswith("party") else "central"
            env["GEOMX_CURVE_SECRET_KEY"] = os.path.join(self.curve_dir, f"{party}.key_secret")
            env["GEOMX_CURVE_PUBLIC_KEYS_DIR"] = self.curve_dir
        env.update({str(k): str(v) for k, v in self.env.items()})
        for pattern, extra in self.node_env.items():
            if fnmatch.fnmatchcase(name, pattern):
                env.update({str(k): str(v) for k, v in extra.items()})
        return env


# --------------------------------------------------------------------------------------
# Running a topology
# --------------------------------------------------------------------------------------


def _exit_status(returncode: int) -> int:
    """Popen return code -> shell-style exit status (signal N -> 128 + N)."""
    return returncode if returncode >= 0 else 128 - returncode


def _signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


class _Signalled(BaseException):
    """Raised in the main thread when the launcher receives SIGTERM/SIGINT."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class _Child:
    def __init__(self, spec: ProcessSpec, popen: subprocess.Popen, logfile: Optional[IO[bytes]]):
        self.spec = spec
        self.popen = popen
        self.pgid = popen.pid  # start_new_session=True: the child leads its own group
        self.logfile = logfile
        self.returncode: Optional[int] = None  # set when the exit was seen by the monitor
        self.reader: Optional[threading.Thread] = None

    @property
    def name(self) -> str:
        return self.spec.name

    def poll(self) -> Optional[int]:
        return self.popen.poll()


def _signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to a process group; False when the group no longer exists."""
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


_ACTIVE: "set[_Launcher]" = set()
_ACTIVE_LOCK = threading.Lock()


def _atexit_cleanup() -> None:
    with _ACTIVE_LOCK:
        launchers = list(_ACTIVE)
    for launcher in launchers:
        launcher.kill_now()


atexit.register(_atexit_cleanup)


class _Launcher:
    def __init__(
        self, specs: List[ProcessSpec], stream: IO[str], log_dir: Optional[str], kill_timeout: float
    ):
        self.specs = specs
        self.stream = stream
        self.log_dir = log_dir
        self.kill_timeout = kill_timeout
        self.children: List[_Child] = []
        self.stream_lock = threading.Lock()
        self.stopping = False
        # While a child is being started, a SIGINT/SIGTERM is deferred so that no started
        # process can escape the bookkeeping.
        self.critical = False
        self.pending_signal: Optional[int] = None

    # ---- output
    def _pump(self, child: _Child) -> None:
        prefix = f"[{child.name}] "
        pipe = child.popen.stdout
        assert pipe is not None
        try:
            for raw in iter(pipe.readline, b""):
                if child.logfile is not None:
                    try:
                        child.logfile.write(raw)
                        child.logfile.flush()
                    except (OSError, ValueError):
                        pass
                text = raw.decode("utf-8", errors="replace")
                if not text.endswith("\n"):
                    text += "\n"
                try:
                    with self.stream_lock:
                        self.stream.write(prefix + text)
                        self.stream.flush()
                except (OSError, ValueError):
                    pass  # keep draining the pipe so the child never blocks on it
        except (OSError, ValueError):
            pass
        finally:
            try:
                pipe.close()
            except OSError:
                pass

    # ---- start
    def start(self, spec: ProcessSpec) -> None:
        logfile = None
        if self.log_dir is not None:
            path = os.path.join(self.log_dir, spec.name + ".log")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            logfile = open(path, "wb")
        try:
            popen = subprocess.Popen(
                spec.argv,
                env=spec.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        except BaseException:
            if logfile is not None:
                logfile.close()
            raise
        child = _Child(spec, popen, logfile)
        self.children.append(child)
        child.reader = threading.Thread(
            target=self._pump, args=(child,), name=f"geomx-launch-{spec.name}", daemon=True
        )
        child.reader.start()
        log.debug("started %s (pid %d): %s", spec.name, popen.pid, shlex.join(spec.argv))

    # ---- stop
    def stop_all(self) -> List[_Child]:
        """SIGTERM every process group, SIGKILL after ``kill_timeout``. Returns the children
        that were still running when the stop began."""
        self.stopping = True
        running = [c for c in self.children if c.poll() is None]
        for c in self.children:
            # Also groups whose leader already exited: grandchildren may still be there.
            _signal_group(c.pgid, signal.SIGTERM)
        end = time.monotonic() + self.kill_timeout
        while time.monotonic() < end and any(c.poll() is None for c in self.children):
            time.sleep(0.02)
        for c in self.children:
            leader_alive = c.poll() is None
            if leader_alive:
                log.warning(
                    "%s did not stop within %.3g s of SIGTERM; sending SIGKILL", c.name, self.kill_timeout
                )
            if leader_alive or _signal_group(c.pgid, 0):
                _signal_group(c.pgid, signal.SIGKILL)
        for c in self.children:
            try:
                c.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
                log.error("%s (pid %d) could not be reaped", c.name, c.popen.pid)
        return running

    def kill_now(self) -> None:
        """Last-resort cleanup (atexit): SIGKILL everything, no grace."""
        for c in self.children:
            _signal_group(c.pgid, signal.SIGKILL)
            try:
                c.popen.wait(timeout=1)
            except Exception:
                pass

    def close(self) -> None:
        for c in self.children:
            if c.reader is not None:
                c.reader.join(timeout=2)
            if c.logfile is not None:
                try:
                    c.logfile.close()
                except OSError:
                    pass
        try:
            with self.stream_lock:
                self.stream.flush()
        except (OSError, ValueError):
            pass


def run(
    topology: Topology,
    command: Union[str, Sequence[str]],
    *,
    timeout: Optional[float] = None,
    log_dir: Optional[str] = None,
    stream: Optional[IO[str]] = None,
    grace: float = 30.0,
    kill_timeout: float = 5.0,
) -> int:
    """Run the topology until it finishes; return an exit status.

    * every worker exits 0 and then every non-worker exits 0 within ``grace`` seconds -> 0;
      a non-worker still running after ``grace`` is terminated and the result is non-zero;
    * the first process exiting non-zero (any role) stops the topology; its code is returned
      (128 + N when it was killed by signal N);
    * ``timeout`` seconds exceeded -> 124; SIGINT/KeyboardInterrupt -> 130; SIGTERM -> 143.

    Children run in their own process groups and are always terminated before returning
    (SIGTERM to the group, SIGKILL after ``kill_timeout`` seconds). Their stdout+stderr are
    written line by line to ``stream`` (default ``sys.stdout``) prefixed with ``[name] ``,
    and raw to ``log_dir/<name>.log`` when ``log_dir`` is given.
    """
    specs = topology.processes(command)
    if stream is None:
        stream = sys.stdout
    launcher = _Launcher(specs, stream, log_dir, kill_timeout)
    with _ACTIVE_LOCK:
        _ACTIVE.add(launcher)

    def on_signal(signum, frame):
        if launcher.stopping:
            return
        if launcher.critical:
            launcher.pending_signal = signum
            return
        raise _Signalled(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        # Respect a SIGINT that was ignored on purpose (e.g. a background job in a script).
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            previous[signal.SIGINT] = signal.signal(signal.SIGINT, on_signal)
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, on_signal)

    status = 1
    stragglers: List[_Child] = []
    try:
        status, stragglers = _supervise(launcher, topology, timeout, grace)
    except (_Signalled, KeyboardInterrupt) as exc:
        signum = exc.signum if isinstance(exc, _Signalled) else signal.SIGINT
        status = 128 + int(signum)
        log.error("launcher received %s; stopping the topology", signal.Signals(signum).name)
    finally:
        launcher.stopping = True
        try:
            launcher.stop_all()
            for c in stragglers:
                code = c.popen.returncode
                log.error(
                    "%s had to be terminated after every worker succeeded (exit %s)",
                    c.name,
                    f"code {code}" if code >= 0 else _signal_name(code),
                )
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            launcher.close()
            with _ACTIVE_LOCK:
                _ACTIVE.discard(launcher)
    return status


def _supervise(launcher: _Launcher, topology: Topology, timeout: Optional[float], grace: float):
    start = time.monotonic()
    deadline = start + timeout if timeout is not None else None
    log.info(
        "starting %d processes: %d parties x %d workers, %d global server(s), %d central worker(s) on %s",
        len(launcher.specs),
        topology.parties,
        topology.workers_per_party,
        topology.global_servers,
        topology.central_workers,
        ", ".join(f"{dc} {h}" for dc, h in topology.dc_hosts.items()) if topology.dc_hosts else topology.host,
    )
    for spec in launcher.specs:
        launcher.critical = True
        try:
            launcher.start(spec)
        except OSError as exc:
            launcher.critical = False
            log.error(
                "could not start %s (%s): %s; stopping the topology", spec.name, shlex.join(spec.argv), exc
            )
            if isinstance(exc, FileNotFoundError):
                return 127, []
            if isinstance(exc, PermissionError):
                return 126, []
            return 1, []
        launcher.critical = False
        if launcher.pending_signal is not None:
            raise _Signalled(launcher.pending_signal)

    grace_deadline: Optional[float] = None
    while True:
        now = time.monotonic()
        for c in launcher.children:
            if c.returncode is not None:
                continue
            rc = c.poll()
            if rc is None:
                continue
            c.returncode = rc
            if rc != 0:
                status = _exit_status(rc)
                detail = f" (killed by {_signal_name(rc)})" if rc < 0 else ""
                log.error("%s exited with code %d%s; stopping the topology", c.name, status, detail)
                return status, []
            log.info("%s exited with code 0", c.name)

        if all(c.returncode is not None for c in launcher.children if c.spec.is_worker):
            pending = [c for c in launcher.children if c.returncode is None]
            if not pending:
                log.info("all processes exited with code 0")
                return 0, []
            if grace_deadline is None:
                grace_deadline = now + grace
                log.info(
                    "all workers succeeded; waiting up to %.3g s for %d other process(es) to exit",
                    grace,
                    len(pending),
                )
            elif now >= grace_deadline:
                for c in pending:
                    log.error(
                        "%s still running %.3g s after every worker succeeded; terminating it", c.name, grace
                    )
                return EXIT_STRAGGLER, pending

        if deadline is not None and now >= deadline:
            still = [c.name for c in launcher.children if c.returncode is None]
            log.error(
                "timeout of %.3g s exceeded; stopping the topology (still running: %s)",
                timeout,
                ", ".join(still) or "none",
            )
            return EXIT_TIMEOUT, []
        time.sleep(0.05)


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _local_servers_arg(text: str) -> Union[int, List[int]]:
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or N0,N1,... (positive integers), got {text!r}") from None
    if min(counts) < 1:
        raise argparse.ArgumentTypeError(f"local server counts must be >= 1, got {text!r}")
    return counts[0] if len(counts) == 1 else counts


def _key_value(text: str):
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected K=V, got {text!r}")
    return key, value


def _pattern_key_value(text: str):
    pattern, sep, kv = text.partition(":")
    if not sep or not pattern:
        raise argparse.ArgumentTypeError(f"expected PATTERN:K=V, got {text!r}")
    key, value = _key_value(kv)
    return pattern, key, value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="geomx-launch",
        description="Start a whole GeoMX topology (global scheduler/servers, a central party and "
        "P parties) on one machine. Workers run COMMAND, in which {slice}, {party} and {rank} "
        "are replaced by the worker's data-slice index, party index (or 'central') and rank.",
        usage="%(prog)s [options] -- COMMAND ...",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("-p", "--parties", type=_int_at_least(1), default=2, help="number of parties (default 2)")
    p.add_argument(
        "-w", "--workers", type=_int_at_least(1), default=2, help="workers per party (default 2)"
    )
    p.add_argument(
        "-s",
        "--global-servers",
        type=_int_at_least(1),
        default=1,
        help="number of global servers (default 1)",
    )
    p.add_argument(
        "-l",
        "--local-servers",
        type=_local_servers_arg,
        default=1,
        metavar="N|N0,N1,...",
        help="local servers per party: one count for every party or one per party (default 1)",
    )
    p.add_argument(
        "-c",
        "--central-workers",
        type=_int_at_least(0),
        default=0,
        help="training workers in the central party "
        "(default 0: only the master worker, which does not train)",
    )
    p.add_argument("--host", default="127.0.0.1", help="host/IP every process binds to (default 127.0.0.1)")
    p.add_argument(
        "--env",
        type=_key_value,
        action="append",
        default=[],
        metavar="K=V",
        help="extra variable for every process",
    )
    p.add_argument(
        "--node-env",
        type=_pattern_key_value,
        action="append",
        default=[],
        metavar="PATTERN:K=V",
        help="extra variable for the processes whose name matches the fnmatch PATTERN "
        "(e.g. 'party*/server:ENABLE_P3=1', 'global_server*:MXNET_KVSTORE_SIZE_LOWER_BOUND=1000')",
    )
    p.add_argument(
        "--node-command",
        default=None,
        metavar="CMD",
        help="command for the non-worker processes (shell-split; default: python -m geomx.node)",
    )
    p.add_argument(
        "--timeout",
        type=_positive_float,
        default=None,
        metavar="SEC",
        help="stop everything after SEC (exit 124)",
    )
    p.add_argument(
        "--grace",
        type=_non_negative_float,
        default=30.0,
        metavar="SEC",
        help="after every worker succeeded, how long to wait for the other processes to exit (default 30)",
    )
    p.add_argument(
        "--log-dir",
        default=None,
        metavar="DIR",
        help="also write each process's raw output to DIR/<name>.log",
    )
    p.add_argument(
        "--wan",
        default=None,
        metavar="SPEC",
        help="run on an emulated WAN (needs root): the central party and every party in its own network "
        "namespace, joined through a bridge by links capped with tbf. SPEC: RATE for every party link "
        "(e.g. 20mbit), and/or partyN=RATE, central=RATE (default uncapped), all=RATE, delay=MS "
        "(added one-way latency between data centers through a delaying relay; needs nft). "
        "Prints the bytes that crossed each link at the end (see geomx/wan.py)",
    )
    p.add_argument(
        "--separate-global-servers",
        action="store_true",
        help="with --wan: each global server in a data center of its own (gs0, gs1, ...) with its own link "
        "at the central rate (or gsN=RATE), as with one machine per global server",
    )
    p.add_argument(
        "--curve",
        action="store_true",
        help="encrypt and authenticate every link with CURVE, using throwaway key pairs (one per data center) "
        "generated into a temporary directory and removed at exit",
    )
    p.add_argument("--dry-run", action="store_true", help="print the processes as shell lines and exit")
    p.add_argument("command", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return p


def _dry_run_lines(specs: List[ProcessSpec], explicit_keys: Sequence[str] = ()) -> List[str]:
    lines = []
    for spec in specs:
        keys = sorted(k for k in spec.env if k.startswith(DRY_RUN_PREFIXES) or k in explicit_keys)
        assigns = " ".join(f"{k}={shlex.quote(spec.env[k])}" for k in keys)
        lines.append(f"# {spec.name}{' (worker)' if spec.is_worker else ''}")
        lines.append(f"{assigns} {shlex.join(spec.argv)}".strip())
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if "--" in argv:
        idx = argv.index("--")
        args = parser.parse_args(argv[:idx])
        if args.command:
            parser.error(f"unexpected arguments before '--': {shlex.join(args.command)}")
        command = argv[idx + 1 :]
    else:
        args = parser.parse_args(argv)
        command = list(args.command)
    if not command:
        parser.error("the following arguments are required: COMMAND (give it after '--')")

    node_env: Dict[str, Dict[str, str]] = {}
    for pattern, key, value in args.node_env:
        node_env.setdefault(pattern, {})[key] = value
    topology = Topology(
        parties=args.parties,
        workers_per_party=args.workers,
        global_servers=args.global_servers,
        central_workers=args.central_workers,
        local_servers=args.local_servers,
        separate_global_servers=args.separate_global_servers,
        host=args.host,
        env=dict(args.env),
        node_env=node_env,
        node_command=shlex.split(args.node_command) if args.node_command is not None else None,
    )

    wan_spec = None
    if args.wan is not None:
        from . import wan as wanmod  # no MXNet import there either

        try:
            wan_spec = wanmod.parse_spec(args.wan, args.parties, topology.global_server_dcs)
        except wanmod.WanError as exc:
            print(f"geomx-launch: --wan: {exc}", file=sys.stderr)
            return 2

    if args.curve:
        curve_tmp = tempfile.TemporaryDirectory(prefix="geomx-curve-")
        atexit.register(curve_tmp.cleanup)
        topology.make_curve_keys(curve_tmp.name)

    if args.dry_run:
        if wan_spec is not None:
            # Show the placement the WAN would get (nothing is built).
            plan = wanmod.Wan(wanmod.dc_names(args.parties, topology.global_server_dcs), wan_spec, "<wan>",
                              wanmod.DEFAULT_SUBNET)
            _place_on_wan(topology, plan)
            print(f"# emulated WAN: {plan.describe()}")
        explicit = {k for k, _ in args.env} | {k for _, k, _ in args.node_env}
        for line in _dry_run_lines(topology.processes(command), explicit):
            print(line)
        return 0

    if not logging.getLogger().handlers and not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[launch] %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    if wan_spec is None:
        return run(topology, command, timeout=args.timeout, log_dir=args.log_dir, grace=args.grace)
    return _run_on_wan(topology, command, wan_spec, args)


def _place_on_wan(topology: Topology, wan) -> None:
    """Point every data center of ``topology`` at its namespace of ``wan``."""
    topology.dc_hosts = {dc: wan.address(dc) for dc in wan.dcs}
    topology.dc_prefix = {dc: wan.exec_argv(dc) for dc in wan.dcs}


def _run_on_wan(topology: Topology, command: Sequence[str], spec, args) -> int:
    from . import wan as wanmod

    try:
        w = wanmod.Wan.create(wanmod.dc_names(topology.parties, topology.global_server_dcs), spec)
    except wanmod.WanError as exc:
        print(f"geomx-launch: --wan: {exc}", file=sys.stderr)
        return 2
    status = 1
    t0 = time.monotonic()
    try:
        with w:
            log.info("emulated WAN: %s", w.describe())
            _place_on_wan(topology, w)
            try:
                status = run(topology, command, timeout=args.timeout, log_dir=args.log_dir, grace=args.grace)
            finally:
                try:
                    elapsed = time.monotonic() - t0
                    report = w.report(elapsed)
                    print(f"[launch] WAN bytes per link over {elapsed:.1f} s:\n{report}", file=sys.stderr)
                except wanmod.WanError as exc:
                    log.error("could not read the WAN counters: %s", exc)
    except SystemExit as exc:  # SIGTERM/SIGHUP while the WAN existed (see geomx.wan)
        code = exc.code if isinstance(exc.code, int) else 1
        log.error("launcher received a termination signal; topology stopped, WAN torn down")
        return code
    return status


if __name__ == "__main__":
    sys.exit(main())
