"""Topology files: one TOML file that places a whole GeoMX topology on sites (data centers) and hosts.

The minimal form (docs/Deployment.md, "The topology file", lists every field)::

    [central]                 # global scheduler + global server(s) + master worker
    host = "10.1.0.1"
    global_servers = 1
    [[party]]
    name = "party0"
    host = "10.1.0.2"
    workers = 2

:func:`load` reads and validates a file into a :class:`SiteTopology`; every mistake raises
:class:`TopologyFileError` naming the file, the site and the field. :meth:`SiteTopology.processes`
gives every process with its host, environment (fixed ports, bind and advertised addresses) and
argv; :meth:`SiteTopology.firewall` the ports each site must open to which other sites.
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from .. import config
from ..errors import ConfigError
from .topology import ROLE_KEYS, Ports, ProcessSpec, Topology, declare_party_servers, enable_restarts

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python < 3.11 only
    import tomli as tomllib

#: Roles of ``role_env`` tables.
ROLES = ("global_scheduler", "global_server", "scheduler", "server", "master_worker", "worker")

#: Variables the launcher sets from the file itself; ``env`` tables may not set them.
PLACEMENT_KEYS = frozenset({"GEOMX_BIND_HOST", "GEOMX_SERVER_PORT", "GEOMX_CENTRAL_PORT", "GEOMX_TS_PORT",
                            "GEOMX_DGT_UDP_PORT", "GEOMX_CURVE_SECRET_KEY", "GEOMX_CURVE_PUBLIC_KEYS_DIR",
                            "GEOMX_CURVE_CENTRAL_KEY"})

DEFAULT_PORT_BASE = 9000

#: What --dry-run shows for the directory of automatically generated keys.
AUTO_KEYS_PLACEHOLDER = "<keys generated at start>"

_TOP_KEYS = {"central", "party", "security", "keys_dir", "env", "role_env", "port_base", "python", "workdir",
             "outage_window", "lost_party"}
_HOST_KEYS = {"host", "address", "bind", "python", "workdir"}
_SITE_KEYS = _HOST_KEYS | {"name", "ports", "env", "role_env", "keys_dir", "server_hosts", "worker_hosts"}
_CENTRAL_KEYS = _SITE_KEYS | {"global_servers", "central_workers"}
_PARTY_KEYS = _SITE_KEYS | {"workers", "local_servers"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class TopologyFileError(ValueError):
    """A mistake in a topology file; the message names the file, the site and the field."""


@dataclass(frozen=True)
class Host:
    """One machine of a site."""

    ssh: str  # SSH target as written (``user@`` allowed)
    address: str  # what other processes connect to (advertised)
    bind: str  # what this machine's listeners bind
    python: str
    workdir: Optional[str]

    @property
    def internal(self) -> str:
        """The address processes of its own site use (the bound one, which behind NAT differs)."""
        return self.address if self.bind == "*" else self.bind


@dataclass
class Site:
    name: str
    kind: str  # "central" or "party"
    host: Host  # schedulers (and every process without a host list of its own)
    server_hosts: List[Host]
    worker_hosts: List[Host]
    ports: Optional[Tuple[int, int]]  # [first, last] of the site's own range, or None (shared counter)
    env: Dict[str, str]
    role_env: Dict[str, Dict[str, str]]
    keys_dir: Optional[str]
    count: int  # parties: workers; central: global servers
    extra: int  # parties: local servers; central: central workers

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


@dataclass
class SiteTopology:
    path: str
    central: Site
    parties: List[Site]
    security: str  # "none" or "curve"
    env: Dict[str, str] = field(default_factory=dict)
    role_env: Dict[str, Dict[str, str]] = field(default_factory=dict)
    port_base: int = DEFAULT_PORT_BASE
    explicit_security: bool = False
    #: CURVE without keys_dir: the launcher generates each site's key pair on the site's host at start
    #: (over SSH) and hands out the public keys; see geomx/launch/cli.py.
    auto_keys: bool = False

    @property
    def sites(self) -> List[Site]:
        return [self.central, *self.parties]

    def site(self, name: str) -> Site:
        for s in self.sites:
            if s.name == name:
                return s
        raise TopologyFileError(f"{self.path}: no site named {name!r} (sites: "
                                f"{', '.join(s.name for s in self.sites)})")

    @property
    def hosts(self) -> List[Host]:
        seen: Dict[str, Host] = {}
        for s in self.sites:
            for h in s.hosts:
                seen.setdefault(h.ssh, h)
        return list(seen.values())

    # ---- processes ------------------------------------------------------------------------
    def _topology(self) -> Topology:
        return Topology(
            parties=len(self.parties),
            workers_per_party=[p.count for p in self.parties],
            global_servers=self.central.count,
            central_workers=self.central.extra,
            local_servers=[p.extra for p in self.parties],
            dc_hosts={"central": self.central.host.address,
                      **{f"party{i}": p.host.address for i, p in enumerate(self.parties)}},
        )

    def _placement(self) -> Tuple[List[Tuple[str, Site, str, Host, Dict[str, str]]], Ports, List[Listener]]:
        """Every process (internal name, site, role, host, its launcher-set env), the scheduler ports
        and every listener, in start order; ports are given out here."""
        counters: Dict[str, int] = {}  # address -> next port, for sites without a range of their own
        ranges: Dict[Tuple[str, str], int] = {}  # (site, address) -> next port in the site's range
        listeners: List[Listener] = []
        procs: List[Tuple[str, Site, str, Host, Dict[str, str]]] = []
        party_names = [p.name for p in self.parties]

        def take(site: Site, host: Host, process: str, what: str, reached_from: Sequence[str],
                 proto: str = "tcp") -> int:
            if site.ports is None:
                port = counters.get(host.address, self.port_base)
                counters[host.address] = port + 1
            else:
                first, last = site.ports
                port = ranges.get((site.name, host.address), first)
                if port > last:
                    raise TopologyFileError(
                        f"{self.path}: {_where(site)}: ports {first}-{last} hold {last - first + 1} port(s), too few "
                        f"for the listeners on {host.address} (each scheduler, server and TSEngine link takes one)")
                ranges[(site.name, host.address)] = port + 1
            listeners.append(Listener(site.name, process, host, port, proto, what, tuple(reached_from)))
            return port

        def env_of(site: Site, role: str) -> Dict[str, str]:
            merged = dict(self.env)
            merged.update(self.role_env.get(role, {}))
            merged.update(site.env)
            merged.update(site.role_env.get(role, {}))
            return merged

        def read(site: Site, env: Dict[str, str], reader: Callable[..., Any], *args: str) -> Any:
            # A feature read by the rule the node will read it with (config): the file gets the listeners
            # the node will open, and a value the node would refuse is refused here already.
            try:
                return reader(env, *args)
            except ConfigError as exc:
                raise TopologyFileError(f"{self.path}: {_where(site)}: {exc}") from None

        c = self.central
        everyone = [c.name, *party_names]
        g_env = env_of(c, "global_scheduler")
        g_port = take(c, c.host, "global_scheduler", "global scheduler", everyone)
        procs.append(("global_scheduler", c, "global_scheduler", c.host, g_env))
        c_port = take(c, c.host, "central/scheduler", "central scheduler", [c.name])
        procs.append(("central/scheduler", c, "scheduler", c.host, env_of(c, "scheduler")))
        for i in range(c.count):
            host = c.server_hosts[i % len(c.server_hosts)] if c.server_hosts else c.host
            env = env_of(c, "global_server")
            name = f"global_server{i}"
            placed = {"GEOMX_SERVER_PORT": str(take(c, host, name, "global server, for the parties", party_names))}
            if read(c, env, config.dgt_mode) == 1:  # UDP channels beside the server's TCP port
                listeners.append(Listener(c.name, name, host, int(placed["GEOMX_SERVER_PORT"]), "udp",
                                          "global server, DGT channel", tuple(party_names)))
                placed["GEOMX_DGT_UDP_PORT"] = placed["GEOMX_SERVER_PORT"]
            placed["GEOMX_CENTRAL_PORT"] = str(take(c, host, name, "global server, for the central workers",
                                                    [c.name]))
            procs.append((name, c, "global_server", host, dict(env, **placed)))
        for j in range(max(1, c.extra)):
            host = c.worker_hosts[j % len(c.worker_hosts)] if c.worker_hosts else c.host
            name = "central/master_worker" if j == 0 else f"central/worker{j}"
            procs.append((name, c, "master_worker" if j == 0 else "worker", host, env_of(c, "master_worker" if j == 0
                                                                                      else "worker")))
        party_ports = []
        for p, site in enumerate(self.parties):
            party_ports.append(take(site, site.host, f"{site.name}/scheduler", "party scheduler", [site.name]))
            procs.append((f"party{p}/scheduler", site, "scheduler", site.host, env_of(site, "scheduler")))
            for i in range(site.extra):
                host = site.server_hosts[i % len(site.server_hosts)] if site.server_hosts else site.host
                suffix = "server" if site.extra == 1 else f"server{i}"
                env = env_of(site, "server")
                placed = {"GEOMX_SERVER_PORT": str(take(site, host, f"{site.name}/{suffix}",
                                                        "local server, for its workers", [site.name]))}
                if read(site, env, config.switch, "ENABLE_INTER_TS"):
                    others = [n for n in everyone if n != site.name]
                    placed["GEOMX_TS_PORT"] = str(take(site, host, f"{site.name}/{suffix}",
                                                       "local server, TSEngine relays", others))
                procs.append((f"party{p}/{suffix}", site, "server", host, dict(env, **placed)))
            for i in range(site.count):
                host = site.worker_hosts[i % len(site.worker_hosts)] if site.worker_hosts else site.host
                env = env_of(site, "worker")
                placed = {}
                if read(site, env, config.switch, "ENABLE_INTRA_TS"):
                    placed["GEOMX_TS_PORT"] = str(take(site, host, f"{site.name}/worker{i}",
                                                       "worker, TSEngine relays", [site.name]))
                procs.append((f"party{p}/worker{i}", site, "worker", host, dict(env, **placed)))
        ports = Ports(global_root=g_port, central_root=c_port, parties=party_ports)
        self._check_clashes(listeners)
        return procs, ports, listeners

    def _check_clashes(self, listeners: List[Listener]) -> None:
        seen: Dict[Tuple[str, str, int], Listener] = {}
        for lst in listeners:
            key = (lst.proto, lst.host.address, lst.port)
            other = seen.get(key)
            if other is not None and other.process != lst.process:
                raise TopologyFileError(
                    f"{self.path}: two listeners at {lst.host.address}:{lst.port} ({lst.proto}): "
                    f"{other.process} of site {other.site!r} and {lst.process} of site {lst.site!r}; give the "
                    f"sites on one host distinct `ports` ranges")
            seen[key] = lst

    def listeners(self) -> List[Listener]:
        return self._placement()[2]

    def processes(self, command: Union[str, Sequence[str]], keys_dir: Optional[str] = None) -> List[ProcessSpec]:
        """Every process of the topology, in start order, with its host, site and environment.

        ``{python}`` in ``command`` is replaced by the host's interpreter (``python`` field).
        ``keys_dir``: with automatic keys, the directory the launcher generated them into on every host
        (default: a placeholder, for --dry-run)."""
        if isinstance(command, str):
            command = shlex.split(command)
        placed, ports, _ = self._placement()
        topo = self._topology()
        specs = topo.processes(list(command), ports)
        by_name = {name: (site, role, host, env) for name, site, role, host, env in placed}
        curve = self.security == "curve"
        out = []
        for spec in specs:
            site, role, host, env = by_name[spec.name]
            spec.env.update(env)
            spec.env["DMLC_NODE_HOST"] = host.address
            if "DMLC_PS_ROOT_URI" in spec.env:
                # The site's own scheduler is reached inside the site (the global one across sites).
                spec.env["DMLC_PS_ROOT_URI"] = site.host.internal
            spec.env["GEOMX_BIND_HOST"] = host.bind
            if curve:
                keys = site.keys_dir if not self.auto_keys else keys_dir or AUTO_KEYS_PLACEHOLDER
                assert keys is not None  # load() checked it
                spec.env["GEOMX_CURVE_SECRET_KEY"] = f"{keys.rstrip('/')}/{site.name}.key_secret"
                spec.env["GEOMX_CURVE_PUBLIC_KEYS_DIR"] = keys
                spec.env["GEOMX_CURVE_CENTRAL_KEY"] = self.central.name
            if spec.is_worker:
                spec.argv = [a.replace("{python}", host.python) for a in spec.argv]
            elif spec.argv[:1] == [sys.executable]:
                spec.argv = [host.python, *spec.argv[1:]]
            spec.name = _rename(spec.name, self.parties)
            spec.dc = spec.site = site.name
            spec.party = site.name if site.kind == "party" else ""
            spec.host = host.ssh
            spec.cwd = host.workdir
            out.append(spec)
        return enable_restarts(declare_party_servers(out))

    @property
    def spans_hosts(self) -> bool:
        return len({h.address for h in self.hosts}) > 1

    def insecure_warning(self) -> Optional[str]:
        """The warning a topology over several hosts without CURVE gets at start (None: no warning)."""
        if self.security == "curve" or not self.spans_hosts:
            return None
        how = "security = \"none\"" if self.explicit_security else "no keys_dir"
        return (f"INSECURE: {self.path} spans several hosts and runs with {how}: the links between sites are "
                f"neither encrypted nor authenticated (set keys_dir to a directory of geomx-keys key pairs on "
                f"every host for CURVE)")

    # ---- firewall -------------------------------------------------------------------------
    def firewall(self) -> List[str]:
        """Per site, the ports its hosts must accept, and from which sites (by their addresses)."""
        listeners = self.listeners()
        addresses = {s.name: sorted({h.address for h in s.hosts}) for s in self.sites}
        lines = []
        for site in self.sites:
            mine = [lst for lst in listeners if lst.site == site.name]
            lines.append(f"# {site.name} ({', '.join(addresses[site.name])}): {len(mine)} port(s)")
            for lst in mine:
                sources = ", ".join(f"{s} ({' '.join(addresses[s])})" for s in lst.reached_from)
                lines.append(f"{lst.proto} {lst.host.address}:{lst.port}  {lst.process} ({lst.what})  "
                             f"from {sources}")
        return lines


def _rename(name: str, parties: List[Site]) -> str:
    """``party<p>/...`` (the topology model's names) -> ``<party name>/...``."""
    m = re.match(r"^party(\d+)/(.*)$", name)
    if m is None:
        return name
    return f"{parties[int(m.group(1))].name}/{m.group(2)}"


def _where(site: Union[Site, str, None], index: Optional[int] = None) -> str:
    if isinstance(site, Site):
        return "[central]" if site.kind == "central" else f"[[party]] {site.name!r}"
    if site == "central":
        return "[central]"
    if site:
        return f"[[party]] {site!r}"
    return f"[[party]] #{(index or 0) + 1}"


# --------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------


class _Checker:
    def __init__(self, path: str):
        self.path = path

    def fail(self, where: str, message: str) -> TopologyFileError:
        return TopologyFileError(f"{self.path}: {where}: {message}")

    def keys(self, table: Dict[str, Any], known: set, where: str) -> None:
        unknown = sorted(set(table) - known)
        if unknown:
            raise self.fail(where, f"unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")

    def string(self, table: Dict[str, Any], key: str, where: str, default: Optional[str] = None,
               required: bool = False) -> Optional[str]:
        if key not in table:
            if required:
                raise self.fail(where, f"{key} is required")
            return default
        value = table[key]
        if not isinstance(value, str) or not value.strip():
            raise self.fail(where, f"{key} must be a non-empty string, got {value!r}")
        return value.strip()

    def count(self, table: Dict[str, Any], key: str, where: str, default: Optional[int], minimum: int) -> int:
        if key not in table:
            if default is None:
                raise self.fail(where, f"{key} is required")
            return default
        value = table[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(where, f"{key} must be an integer, got {value!r}")
        if value < minimum:
            raise self.fail(where, f"{key} must be >= {minimum}, got {value}")
        return value

    def env(self, table: Dict[str, Any], key: str, where: str) -> Dict[str, str]:
        value = table.get(key, {})
        if not isinstance(value, dict):
            raise self.fail(where, f"{key} must be a table of VARIABLE = value, got {value!r}")
        out = {}
        for k, v in value.items():
            if isinstance(v, bool):
                v = "1" if v else "0"
            if not isinstance(v, (str, int, float)):
                raise self.fail(where, f"{key}.{k} must be a string or a number, got {v!r}")
            if k in ROLE_KEYS or k in PLACEMENT_KEYS or k == "DMLC_NODE_HOST":
                raise self.fail(where, f"{key}.{k}: the launcher sets {k} from the topology file")
            out[str(k)] = str(v)
        return out

    def role_env(self, table: Dict[str, Any], where: str) -> Dict[str, Dict[str, str]]:
        value = table.get("role_env", {})
        if not isinstance(value, dict):
            raise self.fail(where, f"role_env must be a table of role tables, got {value!r}")
        out = {}
        for role in value:
            if role not in ROLES:
                raise self.fail(where, f"role_env: unknown role {role!r} (roles: {', '.join(ROLES)})")
            out[role] = self.env(value, role, f"{where} role_env")
        return out

    def port(self, value: Any, where: str, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            raise self.fail(where, f"{key} must be a TCP port (1-65535), got {value!r}")
        return value

    def ports(self, table: Dict[str, Any], where: str) -> Optional[Tuple[int, int]]:
        if "ports" not in table:
            return None
        value = table["ports"]
        if isinstance(value, int) and not isinstance(value, bool):
            first = self.port(value, where, "ports")
            return first, 65535
        if isinstance(value, str):
            m = re.match(r"^\s*(\d+)\s*-\s*(\d+)\s*$", value)
            if m:
                first = self.port(int(m.group(1)), where, "ports")
                last = self.port(int(m.group(2)), where, "ports")
                if last < first:
                    raise self.fail(where, f"ports {value!r}: the range ends before it starts")
                return first, last
        raise self.fail(where, f"ports must be a first port (9000) or a range (\"9000-9019\"), got {value!r}")

    def host(self, value: Any, where: str, defaults: Dict[str, Optional[str]]) -> Host:
        if isinstance(value, str):
            value = {"host": value}
        if not isinstance(value, dict):
            raise self.fail(where, f"a host must be a string or a table with host = ..., got {value!r}")
        self.keys(value, _HOST_KEYS, where)
        ssh = self.string(value, "host", where, required=True)
        assert ssh is not None
        address = self.string(value, "address", where, ssh.rsplit("@", 1)[-1])
        assert address is not None
        bind = self.string(value, "bind", where, defaults.get("bind") or address)
        if bind == "0.0.0.0":
            bind = "*"
        python = self.string(value, "python", where, defaults.get("python") or sys.executable)
        workdir = self.string(value, "workdir", where, defaults.get("workdir"))
        assert bind is not None and python is not None
        return Host(ssh, address, bind, python, workdir)

    def hosts(self, table: Dict[str, Any], key: str, where: str, defaults: Dict[str, Optional[str]]) -> List[Host]:
        value = table.get(key, [])
        if not isinstance(value, list) or not value and key in table:
            raise self.fail(where, f"{key} must be a non-empty list of hosts, got {value!r}")
        return [self.host(v, f"{where} {key}[{i}]", defaults) for i, v in enumerate(value)]


def loads(text: str, path: str = "<topology>") -> SiteTopology:
    """Parse and validate a topology file's text."""
    ck = _Checker(path)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TopologyFileError(f"{path}: not valid TOML: {exc}") from None
    ck.keys(doc, _TOP_KEYS, "top level")
    if "central" not in doc:
        raise ck.fail("top level", "[central] is required (the global scheduler, global servers and master worker)")
    if "party" not in doc:
        raise ck.fail("top level", "at least one [[party]] is required")
    if not isinstance(doc["central"], dict):
        raise ck.fail("top level", "central must be a table: [central]")
    parties_raw = doc["party"]
    if not isinstance(parties_raw, list) or not parties_raw or not all(isinstance(p, dict) for p in parties_raw):
        raise ck.fail("top level", "party must be an array of tables: [[party]] (at least one)")
    top_python = ck.string(doc, "python", "top level")
    top_workdir = ck.string(doc, "workdir", "top level")
    port_base = ck.port(doc.get("port_base", DEFAULT_PORT_BASE), "top level", "port_base")
    security = ck.string(doc, "security", "top level")
    if security not in (None, "none", "curve"):
        raise ck.fail("top level", f"security must be \"curve\" or \"none\", got {security!r}")

    def site(table: Dict[str, Any], kind: str, index: int) -> Site:
        raw_name = table.get("name", "central" if kind == "central" else None)
        if kind == "party" and raw_name is None:
            raise ck.fail(_where(None, index), "name is required")
        if not isinstance(raw_name, str) or not _NAME.match(raw_name):
            raise ck.fail(_where(None, index) if kind == "party" else "[central]",
                          f"name must be letters, digits, '_', '.', '-', got {raw_name!r}")
        where = _where(raw_name if kind == "party" else "central")
        ck.keys(table, _CENTRAL_KEYS if kind == "central" else _PARTY_KEYS, where)
        defaults = {"python": ck.string(table, "python", where, top_python),
                    "workdir": ck.string(table, "workdir", where, top_workdir),
                    "bind": ck.string(table, "bind", where)}
        if "host" not in table:
            raise ck.fail(where, "host is required (the SSH target, user@ allowed, and the address others reach)")
        main = ck.host({k: table[k] for k in _HOST_KEYS if k in table}, where, defaults)
        if kind == "central":
            count = ck.count(table, "global_servers", where, 1, 1)
            extra = ck.count(table, "central_workers", where, 0, 0)
        else:
            count = ck.count(table, "workers", where, None, 1)
            extra = ck.count(table, "local_servers", where, 1, 1)
        # A site's address and bind belong to its main host; the other hosts give their own.
        others = dict(defaults, bind=None)
        return Site(raw_name, kind, main, ck.hosts(table, "server_hosts", where, others),
                    ck.hosts(table, "worker_hosts", where, others), ck.ports(table, where),
                    ck.env(table, "env", where), ck.role_env(table, where),
                    ck.string(table, "keys_dir", where, ck.string(doc, "keys_dir", "top level")), count, extra)

    central = site(doc["central"], "central", 0)
    parties = [site(p, "party", i) for i, p in enumerate(parties_raw)]
    seen = {central.name: "[central]"}
    for i, p in enumerate(parties):
        if p.name in seen:
            raise ck.fail(_where(None, i), f"name {p.name!r} is used twice (also {seen[p.name]})")
        seen[p.name] = f"[[party]] #{i + 1}"
    topo = SiteTopology(path, central, parties, "none", ck.env(doc, "env", "top level"),
                        ck.role_env(doc, "top level"), port_base)
    window = doc.get("outage_window")
    if window is not None:
        # How long the global tier rides out a party's silent WAN link: every process reads it from
        # GEOMX_WAN_OUTAGE_WINDOW (config.py), so the field is that variable for the whole topology.
        if isinstance(window, bool) or not isinstance(window, (int, float)) or not 0 <= window <= 7 * 86400:
            raise ck.fail("top level", f"outage_window must be seconds in [0, 604800], got {window!r}")
        if "GEOMX_WAN_OUTAGE_WINDOW" in topo.env:
            raise ck.fail("top level", "outage_window and env.GEOMX_WAN_OUTAGE_WINDOW are both set; keep one")
        topo.env["GEOMX_WAN_OUTAGE_WINDOW"] = f"{window:g}"
    policy = doc.get("lost_party")
    if policy is not None:
        # What the global tier does with a party lost beyond the window: GEOMX_LOST_PARTY, likewise.
        if policy not in config.LOST_PARTY_POLICIES:
            raise ck.fail("top level", f"lost_party must be one of {', '.join(config.LOST_PARTY_POLICIES)}, got "
                                       f"{policy!r}")
        if "GEOMX_LOST_PARTY" in topo.env:
            raise ck.fail("top level", "lost_party and env.GEOMX_LOST_PARTY are both set; keep one")
        topo.env["GEOMX_LOST_PARTY"] = policy
    with_keys = [s for s in topo.sites if s.keys_dir is not None]
    if security is None:
        # Encrypted by default across hosts; one machine (every site at one address) runs in clear
        # unless keys are given.
        security = "curve" if with_keys or topo.spans_hosts else "none"
    topo.security = security
    topo.explicit_security = doc.get("security") is not None
    if security == "curve":
        if with_keys and len(with_keys) != len(topo.sites):
            missing = next(s for s in topo.sites if s.keys_dir is None)
            raise ck.fail(_where(missing), "keys_dir is set for other sites but not here: give it for every site, "
                                           "or for none (the launcher then generates the keys)")
        if not with_keys:
            topo.auto_keys = True
            for s in topo.sites:
                if len(s.hosts) > 1:
                    raise ck.fail(_where(s), "CURVE keys generated by the launcher need each site on one host (a "
                                             "site's hosts share its key pair): set keys_dir, or security = "
                                             "\"none\"")
    topo.listeners()  # port ranges and clashes
    return topo


def load(path: str) -> SiteTopology:
    """Read and validate the topology file at ``path``."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise TopologyFileError(f"{path}: cannot read the topology file: {exc.strerror}") from None
    return loads(text, path)
