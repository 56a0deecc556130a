"""The single-machine form of a launch: a GeoMX topology on this machine (``geomx-launch -p .. -w ..``), and
the scheduler ports the launcher holds for it.

:class:`Topology` is a :class:`~.layout.Layout` whose sites all run here (or, with ``--wan``, each in its
network namespace); its processes are derived by :meth:`.layout.Layout.processes`, as a topology file's are.

Free of MXNet imports (the launcher must start fast).
"""

from __future__ import annotations

import random
import socket
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Union

from .layout import (
    DEFAULT_NODE_COMMAND,
    ROLE_KEYS,
    Host,
    Layout,
    PortPlan,
    ProcessSpec,
    Site,
    declare_party_servers,
    enable_restarts,
    worker_argv,
)

__all__ = ["DEFAULT_NODE_COMMAND", "ROLE_KEYS", "ProcessSpec", "Ports", "Topology", "free_ports", "listening_sockets",
           "declare_party_servers", "enable_restarts"]

#: Scheduler ports on an emulated WAN: below Linux's default ephemeral range (32768-60999) and above
#: the WAN relay's port (geomx/testing/wan.py).
_WAN_PORTS = (20000, 32768)


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


def free_port_range(n: int, host: str = "127.0.0.1") -> int:
    """A first port of ``n`` consecutive ports free on ``host``, below the ephemeral range (so that no
    OS-chosen port lands there while they are used): ``--status`` without ``--metrics-port``, tests."""
    rng = random.Random()  # noqa: S311 - any free range does
    for _ in range(200):
        first = rng.randrange(20000, 32000 - n)
        socks = []
        try:
            for port in range(first, first + n):
                s = socket.socket()
                socks.append(s)
                s.bind((host, port))
            return first
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


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
    #: Every process serves its metrics (``--metrics-port``): the n-th process in start order on
    #: ``metrics_base + n`` (None: none do).
    metrics_base: Optional[int] = None

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

    def layout(self) -> Layout:
        """This topology as sites on this machine: ``central`` and ``party0`` .. (each at its ``dc_hosts``
        address, run through its ``dc_prefix``; with ``separate_global_servers`` the global servers on
        hosts ``gs0`` .. of their own), all with the ``curve_dir`` keys."""
        self.validate()

        def here(dc: str) -> Host:
            return Host("", self.dc_host(dc), prefix=tuple(self.dc_prefix.get(dc, ())), dc=dc)

        central = Site("central", "central", here("central"), servers=self.global_servers,
                       workers=self.central_workers, keys_dir=self.curve_dir,
                       server_hosts=[here(f"gs{i}") for i in range(self.global_server_dcs)])
        parties = [Site(f"party{p}", "party", here(f"party{p}"), servers=servers, workers=workers,
                        keys_dir=self.curve_dir)
                   for p, (servers, workers) in enumerate(zip(self.servers_per_party, self.workers_of_party))]
        return Layout(central, parties, env=dict(self.env), node_env=dict(self.node_env),
                      node_command=list(self.node_command) if self.node_command is not None else None,
                      metrics_base=self.metrics_base)

    def processes(
        self, command: Union[str, Sequence[str]], ports: Optional[Ports] = None
    ) -> List[ProcessSpec]:
        """All processes in start order: schedulers, then servers, then workers (see :meth:`Layout.processes`).

        ``ports``: the schedulers' (default: free ports, :meth:`pick_ports`); every other listener binds a
        port the OS chooses."""
        layout = self.layout()
        command = worker_argv(command)
        if ports is None:
            ports = self.pick_ports()
        if len(ports.parties) != self.parties:
            raise ValueError(f"need {self.parties} party ports, got {len(ports.parties)}")
        return layout.processes(command, _SchedulerPorts(ports, layout))[0]


class _SchedulerPorts(PortPlan):
    """The single-machine form's ports: the schedulers' from a :class:`Ports`, given out by site; every other
    listener binds a port the OS chooses."""

    fixed = False

    def __init__(self, ports: Ports, layout: Layout):
        self.ports = ports
        self.by_site = {layout.central.name: ports.central_root,
                        **{site.name: port for site, port in zip(layout.parties, ports.parties)}}

    def take(self, site: Site, host: Host, process: str, role: str) -> int:
        return self.ports.global_root if role == "global_scheduler" else self.by_site[site.name]

    def held(self, port: int) -> Optional[socket.socket]:
        return self.ports.listeners.get(port)
