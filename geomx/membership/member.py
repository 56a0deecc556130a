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
from ..transport import EventLoop, Link, connect_dealer
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
                 on_fatal: Callable[[Exception], None], cross_party: bool = False):
        self.loop = loop
        self.tier = tier
        self.scheduler = scheduler
        self.on_fatal = on_fatal
        self.heartbeat_timeout = heartbeat_timeout
        self.start_timeout = start_timeout
        self._answered = False
        self.on_peer_left: Optional[Callable[[int, str], None]] = None
        # Called with (old, new) when the scheduler announces a server's new address (a global
        # server restarted from a checkpoint).
        self.on_servers_changed: Optional[Callable[[TierInfo, TierInfo], None]] = None
        # Called with the first TierInfo, in the same loop turn as the REGISTER_ACK: before any message
        # from the tier's other nodes (who learn the tier from the same acknowledgements) is handled.
        self.on_registered: Optional[Callable[[TierInfo], None]] = None
        # TSEngine answers from the scheduler (TS_PUSH_TO / TS_RELAY_TO), when this node takes part.
        self.on_tsengine: Optional[Callable[[Message], None]] = None
        identity = f"{name}@{tier}#{os.getpid()}-{uuid.uuid4().hex[:8]}".encode()
        # Registered with the scheduler, which tells only the tier's servers: this node's data links
        # carry it in their identities (client_identity), so a server can tell its registered
        # clients from anyone else who reaches its port, and nobody can guess a client's identity.
        self.token = uuid.uuid4().hex
        self.link: Link = connect_dealer(loop, scheduler[0], scheduler[1], identity, f"{tier}-scheduler-link",
                                         peer=f"the {tier} scheduler", cross_party=cross_party)
        self.link.on_refused = lambda reason: self._fail(SecurityError(reason))
        loop.add(self.link, self._handle, routed=False)
        self.register_meta = {"role": role, "host": host, "port": port, "name": name, "master": master,
                              "rank": -1 if rank_hint is None else rank_hint, "ts": ts, "token": self.token,
                              **(layout or {})}
        self.info: Optional[TierInfo] = None
        self._barrier_waiters: List[Callable[[], None]] = []
        self._last_ack = time.monotonic()
        self._failed = False
        self._said_bye = False
        loop.call_every(heartbeat_interval, self._beat)

    def client_identity(self, name: str) -> str:
        """The identity (before KVClient's ``>server``) of this node's links to its tier's servers."""
        return f"{name}#{self.token}"

    def register(self) -> None:
        self.link.send(Message(MsgType.REGISTER, meta=self.register_meta))

    def barrier(self, group: str, on_done: Callable[[], None]) -> None:
        self._barrier_waiters.append(on_done)
        self.link.send(Message(MsgType.BARRIER, meta={"group": group}))

    def send(self, msg: Message) -> None:
        """A message to this tier's scheduler (TSEngine questions)."""
        self.link.send(msg)

    def set_policy(self, tolerate_worker_loss: bool) -> None:
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
        silent = time.monotonic() - self._last_ack
        # Until the scheduler has answered once, it may simply not be up yet: wait up to start_timeout.
        limit = self.heartbeat_timeout if self._answered else max(self.heartbeat_timeout, self.start_timeout)
        if silent > limit:
            self._fail(PeerDeadError(
                f"the {self.tier} scheduler at {self.scheduler[0]}:{self.scheduler[1]} has not answered "
                f"for {silent:.1f}s; presumed dead"))
            return
        self.link.send(Message(MsgType.HEARTBEAT))

    def _fail(self, exc: Exception) -> None:
        if not self._failed:
            self._failed = True
            self.on_fatal(exc)

    def _handle(self, msg: Message, identity: Optional[bytes], link: Link) -> None:
        self._last_ack = time.monotonic()
        self._answered = True
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
        elif msg.type == MsgType.BARRIER_ACK:
            if self._barrier_waiters:
                self._barrier_waiters.pop(0)()
        elif msg.type == MsgType.PEER_LEFT:
            rank = meta_field(msg, "rank", int)
            reason = meta_field(msg, "reason", str, "")
            if self.on_peer_left is not None:
                self.on_peer_left(rank, reason)
            else:
                log.warning("%s", reason)
        elif msg.type in (MsgType.TS_PUSH_TO, MsgType.TS_RELAY_TO) and self.on_tsengine is not None:
            self.on_tsengine(msg)
        elif msg.type == MsgType.PEER_DEAD:
            self._fail(PeerDeadError(str(meta_field(msg, "reason", str, "a peer died"))))
        else:
            raise ProtocolError(f"unexpected {msg.type.name} from the {self.tier} scheduler")
