"""The topology model of the launcher: which processes a GeoMX topology has, with which environment.

Free of MXNet imports (the launcher must start fast).
"""

from __future__ import annotations

import fnmatch
import os
import random
import shlex
import socket
import sys
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

from .. import config

#: The command every non-worker process (schedulers, servers) runs by default.
DEFAULT_NODE_COMMAND = [sys.executable, "-m", "geomx.node"]

#: Scheduler ports on an emulated WAN: below Linux's default ephemeral range (32768-60999) and above
#: the WAN relay's port (geomx/testing/wan.py).
_WAN_PORTS = (20000, 32768)

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
        "GEOMX_PARTY",
        "GEOMX_LISTEN_FD",
        "GEOMX_GLOBAL_SERVER_RANK",
        # One process's own ports (a topology file sets them per process).
        "GEOMX_SERVER_PORT",
        "GEOMX_CENTRAL_PORT",
        "GEOMX_TS_PORT",
        "GEOMX_DGT_UDP_PORT",
    }
)

#: Prefixes of the variables shown by ``--dry-run``.

@dataclass
class ProcessSpec:
    """One process of the topology: its name (log prefix), argv and full environment."""

    name: str
    argv: List[str]
    env: Dict[str, str]
    is_worker: bool
    #: Data center the process belongs to: ``"central"``, ``"partyN"`` or ``"gsN"`` (used by ``--wan``).
    dc: str = ""
    #: A scheduler's listening socket, bound by the launcher (see :meth:`Topology.reserve_ports`): the
    #: child inherits it (``GEOMX_LISTEN_FD``), the launcher closes its own copy once the child runs.
    listener: Optional[socket.socket] = field(default=None, compare=False, repr=False)
    #: Working directory (None: the launcher's).
    cwd: Optional[str] = None
    #: Topology files: the machine it runs on (SSH target, ``user@`` allowed) and its site's name.
    host: str = ""
    site: str = ""
    #: Keep the process's input open while it may run (SSH sessions; closing it stops the remote process).
    keep_stdin: bool = False
    #: A process the launcher starts again when it is killed: returns its replacement and the seconds
    #: to wait before starting it, or None (see :func:`enable_restarts`).
    restart: Optional[Callable[[], Optional[Tuple["ProcessSpec", float]]]] = field(
        default=None, compare=False, repr=False)
    #: The party it belongs to ("" for the central site's processes) and whether the run goes on
    #: without that party should the process fail (GEOMX_LOST_PARTY=continue): see :func:`enable_restarts`.
    party: str = ""
    party_may_be_lost: bool = False
    #: GEOMX_LOST_PARTY=rejoin: the process to start for the n-th time its lost party is started again.
    rejoin: Optional[Callable[[int], "ProcessSpec"]] = field(default=None, compare=False, repr=False)


@dataclass
class Ports:
    """Scheduler ports: global scheduler, central party scheduler, one per party."""

    global_root: int
    central_root: int
    parties: List[int]
    #: Port -> a socket bound and listening at it, held for the scheduler of that port.
    listeners: Dict[int, socket.socket] = field(default_factory=dict, compare=False, repr=False)

    def close(self) -> None:
        """Close the listening sockets no child took over."""
        for sock in self.listeners.values():
            sock.close()


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


def listening_sockets(n: int, host: str = "127.0.0.1") -> List[socket.socket]:
    """``n`` TCP sockets bound at distinct free ports of ``host`` and listening.

    A port merely found free (:func:`free_ports`) can be taken by any process before the scheduler
    meant for it binds it ("Address already in use" when several topologies start at once); a port
    held by a listening socket cannot, and the scheduler inherits the socket itself.
    """
    socks: List[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            # Its accepted connections inherit this; without it, those left in TIME_WAIT by a scheduler
            # that died keep the one started in its place from binding the port (as libzmq binds).
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, 0))
            s.listen(128)
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


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
    #: Workers per party: one number for every party, or one per party.
    workers_per_party: Union[int, Sequence[int]] = 2
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
        from .. import security

        security.generate_topology_keys(directory, self.dcs)
        self.curve_dir = directory

    def dc_host(self, dc: str) -> str:
        return self.dc_hosts.get(dc, self.host)

    def validate(self) -> None:
        if self.parties < 1:
            raise ValueError(f"parties must be >= 1, got {self.parties}")
        if not isinstance(self.workers_per_party, int) and len(self.workers_per_party) != self.parties:
            raise ValueError(f"workers_per_party needs one count per party ({self.parties}), "
                             f"got {list(self.workers_per_party)}")
        if min(self.workers_of_party) < 1:
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
    def workers_of_party(self) -> List[int]:
        """Workers of each party."""
        if isinstance(self.workers_per_party, int):
            return [self.workers_per_party] * self.parties
        return [int(n) for n in self.workers_per_party]

    @property
    def num_all_workers(self) -> int:
        """``DMLC_NUM_ALL_WORKER``: training workers worldwide."""
        return sum(self.workers_of_party) + self.central_workers

    @property
    def num_processes(self) -> int:
        central = 1 + self.global_servers + 1 + max(1, self.central_workers)
        return central + sum(1 + n + w for n, w in zip(self.servers_per_party, self.workers_of_party))

    def pick_ports(self) -> Ports:
        """Free scheduler ports (for ``--dry-run`` and hand-written scripts: nothing holds them)."""
        ports = free_ports(2 + self.parties, self.host)
        return Ports(global_root=ports[0], central_root=ports[1], parties=ports[2:])

    def reserve_ports(self) -> Ports:
        """Scheduler ports held by listening sockets that the schedulers inherit (no port race).

        On an emulated WAN the schedulers listen inside their namespaces, where a socket of the
        launcher's cannot be handed over. Those namespaces are new and hold only the topology's own
        processes, whose other listeners take OS-chosen ports (from the ephemeral range, 32768 and
        up by default): distinct ports below that range cannot be taken there."""
        if self.dc_prefix:
            # Not cryptographic: any distinct ports below the ephemeral range do.
            picked = random.sample(range(_WAN_PORTS[0], _WAN_PORTS[1]), 2 + self.parties)  # noqa: S311
            return Ports(global_root=picked[0], central_root=picked[1], parties=picked[2:])
        socks = listening_sockets(2 + self.parties, self.host)
        ports = [s.getsockname()[1] for s in socks]
        return Ports(global_root=ports[0], central_root=ports[1], parties=ports[2:],
                     listeners=dict(zip(ports, socks)))

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
        P, NGS, CW = self.parties, self.global_servers, self.central_workers
        WS = self.workers_of_party
        PW = sum(WS)  # the parties' training workers; their slices come first
        first_slice = [sum(WS[:p]) for p in range(P)]
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

        def node(name: str, role_env: Dict[str, object], party="central", listen_port: int = 0) -> ProcessSpec:
            dc = dc_of(party)
            argv = list(self.dc_prefix.get(dc, [])) + list(node_cmd)
            listener = ports.listeners.get(listen_port) if listen_port else None
            if listener is not None:
                role_env = dict(role_env, GEOMX_LISTEN_FD=listener.fileno())
            spec = ProcessSpec(name, argv, self._env(name, role_env, dc), False, dc,
                               party=dc if dc.startswith("party") else "")
            spec.listener = listener
            return spec

        def worker(name: str, role_env: Dict[str, object], slice_idx: int, party, rank: int) -> ProcessSpec:
            dc = dc_of(party)
            role_env = dict(role_env, GEOMX_DATA_SLICE=slice_idx, GEOMX_PARTY=dc)
            argv = list(self.dc_prefix.get(dc, [])) + _substitute(command, slice_idx, party, rank)
            return ProcessSpec(name, argv, self._env(name, role_env, dc), True, dc,
                               party=dc if dc.startswith("party") else "")

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
                listen_port=G,
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
                listen_port=C,
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
                        GEOMX_GLOBAL_SERVER_RANK=i,
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
            worker("central/master_worker", master_env, PW if CW > 0 else 0, "central", 0)
        )
        for j in range(1, CW):
            workers.append(worker(f"central/worker{j}", central_worker_env, PW + j, "central", j))

        # ---- parties
        for p in range(P):
            port = ports.parties[p]
            W = WS[p]
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
                    listen_port=port,
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
                        first_slice[p] + i,
                        p,
                        i,
                    )
                )
        return enable_restarts(declare_party_servers(schedulers + servers + workers))

    def _env(self, name: str, role_env: Dict[str, object], dc: str = "central") -> Dict[str, str]:
        # The launcher's own environment is handed on (less the roles); the settings below are set for
        # the child, not read.
        env = config.inherited_environment(drop=ROLE_KEYS)
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


def declare_party_servers(specs: List[ProcessSpec]) -> List[ProcessSpec]:
    """Tell the global scheduler each party's number of local servers (GEOMX_PARTY_SERVERS), by the
    party scheduler address its local servers will name, read from their final environments: the
    global tier then refuses a local server that would take another party's slot."""
    counts: Dict[str, int] = {}
    for spec in specs:
        env = spec.env
        if env.get("DMLC_ROLE") == "server" and "DMLC_ROLE_GLOBAL" not in env:
            party = f"{env['DMLC_PS_ROOT_URI']}:{env['DMLC_PS_ROOT_PORT']}"
            counts[party] = counts.get(party, 0) + 1
    for spec in specs:
        if spec.env.get("DMLC_ROLE_GLOBAL") == "global_scheduler":
            spec.env["GEOMX_PARTY_SERVERS"] = ",".join(f"{party}={n}" for party, n in counts.items())
    return specs


def enable_restarts(specs: List[ProcessSpec]) -> List[ProcessSpec]:
    """What the launcher does when a process ends badly, from the final environments: a global server
    that keeps checkpoints (GEOMX_CHECKPOINT_DIR) is started again from its latest checkpoint when it
    is killed (geomx.config.checkpoint_restart); with GEOMX_LOST_PARTY=continue a party's process that
    fails takes only its party out of the run, and with GEOMX_LOST_PARTY=rejoin the launcher starts the
    party's processes again once they have all ended."""
    for spec in specs:
        if spec.env.get("DMLC_ROLE_GLOBAL") == "global_server":
            spec.restart = lambda spec=spec: _from_checkpoint(spec)
        elif spec.env.get("DMLC_ROLE_GLOBAL") == "global_scheduler":
            spec.restart = lambda spec=spec: _resumed_scheduler(spec)
        policy = config.lost_party(spec.env)
        spec.party_may_be_lost = bool(spec.party) and policy != "stop"
        if spec.party and policy == "rejoin":
            spec.rejoin = lambda n, spec=spec: _rejoining(spec, n)
    return specs


def _resumed_scheduler(spec: ProcessSpec) -> Optional[Tuple[ProcessSpec, float]]:
    how = config.scheduler_restart(spec.env)
    if how is None:
        return None
    extra, wait = how
    env = {k: v for k, v in spec.env.items() if k != "GEOMX_LISTEN_FD"}  # the first one had the socket
    again = replace(spec, env={**env, **extra}, listener=None)
    again.restart = lambda: _resumed_scheduler(again)
    return again, wait


def _rejoining(spec: ProcessSpec, n: int) -> ProcessSpec:
    """``spec`` started again for its party's n-th rejoin: its scheduler binds its port itself (the
    launcher's socket went to the first one), and the training script can tell (GEOMX_PARTY_RESTART)."""
    env = {k: v for k, v in spec.env.items() if k != "GEOMX_LISTEN_FD"}
    env["GEOMX_PARTY_RESTART"] = str(n)
    return replace(spec, env=env, listener=None)


def _from_checkpoint(spec: ProcessSpec) -> Optional[Tuple[ProcessSpec, float]]:
    how = config.checkpoint_restart(spec.env)
    if how is None:
        return None
    extra, wait = how
    again = replace(spec, env={**spec.env, **extra}, listener=None)
    again.restart = lambda: _from_checkpoint(again)
    return again, wait
