"""The requesting side of the key-value protocol, shared by workers (towards their party's servers)
and local servers (towards the global servers): key placement over several servers, request ids,
reassembly of slices, and completion callbacks. Runs in the owner's event-loop thread.

How the messages reach the servers' sockets is the sender's business (:mod:`geomx.senders`, by
name: ``zmq``, ``p3``'s sliced priority queues, ``dgt``'s blocks)."""
from __future__ import annotations

import itertools
import logging
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import compression, senders, wire
from .errors import GeoMXError, PeerDeadError, ProtocolError, RemoteError, SecurityError
from .p3 import CONTROL, DATA
from .senders import Sender
from .trace import Trace
from .transport import EventLoop, Handler, Link, Origin, connect_dealer, reconnected_identity
from .wire import Message, MsgType

log = logging.getLogger("geomx.kvclient")

Part = Tuple[int, int, int]  # (server index, offset, numel)
Callback = Callable[[Optional[np.ndarray], Optional[Exception]], None]
Encoder = Callable[[int, int], Tuple[dict, np.ndarray]]  # (offset, numel) -> (payload meta, bytes)


def partition(key: int, total: int, num_servers: int, bigarray_bound: int,
              global_servers: Optional[int] = None, slice_size: int = 0) -> List[Part]:
    """Which server holds which slice of ``key``.

    Towards the global servers (and inside the central party, whose servers they are): small keys
    whole on ``(key * 9973) % n``, large ones (``total >= bigarray_bound``) cut into ``n`` near-equal
    contiguous parts, as in GeoMX. Inside a party with several local servers (``global_servers``
    given and different from ``n``), keys are divided *along the global servers' parts*: global
    part ``j`` goes to local server ``j * n // global_servers`` (consecutive parts on one server
    merged), a key with a single global part goes whole to ``(key * 9973) % n``. Every local server
    then forwards whole global parts, so each global server receives exactly one aggregate per
    party and per part, whatever each party's number of local servers.

    ``slice_size`` > 0 (P3) further cuts each server's part into messages of at most that many
    elements (:func:`p3_slices`)."""
    return p3_slices(_server_parts(key, total, num_servers, bigarray_bound, global_servers), slice_size)


def p3_slices(parts: List[Part], slice_size: int) -> List[Part]:
    """P3: every part cut into slices of at most ``slice_size`` elements (none if 0). Servers hold
    their part as one key: a local server counts a round complete when every element arrived, the
    global server keeps a state per slice (geomx/servers/base.py)."""
    if slice_size <= 0:
        return parts
    return [(server, offset + i, min(slice_size, numel - i))
            for server, offset, numel in parts for i in range(0, max(numel, 1), slice_size)]


def _server_parts(key: int, total: int, num_servers: int, bigarray_bound: int,
                  global_servers: Optional[int]) -> List[Part]:
    if global_servers is None or global_servers == num_servers:
        return _global_parts(key, total, num_servers, bigarray_bound)
    if num_servers == 1:
        return [(0, 0, total)]
    upstream = _global_parts(key, total, global_servers, bigarray_bound)
    if len(upstream) == 1:
        return [((key * 9973) % num_servers, 0, total)]
    parts: List[Part] = []
    for j, offset, numel in upstream:
        server = j * num_servers // global_servers
        if parts and parts[-1][0] == server:
            parts[-1] = (server, parts[-1][1], parts[-1][2] + numel)
        else:
            parts.append((server, offset, numel))
    return parts


def _global_parts(key: int, total: int, num_servers: int, bigarray_bound: int) -> List[Part]:
    if num_servers == 1:
        return [(0, 0, total)]
    if total < bigarray_bound:
        return [((key * 9973) % num_servers, 0, total)]
    bounds = [round(total * i / num_servers) for i in range(num_servers + 1)]
    return [(i, bounds[i], bounds[i + 1] - bounds[i]) for i in range(num_servers) if bounds[i + 1] > bounds[i]]


# Requests that P3 slices and schedules by priority; INIT and commands travel whole.
_SLICED = (MsgType.PUSH, MsgType.PULL, MsgType.PUSHPULL)


class _Pending:
    __slots__ = ("callback", "parts", "remaining", "result", "error", "single", "replies", "is_broadcast",
                 "base", "size", "sent", "times", "mtype", "priority", "since", "what")

    def __init__(self, callback: Callable[..., None], parts: List[Part], single: bool,
                 is_broadcast: bool = False, base: int = 0, size: int = 0):
        self.callback = callback
        self.base = base  # the requested slice: [base, base + size) of the key
        self.size = size
        # (server, offset) -> [queued, handed to the socket], only while tracing
        self.times: Optional[Dict[Tuple[int, int], List[Optional[float]]]] = None
        self.mtype = ""
        self.priority = 0
        self.parts = {(p[0], p[1]): p[2] for p in parts}
        self.remaining = len(parts)
        self.result: Optional[np.ndarray] = None
        self.error: Optional[Exception] = None
        self.single = single
        self.is_broadcast = is_broadcast
        self.replies: List[Optional[Message]] = []
        # (server, offset) -> the message sent there, kept until answered so that it can be sent
        # again to a server that was restarted (see :meth:`KVClient.replace_server`).
        self.sent: Dict[Tuple[int, int], Message] = {}
        self.since = time.monotonic()  # for the request deadline
        self.what = "request"  # for its error


class KVClient:
    """``via`` hands the messages to the servers' sockets (:mod:`geomx.senders`: ``zmq`` by default,
    ``p3``'s priority queues, ``dgt``'s blocks); its ``slice_size`` cuts data-path requests into P3
    slices. ``trace_dir`` records every data-path message's send and reply times (P3 on or off) into
    a chrome://tracing file there."""

    def __init__(self, loop: EventLoop, servers: Sequence[Tuple[str, int]], *, identity: str, sender: int,
                 bigarray_bound: int, wan: bool, name: str, global_servers: Optional[int] = None,
                 via: Optional[Sender] = None, trace_dir: Optional[str] = None, request_timeout: float = 0.0):
        self.loop = loop
        self.sender = sender
        self.bigarray_bound = bigarray_bound
        self.global_servers = global_servers  # see partition()
        self.name = name
        self.identity = identity
        self.wan = wan
        self.via = via if via is not None else Sender(loop)
        self.links: List[Link] = []
        self.addresses = [(str(h), int(p)) for h, p in servers]
        # Per server: connections made after the first broke (each under a new identity, see
        # geomx.transport.reconnected_identity).
        self.generations = [0] * len(self.addresses)
        # Requests sent again over a new connection: a second answer to one of them is a duplicate.
        self.resent: Dict[int, None] = {}
        # While the WAN is out (the owner says so) requests wait without a deadline.
        self.paused = False
        for i, (host, port) in enumerate(self.addresses):
            self.links.append(self._connect(i, host, port))
            self.via.attach(i, self.links[i], self.addresses[i])
        self.trace = Trace(trace_dir, name) if trace_dir else None
        # A worker's trace: key -> when its last request was answered; the time from there to the key's
        # next push is the worker's computation (forward and backward), drawn as a "compute" span.
        self.answered_at: Optional[Dict[int, float]] = {} if self.trace is not None and not wan else None
        # Global servers give the round a key starts from in their INIT replies (meta "round").
        # Towards them, pushes are numbered (header ``version`` = round + 1, per server, key and
        # slice), so that one sent twice (again over a new connection after an outage, or to a
        # server restarted from a checkpoint) is summed once. Servers that checkpoint say so (meta
        # "checkpoints"): pushes to them are kept after they are answered until the server reports
        # a checkpoint holding their round (meta "checkpointed"), so that a server restarted from
        # that checkpoint gets them again.
        self.first_rounds: Dict[Tuple[int, int], int] = {}  # (server, key) -> the INIT reply's round
        self.push_rounds: Dict[Tuple[int, int, int], int] = {}  # (server, key, offset) -> rounds pushed
        self.checkpointing: set = set()  # (server, key) whose server checkpoints
        # Cut-through rounds: key -> the slice size (elements) its global servers asked for in their
        # INIT replies (meta "slice"); dense pushes and pulls of the key go in slices of that size.
        self.slices: Dict[int, int] = {}
        self.retained: Dict[Tuple[int, int], List[Message]] = {}  # (server, key) -> answered pushes
        self._ids = itertools.count(1)
        self.pending: Dict[int, _Pending] = {}
        self.failed: Optional[Exception] = None
        # Called with (key, meta) for data-path replies that carry meta (ESync's step counts).
        self.on_meta: Optional[Callable[[int, dict], None]] = None
        # Called with (server index, meta) for the same replies (DGT's per-server announcement).
        self.on_server_meta: Optional[Callable[[int, dict], None]] = None
        # GEOMX_REQUEST_TIMEOUT (0: none): a server that is alive but stuck, cut off from this node
        # while both still reach the scheduler, or that dropped a request, fails it instead of
        # leaving its caller waiting forever.
        self.request_timeout = request_timeout
        if request_timeout > 0:
            loop.call_every(min(5.0, request_timeout / 4), self._expire)

    def _connect(self, server: int, host: str, port: int) -> Link:
        peer = f"{'global' if self.wan else 'party'} server {server}"
        identity = reconnected_identity(f"{self.identity}>{server}".encode(), self.generations[server])
        link = connect_dealer(self.loop, host, port, identity, f"{self.name}->server{server}", peer=peer,
                              wan=self.wan, cross_party=self.wan, **self.via.link_options())
        link.on_refused = lambda reason: self.fail_all(SecurityError(reason))
        link.on_disconnected = lambda: self._on_disconnected(server)
        self.loop.add(link, self._make_handler(server), routed=False)
        return link

    def _relink(self, server: int, host: str, port: int) -> Link:
        """Close server ``server``'s link (dropping whatever was still queued on it) and connect
        again at ``host:port`` under the next identity."""
        old_address, self.addresses[server] = self.addresses[server], (host, port)
        old = self.links[server]
        self.loop.remove(old)
        old.kernel.totals()  # a last reading of its connections, while their descriptors are open
        old.close()
        self.via.discard(server)  # its unsent messages are sent again with the unanswered ones
        self.generations[server] += 1
        link = self.links[server] = self._connect(server, host, port)
        self.via.attach(server, link, (host, port))
        # The link's figures go on across reconnects (its metrics are counters).
        link.bytes_sent, link.bytes_received = old.bytes_sent, old.bytes_received
        link.messages_sent, link.messages_received = old.messages_sent, old.messages_received
        link.kernel = old.kernel
        # The same server (reconnect) took this node's key before; a restarted one is a new process.
        link.proven = old.proven and (host, port) == old_address
        return link

    def _resend_unanswered(self, server: int) -> int:
        """Send every request that server ``server`` has not answered again over its new link, in order."""
        resent = 0
        for req_id in sorted(self.pending):
            p = self.pending[req_id]
            for (srv, offset), msg in p.sent.items():
                unanswered = p.replies[srv] is None if p.is_broadcast else (srv, offset) in p.parts
                if srv == server and unanswered:
                    self.via.resend(server, msg, CONTROL if p.is_broadcast else DATA)
                    resent += 1
                    self.resent[req_id] = None
                    p.since = time.monotonic()  # its deadline starts again
        while len(self.resent) > 1_000_000:  # bounded: only a very late duplicate could need more
            del self.resent[next(iter(self.resent))]
        return resent

    def _on_disconnected(self, server: int) -> None:
        # Whatever this server had not answered may have been lost with the connection. With nothing
        # outstanding nothing was lost (and a server that closed its end at the run's end is left be).
        if any(srv == server for p in self.pending.values() for srv, _ in p.parts):
            self.reconnect(server, "its connection ended")

    def reconnect(self, server: int, why: str) -> None:
        """Server ``server``'s connection broke (``why``), or may have lost messages (a WAN outage):
        connect again and send what it has not answered. Numbered pushes it already holds are summed
        once (see :meth:`geomx.servers.features.replay.Replay.take_push`), requests it already answered
        are answered again and the second answer is dropped here."""
        if self.failed is not None or self.links[server].sock.closed:
            return
        link = self._relink(server, *self.addresses[server])
        resent = self._resend_unanswered(server)
        log.warning("%s: link to %s: %s; reconnected and sent %d unanswered request(s) again", self.name,
                    link.peer, why, resent)

    def reconnect_all(self, why: str) -> None:
        for server in range(len(self.links)):
            self.reconnect(server, why)

    def update_servers(self, servers: Sequence[Tuple[str, int]]) -> None:
        """The tier's scheduler announced the server list again: follow the servers that moved."""
        for i, address in enumerate(servers[:len(self.links)]):
            if tuple(address) != self.addresses[i]:
                self.replace_server(i, *address)

    def replace_server(self, server: int, host: str, port: int) -> None:
        """Server ``server`` was restarted (from a checkpoint) at ``host:port``: connect there with
        the same identity and send it, in order, the answered pushes it may have lost (those after
        its checkpoint) and every request it had not answered. It discards what it already holds
        (numbered pushes of rounds in its checkpoint)."""
        self._relink(server, host, port)
        replayed = 0
        for (srv, _key), msgs in self.retained.items():
            if srv == server:
                for msg in msgs:
                    self.via.resend(server, msg)
                replayed += len(msgs)
        resent = self._resend_unanswered(server)
        log.warning("%s: server %d restarted at %s:%d; replayed %d answered push(es) after its checkpoint "
                    "and resent %d unanswered request(s)", self.name, server, host, port, replayed, resent)

    @property
    def num_servers(self) -> int:
        return len(self.links)

    # A server asking for smaller slices is ignored: per-message costs would swamp the round.
    MIN_SLICE = 256

    def parts(self, key: int, total: int, slice_size: int = 0) -> List[Part]:
        return partition(key, total, len(self.links), self.bigarray_bound, self.global_servers, slice_size)

    def span_parts(self, key: int, offset: int, numel: int, total: int, slice_size: int = 0) -> List[Part]:
        """The parts of ``key`` (``total`` elements) that make up its slice ``[offset, offset + numel)``:
        a local server holding one slice of a key forwards exactly the global parts inside it (cut
        into slices of ``slice_size`` elements, if not 0)."""
        parts = [p for p in self.parts(key, total) if offset <= p[1] and p[1] + p[2] <= offset + numel]
        if sum(p[2] for p in parts) != numel:
            raise ProtocolError(f"key {key}: slice [{offset}, {offset + numel}) of {total} elements does not "
                                "consist of whole parts of the global servers")
        return p3_slices(parts, slice_size)

    def slice_size(self, mtype: MsgType, key: int, encoded: bool) -> int:
        """How many elements each message of a ``mtype`` request of ``key`` carries at most (0: a
        whole part): P3's slices when the sender has them, else the global servers' cut-through
        slices for dense data (an encoded push is already small and travels whole)."""
        if mtype not in _SLICED:
            return 0
        return self.via.slice_size or (0 if encoded else self.slices.get(key, 0))

    def request(self, mtype: MsgType, key: int, total: int, dtype: Any, callback: Callback, *,
                data: Optional[np.ndarray] = None, meta: Optional[dict] = None, priority: int = 0,
                version: int = 0, encoder: Optional[Encoder] = None,
                span: Optional[Tuple[int, int]] = None) -> None:
        """Send ``mtype`` for ``key`` to the servers holding it; ``callback(value, error)`` once all
        parts answered (``value`` is the reassembled array when the servers sent data).

        ``total`` is the number of elements sent; with ``span=(offset, key_total)`` they are the
        slice of a larger key starting at ``offset`` (a local server's share of the key).
        With ``encoder``, each part's data is ``encoder(offset, numel)`` (offsets relative to the
        data): an encoded gradient (compression frames) instead of a slice of ``data``."""
        if self.failed is not None:
            callback(None, self.failed)
            return
        base, key_total = span if span is not None else (0, total)
        slice_size = self.slice_size(mtype, key, encoder is not None)
        try:
            parts = (self.span_parts(key, base, total, key_total, slice_size) if span is not None
                     else self.parts(key, total, slice_size))
        except ProtocolError as exc:
            callback(None, exc)
            return
        if data is not None:
            largest = max(n for _, _, n in parts) * data.itemsize
            if largest > self.loop.max_message_bytes:
                # The receiver would drop it (MAXMSGSIZE) and this request would never be answered.
                callback(None, GeoMXError(f"key {key}: a {largest}-byte message exceeds "
                                          f"GEOMX_MAX_MESSAGE_BYTES={self.loop.max_message_bytes}"))
                return
        req_id = next(self._ids)
        pending = self.pending[req_id] = _Pending(callback, parts, single=len(parts) == 1, base=base, size=total)
        pending.what = f"{mtype.name} of key {key}"
        if self.trace is not None and mtype in _SLICED:
            pending.times, pending.mtype, pending.priority = {}, mtype.name, priority
            if self.answered_at is not None and mtype != MsgType.PULL and key in self.answered_at:
                self.trace.span(f"compute before key {key}", "compute", self.answered_at.pop(key), Trace.now(), key,
                                key=key)
        code = wire.dtype_code(dtype)
        for server, offset, numel in parts:
            msg = Message(mtype, sender=self.sender, req_id=req_id, key=key, offset=offset, numel=numel,
                          total=key_total, priority=priority, version=version, dtype=code, meta=meta)
            start = offset - base
            if encoder is not None:
                payload_meta, msg.data = encoder(start, numel)
                msg.meta = {**(meta or {}), "payload": payload_meta}
                msg.payload = True
            elif data is not None:
                msg.data = data[start:start + numel]
            if mtype in (MsgType.PUSH, MsgType.PUSHPULL) and (server, key) in self.first_rounds:
                rounds = self.push_rounds.get((server, key, offset), self.first_rounds[(server, key)])
                msg.version = rounds + 1
                self.push_rounds[(server, key, offset)] = rounds + 1
            self.pending[req_id].sent[(server, offset)] = msg
            on_sent = None
            if pending.times is not None:
                stamp = pending.times[(server, offset)] = [Trace.now(), None]
                on_sent = lambda handed, stamp=stamp: stamp.__setitem__(1, handed)  # noqa: E731
            self.via.send(server, msg, DATA, on_sent)

    def broadcast(self, mtype: MsgType, callback: Callable[[List[Message], Optional[Exception]], None], *,
                  meta: Optional[dict] = None, datas: Optional[Sequence[Optional[np.ndarray]]] = None,
                  servers: Optional[Sequence[int]] = None) -> None:
        """Send one message to every server (or to ``servers``); ``callback(replies in that order, error)``."""
        if self.failed is not None:
            callback([], self.failed)
            return
        targets = list(range(len(self.links))) if servers is None else list(servers)
        req_id = next(self._ids)
        pending = _Pending(callback, [(i, 0, 0) for i in targets], single=False, is_broadcast=True)
        cmd = (meta or {}).get("cmd")
        pending.what = mtype.name + (f" {cmd}" if isinstance(cmd, str) else "")
        pending.replies = [None] * len(self.links)
        self.pending[req_id] = pending
        for i in targets:
            msg = Message(mtype, sender=self.sender, req_id=req_id, meta=meta)
            if datas is not None and datas[i] is not None:
                msg.data = datas[i]
            pending.sent[(i, 0)] = msg
            self.via.send(i, msg, CONTROL)

    def _make_handler(self, server: int) -> Handler:
        def handle(msg: Message, origin: Origin) -> None:
            self._on_reply(server, msg)
        return handle

    def _on_reply(self, server: int, msg: Message) -> None:
        if msg.type not in (MsgType.RESPONSE, MsgType.ERROR):
            raise ProtocolError(f"unexpected {msg.type.name} from server {server}")
        if msg.req_id == 0:
            self._on_replayed_reply(server, msg)
            return
        p = self.pending.get(msg.req_id)
        if msg.req_id in self.resent and (p is None or (server, 0 if p.is_broadcast else msg.offset) not in p.parts):
            log.debug("%s: second answer from server %d to request %d (sent again); dropped", self.name, server,
                      msg.req_id)
            return
        if p is None:
            raise ProtocolError(f"reply to unknown request {msg.req_id} from server {server}")
        if p.is_broadcast:
            self._on_broadcast_reply(server, msg, p)
            return
        expected = p.parts.get((server, msg.offset))
        if expected is None or (msg.data is not None and msg.numel != expected):
            raise ProtocolError(f"reply for key {msg.key} from server {server} has an unexpected slice "
                                f"(offset {msg.offset}, numel {msg.numel})")
        if msg.type == MsgType.ERROR:
            p.error = p.error or RemoteError(str((msg.meta or {}).get("error", "server error")))
        else:
            self._track_rounds(server, msg, p.sent[(server, msg.offset)])
            if msg.meta and self.on_server_meta is not None:
                self.on_server_meta(server, msg.meta)
            if msg.meta and self.on_meta is not None:
                self.on_meta(msg.key, msg.meta)
            if msg.payload:
                try:
                    encoded = compression.from_frames(msg.meta["payload"], msg.data, msg.numel)  # type: ignore[index]
                    msg.data = compression.decode_payload(encoded, msg.numel)
                except ValueError as exc:
                    # Fail this request (rather than drop the reply and leave it waiting forever).
                    p.error = p.error or ProtocolError(f"bad encoded reply for key {msg.key}: {exc}")
                    msg.data = None
            if msg.data is not None:
                if p.single:
                    p.result = msg.data
                else:
                    if p.result is None:
                        p.result = np.empty(p.size, dtype=msg.data.dtype)
                    start = msg.offset - p.base
                    p.result[start:start + msg.numel] = msg.data
        del p.parts[(server, msg.offset)]
        if p.times is not None and self.trace is not None:
            queued, sent = p.times.pop((server, msg.offset))
            self.trace.record(p.mtype, msg.key, msg.offset, expected, p.priority, server, queued, sent,
                              Trace.now(), msg.type != MsgType.ERROR)
        p.remaining -= 1
        if p.remaining == 0:
            del self.pending[msg.req_id]
            if self.answered_at is not None and p.times is not None:
                self.answered_at[msg.key] = Trace.now()
            p.callback(None if p.error else p.result, p.error)

    def _track_rounds(self, server: int, reply: Message, sent: Message) -> None:
        """Numbering and retention of pushes towards a checkpointing global server."""
        meta = reply.meta or {}
        where = (server, sent.key)
        if sent.type == MsgType.INIT:
            size = meta.get("slice")
            if isinstance(size, int) and not isinstance(size, bool) and size >= self.MIN_SLICE:
                self.slices[sent.key] = min(size, self.slices.get(sent.key, size))
            start = meta.get("round")
            if isinstance(start, int) and not isinstance(start, bool) and start >= 0:
                self.first_rounds.setdefault(where, start)
                if meta.get("checkpoints") is True:
                    self.checkpointing.add(where)
            return
        if sent.version and where in self.checkpointing:
            sent.req_id = 0  # a replay's answer is only checked, nobody waits for it
            self.retained.setdefault(where, []).append(sent)
        self._prune_retained(where, meta)

    def _on_replayed_reply(self, server: int, msg: Message) -> None:
        if msg.type == MsgType.ERROR:
            log.error("%s: server %d refused a replayed push of key %d: %s", self.name, server, msg.key,
                      (msg.meta or {}).get("error"))
            return
        self._prune_retained((server, msg.key), msg.meta)

    def _prune_retained(self, where: Tuple[int, int], meta: Optional[dict]) -> None:
        """Drop the retained pushes of ``where`` (server, key) that a reply's ``checkpointed`` says the
        server's checkpoint holds: it will never ask for them again."""
        saved = (meta or {}).get("checkpointed")
        if isinstance(saved, int) and where in self.retained:
            # The checkpoint holds rounds < saved of this key.
            self.retained[where] = [m for m in self.retained[where] if m.version > saved]

    def _on_broadcast_reply(self, server: int, msg: Message, p: _Pending) -> None:
        if p.replies[server] is not None or (server, 0) not in p.parts:
            raise ProtocolError(f"unexpected or duplicate reply from server {server}")
        if msg.type == MsgType.ERROR:
            p.error = p.error or RemoteError(str((msg.meta or {}).get("error", "server error")))
        p.replies[server] = msg
        p.remaining -= 1
        if p.remaining == 0:
            del self.pending[msg.req_id]
            p.callback([r for r in p.replies if r is not None], p.error)

    def _expire(self) -> None:
        """Fail the requests unanswered for longer than ``request_timeout``, naming the servers that
        did not answer and what they were asked."""
        if self.failed is not None or not self.pending or self.paused:
            return
        limit = time.monotonic() - self.request_timeout
        for req_id in [i for i, p in self.pending.items() if p.since < limit]:
            p = self.pending.pop(req_id)
            if p.is_broadcast:
                silent = sorted(srv for srv, _ in p.parts if p.replies[srv] is None)
            else:
                silent = sorted({srv for srv, _ in p.parts})
            peers = ", ".join(self.links[srv].peer for srv in silent)
            for srv in silent:
                self.loop.metrics.inc("geomx_deadline_misses_total", peer=self.links[srv].peer)
            error = GeoMXError(f"{self.name}: {peers} did not answer {p.what} within {self.request_timeout:g}s "
                               "(GEOMX_REQUEST_TIMEOUT): it is stuck, cut off from this node, or dropped the "
                               "request")
            log.error("%s", error)
            try:
                p.callback([] if p.is_broadcast else None, error)
            except Exception:  # noqa: BLE001 - one bad callback must not stop the others
                log.exception("%s: callback failed while failing an expired request", self.name)

    def write_trace(self) -> Optional[str]:
        """Write the request timeline (GEOMX_P3_TRACE), if it is being recorded."""
        return self.trace.write() if self.trace is not None else None

    def fail_all(self, exc: Exception) -> None:
        """Complete every outstanding request with ``exc`` (a peer died, or we are shutting down)."""
        self.failed = exc
        self.via.close()
        pending, self.pending = self.pending, {}
        for p in pending.values():
            try:
                p.callback([] if p.is_broadcast else None, exc)
            except Exception:  # noqa: BLE001 - one bad callback must not stop the others
                log.exception("%s: callback failed while failing requests", self.name)


def client_options(cfg: Any, loop: EventLoop, dgt: Optional[Any] = None) -> Dict[str, Any]:
    """The :class:`KVClient` arguments from a NodeConfig: its sender (``senders.for_node``: DGT for a
    local server with ``dgt``, P3 with ``ENABLE_P3=1``), the trace directory and the request deadline."""
    return {"via": senders.for_node(cfg, loop, dgt), "trace_dir": cfg.trace,
            "request_timeout": cfg.request_timeout}


__all__ = ["KVClient", "client_options", "partition", "PeerDeadError"]
