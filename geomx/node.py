"""Run a non-worker GeoMX role from the environment: ``python -m geomx.node``.

It replaces the original's ``python -c "import mxnet"``: the same variables decide whether this
process is the global scheduler, a party scheduler, a local server or a global server.
"""
from __future__ import annotations

import argparse
import logging
import resource
import sys
import textwrap
from typing import Dict, List, Optional, Tuple

import zmq

from . import __version__, checkpoint, config, logutil, metrics
from .config import NodeConfig
from .errors import ConfigError, GeoMXError
from .kvclient import KVClient, client_options
from .membership import Scheduler, TierMember
from .servers import GlobalServer, LocalServer
from .servers.base import ServerBase
from .servers.features import TSRoot
from .trace import Trace
from .transport import EventLoop
from .tsengine.keys import LinkKeys
from .tsengine.peer import TSPeer
from .tsengine.tier import TSEngineTier

log = logging.getLogger("geomx.node")

def _scheduler(cfg: NodeConfig) -> int:
    if cfg.role == config.GLOBAL_SCHEDULER:
        tier, port = "global tier", cfg.global_root_port
        servers, workers = cfg.num_global_server, cfg.num_global_worker
        ts_variable = "ENABLE_INTER_TS"
    else:
        tier, port = f"party@{cfg.root_port}", cfg.root_port
        servers, workers = cfg.num_server, cfg.num_worker
        ts_variable = "ENABLE_INTRA_TS"
    logutil.set_label(tier.replace(" tier", "") + " scheduler")
    sched = Scheduler(tier, port, servers, workers, heartbeat_interval=cfg.heartbeat_interval,
                      heartbeat_timeout=cfg.heartbeat_timeout, start_timeout=cfg.start_timeout,
                      max_message_bytes=cfg.max_message_bytes, keys=cfg.curve,
                      max_queued_replies=cfg.max_queued_replies, local_ipc=cfg.local_ipc,
                      cross_party=cfg.role == config.GLOBAL_SCHEDULER, listen_fd=cfg.listen_fd,
                      host=cfg.scheduler_bind_address(),
                      plugins=[TSEngineTier(ts_variable, cfg.tsengine.max_greed_rate)],
                      party_servers=dict(cfg.party_servers) if cfg.party_servers is not None else None,
                      outage_window=cfg.wan_outage_window if cfg.role == config.GLOBAL_SCHEDULER else 0.0,
                      lost_party=cfg.lost_party if cfg.role == config.GLOBAL_SCHEDULER else "stop",
                      resume=cfg.scheduler_resume)
    role = "global_scheduler" if cfg.role == config.GLOBAL_SCHEDULER else "scheduler"
    _observe(sched.loop, cfg, role, None, cfg.scheduler_bind_address(), node=role)
    code = sched.run()
    if cfg.metrics_dir:
        metrics.dump(sched.loop.metrics, cfg.metrics_dir)
    return code


def _member(loop: EventLoop, cfg: NodeConfig, tier: str, scheduler: tuple, role: str, port: int,
            name: str, fatal: List[Exception], rank_hint: Optional[int] = None,
            layout: Optional[dict] = None, ts: bool = False, outage_window: float = 0.0) -> TierMember:
    return TierMember(loop, tier, scheduler, role=role, host=cfg.advertised_host(*scheduler), port=port,
                      name=name, rank_hint=rank_hint, layout=layout, ts=ts,
                      heartbeat_interval=cfg.heartbeat_interval,
                      heartbeat_timeout=cfg.heartbeat_timeout, start_timeout=cfg.start_timeout,
                      on_fatal=fatal.append, cross_party=tier == "global", outage_window=outage_window)


def _observe(loop: EventLoop, cfg: NodeConfig, role: str, server: Optional[ServerBase], host: str,
             node: Optional[str] = None) -> None:
    """Name the node in its metrics, count its server's rounds, and serve them (GEOMX_METRICS_PORT)
    until the loop closes."""
    loop.metrics.identify(role=role, node=node or role, party=cfg.party or "")
    if server is not None:
        loop.metrics.add_collector(lambda: metrics.server_samples(server))
    metrics.serve(cfg.metrics_port, host, loop)


def _wait(loop: EventLoop, cfg: NodeConfig, done, fatal: List[Exception], what: str) -> None:
    loop.run_until(lambda: bool(fatal) or done(), timeout=cfg.start_timeout, what=what)
    if fatal:
        raise fatal[0]


def _serve(loop: EventLoop, cfg: NodeConfig, server: ServerBase, members: List[TierMember], fatal: List[Exception],
           upstream: Optional[KVClient] = None) -> int:
    while server.exit_code is None and not fatal:
        loop.run_once(0.5)
    if fatal:
        log.error("stopping: %s", fatal[0])
        if upstream is not None:
            upstream.fail_all(fatal[0])
        for m in members:  # so the other tier learns now, not after its own heartbeat timeout
            m.bye(failure=str(fatal[0]))
        code = 1
    else:
        for m in members:
            m.bye()
        code = server.exit_code or 0
    # Its clients learn that it leaves from the replies to whatever they still wait for (after the
    # upstream requests failed, whose callbacks answer some of them already).
    server.leave(str(fatal[0]) if fatal else "every client stopped", failed=bool(fatal))
    # Give the goodbyes and last replies a moment to leave.
    for _ in range(3):
        loop.run_once(0.05)
    if upstream is not None:
        upstream.write_trace()  # the local server's spans with its WAN requests'
    elif server.trace is not None:
        server.trace.write()
    if cfg.metrics_dir:
        metrics.dump(loop.metrics, cfg.metrics_dir)  # its last figures, for tests and benchmarks
    loop.close()
    return code


def _local_server(cfg: NodeConfig) -> int:
    ctx = zmq.Context()
    loop = EventLoop(ctx, cfg.max_message_bytes, name="local server", keys=cfg.curve,
                     max_queued_replies=cfg.max_queued_replies, local_ipc=cfg.local_ipc)
    server = LocalServer(cfg, loop)
    _observe(loop, cfg, "local_server", server, cfg.bind_address(cfg.root_uri, cfg.root_port))
    loop.metrics.add_collector(lambda: metrics.local_server_samples(server))
    fatal: List[Exception] = []
    # The party's workers divide keys along the global servers' parts (kvclient.partition); the
    # global tier counts parties by their scheduler, since a party may have several local servers.
    party = _member(loop, cfg, "party", (cfg.root_uri, cfg.root_port), "server", server.port,
                    "local_server", fatal, layout={"global_servers": cfg.num_global_server, "relay": True},
                    ts=cfg.tsengine.intra)
    # Under ENABLE_INTER_TS other parties send partial sums and results to server.ts_port.
    glob = _member(loop, cfg, "global", (cfg.global_root_uri, cfg.global_root_port), "worker", server.ts_port,
                   "local_server", fatal, layout={"party": f"{cfg.root_uri}:{cfg.root_port}"},
                   ts=cfg.tsengine.inter, outage_window=cfg.wan_outage_window)
    party.register()
    glob.register()
    _wait(loop, cfg, lambda: party.info is not None and glob.info is not None, fatal, "registration")
    assert glob.info is not None and party.info is not None
    logutil.set_label(f"local_server{glob.info.rank}")
    loop.metrics.identify(node=f"local_server{glob.info.rank}")
    server.parties = glob.info.num_parties
    # Only the party's registered workers may use this server (from before its first request).
    server.allow(server.link.name, party.info.clients, party.info.client_keys)
    upstream = KVClient(loop, glob.info.servers, identity=glob.client_identity(f"local_server{glob.info.rank}"),
                        sender=glob.info.rank,
                        bigarray_bound=cfg.bigarray_bound, wan=True, name=f"local_server{glob.info.rank}",
                        **client_options(cfg, loop, server.dgt))
    server.connect_upstream(upstream)
    server.trace = upstream.trace  # one trace file per process: its rounds and its WAN requests
    # A global server restarted from its checkpoint: reconnect, resend what it lost.
    glob.on_servers_changed = lambda old, new: upstream.update_servers(new.servers)
    _ride_out_outages(glob, upstream, cfg)
    server.on_fatal = fatal.append
    root = server.features.get(TSRoot)
    if root is not None:  # ENABLE_INTRA_TS: this server is the root of its party's aggregation tree
        party.on_tsengine = root.connect("local_server", party.send, fatal.append, wan=False,
                                         keys=LinkKeys.from_meta(party.info.ts_keys)).on_answer
    if cfg.tsengine.inter:
        peer = TSPeer(loop, glob.info.rank, f"local_server{glob.info.rank}", server, glob.send, fatal.append,
                      wan=True, keys=LinkKeys.from_meta(glob.info.ts_keys))
        glob.on_tsengine = peer.on_answer
        server.connect_inter_ts(peer)
    log.info("serving %d worker(s) on port %d; %d global server(s)", cfg.num_worker, server.port,
             len(glob.info.servers))
    return _serve(loop, cfg, server, [party, glob], fatal, upstream)


def _ride_out_outages(glob: TierMember, upstream: KVClient, cfg: NodeConfig) -> None:
    """The WAN link is down while the global scheduler is silent: the requests to the global servers
    wait without a deadline, and once it answers again the links to them are made anew and whatever
    was unanswered is sent again (what was on the wire may be lost, and an old connection may take
    minutes to recover by itself)."""
    if cfg.wan_outage_window <= 0:
        return
    if 0 < cfg.request_timeout < cfg.wan_outage_window:
        log.warning("GEOMX_REQUEST_TIMEOUT (%gs) is shorter than GEOMX_WAN_OUTAGE_WINDOW (%gs): the party's workers "
                    "give up on a round that waits for the WAN sooner than the global tier gives up on the party",
                    cfg.request_timeout, cfg.wan_outage_window)

    def on_outage() -> None:
        upstream.paused = True

    def on_restored(seconds: float) -> None:
        upstream.paused = False
        upstream.reconnect_all(f"the WAN link was out for {seconds:.0f}s")

    glob.on_outage = on_outage
    glob.on_restored = on_restored


def _restartable(member: TierMember, cfg: NodeConfig, restarting: bool) -> None:
    """A global server that checkpoints asks its schedulers to wait for its restart should it die;
    one started from a checkpoint asks to take the place of the one that died."""
    if cfg.checkpoint.dir:
        member.register_meta["restart_timeout"] = cfg.checkpoint.restart_timeout
    member.register_meta["restart"] = restarting


def _global_server(cfg: NodeConfig) -> int:
    # The optimizer runs in numpy (servers/updater.py); only an optimizer the numpy engine cannot run
    # exactly (NAG, DC-ASGD, ...) imports MXNet, when the master worker sets it: that import takes
    # seconds on the event loop (logged; heartbeats time out after PS_HEARTBEAT_TIMEOUT, 20 s). The
    # server calls MXNet from its one event-loop thread and waits for every result at once, so MXNet's
    # own threaded engine only adds hand-offs: should it be imported, run its ops in the calling
    # thread instead (unless the user chose).
    config.default_mxnet_engine("NaiveEngine")
    # A checkpoint to start from is read (and refused if unusable) before anything else happens; its
    # optimizer (and MXNet, if that needs it) is set up by server.restore, before joining the tiers.
    ckpt = checkpoint.load(cfg.checkpoint.restore) if cfg.checkpoint.restore else None

    ctx = zmq.Context()
    loop = EventLoop(ctx, cfg.max_message_bytes, name="global server", keys=cfg.curve,
                     max_queued_replies=cfg.max_queued_replies, local_ipc=cfg.local_ipc)
    server = GlobalServer(cfg, loop)
    _observe(loop, cfg, "global_server", server, cfg.bind_address(cfg.global_root_uri, cfg.global_root_port))
    if ckpt is not None:
        server.restore(ckpt, cfg.checkpoint.restore)
    fatal: List[Exception] = []
    glob = _member(loop, cfg, "global", (cfg.global_root_uri, cfg.global_root_port), "server",
                   server.wan_port, "global_server", fatal,
                   rank_hint=cfg.checkpoint.rank if ckpt is None else ckpt.rank,
                   ts=cfg.tsengine.inter)
    _restartable(glob, cfg, ckpt is not None)

    def on_registered(info) -> None:
        # In the loop turn of the acknowledgement, before the local servers' first messages.
        server.parties = info.num_parties
        server.allow(server.wan_link.name, info.clients, info.client_keys)
        if ckpt is not None:
            # Restored into the running topology it came from, or into a whole new one whose
            # clients start afresh.
            server.adopt_clients() if info.rejoined else server.forget_clients()

    glob.on_registered = on_registered
    glob.register()
    _wait(loop, cfg, lambda: glob.info is not None, fatal, "global-tier registration")
    assert glob.info is not None
    if ckpt is not None and glob.info.rank != ckpt.rank:
        raise checkpoint.CheckpointError(f"{cfg.checkpoint.restore} is global server {ckpt.rank}'s checkpoint, "
                                         f"the global tier gave this server rank {glob.info.rank}")
    server.rank = glob.info.rank
    server.on_async = lambda: glob.set_policy(tolerate_worker_loss=True)
    if not server.global_sync:
        server.on_async()  # restored under MixedSync
    root = server.features.get(TSRoot)
    if root is not None:  # ENABLE_INTER_TS: this server is the root of the parties' aggregation tree
        glob.on_tsengine = root.connect("global_server", glob.send, fatal.append, wan=True,
                                        keys=LinkKeys.from_meta(glob.info.ts_keys)).on_answer
    glob.on_peer_left = server.on_peer_left
    glob.on_client_joined = lambda info, joined: server.on_client_joined(info.clients, info.client_keys, joined)
    # A restarted global scheduler learns from the global servers which parties the tier goes on without.
    glob.resume_meta = lambda: {"left": [[rank, party, key] for rank, (party, key) in sorted(server.left.items())]}
    logutil.set_label(f"global_server{server.rank}")
    loop.metrics.identify(node=f"global_server{server.rank}")
    if cfg.trace:
        server.trace = Trace(cfg.trace, f"global_server{server.rank}")
    # The same rank in the central party, so both tiers agree on which server holds which key.
    central = _member(loop, cfg, "central", (cfg.root_uri, cfg.root_port), "server", server.lan_port,
                      "global_server", fatal, rank_hint=server.rank,
                      layout={"global_servers": cfg.num_global_server})
    _restartable(central, cfg, ckpt is not None)
    central.on_registered = lambda info: server.allow(server.lan_link.name, info.clients, info.client_keys,
                                                      info.master_client)
    central.register()
    _wait(loop, cfg, lambda: central.info is not None, fatal, "central-party registration")
    log.info("serving %d party(ies) on port %d and %d central worker(s) on port %d (%d local server(s))",
             server.parties, server.wan_port, cfg.num_worker, server.lan_port, cfg.num_global_worker)
    return _serve(loop, cfg, server, [glob, central], fatal)


# What --help says about roles and required variables; tests/test_install.py checks it against what
# config.load() really requires, so the two cannot drift apart.
ROLE_VARIABLES: Tuple[Tuple[str, str], ...] = (
    ("global scheduler", "DMLC_ROLE_GLOBAL=global_scheduler"),
    ("global server", "DMLC_ROLE_GLOBAL=global_server DMLC_ROLE=server"),
    ("party scheduler", "DMLC_ROLE=scheduler"),
    ("local server", "DMLC_ROLE=server"),
)
_GLOBAL_TIER = ("DMLC_PS_GLOBAL_ROOT_URI", "DMLC_PS_GLOBAL_ROOT_PORT", "DMLC_NUM_GLOBAL_SERVER",
                "DMLC_NUM_GLOBAL_WORKER")
_PARTY = ("DMLC_PS_ROOT_URI", "DMLC_PS_ROOT_PORT", "DMLC_NUM_SERVER", "DMLC_NUM_WORKER")
REQUIRED_VARIABLES: Dict[str, Tuple[str, ...]] = {
    "global scheduler": _GLOBAL_TIER,
    "global server": _GLOBAL_TIER + _PARTY + ("DMLC_NUM_ALL_WORKER",),
    "party scheduler": _PARTY,
    "local server": _GLOBAL_TIER + _PARTY,
}


def _help_epilog() -> str:
    roles = "\n".join(f"  {name:<17} {variables}" for name, variables in ROLE_VARIABLES)
    required = "\n".join(textwrap.fill(f"  {name:<17} {', '.join(names)}", 100, subsequent_indent=" " * 20)
                         for name, names in REQUIRED_VARIABLES.items())
    return f"""\
roles (DMLC_ROLE_GLOBAL decides first, then DMLC_ROLE):
{roles}

required variables (the party variables name the party's scheduler; the central party's for a
global server, whose DMLC_NUM_SERVER must equal DMLC_NUM_GLOBAL_SERVER):
{required}

often used optional variables:
  DMLC_NODE_HOST, DMLC_INTERFACE   the address this node advertises to others
  PS_HEARTBEAT_INTERVAL, PS_HEARTBEAT_TIMEOUT, GEOMX_START_TIMEOUT   liveness and start-up (seconds)
  PS_VERBOSE=1                     debug logging
  GEOMX_CURVE_SECRET_KEY, GEOMX_CURVE_PUBLIC_KEYS_DIR   encrypted, authenticated links (keys from
                                   geomx-keys generate)
  GEOMX_CHECKPOINT_DIR             a global server's checkpoints (and GEOMX_CHECKPOINT_RESTORE)
  and the switches of the features (HFA, ESync, P3, DGT, TSEngine).

Every variable, its default and how it is checked: docs/Configurations.md in the geomx source tree.
To start a whole topology on one machine: geomx-launch --help.

exit status: 0 the topology finished; 1 a failure (logged); 2 a configuration error (logged with the
variable's name) or a worker environment; 130 interrupted."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="geomx-node",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill(
            "Run one non-worker process of a GeoMX topology: the global scheduler, a global server, a "
            "party's scheduler or a party's local server. It is configured by environment variables only "
            "(the names of the original GeoMX) and takes no other arguments. Workers do not run "
            "geomx-node: they run the training script, which does `import geomx` and then "
            "mx.kv.create(\"dist_sync\").", 100),
        epilog=_help_epilog(),
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    _parser().parse_args(argv)  # only --help and --version: everything else comes from the environment
    try:
        cfg = config.load()
    except ConfigError as exc:
        logutil.setup(0, "geomx.node")
        logging.getLogger("geomx.node").error("configuration error: %s", exc)
        return 2
    logutil.setup(cfg.verbose, cfg.role)
    config.hide_roles_from_mxnet()  # before anything imports mxnet (config.MXNET_TRAPS)
    try:
        return _run_role(cfg)
    finally:
        _log_resources()


def _log_resources() -> None:
    """One line at exit with this process's CPU time and peak memory, for people (programs read the
    same figures from the metrics: geomx_process_cpu_seconds_total, ..._peak_resident_memory_bytes)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    log.info("resources: cpu %.3f s, max rss %.1f MB", usage.ru_utime + usage.ru_stime,
             usage.ru_maxrss / 1024.0)  # ru_maxrss is in kilobytes on Linux


def _run_role(cfg: NodeConfig) -> int:
    try:
        if cfg.is_scheduler:
            return _scheduler(cfg)
        if cfg.role == config.LOCAL_SERVER:
            return _local_server(cfg)
        if cfg.role == config.GLOBAL_SERVER:
            return _global_server(cfg)
        log.error("DMLC_ROLE=worker: workers run the training script (with `import geomx`), "
                  "not geomx.node")
        return 2
    except (GeoMXError, TimeoutError) as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
