"""A node's side of a tier: register with the scheduler, barriers, heartbeats, goodbye.

Everything here runs in the node's event-loop thread and reports through callbacks, so the same class
serves a server (whose loop is its main thread) and a worker (whose loop is a background I/O thread).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
import uuid
from typing import Any, Callable, List, Mapping, Optional, Tuple

from ..errors import PeerDeadError, ProtocolError, SecurityError
from ..transport import EventLoop, Link, Origin, connect_dealer, reconnected_identity
from ..wire import Message, MsgType, meta_field

log = logging.getLogger("geomx.membership")


@dataclasses.dataclass(frozen=True)
class TierInfo:
    """What the scheduler told this node: its rank and the tier's servers."""

    tier: str
    rank: int
    servers: Tuple[Tuple[str, int], ...]
    num_workers: int
    num_servers: int
    #: How many global servers keys are divided for (see :func:`geomx.kvclient.partition`).
    global_servers: int = 1
    #: Whether this tier's servers are local servers relaying to a global tier (a party's tier).
    relay: bool = False
    #: How many parties the tier's workers serve (the global tier: its workers are local servers).
    num_parties: int = 0
    #: This server took the place of a dead one in a running tier (restarted from a checkpoint).
    rejoined: bool = False
    #: A server: the tokens of the tier's workers, its only clients (see ServerBase.allow).
    clients: Tuple[str, ...] = ()
    #: With CURVE: the key (name) each client's requests must come with, by token.
    client_keys: Mapping[str, str] = dataclasses.field(default_factory=dict)
    #: A server of the central party: the master worker's token (only it sets optimizer and codec).
    master_client: Optional[str] = None
    #: TSEngine: this node's link keys, as the scheduler sent them (geomx.tsengine.keys.LinkKeys).
    ts_keys: Mapping[str, Any] = dataclasses.field(default_factory=dict)


class TierMember:
    def __init__(self, loop: EventLoop, tier: str, scheduler: Tuple[str, int], *, role: str, host: str,
                 port: int, name: str, master: bool = False, rank_hint: Optional[int] = None, ts: bool = False,
                 layout: Optional[dict] = None,
                 heartbeat_interval: float, heartbeat_timeout: float, start_timeout: float = 120.0,
                 on_fatal: Callable[[Exception], None], cross_party: bool = False, outage_window: float = 0.0):
        self.loop = loop
        self.tier = tier
        self.scheduler = scheduler
        self.on_fatal = on_fatal
        self.heartbeat_timeout = heartbeat_timeout
        # A scheduler across the WAN (a local server's, at the global tier): silence beyond the
        # heartbeat timeout is taken for an outage of the link until this many seconds
        # (GEOMX_WAN_OUTAGE_WINDOW); 0: it is a death.
        self.outage_window = outage_window
        self.outage_since: Optional[float] = None  # the last answer before the current outage
        self._said_outage = 0.0
        # Called with the outage's length in seconds once the scheduler answers again: the node's data
        # links across the same WAN were down as long and may have lost what was on the wire.
        self.on_restored: Optional[Callable[[float], None]] = None
        self.on_outage: Optional[Callable[[], None]] = None  # called when an outage begins
        self.start_timeout = start_timeout
        self._answered = False
        # Called with (rank, reason, party: the lost node's party name or None) when the tier goes on
        # without a node (MixedSync, or GEOMX_LOST_PARTY=continue).
        # A server also gets the lost node's token (its requests are refused from then on).
        self.on_peer_left: Optional[Callable[[int, str, Optional[str], Optional[str]], None]] = None
        # Called with (old, new) when the scheduler announces a server's new address (a global
        # server restarted from a checkpoint).
        self.on_servers_changed: Optional[Callable[[TierInfo, TierInfo], None]] = None
        # A server: called with (new info, the joined client: meta "token", "rank", "party") when a lost
        # party's local server took its place again; the scheduler hears ADMITTED once it returns.
        self.on_client_joined: Optional[Callable[[TierInfo, dict], None]] = None
        # What this node adds to its registration when it resumes it with a restarted scheduler (a
        # global server: the parties the tier goes on without).
        self.resume_meta: Optional[Callable[[], dict]] = None
        self._policy: Optional[bool] = None  # the last POLICY sent, sent again to a restarted scheduler
        self._registering = False
        # Called with the first TierInfo, in the same loop turn as the REGISTER_ACK: before any message
        # from the tier's other nodes (who learn the tier from the same acknowledgements) is handled.
        self.on_registered: Optional[Callable[[TierInfo], None]] = None
        # TSEngine answers from the scheduler (TS_PUSH_TO / TS_RELAY_TO), when this node takes part.
        self.on_tsengine: Optional[Callable[[Message], None]] = None
        self.identity = f"{name}@{tier}#{os.getpid()}-{uuid.uuid4().hex[:8]}".encode()
        # Registered with the scheduler, which tells only the tier's servers: this node's data links
        # carry it in their identities (client_identity), so a server can tell its registered
        # clients from anyone else who reaches its port, and nobody can guess a client's identity.
        self.token = uuid.uuid4().hex
        self.cross_party = cross_party
        self.generation = 0  # connections to the scheduler made after the first broke
        self.link: Link = self._connect()
        self.register_meta = {"role": role, "host": host, "port": port, "name": name, "master": master,
                              "rank": -1 if rank_hint is None else rank_hint, "ts": ts, "token": self.token,
                              **(layout or {})}
        self.info: Optional[TierInfo] = None
        # Barriers are numbered, so that one sent again over a new connection is answered once.
        self._barrier_waiters: List[Tuple[int, str, Callable[[], None]]] = []
        self._barriers_entered = 0
        self._last_ack = time.monotonic()
        self._failed = False
        self._said_bye = False
        loop.call_every(heartbeat_interval, self._beat)

    def _connect(self) -> Link:
        link = connect_dealer(self.loop, self.scheduler[0], self.scheduler[1],
                              reconnected_identity(self.identity, self.generation), f"{self.tier}-scheduler-link",
                              peer=f"the {self.tier} scheduler", cross_party=self.cross_party)
        link.on_refused = lambda reason: self._fail(SecurityError(reason))
        link.on_disconnected = lambda: self._reconnect("its connection ended")
        self.loop.add(link, self._handle, routed=False)
        return link

    def _reconnect(self, why: str) -> None:
        """A new connection to the scheduler (under a new identity: the scheduler may still hold the
        old one); barriers not yet answered are entered again."""
        if self._said_bye or self._failed:
            return
        log.info("%s scheduler link: %s; reconnecting", self.tier, why)
        old = self.link
        self.loop.remove(old)
        old.close()
        self.generation += 1
        self.link = self._connect()
        self.link.proven = old.proven
        if self.info is not None:
            # The scheduler may have died and been started again (GEOMX_SCHEDULER_RESUME): it learns
            # the tier back from its nodes. The same scheduler takes this as the reconnection it is.
            resume = {"rank": self.info.rank, "barriers": self._barriers_entered - len(self._barrier_waiters)}
            if self.resume_meta is not None:
                resume.update(self.resume_meta())
            self.link.send(Message(MsgType.REGISTER, meta={**self.register_meta, "resume": resume}))
            if self._policy is not None:
                self.set_policy(self._policy)
        elif self._registering:
            self.register()  # not acknowledged yet: the scheduler may be a new one that never saw it
        for seq, group, _ in self._barrier_waiters:
            self.link.send(Message(MsgType.BARRIER, meta={"group": group, "n": seq}))

    def client_identity(self, name: str) -> str:
        """The identity (before KVClient's ``>server``) of this node's links to its tier's servers."""
        return f"{name}#{self.token}"

    def register(self) -> None:
        self._registering = True
        self.link.send(Message(MsgType.REGISTER, meta=self.register_meta))

    def barrier(self, group: str, on_done: Callable[[], None]) -> None:
        seq = self._barriers_entered
        self._barriers_entered += 1
        self._barrier_waiters.append((seq, group, on_done))
        self.link.send(Message(MsgType.BARRIER, meta={"group": group, "n": seq}))

    def send(self, msg: Message) -> None:
        """A message to this tier's scheduler (TSEngine questions)."""
        self.link.send(msg)

    def set_policy(self, tolerate_worker_loss: bool) -> None:
        self._policy = tolerate_worker_loss
        self.link.send(Message(MsgType.POLICY, meta={"tolerate_worker_loss": tolerate_worker_loss}))

    def bye(self, failure: Optional[str] = None) -> None:
        """Leave the tier; with ``failure`` the scheduler tells every other node at once (instead of
        them waiting for a heartbeat timeout)."""
        if not self._said_bye:
            self._said_bye = True
            self.link.send(Message(MsgType.BYE, meta=None if failure is None else {"failure": failure}))

    def _beat(self) -> None:
        if self._said_bye or self._failed:
            return
        now = time.monotonic()
        silent = now - self._last_ack
        # Until the scheduler has answered once, it may simply not be up yet: wait up to start_timeout.
        limit = self.heartbeat_timeout if self._answered else max(self.heartbeat_timeout, self.start_timeout)
        if self._answered and silent > limit and silent <= self.outage_window:
            self._outage(now, silent)
        elif silent > limit:
            beyond = f" (beyond GEOMX_WAN_OUTAGE_WINDOW={self.outage_window:g}s)" if self.outage_window else ""
            self._fail(PeerDeadError(
                f"the {self.tier} scheduler at {self.scheduler[0]}:{self.scheduler[1]} has not answered "
                f"for {silent:.1f}s; presumed dead{beyond}"))
            return
        self.link.send(Message(MsgType.HEARTBEAT))

    def _outage(self, now: float, silent: float) -> None:
        """Silent beyond the heartbeat timeout, inside the outage window: the WAN link is taken to be
        down. Reconnect once (the old connection may never recover, or be reset meanwhile), and say
        so every 30 s."""
        if self.outage_since is None:
            self.outage_since = self._last_ack
            self._reconnect(f"no answer for {silent:.0f}s")
            if self.on_outage is not None:
                self.on_outage()
        elif now - self._said_outage < 30:
            return
        self._said_outage = now
        log.warning("the %s scheduler at %s:%d has not answered for %.0fs: taken for a WAN outage; waiting %.0fs "
                    "more for the link (GEOMX_WAN_OUTAGE_WINDOW=%gs)", self.tier, self.scheduler[0],
                    self.scheduler[1], silent, self.outage_window - silent, self.outage_window)

    def _fail(self, exc: Exception) -> None:
        if not self._failed:
            self._failed = True
            self.on_fatal(exc)

    def _handle(self, msg: Message, origin: Origin) -> None:
        self._last_ack = time.monotonic()
        self._answered = True
        if self.outage_since is not None:
            down, self.outage_since = self._last_ack - self.outage_since, None
            log.warning("the %s scheduler answers again after %.1fs", self.tier, down)
            if self.on_restored is not None:
                self.on_restored(down)
        if msg.type == MsgType.HEARTBEAT_ACK:
            return
        if msg.type == MsgType.REGISTER_ACK:
            servers = meta_field(msg, "servers", list)
            try:
                parsed = tuple((str(h), int(p)) for h, p in servers)
            except (TypeError, ValueError):
                raise ProtocolError("REGISTER_ACK with a malformed server list") from None
            old, self.info = self.info, TierInfo(
                self.tier, meta_field(msg, "rank", int), parsed, meta_field(msg, "num_workers", int),
                meta_field(msg, "num_servers", int), meta_field(msg, "global_servers", int, 1),
                meta_field(msg, "relay", bool, False), meta_field(msg, "num_parties", int, 0),
                meta_field(msg, "rejoined", bool, False),
                tuple(str(t) for t in meta_field(msg, "clients", list, []) if isinstance(t, str)),
                {str(t): str(k) for t, k in meta_field(msg, "client_keys", dict, {}).items()},
                meta_field(msg, "master_client", str, None), meta_field(msg, "ts_keys", dict, {}))
            if old is None and self.on_registered is not None:
                self.on_registered(self.info)
            if old is not None and old.servers != parsed and self.on_servers_changed is not None:
                self.on_servers_changed(old, self.info)
            joined = meta_field(msg, "joined", dict, None)
            if old is not None and joined is not None:
                if not isinstance(joined.get("token"), str) or not isinstance(joined.get("rank"), int):
                    raise ProtocolError("REGISTER_ACK with a malformed joined client")
                if self.on_client_joined is not None:
                    self.on_client_joined(self.info, joined)
                self.link.send(Message(MsgType.ADMITTED, meta={"token": joined["token"]}))
        elif msg.type == MsgType.BARRIER_ACK:
            seq = meta_field(msg, "n", int, None)
            if self._barrier_waiters and (seq is None or seq == self._barrier_waiters[0][0]):
                self._barrier_waiters.pop(0)[2]()
            # else: a second answer to a barrier entered again over a new connection
        elif msg.type == MsgType.PEER_LEFT:
            rank = meta_field(msg, "rank", int)
            reason = meta_field(msg, "reason", str, "")
            if self.on_peer_left is not None:
                self.on_peer_left(rank, reason, meta_field(msg, "party", str, None),
                                  meta_field(msg, "token", str, None))
            else:
                log.warning("%s", reason)
        elif msg.type in (MsgType.TS_PUSH_TO, MsgType.TS_RELAY_TO) and self.on_tsengine is not None:
            self.on_tsengine(msg)
        elif msg.type == MsgType.PEER_DEAD:
            self._fail(PeerDeadError(str(meta_field(msg, "reason", str, "a peer died"))))
        else:
            raise ProtocolError(f"unexpected {msg.type.name} from the {self.tier} scheduler")
