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
:class:`TopologyFileError` naming the file, the site and the field. :meth:`SiteTopology.layout` is the
file as a :class:`~.layout.Layout` (the description the single-machine form gives too), and
:meth:`SiteTopology.processes` the processes it derives, each with its host, environment (fixed ports,
bind and advertised addresses) and argv; :meth:`SiteTopology.firewall` the ports each site must open to
which other sites.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from .. import config
from .layout import ROLE_KEYS, ROLES, Host, Layout, LayoutError, Listener, PortPlan, ProcessSpec, Site, worker_argv

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python < 3.11 only
    import tomli as tomllib

#: Variables the launcher sets from the file itself; ``env`` tables may not set them.
PLACEMENT_KEYS = frozenset({"GEOMX_BIND_HOST", "GEOMX_SERVER_PORT", "GEOMX_CENTRAL_PORT", "GEOMX_TS_PORT",
                            "GEOMX_DGT_UDP_PORT", "GEOMX_CURVE_SECRET_KEY", "GEOMX_CURVE_PUBLIC_KEYS_DIR",
                            "GEOMX_CURVE_CENTRAL_KEY"})

DEFAULT_PORT_BASE = 9000

#: What --dry-run shows for the directory of automatically generated keys.
AUTO_KEYS_PLACEHOLDER = "<keys generated at start>"

_TOP_KEYS = {"central", "party", "security", "keys_dir", "env", "role_env", "port_base", "python", "workdir",
             "outage_window", "lost_party", "metrics"}
_HOST_KEYS = {"host", "address", "bind", "python", "workdir"}
_SITE_KEYS = _HOST_KEYS | {"name", "ports", "env", "role_env", "keys_dir", "server_hosts", "worker_hosts"}
_CENTRAL_KEYS = _SITE_KEYS | {"global_servers", "central_workers"}
_PARTY_KEYS = _SITE_KEYS | {"workers", "local_servers"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class TopologyFileError(ValueError):
    """A mistake in a topology file; the message names the file, the site and the field."""


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
    #: ``metrics = true``: every process serves /metrics on a port of its site's range, bound to its host's
    #: internal address (reached from inside its site; docs/Observability.md).
    metrics: bool = False

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
    def layout(self, keys_dir: Optional[str] = None) -> Layout:
        """The file's sites as a :class:`Layout`, each site with the CURVE keys its processes use: its
        ``keys_dir``, or with automatic keys ``keys_dir`` here (default: a placeholder, for --dry-run)."""
        curve = self.security == "curve"

        def keys(site: Site) -> Optional[str]:
            if not curve:
                return None
            return (keys_dir or AUTO_KEYS_PLACEHOLDER) if self.auto_keys else site.keys_dir

        central, *parties = [replace(site, keys_dir=keys(site)) for site in self.sites]
        return Layout(central, parties, env=self.env, role_env=self.role_env,
                      central_key=self.central.name if curve else None, metrics=self.metrics)

    def _placement(self, command: Union[str, Sequence[str]], keys_dir: Optional[str] = None
                   ) -> Tuple[List[ProcessSpec], List[Listener]]:
        try:
            specs, listeners = self.layout(keys_dir).processes(command, _FixedPorts(self))
        except LayoutError as exc:
            raise TopologyFileError(f"{self.path}: {_where(exc.site)}: {exc}") from None
        self._check_clashes(listeners)
        return specs, listeners

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
        """Every listener, in the order its port was given out (the command does not matter)."""
        return self._placement(["COMMAND"])[1]

    def processes(self, command: Union[str, Sequence[str]], keys_dir: Optional[str] = None) -> List[ProcessSpec]:
        """Every process of the topology, in start order, with its host, site and environment.

        ``{python}`` in ``command`` is replaced by the host's interpreter (``python`` field).
        ``keys_dir``: with automatic keys, the directory the launcher generated them into on every host
        (default: a placeholder, for --dry-run)."""
        return self._placement(worker_argv(command), keys_dir)[0]

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


class _FixedPorts(PortPlan):
    """A topology file's ports: every listener takes the next port of its site's ``ports`` range on its host's
    address or, for a site without one, of a counter from ``port_base`` per address shared by such sites."""

    fixed = True

    def __init__(self, topo: SiteTopology):
        self.topo = topo
        self.counters: Dict[str, int] = {}  # address -> next port, for sites without a range of their own
        self.ranges: Dict[Tuple[str, str], int] = {}  # (site, address) -> next port in the site's range

    def take(self, site: Site, host: Host, process: str, role: str) -> int:
        if site.ports is None:
            port = self.counters.get(host.address, self.topo.port_base)
            self.counters[host.address] = port + 1
            return port
        first, last = site.ports
        port = self.ranges.get((site.name, host.address), first)
        if port > last:
            raise TopologyFileError(
                f"{self.topo.path}: {_where(site)}: ports {first}-{last} hold {last - first + 1} port(s), too few "
                f"for the listeners on {host.address} (each scheduler, server and TSEngine link takes one)")
        self.ranges[(site.name, host.address)] = port + 1
        return port


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
            servers = ck.count(table, "global_servers", where, 1, 1)
            workers = ck.count(table, "central_workers", where, 0, 0)
        else:
            workers = ck.count(table, "workers", where, None, 1)
            servers = ck.count(table, "local_servers", where, 1, 1)
        # A site's address and bind belong to its main host; the other hosts give their own.
        others = dict(defaults, bind=None)
        return Site(raw_name, kind, main, servers=servers, workers=workers,
                    server_hosts=ck.hosts(table, "server_hosts", where, others),
                    worker_hosts=ck.hosts(table, "worker_hosts", where, others), ports=ck.ports(table, where),
                    env=ck.env(table, "env", where), role_env=ck.role_env(table, where),
                    keys_dir=ck.string(table, "keys_dir", where, ck.string(doc, "keys_dir", "top level")))

    central = site(doc["central"], "central", 0)
    parties = [site(p, "party", i) for i, p in enumerate(parties_raw)]
    seen = {central.name: "[central]"}
    for i, p in enumerate(parties):
        if p.name in seen:
            raise ck.fail(_where(None, i), f"name {p.name!r} is used twice (also {seen[p.name]})")
        seen[p.name] = f"[[party]] #{i + 1}"
    topo = SiteTopology(path, central, parties, "none", ck.env(doc, "env", "top level"),
                        ck.role_env(doc, "top level"), port_base)
    metrics = doc.get("metrics", False)
    if not isinstance(metrics, bool):
        raise ck.fail("top level", f"metrics must be true or false, got {metrics!r}")
    topo.metrics = metrics
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
