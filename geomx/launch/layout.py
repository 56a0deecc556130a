"""The one process list of a launch: a topology's sites and hosts (:class:`Layout`) and every process it runs,
with its name, role, environment, ports, host and site (:meth:`Layout.processes`).

Both command lines describe a layout and derive their processes here: the single-machine form
(:class:`~.topology.Topology`, ``geomx-launch -p .. -w ..``) is a layout whose sites all run on this machine,
a topology file (:mod:`.sitefile`) places its sites on the hosts it names. What differs between them is data:
the hosts (addresses, bind addresses, interpreters), the variables, and a :class:`PortPlan` (a topology file
fixes every listener's port; on one machine only the schedulers' are chosen by the launcher).

Free of MXNet imports (the launcher must start fast).
"""

from __future__ import annotations

import fnmatch
import shlex
import socket
import sys
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from .. import config
from ..errors import ConfigError

#: The command every non-worker process (schedulers, servers) runs by default; on a host whose
#: interpreter is given (a topology file's ``python``), that interpreter instead of this one.
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
        "GEOMX_PARTY",
        "GEOMX_LISTEN_FD",
        "GEOMX_GLOBAL_SERVER_RANK",
        # One process's own ports (a topology file sets them per process).
        "GEOMX_SERVER_PORT",
        "GEOMX_CENTRAL_PORT",
        "GEOMX_TS_PORT",
        "GEOMX_DGT_UDP_PORT",
        "GEOMX_METRICS_PORT",
    }
)

#: Roles of the processes (the keys of ``role_env`` tables).
ROLES = ("global_scheduler", "global_server", "scheduler", "server", "master_worker", "worker")


@dataclass
class ProcessSpec:
    """One process of the topology: its name (log prefix), argv and full environment."""

    name: str
    argv: List[str]
    env: Dict[str, str]
    is_worker: bool
    #: Data center the process runs in: its site's name, or on an emulated WAN (``--wan``) the
    #: namespace's (``"central"``, ``"partyN"``, ``"gsN"``).
    dc: str = ""
    #: A scheduler's listening socket, bound by the launcher (see :meth:`Topology.reserve_ports`): the
    #: child inherits it (``GEOMX_LISTEN_FD``), the launcher closes its own copy once the child runs.
    listener: Optional[socket.socket] = field(default=None, compare=False, repr=False)
    #: Working directory (None: the launcher's).
    cwd: Optional[str] = None
    #: The machine it runs on (SSH target, ``user@`` allowed; "": this one) and its site's name.
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

    @property
    def role(self) -> str:
        """Its role as its metrics name it (``geomx_node_info{role=...}``): global_scheduler, scheduler,
        global_server, local_server, master_worker or worker."""
        env = self.env
        if env.get("DMLC_ROLE_GLOBAL"):
            return env["DMLC_ROLE_GLOBAL"]
        role = env.get("DMLC_ROLE", "")
        if role == "server":
            return "local_server"
        if role == "worker" and env.get("DMLC_ROLE_MASTER_WORKER", "") not in ("", "0"):
            return "master_worker"
        return role or "worker"

    @property
    def metrics_address(self) -> Optional[Tuple[str, int]]:
        """Where its metrics listener is reached (GEOMX_METRICS_PORT at the address it binds:
        GEOMX_BIND_HOST unless that is a wildcard, else its advertised DMLC_NODE_HOST); None: it has none."""
        port = self.env.get("GEOMX_METRICS_PORT", "").strip()
        if port in ("", "0"):
            return None
        host = self.env.get("GEOMX_BIND_HOST", "")
        if host in ("", "*", "0.0.0.0", "::"):  # noqa: S104 - a wildcard is not an address to reach
            host = self.env.get("DMLC_NODE_HOST") or "127.0.0.1"
        return host, int(port)


@dataclass(frozen=True)
class Host:
    """One machine processes run on."""

    ssh: str  # SSH target as written (``user@`` allowed); "": the launcher's machine
    address: str  # what other processes connect to (advertised)
    #: What its listeners bind (GEOMX_BIND_HOST; ``*``: every interface). None: the variable is not set,
    #: and each listener binds the address it is reached at.
    bind: Optional[str] = None
    #: Its interpreter: the nodes' ``python -m geomx.node`` and ``{python}`` in a worker's command.
    #: None: the launcher's own for the nodes, and ``{python}`` is left as it is.
    python: Optional[str] = None
    workdir: Optional[str] = None  # where its processes start (None: the launcher's directory)
    #: argv prefix that runs a process on it (an emulated WAN's ``ip netns exec NS``) ...
    prefix: Tuple[str, ...] = ()
    #: ... and that namespace's data center (``ProcessSpec.dc``; "": the site's name).
    dc: str = ""

    @property
    def internal(self) -> str:
        """The address processes of its own site use (the bound one, which behind NAT differs)."""
        return self.address if self.bind in (None, "*") else self.bind


@dataclass
class Site:
    """A data center: the central one (global scheduler, global servers, central scheduler, master worker and
    central workers) or a party (scheduler, local servers, workers)."""

    name: str
    kind: str  # "central" or "party"
    host: Host  # schedulers (and every process without a host list of its own)
    #: The central site: global servers and training workers (0: only the master worker, which does not
    #: train). A party: local servers and workers.
    servers: int = 1
    workers: int = 0
    server_hosts: List[Host] = field(default_factory=list)  # given out round-robin; empty: ``host``
    worker_hosts: List[Host] = field(default_factory=list)
    ports: Optional[Tuple[int, int]] = None  # [first, last] of a topology file's range for the site
    env: Dict[str, str] = field(default_factory=dict)
    role_env: Dict[str, Dict[str, str]] = field(default_factory=dict)
    #: CURVE: the directory of the site's key pair and every site's public key (None: no CURVE). A topology
    #: file's sites hold its ``keys_dir`` field as written; :meth:`.sitefile.SiteTopology.layout` gives the
    #: directory their processes use.
    keys_dir: Optional[str] = None

    @property
    def hosts(self) -> List[Host]:
        seen: Dict[str, Host] = {}
        for h in [self.host, *self.server_hosts, *self.worker_hosts]:
            seen.setdefault(h.ssh, h)
        return list(seen.values())


@dataclass(frozen=True)
class Listener:
    """A port some process listens on, and the sites that must reach it."""

    site: str
    process: str
    host: Host
    port: int
    proto: str  # "tcp" or "udp"
    what: str
    reached_from: Tuple[str, ...]


class PortPlan:
    """Which port each listener of a layout binds."""

    #: True: every listener gets its port from :meth:`take` (so the launcher must know which listeners a
    #: process opens, from its feature switches). False: only the schedulers do; every other listener
    #: binds a port the OS chooses and registers it with its scheduler.
    fixed: bool = False

    def take(self, site: Site, host: Host, process: str, role: str) -> int:
        """The port of the next listener of ``process`` (a ``role`` of ``site``) on ``host``."""
        raise NotImplementedError

    def held(self, port: int) -> Optional[socket.socket]:
        """A socket the launcher already listens on at a scheduler's ``port``, for the scheduler to inherit."""
        return None


class LayoutError(ValueError):
    """A process of ``site`` cannot be placed (a feature switch it would refuse, for instance)."""

    def __init__(self, site: Site, message: str):
        super().__init__(message)
        self.site = site


def worker_argv(command: Union[str, Sequence[str]]) -> List[str]:
    """The workers' command as an argv (a string is shell-split); refuses an empty one."""
    argv = shlex.split(command) if isinstance(command, str) else list(command)
    if not argv:
        raise ValueError("empty worker command")
    return argv


def _substitute(args: Sequence[str], slice_idx: int, party: Union[int, str], rank: int,
                python: Optional[str]) -> List[str]:
    # Plain substring replacement (not str.format) so that other braces are left alone.
    out = []
    for a in args:
        a = a.replace("{slice}", str(slice_idx)).replace("{party}", str(party)).replace("{rank}", str(rank))
        out.append(a if python is None else a.replace("{python}", python))
    return out


@dataclass
class Layout:
    """Every site of a topology, the variables its processes get, and the commands they run.

    The variables a process gets beyond the launcher's, later ones winning: ``env``, ``role_env`` of its role,
    its site's ``env`` and ``role_env``, and ``node_env``'s tables whose fnmatch pattern matches the process's
    name (``"party*/server"``, ``"global_server*"``, ``"*worker*"``...).
    """

    central: Site
    parties: List[Site]
    env: Dict[str, str] = field(default_factory=dict)
    role_env: Dict[str, Dict[str, str]] = field(default_factory=dict)
    node_env: Dict[str, Dict[str, str]] = field(default_factory=dict)
    #: Replaces the non-worker processes' command (default: ``python -m geomx.node`` on their host).
    node_command: Optional[List[str]] = None
    #: GEOMX_CURVE_CENTRAL_KEY of every process under CURVE (None: not set; the nodes' default ``central``).
    central_key: Optional[str] = None
    #: Every process serves its metrics (GEOMX_METRICS_PORT, docs/Observability.md): with a port plan that
    #: fixes ports (a topology file), each takes one from its site's range after every other listener; on
    #: one machine, the n-th process in start order takes ``metrics_base + n``.
    metrics: bool = False
    metrics_base: Optional[int] = None

    @property
    def sites(self) -> List[Site]:
        return [self.central, *self.parties]

    def processes(self, command: Union[str, Sequence[str]], ports: PortPlan
                  ) -> Tuple[List[ProcessSpec], List[Listener]]:
        """All processes in start order (schedulers, then servers, then workers) and every listener with a
        port of ``ports``, in the order the ports are taken: the global scheduler, the central scheduler, each
        global server, then per party its scheduler, its local servers and its workers.

        Workers run ``command``, in which ``{slice}``, ``{party}`` and ``{rank}`` are replaced by the
        worker's data-slice index (the parties' workers first), its party's index (or ``central``) and its
        rank in its site, and ``{python}`` by its host's interpreter where the host names one."""
        command = worker_argv(command)
        c, parties = self.central, self.parties
        party_names = [p.name for p in parties]
        everyone = [c.name, *party_names]
        party_workers = sum(p.workers for p in parties)  # their slices come first
        num_all_workers = party_workers + c.workers
        num_global_workers = sum(p.servers for p in parties)  # the global tier's workers: the local servers
        central_num_worker = max(1, c.workers)
        enable_cw = 1 if c.workers > 0 else 0
        listeners: List[Listener] = []
        placed_at: Dict[str, Tuple[Site, Host, str]] = {}  # process name -> its site, host and role
        schedulers: List[ProcessSpec] = []
        servers: List[ProcessSpec] = []
        workers: List[ProcessSpec] = []

        def listen(site: Site, host: Host, process: str, role: str, what: str, reached_from: Sequence[str]) -> int:
            port = ports.take(site, host, process, role)
            listeners.append(Listener(site.name, process, host, port, "tcp", what, tuple(reached_from)))
            return port

        def read(site: Site, env: Dict[str, str], reader: Callable[..., Any], *args: str) -> Any:
            # A feature read by the rule the node will read it with (config): the launcher gives the node
            # the listeners it will open, and a value the node would refuse is refused here already.
            try:
                return reader(env, *args)
            except ConfigError as exc:
                raise LayoutError(site, str(exc)) from None

        def spec(site: Site, role: str, name: str, host: Host, launcher_env: Dict[str, object],
                 user_env: Dict[str, str], worker: Optional[Tuple[int, Union[int, str], int]] = None,
                 listen_port: int = 0) -> ProcessSpec:
            listener = ports.held(listen_port) if listen_port else None
            if listener is not None:
                launcher_env = dict(launcher_env, GEOMX_LISTEN_FD=listener.fileno())
            if worker is not None:
                slice_idx, party, rank = worker
                launcher_env = dict(launcher_env, GEOMX_DATA_SLICE=slice_idx,
                                    GEOMX_PARTY=party if isinstance(party, str) else f"party{party}")
                argv = [*host.prefix, *_substitute(command, slice_idx, party, rank, host.python)]
            elif self.node_command is not None:
                argv = [*host.prefix, *self.node_command]
            else:
                argv = [*host.prefix, host.python or DEFAULT_NODE_COMMAND[0], *DEFAULT_NODE_COMMAND[1:]]
            if worker is None:  # its party as a worker's is named, for its metrics' labels
                launcher_env = dict(launcher_env, GEOMX_PARTY="central" if site.kind == "central"
                                    else f"party{parties.index(site)}")
            out = ProcessSpec(name, argv, self._environment(site, host, launcher_env, user_env), worker is not None,
                              host.dc or site.name, cwd=host.workdir, host=host.ssh, site=site.name,
                              party=site.name if site.kind == "party" else "")
            out.listener = listener
            placed_at[name] = (site, host, role)
            return out

        # ---- the central site: the global tier and the central party
        chost = c.host
        g_port = listen(c, chost, "global_scheduler", "global_scheduler", "global scheduler", everyone)
        schedulers.append(spec(c, "global_scheduler", "global_scheduler", chost, dict(
            DMLC_ROLE_GLOBAL="global_scheduler",
            DMLC_PS_GLOBAL_ROOT_URI=chost.address,
            DMLC_PS_GLOBAL_ROOT_PORT=g_port,
            DMLC_NUM_GLOBAL_SERVER=c.servers,
            DMLC_NUM_GLOBAL_WORKER=num_global_workers,
        ), self._user_env(c, "global_scheduler", "global_scheduler"), listen_port=g_port))
        c_port = listen(c, chost, "central/scheduler", "scheduler", "central scheduler", [c.name])
        schedulers.append(spec(c, "scheduler", "central/scheduler", chost, dict(
            DMLC_ROLE="scheduler",
            DMLC_PS_ROOT_URI=chost.internal,
            DMLC_PS_ROOT_PORT=c_port,
            DMLC_NUM_SERVER=c.servers,
            DMLC_NUM_WORKER=central_num_worker,
        ), self._user_env(c, "scheduler", "central/scheduler"), listen_port=c_port))
        for i in range(c.servers):
            host = _round_robin(c.server_hosts, i, c)
            name = f"global_server{i}"
            user_env = self._user_env(c, "global_server", name)
            placed: Dict[str, object] = {}
            if ports.fixed:
                port = listen(c, host, name, "global_server", "global server, for the parties", party_names)
                placed["GEOMX_SERVER_PORT"] = port
                if read(c, user_env, config.dgt_mode) == 1:  # UDP channels beside the server's TCP port
                    listeners.append(Listener(c.name, name, host, port, "udp", "global server, DGT channel",
                                              tuple(party_names)))
                    placed["GEOMX_DGT_UDP_PORT"] = port
                placed["GEOMX_CENTRAL_PORT"] = listen(c, host, name, "global_server",
                                                      "global server, for the central workers", [c.name])
            servers.append(spec(c, "global_server", name, host, dict(
                DMLC_ROLE_GLOBAL="global_server",
                DMLC_ROLE="server",
                DMLC_PS_GLOBAL_ROOT_URI=chost.address,
                DMLC_PS_GLOBAL_ROOT_PORT=g_port,
                DMLC_PS_ROOT_URI=chost.internal,
                DMLC_PS_ROOT_PORT=c_port,
                DMLC_NUM_SERVER=c.servers,
                DMLC_NUM_WORKER=central_num_worker,
                DMLC_NUM_GLOBAL_SERVER=c.servers,
                DMLC_NUM_GLOBAL_WORKER=num_global_workers,
                DMLC_NUM_ALL_WORKER=num_all_workers,
                DMLC_ENABLE_CENTRAL_WORKER=enable_cw,
                GEOMX_GLOBAL_SERVER_RANK=i,
                **placed,
            ), user_env))
        central_worker_env: Dict[str, object] = dict(
            DMLC_ROLE="worker",
            DMLC_PS_ROOT_URI=chost.internal,
            DMLC_PS_ROOT_PORT=c_port,
            DMLC_NUM_SERVER=c.servers,
            DMLC_NUM_WORKER=central_num_worker,
            DMLC_NUM_ALL_WORKER=num_all_workers,
            DMLC_ENABLE_CENTRAL_WORKER=enable_cw,
        )
        for j in range(central_num_worker):
            host = _round_robin(c.worker_hosts, j, c)
            # The master worker trains (as the first central worker) only when the central site trains.
            if j == 0:
                name, role, env = "central/master_worker", "master_worker", dict(central_worker_env,
                                                                                 DMLC_ROLE_MASTER_WORKER=1)
                slice_idx = party_workers if c.workers > 0 else 0
            else:
                name, role, env, slice_idx = f"central/worker{j}", "worker", central_worker_env, party_workers + j
            workers.append(spec(c, role, name, host, env, self._user_env(c, role, name),
                                worker=(slice_idx, "central", j)))

        # ---- the parties
        first_slice = 0
        for p, site in enumerate(parties):
            shost = site.host
            name = f"{site.name}/scheduler"
            port = listen(site, shost, name, "scheduler", "party scheduler", [site.name])
            schedulers.append(spec(site, "scheduler", name, shost, dict(
                DMLC_ROLE="scheduler",
                DMLC_PS_ROOT_URI=shost.internal,
                DMLC_PS_ROOT_PORT=port,
                DMLC_NUM_SERVER=site.servers,
                DMLC_NUM_WORKER=site.workers,
            ), self._user_env(site, "scheduler", name), listen_port=port))
            for i in range(site.servers):
                host = _round_robin(site.server_hosts, i, site)
                name = f"{site.name}/server" if site.servers == 1 else f"{site.name}/server{i}"
                user_env = self._user_env(site, "server", name)
                placed = {}
                if ports.fixed:
                    placed["GEOMX_SERVER_PORT"] = listen(site, host, name, "server", "local server, for its workers",
                                                         [site.name])
                    if read(site, user_env, config.switch, "ENABLE_INTER_TS"):
                        placed["GEOMX_TS_PORT"] = listen(site, host, name, "server", "local server, TSEngine relays",
                                                         [n for n in everyone if n != site.name])
                servers.append(spec(site, "server", name, host, dict(
                    DMLC_ROLE="server",
                    DMLC_PS_ROOT_URI=shost.internal,
                    DMLC_PS_ROOT_PORT=port,
                    DMLC_PS_GLOBAL_ROOT_URI=chost.address,
                    DMLC_PS_GLOBAL_ROOT_PORT=g_port,
                    DMLC_NUM_SERVER=site.servers,
                    DMLC_NUM_WORKER=site.workers,
                    DMLC_NUM_GLOBAL_SERVER=c.servers,
                    DMLC_NUM_GLOBAL_WORKER=num_global_workers,
                    **placed,
                ), user_env))
            for i in range(site.workers):
                host = _round_robin(site.worker_hosts, i, site)
                name = f"{site.name}/worker{i}"
                user_env = self._user_env(site, "worker", name)
                placed = {}
                if ports.fixed and read(site, user_env, config.switch, "ENABLE_INTRA_TS"):
                    placed["GEOMX_TS_PORT"] = listen(site, host, name, "worker", "worker, TSEngine relays",
                                                     [site.name])
                workers.append(spec(site, "worker", name, host, dict(
                    DMLC_ROLE="worker",
                    DMLC_PS_ROOT_URI=shost.internal,
                    DMLC_PS_ROOT_PORT=port,
                    DMLC_NUM_SERVER=site.servers,
                    DMLC_NUM_WORKER=site.workers,
                    DMLC_NUM_ALL_WORKER=num_all_workers,
                    **placed,
                ), user_env, worker=(first_slice + i, p, i)))
            first_slice += site.workers
        specs = schedulers + servers + workers
        if self.metrics or self.metrics_base is not None:
            # Last, so that turning metrics on moves no other listener's port.
            for n, s in enumerate(specs):
                site, host, role = placed_at[s.name]
                if "GEOMX_METRICS_PORT" in self._user_env(site, role, s.name):
                    continue  # the description gives this process its own
                if ports.fixed:
                    port = listen(site, host, s.name, role, "metrics (/metrics for Prometheus)", [site.name])
                else:
                    assert self.metrics_base is not None, "metrics on one machine need metrics_base"
                    port = self.metrics_base + n
                    listeners.append(Listener(site.name, s.name, host, port, "tcp", "metrics", (site.name,)))
                s.env["GEOMX_METRICS_PORT"] = str(port)
        return enable_restarts(declare_party_servers(specs)), listeners

    def _user_env(self, site: Site, role: str, name: str) -> Dict[str, str]:
        """The variables of the process ``name`` that the description sets (``env`` ... ``node_env``)."""
        env = dict(self.env)
        env.update(self.role_env.get(role, {}))
        env.update(site.env)
        env.update(site.role_env.get(role, {}))
        for pattern, extra in self.node_env.items():
            if fnmatch.fnmatchcase(name, pattern):
                env.update(extra)
        return {str(k): str(v) for k, v in env.items()}

    def _environment(self, site: Site, host: Host, launcher_env: Dict[str, object],
                     user_env: Dict[str, str]) -> Dict[str, str]:
        # The launcher's own environment is handed on (less the roles); the settings below are set for
        # the child, not read.
        env = config.inherited_environment(drop=ROLE_KEYS)
        # Children write into pipes; without this Python children block-buffer their output.
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.update({k: str(v) for k, v in launcher_env.items()})
        env["DMLC_NODE_HOST"] = host.address
        if host.bind is not None:
            env["GEOMX_BIND_HOST"] = host.bind
        if site.keys_dir is not None:
            env["GEOMX_CURVE_SECRET_KEY"] = f"{site.keys_dir.rstrip('/')}/{site.name}.key_secret"
            env["GEOMX_CURVE_PUBLIC_KEYS_DIR"] = site.keys_dir
            if self.central_key is not None:
                env["GEOMX_CURVE_CENTRAL_KEY"] = self.central_key
        env.update(user_env)
        return env


def _round_robin(hosts: List[Host], i: int, site: Site) -> Host:
    return hosts[i % len(hosts)] if hosts else site.host


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
