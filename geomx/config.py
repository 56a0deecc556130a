"""The one place geomx reads its environment: every variable is parsed and validated here.

Variable names and meanings follow the original GeoMX (see docs/Configurations.md). The rest of the
code receives a :class:`NodeConfig` and never touches ``os.environ``.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import stat
from typing import Dict, Iterable, Mapping, Optional, Tuple

from . import security
from .errors import ConfigError

GLOBAL_SCHEDULER = "global_scheduler"
GLOBAL_SERVER = "global_server"
SCHEDULER = "scheduler"
LOCAL_SERVER = "server"
WORKER = "worker"
ROLES = (GLOBAL_SCHEDULER, GLOBAL_SERVER, SCHEDULER, LOCAL_SERVER, WORKER)


@dataclasses.dataclass(frozen=True)
class HFAConfig:
    """Hierarchical Frequency Aggregation: workers average inside the party every ``k1`` local steps,
    local servers go global every ``k2`` party averages."""

    enabled: bool = False  # MXNET_KVSTORE_USE_HFA
    k1: int = 1  # MXNET_KVSTORE_HFA_K1
    k2: int = 1  # MXNET_KVSTORE_HFA_K2


@dataclasses.dataclass(frozen=True)
class ESyncConfig:
    """ESync: the global server sets each party's local steps per round so that parties arrive together."""

    enabled: bool = False  # GEOMX_USE_ESYNC
    max_steps: int = 64  # GEOMX_ESYNC_MAX_STEPS


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Global-server checkpoints (docs/Deployment.md, "Checkpoint and restore"); read by global servers
    only, every other role keeps the defaults."""

    dir: Optional[str] = None  # set: the global server checkpoints and may be restarted
    # Rounds between periodic checkpoints (the parties keep their pushes since the last one).
    every: int = 10
    restore: Optional[str] = None  # a checkpoint file this global server starts from
    restart_timeout: float = 60.0  # how long the schedulers wait for a dead global server to come back
    # The global tier's rank this global server asks for (GEOMX_GLOBAL_SERVER_RANK, set by the launcher):
    # its checkpoint file is named after it, so the launcher knows which file restarts it.
    rank: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class P3Config:
    """P3: data-path requests cut into slices of at most ``slice_size`` elements and sent by priority,
    with at most ``window`` messages handed to each socket at a time (see docs/Scheduling.md)."""

    enabled: bool = False  # ENABLE_P3
    slice_size: int = 40_000  # GEOMX_P3_SLICE_SIZE
    window: int = 2  # GEOMX_P3_WINDOW


@dataclasses.dataclass(frozen=True)
class TSEngineConfig:
    """TSEngine: aggregation trees and relay broadcasts across parties (``inter``: local servers and
    global server) and inside a party (``intra``: workers and local server); schedulers pick the next
    receiver greedily with probability at most ``max_greed_rate``."""

    inter: bool = False  # ENABLE_INTER_TS
    intra: bool = False  # ENABLE_INTRA_TS
    max_greed_rate: float = 0.9  # MAX_GREED_RATE_TS


@dataclasses.dataclass(frozen=True)
class DGTConfig:
    """DGT (differential gradient transmission) of local server -> global server pushes; see geomx/dgt
    and docs/DGT.md. Read by the two ends of a WAN push (global and local servers) only."""

    # 0 = off, 1 = low-priority blocks over UDP, 2 = over a second, low-priority TCP link, 3 = like 2
    # with those blocks quantized to 4 bits.
    mode: int = 0
    k: float = 0.5  # fraction of blocks sent on the reliable channel
    k_min: float = 0.2  # lower bound of K under ADAPTIVE_K_FLAG
    adaptive_k: bool = False
    channels: int = 3  # low-priority channels
    block_size: int = 4096  # bytes
    alpha: float = 0.3  # weight of a block's previous score in its moving average
    grace: float = 0.05  # seconds a receiver waits for missing blocks after the last one
    test_drop_rate: float = 0.0  # tests only: fraction of UDP datagrams the sender drops


@dataclasses.dataclass(frozen=True)
class NodeConfig:
    """Everything a geomx process needs to know about itself, read from the environment once.

    Topology, addresses and limits are flat fields; each optional feature's settings are one frozen
    part (``cfg.p3``, ``cfg.tsengine``, ``cfg.dgt``, ``cfg.checkpoint``, ``cfg.hfa``, ``cfg.esync``),
    loaded by its own ``_load_*`` function below. Security is the part ``cfg.curve`` (a
    :class:`security.CurveKeys`, or None for links in clear).
    """

    role: str
    is_master_worker: bool = False
    # Tier of the process's own party (every role but the global scheduler).
    root_uri: Optional[str] = None
    root_port: Optional[int] = None
    num_server: int = 0
    num_worker: int = 0
    # Global tier (global scheduler, global servers, local servers).
    global_root_uri: Optional[str] = None
    global_root_port: Optional[int] = None
    num_global_server: int = 0
    num_global_worker: int = 0
    num_all_worker: int = 0
    enable_central_worker: bool = False
    # Workers, as the launcher sets them: the worker's place among every training worker (parties'
    # first; GEOMX_DATA_SLICE, None when started by hand) and its party ("party0", ..., "central";
    # GEOMX_PARTY). The PyTorch front end's rank() and party().
    data_slice: Optional[int] = None
    party: Optional[str] = None
    # Workers: the global tier's mode for front ends without a kvstore type (GEOMX_SYNC_MODE: "sync",
    # FSA, the default; "async", MixedSync). MXNet's dist_sync / dist_async decide it there.
    sync_mode: str = "sync"
    node_host: Optional[str] = None
    interface: Optional[str] = None
    # Listeners (docs/Configurations.md, "Addresses and ports"): the address they bind (None: the
    # address this process advertises, "*": every interface) and fixed ports (0: the OS chooses).
    bind_host: Optional[str] = None
    server_port: int = 0  # LS: for the party's workers; GSrv: for the local servers (WAN side)
    central_port: int = 0  # GSrv: for the central party's workers
    ts_port: int = 0  # LS (ENABLE_INTER_TS), W (ENABLE_INTRA_TS): TSEngine links
    dgt_udp_port: int = 0  # GSrv, ENABLE_DGT=1: the UDP channel
    # Every role: the port of the node's /metrics listener (GEOMX_METRICS_PORT; 0: none). It binds
    # the node's listener address like every other listener (bind_host).
    metrics_port: int = 0
    # Every role: where the process writes its last metrics reading when it ends (GEOMX_METRICS_DIR;
    # what tests and benchmarks read, geomx/metrics.py); None: nowhere.
    metrics_dir: Optional[str] = None
    # Every role: the directory of this process's trace events (GEOMX_TRACE, or its older name
    # GEOMX_P3_TRACE; geomx/trace.py), written at exit; None: no trace.
    trace: Optional[str] = None
    # Schedulers: a TCP socket the launcher bound and listens on at the scheduler's port, inherited as
    # this file descriptor (GEOMX_LISTEN_FD), so that no other process can take the port before the
    # scheduler runs.
    listen_fd: Optional[int] = None
    # Global scheduler: started again in place of one that died (GEOMX_SCHEDULER_RESUME=1, set by the
    # launcher): the tier's nodes come back to it with their ranks.
    scheduler_resume: bool = False
    # Global scheduler: how many local servers each party registers, by the party's scheduler address
    # as its local servers name it (GEOMX_PARTY_SERVERS; None: any party may fill the free slots).
    party_servers: Optional[Tuple[Tuple[str, int], ...]] = None
    # Liveness and limits.
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 20.0
    # How long the global tier waits for a party whose WAN link went silent (a local server and the
    # global scheduler, each of the other) before it counts as dead; 0: the heartbeat timeout.
    wan_outage_window: float = 300.0
    # What the global tier does when a party is lost (beyond the outage window, or failed): "stop"
    # (the run ends with the error), "continue" (it goes on with the other parties; the party may
    # rejoin when its site is started again) or "rejoin" (the same, and geomx-launch starts the lost
    # party's processes again itself).
    lost_party: str = "stop"
    start_timeout: float = 120.0
    max_message_bytes: int = 1 << 31
    # Flood bounds: rounds a client's pushes (and parked pulls) of one key may run ahead, and replies
    # a listener queues for one peer that does not read them.
    max_rounds_ahead: int = 16
    max_queued_replies: int = 100_000
    # Keys one client may declare (INIT) at a server: a peer cannot make it hold key states without end.
    max_keys_per_client: int = 100_000
    # Seconds a request (or a TSEngine result) may stay unanswered before it fails naming the peer.
    request_timeout: float = 600.0
    # Peers in the same network namespace talk over a Unix-domain socket instead of loopback TCP.
    local_ipc: bool = True
    verbose: int = 0
    # Key placement (MultiGPS) and codecs.
    bigarray_bound: int = 1_000_000
    # Global server: the slice size, in bytes, it asks its clients to cut their FSA pushes and pulls
    # of a dense key into (GEOMX_WAN_SLICE_BYTES; 0: whole keys). Each slice is updated and answered
    # as soon as every party's copy of it is in, so results stream down the WAN while later slices
    # still stream up (docs/Scheduling.md, "Cut-through rounds").
    wan_slice_bytes: int = 65536
    # None when MXNET_KVSTORE_SIZE_LOWER_BOUND is unset: a master worker then lets the global
    # servers' own value decide (as GeoMX's scripts expect), and they fall back to 200000.
    size_lower_bound: Optional[int] = None
    # Feature settings, one part per feature (each the defaults when its variables are unset).
    hfa: HFAConfig = HFAConfig()
    esync: ESyncConfig = ESyncConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    p3: P3Config = P3Config()
    tsengine: TSEngineConfig = TSEngineConfig()
    dgt: DGTConfig = DGTConfig()
    # CURVE keys of this node's party (None: links in clear; see geomx/security.py).
    curve: Optional[security.CurveKeys] = None

    @property
    def is_server(self) -> bool:
        return self.role in (LOCAL_SERVER, GLOBAL_SERVER)

    @property
    def is_scheduler(self) -> bool:
        return self.role in (SCHEDULER, GLOBAL_SCHEDULER)

    @property
    def is_worker(self) -> bool:
        return self.role == WORKER

    @property
    def needs_global_tier(self) -> bool:
        return self.role in (GLOBAL_SCHEDULER, GLOBAL_SERVER, LOCAL_SERVER)

    @property
    def needs_local_tier(self) -> bool:
        return self.role != GLOBAL_SCHEDULER

    def advertised_host(self, peer_uri: str, peer_port: int) -> str:
        """The address other nodes should use to reach this one.

        ``DMLC_NODE_HOST`` wins; otherwise ``DMLC_INTERFACE``'s IPv4 address; otherwise the local
        address the kernel would use to reach ``peer_uri`` (no packet is sent).
        """
        if self.node_host:
            return self.node_host
        if self.interface:
            return _interface_address(self.interface)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.connect((peer_uri, peer_port))
                return probe.getsockname()[0]
            except OSError:
                return "127.0.0.1"


    def bind_address(self, peer_uri: Optional[str], peer_port: Optional[int]) -> str:
        """The address a listener of this process binds: ``GEOMX_BIND_HOST``, else the address it
        advertises to the tier of the scheduler at ``peer_uri`` (which must then be one of this
        machine's: behind NAT, the advertised address is not, and GEOMX_BIND_HOST names the private
        one). Never every interface unless GEOMX_BIND_HOST says ``*`` or ``0.0.0.0``."""
        if self.bind_host is not None:
            return self.bind_host
        if peer_uri is None or peer_port is None:
            return "127.0.0.1"  # a server built on its own (unit tests, benchmarks): nobody else reaches it
        advertised = self.advertised_host(peer_uri, peer_port)
        source = "DMLC_NODE_HOST" if self.node_host else "DMLC_INTERFACE" if self.interface else \
            "the address this node advertises"
        return local_address(advertised, source, self.role)

    def scheduler_bind_address(self) -> str:
        """The address a scheduler binds: ``GEOMX_BIND_HOST``, else the address it is reached at."""
        if self.bind_host is not None:
            return self.bind_host
        if self.role == GLOBAL_SCHEDULER:
            return local_address(self.global_root_uri or "", "DMLC_PS_GLOBAL_ROOT_URI", self.role)
        return local_address(self.root_uri or "", "DMLC_PS_ROOT_URI", self.role)


def local_address(host: str, source: str, role: str) -> str:
    """``host`` as an IPv4 address of this machine (network namespace), or a ConfigError that says
    GEOMX_BIND_HOST is needed."""
    try:
        address = socket.gethostbyname(host)
    except OSError as exc:
        raise ConfigError(f"{source}={host!r} does not resolve ({exc}) (role: {role})") from None
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind((address, 0))
    except OSError:
        raise ConfigError(f"GEOMX_BIND_HOST is not set and {source}={host} is not an address of this machine "
                          f"(behind NAT, advertise the public address and set GEOMX_BIND_HOST to the private one "
                          f"to listen on; 0.0.0.0 listens on every interface) (role: {role})") from None
    return address


def _interface_address(name: str) -> str:
    import fcntl
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))  # SIOCGIFADDR
        except OSError as exc:
            raise ConfigError(f"DMLC_INTERFACE={name!r}: no IPv4 address on that interface ({exc})") from None
    return socket.inet_ntoa(packed[20:24])


class _Reader:
    """Typed access to an environment mapping that names the variable and role in every error."""

    def __init__(self, env: Mapping[str, str], role: str):
        self.env = env
        self.role = role

    def _fail(self, name: str, why: str) -> ConfigError:
        return ConfigError(f"{name} {why} (role: {self.role})")

    def str(self, name: str, default: Optional[str] = None, required: bool = False) -> Optional[str]:
        value = self.env.get(name)
        if value is None or value.strip() == "":
            if required:
                raise self._fail(name, "is required but not set")
            return default
        return value.strip()

    def int(self, name: str, default: Optional[int] = None, required: bool = False, minimum: int = 0) -> int:
        raw = self.str(name, required=required)
        if raw is None:
            return default  # type: ignore[return-value]
        try:
            value = int(raw)
        except ValueError:
            raise self._fail(name, f"must be an integer, got {raw!r}") from None
        if value < minimum:
            raise self._fail(name, f"must be >= {minimum}, got {value}")
        return value

    def _float(self, name: str, default: float, what: str = "a number") -> float:
        """The variable as a float (``default`` when unset); ``what`` names the expected value."""
        raw = self.str(name)
        if raw is None:
            return default
        try:
            return float(raw)
        except ValueError:
            raise self._fail(name, f"must be {what}, got {raw!r}") from None

    def float(self, name: str, default: float, minimum: float = 0.0) -> float:
        value = self._float(name, default)
        if not value > minimum:
            raise self._fail(name, f"must be > {minimum}, got {value}")
        return value

    def number(self, name: str, default: float, low: float, high: float, *, open_low: bool = False,
               open_high: bool = False) -> float:
        """A number in the interval from ``low`` to ``high`` (each end closed unless ``open_*``)."""
        interval = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
        value = self._float(name, default, f"a number in {interval}")
        if not ((low < value if open_low else low <= value) and (value < high if open_high else value <= high)):
            raise self._fail(name, f"must be in {interval}, got {value}")
        return value

    def fraction(self, name: str, default: float) -> float:
        """A number in [0, 1]."""
        return self.number(name, default, 0.0, 1.0)

    def bool(self, name: str, default: bool = False) -> bool:
        raw = self.str(name)
        if raw is None:
            return default
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise self._fail(name, f"must be 0 or 1, got {raw!r}")

    def port(self, name: str) -> int:
        value = self.int(name, required=True, minimum=1)
        if value > 65535:
            raise self._fail(name, f"must be a TCP port (1-65535), got {value}")
        return value


def detect_role(env: Mapping[str, str]) -> str:
    """The process's role from ``DMLC_ROLE_GLOBAL`` and ``DMLC_ROLE``, as the original decides it."""
    role_global = (env.get("DMLC_ROLE_GLOBAL") or "").strip()
    role = (env.get("DMLC_ROLE") or "").strip()
    if role_global:
        if role_global == GLOBAL_SCHEDULER:
            return GLOBAL_SCHEDULER
        if role_global == GLOBAL_SERVER:
            if role != "server":
                raise ConfigError(
                    f"DMLC_ROLE must be 'server' for a global server (DMLC_ROLE_GLOBAL=global_server), got {role!r}"
                )
            return GLOBAL_SERVER
        raise ConfigError(
            f"DMLC_ROLE_GLOBAL must be 'global_scheduler' or 'global_server', got {role_global!r}"
        )
    if role in (SCHEDULER, LOCAL_SERVER, WORKER):
        return role
    if not role:
        raise ConfigError("DMLC_ROLE is not set (expected scheduler, server or worker) and DMLC_ROLE_GLOBAL is not set")
    raise ConfigError(f"DMLC_ROLE must be scheduler, server or worker, got {role!r}")


def load(env: Optional[Mapping[str, str]] = None) -> NodeConfig:
    """Read and validate the configuration of this process (``os.environ`` unless ``env`` is given)."""
    env = os.environ if env is None else env
    role = detect_role(env)
    r = _Reader(env, role)
    kw: dict = {"role": role}

    kw["is_master_worker"] = r.bool("DMLC_ROLE_MASTER_WORKER")
    if kw["is_master_worker"] and role != WORKER:
        raise ConfigError(f"DMLC_ROLE_MASTER_WORKER=1 is only valid for a worker (role: {role})")

    if role in (GLOBAL_SCHEDULER, GLOBAL_SERVER, LOCAL_SERVER):
        kw["global_root_uri"] = r.str("DMLC_PS_GLOBAL_ROOT_URI", required=True)
        kw["global_root_port"] = r.port("DMLC_PS_GLOBAL_ROOT_PORT")
        kw["num_global_server"] = r.int("DMLC_NUM_GLOBAL_SERVER", required=True, minimum=1)
        kw["num_global_worker"] = r.int("DMLC_NUM_GLOBAL_WORKER", required=True, minimum=1)
    if role != GLOBAL_SCHEDULER:
        kw["root_uri"] = r.str("DMLC_PS_ROOT_URI", required=True)
        kw["root_port"] = r.port("DMLC_PS_ROOT_PORT")
        kw["num_server"] = r.int("DMLC_NUM_SERVER", required=True, minimum=1)
        kw["num_worker"] = r.int("DMLC_NUM_WORKER", required=True, minimum=1)
    if role in (GLOBAL_SERVER, WORKER):
        kw["num_all_worker"] = r.int("DMLC_NUM_ALL_WORKER", required=True, minimum=1)
    kw["party"] = r.str("GEOMX_PARTY")  # the launcher's name of the process's site (metrics label)
    if role == WORKER:
        if r.str("GEOMX_DATA_SLICE") is not None:
            kw["data_slice"] = r.int("GEOMX_DATA_SLICE")
        kw["sync_mode"] = (r.str("GEOMX_SYNC_MODE") or "sync").strip().lower()
        if kw["sync_mode"] not in ("sync", "async"):
            raise r._fail("GEOMX_SYNC_MODE", "must be sync (FSA) or async (MixedSync)")
    kw["enable_central_worker"] = r.bool("DMLC_ENABLE_CENTRAL_WORKER")

    if role == GLOBAL_SERVER and kw["num_server"] != kw["num_global_server"]:
        raise ConfigError(
            "DMLC_NUM_SERVER must equal DMLC_NUM_GLOBAL_SERVER on a global server (the central party's servers "
            f"are the global servers), got {kw['num_server']} and {kw['num_global_server']} (role: {role})"
        )

    if role in (SCHEDULER, GLOBAL_SCHEDULER):
        kw["listen_fd"] = _listen_fd(r, kw["global_root_port"] if role == GLOBAL_SCHEDULER else kw["root_port"],
                                     "DMLC_PS_GLOBAL_ROOT_PORT" if role == GLOBAL_SCHEDULER else "DMLC_PS_ROOT_PORT")
    if role == GLOBAL_SCHEDULER:
        kw["party_servers"] = _party_servers(r, kw["num_global_worker"])
        kw["scheduler_resume"] = r.bool("GEOMX_SCHEDULER_RESUME")
    kw["bind_host"] = _bind_host(r)
    kw["server_port"] = _optional_port(r, "GEOMX_SERVER_PORT")
    kw["central_port"] = _optional_port(r, "GEOMX_CENTRAL_PORT")
    kw["ts_port"] = _optional_port(r, "GEOMX_TS_PORT")
    kw["metrics_port"] = _optional_port(r, "GEOMX_METRICS_PORT")
    kw["trace"] = r.str("GEOMX_TRACE") or r.str("GEOMX_P3_TRACE")
    kw["metrics_dir"] = r.str("GEOMX_METRICS_DIR")
    kw["dgt_udp_port"] = _optional_port(r, "GEOMX_DGT_UDP_PORT")
    fixed = [(n, kw[n.lower()[6:]]) for n in ("GEOMX_SERVER_PORT", "GEOMX_CENTRAL_PORT", "GEOMX_TS_PORT",
                                                     "GEOMX_METRICS_PORT")]
    fixed = [(n, p) for n, p in fixed if p]
    for i, (name, port) in enumerate(fixed):
        for other, other_port in fixed[:i]:
            if port == other_port:
                raise ConfigError(f"{name} and {other} are both {port}: each listener needs its own port "
                                  f"(role: {role})")
    kw["node_host"] = r.str("DMLC_NODE_HOST")
    kw["interface"] = r.str("DMLC_INTERFACE")
    kw["heartbeat_interval"] = r.float("PS_HEARTBEAT_INTERVAL", 1.0)
    kw["heartbeat_timeout"] = r.float("PS_HEARTBEAT_TIMEOUT", 20.0)
    if kw["heartbeat_timeout"] <= 2 * kw["heartbeat_interval"]:
        raise ConfigError(
            f"PS_HEARTBEAT_TIMEOUT ({kw['heartbeat_timeout']}) must exceed twice PS_HEARTBEAT_INTERVAL "
            f"({kw['heartbeat_interval']}) (role: {role})"
        )
    kw["wan_outage_window"] = outage_window(env, role)
    kw["lost_party"] = lost_party(env, role)
    kw["start_timeout"] = r.float("GEOMX_START_TIMEOUT", 120.0)
    kw["max_message_bytes"] = r.int("GEOMX_MAX_MESSAGE_BYTES", 1 << 31, minimum=1024)
    kw["max_rounds_ahead"] = r.int("GEOMX_MAX_ROUNDS_AHEAD", 16, minimum=1)
    kw["max_queued_replies"] = r.int("GEOMX_MAX_QUEUED_REPLIES", 100_000, minimum=1)
    kw["max_keys_per_client"] = r.int("GEOMX_MAX_KEYS_PER_CLIENT", 100_000, minimum=1)
    kw["request_timeout"] = r.float("GEOMX_REQUEST_TIMEOUT", 600.0)
    kw["local_ipc"] = r.bool("GEOMX_LOCAL_IPC", True)
    kw["verbose"] = r.int("PS_VERBOSE", 0)
    kw["bigarray_bound"] = r.int("MXNET_KVSTORE_BIGARRAY_BOUND", 1_000_000, minimum=1)
    kw["size_lower_bound"] = r.int("MXNET_KVSTORE_SIZE_LOWER_BOUND", None, minimum=1)
    if role == GLOBAL_SERVER:
        kw["wan_slice_bytes"] = r.int("GEOMX_WAN_SLICE_BYTES", 65536, minimum=0)
        if 0 < kw["wan_slice_bytes"] < 4096:
            raise r._fail("GEOMX_WAN_SLICE_BYTES", f"must be 0 (whole keys) or at least 4096, got "
                                                   f"{kw['wan_slice_bytes']} (each slice is a message of its own)")
    kw["hfa"] = _load_hfa(r)
    kw["esync"] = _load_esync(r)
    kw["checkpoint"] = _load_checkpoint(r) if role == GLOBAL_SERVER else CheckpointConfig()
    kw["p3"] = _load_p3(r)
    kw["tsengine"] = _load_tsengine(r, kw)
    kw["dgt"] = _load_dgt(r) if role in (GLOBAL_SERVER, LOCAL_SERVER) else DGTConfig()
    _refuse_combinations(kw, r.str("GEOMX_CURVE_SECRET_KEY") is not None, role)
    if kw["lost_party"] != "stop" and role in (GLOBAL_SCHEDULER, GLOBAL_SERVER, LOCAL_SERVER):
        averaging = [n for n, on in (("MXNET_KVSTORE_USE_HFA", kw["hfa"].enabled),
                                     ("GEOMX_USE_ESYNC", kw["esync"].enabled),
                                     ("ENABLE_INTER_TS", kw["tsengine"].inter)) if on]
        if averaging:
            raise ConfigError(f"GEOMX_LOST_PARTY={kw['lost_party']} works with FSA and MixedSync only, not with "
                              f"{averaging[0]}: "
                              "HFA and ESync average over a fixed set of parties and TSEngine's tree holds every "
                              f"party (role: {role})")
    kw["curve"] = _curve_keys(r, role, kw)
    return NodeConfig(**kw)


def _load_hfa(r: _Reader) -> HFAConfig:
    return HFAConfig(enabled=r.bool("MXNET_KVSTORE_USE_HFA"), k1=r.int("MXNET_KVSTORE_HFA_K1", 1, minimum=1),
                     k2=r.int("MXNET_KVSTORE_HFA_K2", 1, minimum=1))


def _load_esync(r: _Reader) -> ESyncConfig:
    return ESyncConfig(enabled=r.bool("GEOMX_USE_ESYNC"), max_steps=r.int("GEOMX_ESYNC_MAX_STEPS", 64, minimum=1))


def _load_checkpoint(r: _Reader) -> CheckpointConfig:
    """The checkpoint variables (read by global servers, the only role that checkpoints)."""
    restore = r.str("GEOMX_CHECKPOINT_RESTORE")
    if restore is not None and not os.path.isfile(restore):
        raise ConfigError(f"GEOMX_CHECKPOINT_RESTORE={restore!r} is not a file (role: {r.role})")
    # Restored without GEOMX_CHECKPOINT_DIR: it goes on checkpointing next to the file it came from.
    default_dir = os.path.dirname(os.path.abspath(restore)) if restore else None
    directory = r.str("GEOMX_CHECKPOINT_DIR", default_dir)
    if directory is not None and os.path.exists(directory) and not os.path.isdir(directory):
        raise ConfigError(f"GEOMX_CHECKPOINT_DIR={directory!r} exists and is not a directory "
                          f"(role: {r.role})")
    rank = r.int("GEOMX_GLOBAL_SERVER_RANK", None)
    servers = r.int("DMLC_NUM_GLOBAL_SERVER", 1, minimum=1)
    if rank is not None and rank >= servers:
        raise r._fail("GEOMX_GLOBAL_SERVER_RANK", f"must be < DMLC_NUM_GLOBAL_SERVER ({servers}), got {rank}")
    return CheckpointConfig(dir=directory, every=r.int("GEOMX_CHECKPOINT_EVERY", 10, minimum=1), restore=restore,
                            restart_timeout=r.float("GEOMX_RESTART_TIMEOUT", 60.0), rank=rank)


def outage_window(env: Mapping[str, str], role: str = "launcher") -> float:
    """GEOMX_WAN_OUTAGE_WINDOW of a process's environment, in seconds (the launcher reads it too: its
    SSH connections to the sites must ride out what the global tier rides out)."""
    return _Reader(env, role).number("GEOMX_WAN_OUTAGE_WINDOW", 300.0, 0.0, 7 * 86400.0)


LOST_PARTY_POLICIES = ("stop", "continue", "rejoin")


def lost_party(env: Mapping[str, str], role: str = "launcher") -> str:
    """GEOMX_LOST_PARTY of a process's environment: "stop" (default), "continue" or "rejoin" (the
    launcher reads it too, to let a lost party's processes end without stopping the others and, with
    "rejoin", to start them again)."""
    value = (env.get("GEOMX_LOST_PARTY") or "stop").strip().lower()
    if value not in LOST_PARTY_POLICIES:
        raise ConfigError(f"GEOMX_LOST_PARTY must be one of {', '.join(LOST_PARTY_POLICIES)}, got {value!r} "
                          f"(role: {role})")
    return value


def checkpoint_restart(env: Mapping[str, str]) -> Optional[Tuple[Dict[str, str], float]]:
    """For the launcher: how a global server with environment ``env`` that was killed is started again
    from its latest checkpoint, as (variables to add, seconds to wait first); None when it keeps no
    checkpoint (no GEOMX_CHECKPOINT_DIR) or has no rank of its own (GEOMX_GLOBAL_SERVER_RANK). The wait
    lets its schedulers notice the death first: they refuse a replacement for a server they heard
    from within two heartbeat intervals (geomx/membership/scheduler.py)."""
    r = _Reader(env, GLOBAL_SERVER)
    directory, rank = r.str("GEOMX_CHECKPOINT_DIR"), r.int("GEOMX_GLOBAL_SERVER_RANK", None)
    if directory is None or rank is None:
        return None
    from .checkpoint import file_name

    wait = 2 * r.float("PS_HEARTBEAT_INTERVAL", 1.0) + 0.5
    return {"GEOMX_CHECKPOINT_RESTORE": file_name(directory, rank)}, wait


def scheduler_restart(env: Mapping[str, str]) -> Optional[Tuple[Dict[str, str], float]]:
    """For the launcher: how a global scheduler with environment ``env`` that was killed is started
    again, as (variables to add, seconds to wait first): at once, and it binds its port itself. The
    tier's nodes reconnect and come back to it with their ranks; None with TSEngine across the WAN
    (ENABLE_INTER_TS), whose trees the scheduler holds and cannot learn back."""
    if _Reader(env, GLOBAL_SCHEDULER).bool("ENABLE_INTER_TS"):
        return None
    return {"GEOMX_SCHEDULER_RESUME": "1"}, 0.2


def _load_p3(r: _Reader) -> P3Config:
    return P3Config(enabled=r.bool("ENABLE_P3"), slice_size=r.int("GEOMX_P3_SLICE_SIZE", 40_000, minimum=1),
                    window=r.int("GEOMX_P3_WINDOW", 2, minimum=1))


def _load_tsengine(r: _Reader, kw: dict) -> TSEngineConfig:
    """TSEngine's variables; ``kw`` is the topology load() read so far (the trees need one node per
    party and one root)."""
    role = r.role
    max_greed_rate = r.fraction("MAX_GREED_RATE_TS", 0.9)
    # Each flag matters only to the roles that take part in that tier's TSEngine.
    inter = r.bool("ENABLE_INTER_TS") and role in (GLOBAL_SERVER, LOCAL_SERVER)
    intra = r.bool("ENABLE_INTRA_TS") and role in (LOCAL_SERVER, WORKER)
    in_party = role == LOCAL_SERVER or (role == WORKER and not kw["is_master_worker"])
    for name, on in (("ENABLE_INTER_TS", inter), ("ENABLE_INTRA_TS", intra)):
        if on and in_party and kw["num_server"] != 1:
            raise ConfigError(f"{name}=1 needs one local server per party (DMLC_NUM_SERVER=1): the local server "
                              f"is its party's node in the aggregation tree, got {kw['num_server']} (role: {role})")
    if inter and kw["num_global_server"] != 1:
        raise ConfigError(f"ENABLE_INTER_TS=1 needs DMLC_NUM_GLOBAL_SERVER=1 (the global server is the root of "
                          f"the parties' aggregation tree), got {kw['num_global_server']} (role: {role})")
    return TSEngineConfig(inter=inter, intra=intra, max_greed_rate=max_greed_rate)


def _optional_port(r: _Reader, name: str) -> int:
    """A fixed TCP/UDP port, or 0 (unset: the OS chooses a free one)."""
    if r.str(name) is None:
        return 0
    return r.port(name)


def _bind_host(r: _Reader) -> Optional[str]:
    """GEOMX_BIND_HOST: an IPv4 address, or ``*`` / ``0.0.0.0`` for every interface (returned as ``*``)."""
    raw = r.str("GEOMX_BIND_HOST")
    if raw is None:
        return None
    if raw in ("*", "0.0.0.0"):
        return "*"
    try:
        packed = socket.inet_aton(raw)
    except OSError:
        packed = b""
    if raw.count(".") != 3 or not packed:
        raise r._fail("GEOMX_BIND_HOST", f"must be an IPv4 address of this machine, or * / 0.0.0.0 for every "
                                         f"interface, got {raw!r}")
    return raw


def _party_servers(r: _Reader, num_global_worker: int) -> Optional[Tuple[Tuple[str, int], ...]]:
    """GEOMX_PARTY_SERVERS: ``HOST:PORT=N,...``, each party's scheduler address (its local servers'
    DMLC_PS_ROOT_URI:DMLC_PS_ROOT_PORT) and how many local servers it has (its DMLC_NUM_SERVER)."""
    raw = r.str("GEOMX_PARTY_SERVERS")
    if raw is None:
        return None
    out: Dict[str, int] = {}
    for item in raw.split(","):
        party, _, count = item.strip().rpartition("=")
        if not party or ":" not in party or not count.strip().isdigit() or int(count) < 1:
            raise r._fail("GEOMX_PARTY_SERVERS", f"must be HOST:PORT=N,... (each party's scheduler address and its "
                                                 f"number of local servers, N >= 1), got {item.strip()!r}")
        if party in out:
            raise r._fail("GEOMX_PARTY_SERVERS", f"names the party {party} twice")
        out[party] = int(count)
    if sum(out.values()) != num_global_worker:
        raise r._fail("GEOMX_PARTY_SERVERS", f"adds up to {sum(out.values())} local servers, DMLC_NUM_GLOBAL_WORKER "
                                             f"is {num_global_worker}")
    return tuple(out.items())


def _listen_fd(r: _Reader, port: int, port_variable: str) -> Optional[int]:
    """GEOMX_LISTEN_FD: an inherited TCP socket, listening at the scheduler's port."""
    fd = r.int("GEOMX_LISTEN_FD", None)
    if fd is None:
        return None
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        raise r._fail("GEOMX_LISTEN_FD", f"is not an open file descriptor ({exc.strerror})") from None
    if not stat.S_ISSOCK(mode):
        raise r._fail("GEOMX_LISTEN_FD", f"({fd}) is not a socket")
    # A view of the descriptor (detached below, so it stays open for ZeroMQ to adopt).
    sock = socket.socket(fileno=fd)
    try:
        kind, bound = sock.type, sock.getsockname()
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    finally:
        sock.detach()
    if kind != socket.SOCK_STREAM or not isinstance(bound, tuple) or not listening:
        raise r._fail("GEOMX_LISTEN_FD", f"({fd}) is not a listening TCP socket")
    if bound[1] != port:
        raise r._fail("GEOMX_LISTEN_FD", f"({fd}) listens on port {bound[1]}, not on {port_variable}={port}")
    return fd


# The largest DGT block: a UDP datagram carries at most 65507 bytes, of which the datagram header
# (geomx.dgt.datagram: sender id, MAC, wire header) takes 80.
DGT_MAX_BLOCK_SIZE = 65424


def _dgt_mode(r: _Reader) -> int:
    mode = r.int("ENABLE_DGT", 0)
    if mode not in (0, 1, 2, 3):
        raise r._fail("ENABLE_DGT", f"must be 0 (off), 1 (UDP), 2 (TCP) or 3 (TCP + 4-bit), got {mode}")
    return mode


def _load_dgt(r: _Reader) -> DGTConfig:
    """DGT's variables (read by global and local servers, the two ends of a WAN push)."""
    mode = _dgt_mode(r)
    if not mode:
        return DGTConfig()

    k = r.number("DMLC_K", 0.5, 0.0, 1.0, open_low=True)
    k_min = r.number("DMLC_K_MIN", 0.2, 0.0, 1.0, open_low=True)
    adaptive_k = r.bool("ADAPTIVE_K_FLAG")
    channels = r.int("DMLC_UDP_CHANNEL_NUM", 3)
    if channels < 1:
        raise r._fail("DMLC_UDP_CHANNEL_NUM", f"must be >= 1 (low-priority channels), got {channels}")
    block = r.int("DGT_BLOCK_SIZE", 4096)
    if block < 4 or block % 4 or block > DGT_MAX_BLOCK_SIZE:
        raise r._fail("DGT_BLOCK_SIZE", f"must be a multiple of 4 bytes (the element size of float32; "
                                        f"float16 divides it too) between 4 and {DGT_MAX_BLOCK_SIZE}, "
                                        f"got {block}")
    alpha = r.number("DGT_CONTRIBUTION_ALPHA", 0.3, 0.0, 1.0, open_high=True)
    grace = r.int("DGT_GRACE_MS", 50)
    drop = r.number("GEOMX_DGT_TEST_DROP_RATE", 0.0, 0.0, 1.0, open_high=True)
    return DGTConfig(mode=mode, k=k, k_min=k_min, adaptive_k=adaptive_k, channels=channels, block_size=block,
                     alpha=alpha, grace=grace / 1000.0, test_drop_rate=drop)


@dataclasses.dataclass(frozen=True)
class Refused:
    """Two switches that cannot be on together in one process, and why (docs/Configurations.md,
    "Combinations refused", lists the same rows; tests/test_config.py checks that it does)."""

    first: str
    second: str
    why: str


_HFA_ESYNC_CKPT = "TSEngine's trees and relays are neither averaged over several rounds nor replayed after a restart"
_DGT_ONLY = ("DGT carries the per-round gradient pushes of FSA / MixedSync only, whole, from a local server straight "
             "to the global servers, without checkpoints")
_P3_WHOLE = ("HFA/ESync exchange whole models every K2 rounds: per-layer priorities buy nothing there, and the "
             "combination is untested")
REFUSED_COMBINATIONS = (
    Refused("MXNET_KVSTORE_USE_HFA", "GEOMX_USE_ESYNC", "both decide how the parties' models are averaged"),
    Refused("ENABLE_P3", "GEOMX_CHECKPOINT_DIR",
            "checkpoint replay numbers whole pushes per key; P3 slices would be counted as rounds"),
    Refused("ENABLE_P3", "MXNET_KVSTORE_USE_HFA", _P3_WHOLE),
    Refused("ENABLE_P3", "GEOMX_USE_ESYNC", _P3_WHOLE),
    Refused("ENABLE_P3", "ENABLE_INTER_TS",
            "TSEngine's trees and relays move whole rounds; P3 cuts them into slices sent by priority"),
    Refused("ENABLE_P3", "ENABLE_INTRA_TS",
            "TSEngine's trees and relays move whole rounds; P3 cuts them into slices sent by priority"),
    Refused("ENABLE_INTRA_TS", "GEOMX_USE_ESYNC",
            "ESync gives each worker its step count with its own reply; TSEngine relays one result"),
    Refused("ENABLE_INTER_TS", "MXNET_KVSTORE_USE_HFA", _HFA_ESYNC_CKPT),
    Refused("ENABLE_INTER_TS", "GEOMX_USE_ESYNC", _HFA_ESYNC_CKPT),
    Refused("ENABLE_INTER_TS", "GEOMX_CHECKPOINT_DIR", _HFA_ESYNC_CKPT),
    Refused("ENABLE_INTER_TS", "GEOMX_CHECKPOINT_RESTORE", _HFA_ESYNC_CKPT),
    # Local servers of different parties would connect to each other: each would need the other's key,
    # which the trust model (a client knows its own party's key and the central one's) lacks.
    Refused("ENABLE_INTER_TS", "GEOMX_CURVE_SECRET_KEY", "TSEngine relays between parties are not encrypted yet"),
    Refused("ENABLE_DGT", "MXNET_KVSTORE_USE_HFA", _DGT_ONLY),
    Refused("ENABLE_DGT", "GEOMX_USE_ESYNC", _DGT_ONLY),
    Refused("ENABLE_DGT", "GEOMX_CHECKPOINT_DIR", _DGT_ONLY),
    Refused("ENABLE_DGT", "GEOMX_CHECKPOINT_RESTORE", _DGT_ONLY),
    Refused("ENABLE_DGT", "ENABLE_P3", _DGT_ONLY),
    Refused("ENABLE_DGT", "ENABLE_INTER_TS", _DGT_ONLY),
)


def _switches(kw: dict, curve: bool) -> dict:
    """Which of the switches REFUSED_COMBINATIONS names are on in this process (each as its roles read
    it: e.g. ENABLE_INTER_TS only on servers, the checkpoint variables only on global servers). ``kw``
    holds NodeConfig's feature parts by field name."""
    ts, ckpt = kw["tsengine"], kw["checkpoint"]
    return {"MXNET_KVSTORE_USE_HFA": kw["hfa"].enabled, "GEOMX_USE_ESYNC": kw["esync"].enabled,
            "ENABLE_P3": kw["p3"].enabled, "ENABLE_INTER_TS": ts.inter,
            "ENABLE_INTRA_TS": ts.intra, "ENABLE_DGT": bool(kw["dgt"].mode),
            "GEOMX_CHECKPOINT_DIR": ckpt.dir is not None,
            "GEOMX_CHECKPOINT_RESTORE": ckpt.restore is not None, "GEOMX_CURVE_SECRET_KEY": curve}


def _refuse_combinations(kw: dict, curve: bool, role: str) -> None:
    on = _switches(kw, curve)
    for rule in REFUSED_COMBINATIONS:
        if on[rule.first] and on[rule.second]:
            raise ConfigError(f"{rule.first} cannot be combined with {rule.second}: {rule.why} (role: {role})")


def _curve_keys(r: _Reader, role: str, kw: dict) -> Optional[security.CurveKeys]:
    """CURVE is on whenever this node has a secret key; listeners also need the allow-list, and a local
    server the name of the central party's key (the only other party it connects to)."""
    secret = r.str("GEOMX_CURVE_SECRET_KEY")
    public_dir = r.str("GEOMX_CURVE_PUBLIC_KEYS_DIR")
    inside_party = r.bool("GEOMX_CURVE_INSIDE_PARTY", True)
    if secret is None:
        if public_dir is not None:
            raise r._fail("GEOMX_CURVE_PUBLIC_KEYS_DIR", "is set but GEOMX_CURVE_SECRET_KEY is not (CURVE needs "
                                                         "this party's secret key too)")
        return None
    if public_dir is None and role != WORKER:
        raise r._fail("GEOMX_CURVE_PUBLIC_KEYS_DIR", "is required with GEOMX_CURVE_SECRET_KEY (the allow-list "
                                                     "of the parties' public keys)")
    central = r.str("GEOMX_CURVE_CENTRAL_KEY", "central") if role == LOCAL_SERVER else None
    try:
        security.load_secret(secret)
    except security.KeyFileError as exc:
        raise r._fail("GEOMX_CURVE_SECRET_KEY", f"is unusable: {exc}") from None
    try:
        if public_dir is not None:
            security.load_allow_list(public_dir)
    except security.KeyFileError as exc:
        raise r._fail("GEOMX_CURVE_PUBLIC_KEYS_DIR", f"is unusable: {exc}") from None
    try:
        return security.load(secret, public_dir if role != WORKER else None, central, inside_party)
    except security.KeyFileError as exc:
        raise r._fail("GEOMX_CURVE_CENTRAL_KEY", f"is unusable: {exc}") from None


def is_worker_process(env: Optional[Mapping[str, str]] = None) -> bool:
    """True when this process is a training worker (``DMLC_ROLE=worker`` and no global role)."""
    env = os.environ if env is None else env
    return (env.get("DMLC_ROLE") or "").strip() == WORKER and not (env.get("DMLC_ROLE_GLOBAL") or "").strip()


# -- The environment beyond one node's configuration -------------------------------------------------
# The launcher asks a few switches of the environments it gives its processes, hands its own on to
# them, and a node takes a few variables away from (or gives defaults to) MXNet in its own process.
# Those reads and changes live here too, so that each variable has one rule.

def switch(env: Mapping[str, str], name: str, role: str = "launcher") -> bool:
    """Switch ``name`` of a process's environment ``env``, by the rule every node reads it with:
    1/true/yes/on, 0/false/no/off (unset: off); anything else is refused, naming the variable."""
    return _Reader(env, role).bool(name)


def dgt_mode(env: Mapping[str, str], role: str = "launcher") -> int:
    """ENABLE_DGT of a process's environment: 0 (off), 1 (UDP channels), 2 (TCP) or 3 (TCP + 4-bit)."""
    return _dgt_mode(_Reader(env, role))


def inherited_environment(drop: Iterable[str] = ()) -> Dict[str, str]:
    """This process's environment less the variables ``drop``: the base the launcher gives every
    process it starts (and the SSH client it starts them through)."""
    dropped = set(drop)
    return {k: v for k, v in os.environ.items() if k not in dropped}


# MXNet starts its own ps-lite server or scheduler at import time when it sees these (and then never
# returns), so a geomx node hides them before anything imports mxnet.
MXNET_TRAPS = ("DMLC_ROLE", "DMLC_ROLE_GLOBAL", "DMLC_PS_ROOT_URI", "DMLC_PS_ROOT_PORT")


def hide_roles_from_mxnet() -> None:
    """Remove :data:`MXNET_TRAPS` from this process's environment (a node calls it once its
    configuration is loaded)."""
    for name in MXNET_TRAPS:
        os.environ.pop(name, None)


def default_mxnet_engine(engine: str) -> None:
    """MXNET_ENGINE_TYPE for an MXNet this process may import later, unless the user chose one."""
    os.environ.setdefault("MXNET_ENGINE_TYPE", engine)
