"""A node's side of a tier's TSEngine: partial sums waiting to be sent up the aggregation tree, models
being relayed, the links to other nodes, and the wall-clock throughput of every hop.

Protocol, per (key, round); the coordinator is the tier's scheduler (:mod:`.coordinator`):

* push: a node with a partial sum asks ``TS_ASK_PUSH``; when the coordinator answers ``TS_PUSH_TO``
  it sends ``TS_MERGE`` (the sum and how many pushes it holds) to that node, which adds it to its
  own partial sum and asks again. The root (the tier's server) asks again after every partial sum
  it receives until its round is complete.
* pull: the root, once it has the result, and then every node that receives it, asks
  ``TS_ASK_RELAY`` and sends ``TS_MODEL`` to the node named in ``TS_RELAY_TO``, until told nobody.
* every ``TS_MERGE`` / ``TS_MODEL`` is acknowledged with ``TS_ACK``; the sender times the hop
  (send to acknowledgement, wall clock) and reports bytes per second to the coordinator.

A refused hop (``TS_ACK`` with an error) is a bug or a misconfiguration that no retry fixes: it
ends the node through ``on_fatal`` with the reason, so the tier stops with a clear error instead of
waiting for a round that cannot complete. A dead peer is found by the tier's heartbeats.
"""
from __future__ import annotations

import dataclasses
import hmac
import itertools
import logging
import time
from typing import Callable, Dict, List, Optional, Protocol, Tuple

import numpy as np

from ..errors import GeoMXError, ProtocolError
from ..transport import EventLoop, Link, Origin, connect_dealer, identity_token, log_limited
from ..wire import Message, MsgType, meta_field
from .keys import LinkKeys
from .partial import Partial, partial_dtype_ok
from .policy import ROOT

log = logging.getLogger("geomx.tsengine")

DATA = (MsgType.TS_MERGE, MsgType.TS_MODEL)


class Owner(Protocol):
    """What a TSEngine node asks of the server or worker it belongs to."""

    def ts_check(self, kind: MsgType, key: int, rnd: int, data: np.ndarray) -> Optional[str]:
        """Why a TS_MERGE (root) or TS_MODEL (other nodes) for (key, round) cannot be taken, or None."""

    def ts_merged(self, key: int, rnd: int, data: np.ndarray, count: int) -> bool:
        """Root: add a partial sum of ``count`` pushes; True once the round is complete."""

    def ts_model(self, key: int, rnd: int, data: np.ndarray) -> None:
        """Other nodes: the result of (key, round) arrived."""


@dataclasses.dataclass
class _Hop:
    kind: MsgType
    key: int
    rnd: int
    to: int
    nbytes: int
    sent: float


class TSPeer:
    """``node`` is :data:`~geomx.tsengine.policy.ROOT` for the tier's server, else the worker rank;
    ``ask(msg)`` sends a question to the tier's scheduler; ``on_fatal(exc)`` ends the node."""

    def __init__(self, loop: EventLoop, node: int, name: str, owner: Owner, ask: Callable[[Message], None],
                 on_fatal: Callable[[Exception], None], wan: bool, keys: LinkKeys):
        self.loop = loop
        # This node's link keys (from its scheduler, geomx/tsengine/keys.py): its link to node j carries
        # keys.to[j] in its identity; a TS_MERGE or TS_MODEL that says it is from node i is taken only
        # from a link that carries keys.from_[i].
        self.keys = keys
        self.node = node
        self.name = name
        self.owner = owner
        self.ask = ask
        self.on_fatal = on_fatal
        self.wan = wan
        self.links: Dict[Tuple[str, int], Link] = {}
        self.partials: Dict[Tuple[int, int], Partial] = {}
        self.models: Dict[Tuple[int, int], np.ndarray] = {}  # being relayed
        self.hops: Dict[int, _Hop] = {}  # by request id, until acknowledged
        self._ids = itertools.count(1)
        self._idle_waiters: List[Callable[[], None]] = []

    @property
    def idle(self) -> bool:
        """Nothing to pass on: no partial sum waiting to be sent, no result still being relayed, no
        hop unacknowledged. A node must not leave before (others may be waiting for its relays)."""
        return not (self.partials or self.models or self.hops)

    def when_idle(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` (in the loop's thread) once :attr:`idle`; at once if it is."""
        if self.idle:
            fn()
        else:
            self._idle_waiters.append(fn)

    def _check_idle(self) -> None:
        if self._idle_waiters and self.idle:
            waiters, self._idle_waiters = self._idle_waiters, []
            for fn in waiters:
                fn()

    # -- push ---------------------------------------------------------------------------------
    def contribute(self, key: int, rnd: int, data: np.ndarray, dtype: np.dtype) -> None:
        """This node's own contribution to (key, round) is ready (a worker node / local server)."""
        if (key, rnd) in self.partials:
            raise GeoMXError(f"{self.name}: key {key} round {rnd} contributed twice")
        self.partials[(key, rnd)] = Partial(data, np.dtype(dtype))
        self.ask(Message(MsgType.TS_ASK_PUSH, key=key, version=rnd))

    def root_wants_more(self, key: int, rnd: int) -> None:
        """Root: (key, round) still misses contributions; take the next partial sum."""
        self.ask(Message(MsgType.TS_ASK_PUSH, key=key, version=rnd))

    # -- pull ---------------------------------------------------------------------------------
    def relay(self, key: int, rnd: int, value: np.ndarray) -> None:
        """This node holds the result of (key, round): pass it on as the coordinator says."""
        self.models[(key, rnd)] = value
        self.ask(Message(MsgType.TS_ASK_RELAY, key=key, version=rnd))

    # -- answers from the coordinator ---------------------------------------------------------
    def on_answer(self, msg: Message) -> None:
        key, rnd = msg.key, msg.version
        to = meta_field(msg, "rank", int, None)
        if msg.type == MsgType.TS_PUSH_TO:
            partial = self.partials.pop((key, rnd), None)
            if partial is None or to is None:
                raise ProtocolError(f"TS_PUSH_TO for key {key} round {rnd}, which this node does not hold")
            self._send_or_fail(msg, MsgType.TS_MERGE, to, partial.value, {"count": partial.count})
        elif msg.type == MsgType.TS_RELAY_TO:
            if to is None:
                self.models.pop((key, rnd), None)  # everyone has it
                self._check_idle()
                return
            value = self.models.get((key, rnd))
            if value is None:
                raise ProtocolError(f"TS_RELAY_TO for key {key} round {rnd}, which this node does not hold")
            self._send_or_fail(msg, MsgType.TS_MODEL, to, value, None)
        else:
            raise ProtocolError(f"unexpected {msg.type.name} from the scheduler")

    def _send_or_fail(self, answer: Message, kind: MsgType, to: int, value: np.ndarray,
                      meta: Optional[dict]) -> None:
        """Send a hop; if it cannot be sent, the node that waits for it would wait forever (the
        coordinator counts on this node): end this node with the reason, so that the tier stops and
        says why."""
        try:
            self._send(answer, kind, to, value, meta)
        except ProtocolError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported, with what it failed to do
            self.on_fatal(GeoMXError(f"{self.name}: could not send {kind.name} of key {answer.key} round "
                                     f"{answer.version} to TSEngine node {to}: {exc}"))

    def pending(self) -> str:
        """What this node still has to pass on, for an error message."""
        parts = [f"partial sum of key {k} round {r}" for k, r in self.partials]
        parts += [f"result of key {k} round {r}" for k, r in self.models]
        parts += [f"{h.kind.name} of key {h.key} round {h.rnd} to node {h.to} (unacknowledged)"
                  for h in self.hops.values()]
        return ", ".join(parts[:6]) + (f" and {len(parts) - 6} more" if len(parts) > 6 else "")

    def _send(self, answer: Message, kind: MsgType, to: int, value: np.ndarray, meta: Optional[dict]) -> None:
        host = meta_field(answer, "host", str)
        port = meta_field(answer, "port", int)
        link = self.links.get((host, port))
        if link is None:
            identity = f"{self.name}-ts{self.node}#{self.keys.to.get(to, '')}>{host}:{port}".encode()
            link = connect_dealer(self.loop, host, port, identity, f"{self.name}-ts->{to}",
                                  peer=f"TSEngine peer {to}", wan=self.wan, cross_party=self.wan)
            self.loop.add(link, self._on_ack, routed=False)
            self.links[(host, port)] = link
        req_id = next(self._ids)
        self.hops[req_id] = _Hop(kind, answer.key, answer.version, to, value.nbytes, time.monotonic())
        link.send(Message(kind, sender=self.node, req_id=req_id, key=answer.key, version=answer.version,
                          total=value.size, meta=meta, data=value))

    def _on_ack(self, msg: Message, origin: Origin) -> None:
        if msg.type != MsgType.TS_ACK:
            raise ProtocolError(f"unexpected {msg.type.name} on a TSEngine link")
        hop = self.hops.pop(msg.req_id, None)
        if hop is None:
            raise ProtocolError(f"TS_ACK for unknown hop {msg.req_id}")
        error = meta_field(msg, "error", str, None)
        if error is not None:
            self.on_fatal(GeoMXError(f"{self.name}: TSEngine node {hop.to} refused {hop.kind.name} of key "
                                     f"{hop.key} round {hop.rnd}: {error}"))
            return
        rate = hop.nbytes / max(time.monotonic() - hop.sent, 1e-9)
        report = {"to": hop.to, "bytes_per_s": rate}
        if hop.kind == MsgType.TS_MODEL:
            self.ask(Message(MsgType.TS_ASK_RELAY, key=hop.key, version=hop.rnd, meta=report))
        else:
            self.ask(Message(MsgType.TS_REPORT, key=hop.key, version=hop.rnd, meta=report))
            self._check_idle()

    # -- data from other nodes ----------------------------------------------------------------
    def handle(self, msg: Message, origin: Origin) -> None:
        """A TS_MERGE or TS_MODEL that arrived on one of the owner's ROUTER sockets."""
        identity = origin.identity
        assert identity is not None
        key, rnd = msg.key, msg.version
        expected = self.keys.from_.get(msg.sender)
        if expected is None or not hmac.compare_digest(identity_token(identity).encode(), expected.encode()):
            reason = (f"not from TSEngine node {msg.sender} of this tier (its link lacks that node's key: a "
                      "stranger, or another node posing as it)")
            log_limited(logging.WARNING, f"{self.name}: refused {msg.type.name} from {origin.label}: {reason}",
                        key=(identity, "ts stranger"))
            origin.reply(Message(MsgType.TS_ACK, req_id=msg.req_id, key=key, version=rnd, meta={"error": reason}))
            return
        error = self._check(msg)
        origin.reply(Message(MsgType.TS_ACK, req_id=msg.req_id, key=key, version=rnd,
                             meta=None if error is None else {"error": error}))
        if error is not None:
            log.warning("%s: refused %s of key %d round %d from node %d: %s", self.name, msg.type.name, key,
                        rnd, msg.sender, error)
            return
        assert msg.data is not None
        if msg.type == MsgType.TS_MODEL:
            self.owner.ts_model(key, rnd, msg.data)
            self.relay(key, rnd, msg.data)
        elif self.node == ROOT:
            if not self.owner.ts_merged(key, rnd, msg.data, meta_field(msg, "count", int)):
                self.root_wants_more(key, rnd)
        else:
            self.partials[(key, rnd)].add(msg.data, meta_field(msg, "count", int))
            self.ask(Message(MsgType.TS_ASK_PUSH, key=key, version=rnd))

    def _check(self, msg: Message) -> Optional[str]:
        if msg.data is None or msg.payload:
            return "no dense data"
        if msg.type == MsgType.TS_MERGE:
            count = (msg.meta or {}).get("count")
            if not isinstance(count, int) or isinstance(count, bool) or count < 1:
                return "no positive meta count"
            if self.node != ROOT:
                partial = self.partials.get((msg.key, msg.version))
                if partial is None:
                    return "this node holds no partial sum of that round"
                if msg.data.size != partial.first.size:
                    return f"{msg.data.size} elements, this node's partial sum has {partial.first.size}"
                if not partial_dtype_ok(msg.data.dtype, partial.dtype):
                    return f"dtype {msg.data.dtype}, key is {partial.dtype}"
                return None
        elif self.node == ROOT:
            return "the root is never sent a model"
        return self.owner.ts_check(msg.type, msg.key, msg.version, msg.data)

    def close(self) -> None:
        for link in self.links.values():
            self.loop.remove(link)
            link.close()
        self.links.clear()
