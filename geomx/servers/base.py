"""What local and global servers share: the client-facing ROUTER sockets, message validation against
known keys, synchronous aggregation rounds, parked pulls, and the stop protocol. Features beyond these
(DGT reception, the TSEngine root, checkpoints, P3 slices, replay) attach through
geomx/servers/features."""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np

from .. import compression, metrics
from ..errors import GeoMXError, ProtocolError, internal_error
from ..security import template
from ..trace import Trace
from ..transport import EventLoop, Link, Origin, base_identity, identity_token, log_limited, peer_label
from ..wire import DTYPES, Message, MsgType, error_reply, meta_field
from .features.base import Features
from .keystate import KeyState

log = logging.getLogger("geomx.server")

Client = Tuple[str, bytes]  # (link name, ZeroMQ identity without its connection's generation)


def client_of(link: Link, identity: bytes) -> Client:
    """Who sent a request: the same client over every connection it made (see
    geomx.transport.reconnected_identity); replies go to the identity the request came from."""
    return link.name, base_identity(identity)


# A request reassembled from parts (DGT's blocks) whose keys were checked as each part arrived.
KEY_CHECKED = object()


class ServerBase:
    """Subclasses say how many pushes make a round (:meth:`expected_pushes`) and what to do when a
    round is complete (:meth:`dispatch_round`); the features their configuration switches on
    (``features``, geomx/servers/features) are called at the points the round engine offers them."""

    kind = ""  # "global" or "local": which of geomx/servers/features' rows apply

    def __init__(self, loop: EventLoop, name: str, max_rounds_ahead: int = 16, max_keys_per_client: int = 100_000):
        self.loop = loop
        self.name = name
        self.max_keys_per_client = max_keys_per_client
        self.keys_declared: Dict[Client, int] = {}  # client -> keys its INITs created
        # A client's pushes of a key may be this many rounds ahead of the last complete round, and it may
        # have this many requests of a key parked: what one peer can make the server hold is bounded.
        self.max_rounds_ahead = max_rounds_ahead
        self.waiting: Dict[tuple, Tuple[int, int]] = {}  # (key state, client) -> requests, elements parked
        self.keys: Dict[int, KeyState] = {}
        # Rounds' metrics: seconds from first push to completion, summed; per client whose push came
        # last: [rounds, seconds from the round's first push to that client's, summed].
        self.round_seconds = 0.0
        self.trace: Optional[Trace] = None  # GEOMX_TRACE: this server's aggregate and update spans
        self.waited_for: Dict[Any, List[Any]] = {}
        self.stopped_clients: set = set()
        self.pushing_clients: set = set()  # clients that have pushed at least once
        self.exit_code: Optional[int] = None
        # The features attached to this server (set by the subclass once its sockets are bound).
        self.features = Features(self)
        # Who may use each client socket (link name -> the tokens its tier's scheduler registered,
        # carried in the clients' identities; see TierMember.client_identity). geomx.node requires
        # it; until the scheduler's list is in, requests wait (at most EARLY_REQUESTS of them).
        self.require_registration = False
        # link name -> {token: the key name its requests must come with (CURVE), or None}
        self.allowed: Dict[str, Dict[str, Optional[str]]] = {}
        self.master_client: Dict[str, str] = {}  # link name -> the master worker's token (central party)
        self.early: List[Tuple[Message, Origin, bool]] = []  # (request, its origin, key_checked)

    # -- hooks --------------------------------------------------------------------------------
    def expected_pushes(self, link: Link) -> int:
        raise NotImplementedError

    def expected_stops(self) -> int:
        raise NotImplementedError

    def full_round_pushes(self) -> int:
        """Pushes a complete round of a key holds (the global server: every party's, and the central
        workers' when they train; a local server: its workers')."""
        raise NotImplementedError

    def dispatch_round(self, ks: KeyState, r: int, acc: np.ndarray) -> None:
        raise NotImplementedError

    def on_init(self, msg: Message, client: Client, link: Link, identity: bytes) -> None:
        raise NotImplementedError

    def on_command(self, msg: Message, client: Client, link: Link, identity: bytes) -> None:
        raise NotImplementedError

    def on_all_stopped(self) -> None:
        raise NotImplementedError

    def on_client_stop(self, client: Client) -> None:
        """``client`` sent STOP (before it is answered)."""
        self.features.client_stop(client)

    # -- replies ------------------------------------------------------------------------------
    @staticmethod
    def reply(link: Link, identity: bytes, req: Message, data: Optional[np.ndarray] = None,
              meta: Optional[dict] = None) -> None:
        out = Message(MsgType.RESPONSE, req_id=req.req_id, key=req.key, offset=req.offset,
                      numel=req.numel if data is not None else 0, total=req.total, meta=meta, data=data)
        if req.payload and data is not None and data.dtype == np.float32:
            # An encoded push is answered in kind: the aggregate as an exact sparse payload (the
            # sum of sparse updates is sparse; nothing is lost).
            payload_meta, out.data = compression.to_frames(compression.sparse_from_dense(data))
            out.meta = {**(meta or {}), "payload": payload_meta}
            out.payload = True
        link.send(out, identity)

    def reply_error(self, link: Link, identity: bytes, req: Message, error: str) -> None:
        log_limited(logging.WARNING, f"{self.name}: {req.type.name} from {peer_label(identity)} refused: {error}",
                    key=(identity, link.name, req.type, template(error)))
        link.send(error_reply(req, f"{self.name}: {error}"), identity)

    def replier(self, link: Link, identity: bytes, req: Message, ks: Optional[KeyState] = None):
        """A one-argument reply function: an array (or None) answers, an Exception refuses.

        With ``ks``, the array is the key's (part's) value and the request may cover a slice of it
        (P3): the reply carries that slice."""
        start = 0 if ks is None else req.offset - ks.offset
        sliced = ks is not None and (start != 0 or req.numel != ks.numel)

        def reply(value: object) -> None:
            if isinstance(value, Exception):
                self.reply_error(link, identity, req, str(value))
                return
            if sliced and isinstance(value, np.ndarray):
                value = value[start:start + req.numel]
            try:
                client = client_of(link, identity)
                meta = self.features.reply_meta(req, client, self.reply_meta(req, client))
                self.reply(link, identity, req, value, meta=meta)  # type: ignore[arg-type]
            except Exception as exc:  # noqa: BLE001 - the request must still be answered
                # Replies go out in a loop over a finished round's waiters, after the round was
                # removed: an exception here must not leave this request, or the others, unanswered.
                log.exception("%s: cannot answer %s of key %d from %s", self.name, req.type.name, req.key,
                              peer_label(identity))
                self.reply_error(link, identity, req, internal_error(exc, "while answering"))
        return reply

    def reply_meta(self, req: Message, client: Client) -> Optional[dict]:
        """Extra information to send with a data-path reply (ESync's step counts); evaluated when the
        reply is sent. The features add theirs (``ServerFeature.reply_meta``)."""
        return None

    # -- who may ask -------------------------------------------------------------------------
    EARLY_REQUESTS = 10_000

    def allow(self, link_name: str, tokens, keys: Optional[Mapping[str, str]] = None,
              master: Optional[str] = None) -> None:
        """The registered clients of ``link_name`` (their tokens), from the tier's scheduler; turns the
        check on. With CURVE, ``keys`` gives the key each token registered with (its requests must come
        with that key too); ``master`` is the master worker's token. Requests that came before are
        handled now."""
        self.require_registration = True
        keys = keys or {}
        self.allowed[link_name] = {t: keys.get(t) for t in tokens}
        if master is not None:
            self.master_client[link_name] = master
        early, self.early = [e for e in self.early if e[1].link.name == link_name], \
            [e for e in self.early if e[1].link.name != link_name]
        for msg, origin, key_checked in early:
            try:
                self.dispatch(msg, origin, key_checked)
            except ProtocolError as exc:
                self.reply_error(origin.link, origin.identity, msg, str(exc))

    def registered_client(self, link: Link, identity: bytes, sender_key: object) -> Optional[bool]:
        """True if ``identity`` carries a token the scheduler registered for ``link``'s tier (and, with
        CURVE, ``sender_key``, the key the message came with, is the one that token registered with);
        None while that list is not known yet."""
        allowed = self.allowed.get(link.name)
        if allowed is None:
            return None
        token = identity_token(identity)
        if token not in allowed:
            return False
        key = allowed[token]
        # With CURVE the token must also come with the key it registered with: a party that learnt
        # another's token still cannot act in its name.
        return key is None or sender_key is KEY_CHECKED or key == sender_key

    def from_master(self, link: Link, identity: bytes) -> bool:
        """True if the request came from the central party's master worker (its token, on its link)."""
        master = self.master_client.get(link.name)
        return master is not None and identity_token(identity) == master

    # -- dispatch -----------------------------------------------------------------------------
    def handle_client(self, msg: Message, origin: Origin) -> None:
        """A message as it arrives on a client socket (the event loop's handler)."""
        self.dispatch(msg, origin)

    def dispatch(self, msg: Message, origin: Origin, key_checked: bool = False) -> None:
        """Handle ``msg`` from ``origin`` (with the CURVE key it came with, read when it arrived);
        ``key_checked``: a request made of parts whose keys were checked as they arrived (DGT's)."""
        identity, link = origin.identity, origin.link
        assert identity is not None
        handler = self.features.handlers.get(msg.type)  # (TSEngine's partial sums, DGT's blocks)
        if handler is not None and handler(msg, origin, key_checked):
            return
        if self.require_registration:
            known = self.registered_client(link, identity, KEY_CHECKED if key_checked else origin.curve_key)
            if known is None:
                if len(self.early) >= self.EARLY_REQUESTS:
                    raise ProtocolError("too many requests before this server's clients are known")
                self.early.append((msg, origin, key_checked))
                return
            if not known:
                # Not one of the clients its tier's scheduler registered (a stranger, or a guessed
                # identity): it may not INIT, push, pull, command or STOP here.
                raise ProtocolError(f"{msg.type.name} from {peer_label(identity)}, which is not a registered "
                                    f"client of this server (it did not register with this tier's scheduler)")
        client = client_of(link, identity)
        if client in self.stopped_clients:
            raise ProtocolError(f"{msg.type.name} after STOP")
        if msg.type == MsgType.INIT:
            self.on_init(msg, client, link, identity)
        elif msg.type in (MsgType.PUSH, MsgType.PUSHPULL):
            self.on_push(msg, client, link, identity)
        elif msg.type == MsgType.PULL:
            self.on_pull(msg, client, link, identity)
        elif msg.type == MsgType.COMMAND:
            self.on_command(msg, client, link, identity)
        elif msg.type == MsgType.STOP:
            self.stopped_clients.add(client)
            if self.expected_pushes(link):
                self.fail_rounds_without(client)
            self.on_client_stop(client)
            self.reply(link, identity, msg)
            log.debug("%s: %s stopped (%d/%d)", self.name, peer_label(identity), len(self.stopped_clients),
                      self.expected_stops())
            if len(self.stopped_clients) >= self.expected_stops():
                self.on_all_stopped()
        else:
            raise ProtocolError(f"unexpected {msg.type.name} at a server")

    def known_key(self, msg: Message, link: Link, identity: bytes) -> Optional[KeyState]:
        """The key's state if ``msg`` matches it (slice and dtype); otherwise answer with an error."""
        ks = self.keys.get(msg.key)
        if ks is None:
            self.reply_error(link, identity, msg, f"key {msg.key} was never initialised")
            return None
        # The part this server holds, or (P3) a slice of it.
        if msg.total != ks.total or msg.offset < ks.offset or msg.offset + msg.numel > ks.offset + ks.numel:
            self.reply_error(link, identity, msg, f"key {msg.key}: elements [{msg.offset}, {msg.offset + msg.numel}) "
                                                  f"of {msg.total} sent, this server holds [{ks.offset}, "
                                                  f"{ks.offset + ks.numel}) of {ks.total}")
            return None
        if msg.data is not None and not msg.payload and msg.data.dtype != ks.dtype:
            self.reply_error(link, identity, msg, f"key {msg.key}: dtype {msg.data.dtype} sent, key is "
                                                  f"{ks.dtype}")
            return None
        return ks

    def request_state(self, msg: Message, ks: KeyState, link: Link, identity: bytes) -> Optional[KeyState]:
        """The state a data-path request of ``ks`` works on, once the features had their say: one that
        refuses the request (``ServerFeature.refuse``) has it answered with the error (None); P3 slices
        give a slice a state of its own (``ServerFeature.state_for``)."""
        error = self.features.refusal(msg, ks)
        if error is not None:
            self.reply_error(link, identity, msg, f"key {msg.key}: {error}")
            return None
        return self.features.state_for(msg, ks)

    def declare_key(self, msg: Message, link: Link, identity: bytes) -> Optional[KeyState]:
        """Create the key's state from an INIT (or check that the INIT agrees with it)."""
        dtype = DTYPES.get(msg.dtype)
        if dtype is None:
            self.reply_error(link, identity, msg, "INIT without a dtype")
            return None
        ks = self.keys.get(msg.key)
        if not 0 <= msg.offset <= msg.offset + msg.numel <= msg.total:
            self.reply_error(link, identity, msg, f"key {msg.key}: slice [{msg.offset}, {msg.offset + msg.numel}) "
                                                  f"outside its {msg.total} elements")
            return None
        if msg.numel == 0:
            # A part of no element: a local server would forward it as an upstream request of no part,
            # which nothing answers (the fuzz found a worker's INIT parked so for ever).
            self.reply_error(link, identity, msg, f"key {msg.key}: an INIT of no element")
            return None
        if ks is None:
            client = client_of(link, identity)
            declared = self.keys_declared.get(client, 0)
            if declared >= self.max_keys_per_client:
                self.reply_error(link, identity, msg, f"key {msg.key}: this client already declared {declared} keys "
                                                      f"(GEOMX_MAX_KEYS_PER_CLIENT={self.max_keys_per_client})")
                return None
            self.keys_declared[client] = declared + 1
            ks = self.keys[msg.key] = KeyState(msg.key, msg.numel, dtype, msg.offset, msg.total)
        elif (ks.numel, ks.offset, ks.total, ks.dtype) != (msg.numel, msg.offset, msg.total, dtype):
            self.reply_error(link, identity, msg, f"key {msg.key} initialised twice with different shapes "
                                                  f"([{ks.offset}, {ks.offset + ks.numel}) of {ks.total} x {ks.dtype} "
                                                  f"and [{msg.offset}, {msg.offset + msg.numel}) of {msg.total} x "
                                                  f"{dtype})")
            return None
        return ks

    def pushed_key(self, msg: Message, link: Link, identity: bytes) -> Optional[KeyState]:
        """The key a PUSH/PUSHPULL adds into, if it is known and carries data; otherwise refused."""
        ks = self.known_key(msg, link, identity)
        if ks is not None and msg.data is None:
            self.reply_error(link, identity, msg, "PUSH without data")
            return None
        if ks is not None and msg.payload:
            # An encoded (compressed) gradient: validate it against this key, then add it densely.
            try:
                encoded = compression.from_frames(meta_field(msg, "payload", dict), msg.data, msg.numel)
            except ValueError as exc:
                self.reply_error(link, identity, msg, f"key {msg.key}: bad encoded gradient: {exc}")
                return None
            msg.data = compression.decode_payload(encoded, msg.numel).astype(ks.dtype, copy=False)
        return ks

    def on_push(self, msg: Message, client: Client, link: Link, identity: bytes) -> None:
        ks = self.pushed_key(msg, link, identity)
        if ks is not None:
            ks = self.request_state(msg, ks, link, identity)
        if ks is None or self.features.take_push(msg, ks, client, link, identity):
            return
        expected = self.expected_pushes(link)
        if expected == 0:
            self.reply_error(link, identity, msg, "this client may not push (set DMLC_ENABLE_CENTRAL_WORKER=1 "
                                                  "for central-party workers to train)")
            return
        start = msg.offset - ks.offset
        r = ks.next_round(client, start)
        ahead = r - ks.completed
        if ahead < 0:
            # Every expected client pushes every round, so only a stranger or a replay gets here.
            self.reply_error(link, identity, msg, f"key {msg.key}: round {r} is complete already (this client "
                                                  "missed it)")
            return
        if ahead >= self.max_rounds_ahead:
            self.reply_error(link, identity, msg, f"key {msg.key}: this client already pushed {ahead} round(s) that "
                                                  f"are not complete (GEOMX_MAX_ROUNDS_AHEAD={self.max_rounds_ahead})")
            return
        missing = self.stopped_without_round(ks, r)
        if missing is not None:
            self.reply_error(link, identity, msg, f"key {msg.key}: {missing} stopped before pushing this round")
            return
        self.pushing_clients.add(client)
        r, rnd = ks.add_push(client, msg.data, self.replier(link, identity, msg, ks),
                             want_value=msg.type == MsgType.PUSHPULL, start=start, priority=msg.priority)
        if rnd.elements == self.round_expects(ks, r, expected) * ks.numel:
            self.complete_round(ks, r, rnd)

    def round_expects(self, ks: KeyState, r: int, expected: int) -> int:
        """The pushes that complete round ``r`` of ``ks``, given ``expected`` for a round from now on
        (the global server adds a lost party's pushes into rounds it pushed before it was lost)."""
        return expected

    def round_scale(self, ks: KeyState, pushes: int) -> float:
        """What a complete round's sum of ``pushes`` pushes is multiplied by (1: as it is)."""
        return 1.0

    def complete_round(self, ks: KeyState, r: int, rnd: Any) -> None:
        # The round's metrics (read by metrics.server_samples): time to complete, and who it waited for.
        now = time.monotonic()
        self.round_seconds += now - rnd.opened
        waited = self.waited_for.get(rnd.last)
        if waited is None:
            waited = self.waited_for[rnd.last] = [0, 0.0]
        waited[0] += 1
        waited[1] += rnd.last_at - rnd.opened
        acc, rnd.acc = rnd.acc, None
        scale = self.round_scale(ks, rnd.elements // max(ks.numel, 1))
        if scale != 1.0:
            acc = (acc * scale).astype(acc.dtype, copy=False)
        self.dispatch_round(ks, r, ks.round_value(acc))
        if self.trace is not None:
            opened = self.trace.wall(rnd.opened)
            done = self.trace.wall(now)
            self.trace.span(f"aggregate key {ks.key} round {r}", "aggregate", opened, done, ks.key, key=ks.key,
                            round=r, offset=ks.offset, waited_for=metrics.peer_name(rnd.last))
            self.trace.span(f"update key {ks.key} round {r}", "update", done, self.trace.now(), ks.key, key=ks.key,
                            round=r, offset=ks.offset)

    def stopped_without_round(self, ks: KeyState, r: int) -> Optional[str]:
        """A stopped pushing client that never pushed round ``r`` of ``ks`` (so it cannot complete)."""
        for client in self.stopped_clients:
            if client in self.pushing_clients and ks.pushes_of(client) <= r:
                return peer_label(client[1])
        return None

    def fail_rounds_without(self, client: Client) -> None:
        """``client`` stopped: rounds it did not push into can never complete; fail their waiters now
        rather than let the other workers wait forever."""
        self.pushing_clients.add(client)
        for ks in self.keys.values():
            done = ks.pushes_of(client)
            error = GeoMXError(f"{peer_label(client[1])} stopped after {done} round(s) of key {ks.key}; "
                               "the synchronous round cannot complete")
            for r in [r for r in ks.rounds if r >= done]:
                ks.fail_round(r, error)
            # Parked pulls of clients that pushed past ``done`` wait for a round that cannot complete.
            ks.answer_parked(error, lambda other: ks.pushes_of(other) > done)  # noqa: B023 - called at once

    def leave(self, reason: str, failed: bool = False) -> None:
        """This server is about to exit (``failed``: because the run failed): answer every request
        still waiting here (pushes of rounds that are not complete, parked pulls and INITs) with an
        error that says so, rather than leave their clients waiting for replies that will never come."""
        self.features.leave(reason, failed)
        error = GeoMXError(f"{self.name} is leaving ({reason}) with this request unanswered")
        waiting = 0
        for ks in self.keys.values():
            for state in (ks, *ks.slices.values()):
                for r in list(state.rounds):
                    waiting += len(state.rounds[r].waiters)
                    state.fail_round(r, error)
                waiting += state.answer_parked(error)
        if waiting:
            log.warning("%s: leaving (%s); refused %d request(s) still waiting", self.name, reason, waiting)

    def on_pull(self, msg: Message, client: Client, link: Link, identity: bytes) -> None:
        ks = self.known_key(msg, link, identity)
        if ks is not None:
            ks = self.request_state(msg, ks, link, identity)
        if ks is None:
            return
        reply = self.replier(link, identity, msg, ks)
        if ks.pull_ready(client):
            reply(ks.value())
        else:
            self.park(ks, client, link, identity, msg, reply)

    # P3 cuts a request into slices that wait separately: up to this many per key and round.
    SLICES_PER_ROUND = 1024

    def park(self, ks: KeyState, client: Client, link: Link, identity: bytes, req: Message,
             reply: Callable[[Any], None]) -> bool:
        """Park ``reply`` until ``ks`` can answer it, unless ``client`` already has
        GEOMX_MAX_ROUNDS_AHEAD rounds' worth of requests of this key waiting (in elements, and in
        requests so that tiny slices cannot make up for it): then refuse it. True when parked."""
        slot = (id(ks), client)
        count, elements = self.waiting.get(slot, (0, 0))
        size = max(1, min(req.numel or ks.numel, ks.numel))
        if elements + size > self.max_rounds_ahead * max(ks.numel, 1) \
                or count >= self.max_rounds_ahead * self.SLICES_PER_ROUND:
            self.reply_error(link, identity, req, f"key {ks.key}: this client already has {count} requests "
                                                  f"({elements} elements) waiting "
                                                  f"(GEOMX_MAX_ROUNDS_AHEAD={self.max_rounds_ahead})")
            return False
        self.waiting[slot] = (count + 1, elements + size)

        def answer(value: Any) -> None:
            left = self.waiting.get(slot, (1, size))
            if left[0] <= 1:
                self.waiting.pop(slot, None)
            else:
                self.waiting[slot] = (left[0] - 1, left[1] - size)
            reply(value)

        ks.park_pull(client, answer)
        return True

