"""Fuzzing of the control-message handlers (the wire decoder itself is fuzzed in test_wire.py): every
message a peer can get past ``wire.decode`` is sent to the node that would receive it — a scheduler, a
local server, a global server, a node's scheduler link and a client's server links — in random
sequences from a few peers.

The peers are real sockets in front of the node's real event loop (DEALERs before a listener, a ROUTER
posing as the scheduler or the servers before a client link): each message is sent and the loop run
until it handed the message to the handler, so decoding, dispatch, the refusal's ERROR and its count
are the loop's own. After each sequence the test checks:

(a) refusals: the handler raised nothing but ProtocolError (anything else is a crash, re-raised here);
    every request (INIT, PUSH, PULL, PUSHPULL, COMMAND, STOP) refused so on a listener was answered
    with ERROR to its peer, naming its request id; the loop counted each refusal, and nothing else, in
    ``geomx_refused_messages_total`` (reason "refused"; none "failed" or "malformed"); a client link,
    which has no one to answer, sent its server no ERROR;
(b) bounded state: what the peers made the node hold stays within its documented limits (a server's
    keys per client, GEOMX_MAX_KEYS_PER_CLIENT; requests held before its clients are known,
    EARLY_REQUESTS; parked requests per client and key, GEOMX_MAX_ROUNDS_AHEAD, and its count of them
    matching what is parked; open rounds per key; a scheduler's members per role and barriers; what a
    client or tier member keeps of replies to requests it never made). The servers run with small
    limits (1 key per client, 1 round ahead, 3 early requests) so that ten-message sequences reach them;
(c) still serving: genuine requests after the sequence get the right answers (a server: fresh
    clients' INIT, PULL and a complete PUSHPULL round of a fresh key, or its refusal where a stopped
    client can never complete the round; a scheduler: fresh nodes complete the tier, or a late one is
    refused and a member's heartbeat answered; a tier member: its registration and barrier; a client:
    a fresh PULL and command).

A fixed budget runs in the suite (GEOMX_FUZZ_EXAMPLES examples per target, default 100, a few
seconds each); a longer run: ``GEOMX_FUZZ_EXAMPLES=20000 pytest tests/test_fuzz.py tests/test_wire.py``
(with ``GEOMX_FUZZ_WAIT=2`` a failure shrinks faster: each try waits that many seconds for what never comes).
"""
from __future__ import annotations

import collections
import os
import time
import uuid
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np
import pytest
import zmq
from helpers import initialised, server_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from geomx import commands, metrics, wire
from geomx.errors import ProtocolError
from geomx.kvclient import KVClient
from geomx.membership import Scheduler, TierMember
from geomx.membership.scheduler import GROUPS
from geomx.servers import GlobalServer, LocalServer
from geomx.transport import EventLoop, Link, Origin
from geomx.wire import DTYPES, Message, MsgType

pytestmark = pytest.mark.unit

EXAMPLES = int(os.environ.get("GEOMX_FUZZ_EXAMPLES", "100"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                        HealthCheck.function_scoped_fixture])

# Meta fields the handlers read, with values of the right kind and of every other kind.
FIELDS = ["role", "host", "port", "name", "master", "rank", "group", "failure", "tolerate_worker_loss",
          "servers", "num_workers", "num_servers", "tier", "reason", "cmd", "spec", "params", "sync",
          "payload", "esync_steps", "esync_seconds", "compression", "delta", "parts", "sizes", "error",
          "optimizer", "lr_scheduler"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2 ** 63), 2 ** 64) | st.floats(allow_nan=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
plausible = st.one_of(
    st.sampled_from(["server", "worker", "127.0.0.1", "sgd", "adam", "dcasgd", "bsc", "fp16", "mpq", "none",
                     *GROUPS, *commands.ALL]),
    st.integers(-2, 70000),
    st.fixed_dictionaries({"name": st.sampled_from(["sgd", "adam", "nag", "bogus"]),
                           "params": st.dictionaries(st.sampled_from(["learning_rate", "momentum", "wd",
                                                                      "rescale_grad", "x"]),
                                                     json_values, max_size=3)}),
    st.fixed_dictionaries({"type": st.sampled_from(["bsc", "fp16", "mpq", "none", "2bit"]),
                           "threshold": json_values}),
    st.lists(st.tuples(st.text(max_size=9), st.integers(-1, 70000)), max_size=3),
)
metas = st.none() | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), plausible | json_values,
                                    max_size=6)


@st.composite
def messages(draw, types=tuple(MsgType)) -> Message:
    """A message as ``wire.decode`` hands it to a handler (built, encoded, decoded)."""
    mtype = draw(st.sampled_from(types))
    key = draw(st.sampled_from([0, 1, 2, 3]) | st.integers(0, 2 ** 40))
    data = None
    if draw(st.booleans()):
        code = draw(st.sampled_from(sorted(DTYPES)))
        n = draw(st.sampled_from([0, 1, 4, 6, 12, 13]))
        data = np.frombuffer(draw(st.binary(min_size=n * DTYPES[code].itemsize,
                                            max_size=n * DTYPES[code].itemsize)), DTYPES[code])
    numel = data.size if data is not None else draw(st.sampled_from([0, 1, 4, 6, 12]) | st.integers(0, 2 ** 33))
    offset = draw(st.sampled_from([0, 0, 0, 2]))
    total = draw(st.sampled_from([offset + numel, offset + numel, offset + numel + 3]))
    msg = Message(mtype, sender=draw(st.integers(-2, 3)), req_id=draw(st.integers(0, 5)), key=key,
                  offset=offset, numel=numel, total=total, dtype=draw(st.sampled_from([0, *DTYPES])),
                  meta=draw(metas), data=data)
    if data is not None and data.dtype == np.uint8 and draw(st.booleans()):
        msg.payload = True
        msg.meta = dict(msg.meta or {}, payload=draw(plausible | json_values))
    try:
        frames = [bytes(f) for f in wire.encode(msg)]
    except (ProtocolError, TypeError, ValueError):
        frames = None
    if frames is None:
        return Message(MsgType.HEARTBEAT)
    try:
        return wire.decode(frames)
    except ProtocolError:
        return Message(MsgType.HEARTBEAT)


# Registered clients' tokens (in registration modes "registered" and "pending" the servers know them),
# carried as TierMember.client_identity puts them in a link's identity (NAME#TOKEN>WHERE); the other
# two peers are strangers there.
FUZZ_TOKENS = ["e" * 32, "f" * 32]
PEERS = [b"peer-a", b"worker@party#1", *(f"worker{i}#{t}>0".encode() for i, t in enumerate(FUZZ_TOKENS, 3))]
F32 = wire.dtype_code(np.float32)

# Random messages alone seldom make a valid request, so the sequences mix them with well-formed ones of
# the protocol (each a draw of ``st.one_of``): requests that declare, push and pull the servers' keys (0
# and 1 initialised by initialised(), 12 and 6 float32; 2 to 6 not: more than a client may declare),
# registrations, barriers and goodbyes for the scheduler, and answers to what a tier member or a client
# asked. They reach the states whose bounds (b) checks: complete rounds, pushes ahead, parked pulls.


def _numel(key: int) -> int:
    return 12 if key % 2 == 0 else 6


@st.composite
def server_requests(draw) -> Message:
    """A well-formed request of a worker (a party's local server at a global server), whole or a slice."""
    mtype = draw(st.sampled_from([MsgType.INIT, MsgType.PULL] * 2 + [MsgType.PUSH, MsgType.PUSHPULL] * 3
                                 + [MsgType.STOP, MsgType.COMMAND]))
    key = draw(st.sampled_from([0, 0, 0, 1, 1, 2, 3, 4, 5, 6]))
    total = _numel(key)
    offset, numel = draw(st.sampled_from([(0, total)] * 4 + [(0, total // 2), (total // 2, total // 2)]))
    msg = Message(mtype, sender=draw(st.integers(0, 3)), req_id=draw(st.integers(0, 5)), key=key, offset=offset,
                  numel=numel, total=total, dtype=F32)
    if mtype in (MsgType.PUSH, MsgType.PUSHPULL) or (mtype == MsgType.INIT and draw(st.booleans())):
        msg.data = np.full(numel, draw(st.integers(-3, 3)), np.float32)
    elif mtype == MsgType.STOP:
        msg.key = msg.offset = msg.numel = msg.total = msg.dtype = 0
    elif mtype == MsgType.COMMAND:
        msg.key = msg.offset = msg.numel = msg.total = msg.dtype = 0
        msg.meta = {"cmd": draw(st.sampled_from(commands.ALL)), "spec": {"name": "sgd", "params": {}},
                    "sync": draw(st.booleans()), "loss": 0.5}
    return msg


@st.composite
def membership_messages(draw) -> Message:
    """What a tier's node sends its scheduler, well-formed."""
    mtype = draw(st.sampled_from([MsgType.REGISTER] * 4 + [MsgType.BARRIER] * 2 + [MsgType.BYE, MsgType.HEARTBEAT,
                                                                                   MsgType.POLICY]))
    if mtype == MsgType.REGISTER:
        meta: Dict[str, Any] = {"role": draw(st.sampled_from(["server", "worker"])), "host": "127.0.0.1",
                                "port": draw(st.integers(1, 3)), "name": "n", "token": uuid.UUID(int=draw(
                                    st.integers(0, 3))).hex, "master": draw(st.booleans()),
                                "ts": draw(st.sampled_from([False] * 15 + [True]))}
    elif mtype == MsgType.BARRIER:
        meta = {"group": draw(st.sampled_from(GROUPS)), "n": draw(st.integers(0, 2))}
    elif mtype == MsgType.BYE:
        meta = draw(st.sampled_from([{}, {"failure": "x"}]))
    elif mtype == MsgType.POLICY:
        meta = {"tolerate_worker_loss": draw(st.booleans())}
    else:
        meta = {}
    return Message(mtype, req_id=draw(st.integers(0, 5)), meta=meta or None)


@st.composite
def scheduler_answers(draw) -> Message:
    """What a scheduler sends a node, well-formed."""
    mtype = draw(st.sampled_from([MsgType.REGISTER_ACK, MsgType.BARRIER_ACK, MsgType.HEARTBEAT_ACK,
                                  MsgType.PEER_LEFT, MsgType.PEER_DEAD]))
    meta = {MsgType.REGISTER_ACK: {"rank": draw(st.integers(0, 2)), "servers": [["127.0.0.1", 1]],
                                   "num_workers": 2, "num_servers": 1},
            MsgType.BARRIER_ACK: {"group": "worker", "n": draw(st.integers(0, 1))},
            MsgType.PEER_LEFT: {"rank": 1, "reason": "gone"},
            MsgType.PEER_DEAD: {"reason": "dead"}}.get(mtype)
    return Message(mtype, meta=meta)


@st.composite
def server_answers(draw) -> Message:
    """What a server sends a client, well-formed: an answer to one of its requests (ids 1 to 4, keys 0 to
    3 of 12 float32 in two parts of 6), or to one it never made."""
    mtype = draw(st.sampled_from([MsgType.RESPONSE, MsgType.RESPONSE, MsgType.ERROR]))
    req_id, server = draw(st.integers(0, 5)), draw(st.integers(0, 1))
    offset = draw(st.sampled_from([6 * server, 6 * server, 0, 6]))  # server 0 holds [0, 6), server 1 [6, 12)
    msg = Message(mtype, sender=server, req_id=req_id, key=(req_id - 1) % 4, offset=offset, total=12)
    if mtype == MsgType.ERROR:
        msg.meta = {"error": "refused"}
    elif draw(st.booleans()):
        msg.numel, msg.data = 6, np.zeros(6, np.float32)
    return msg


# (A strategy named twice in st.one_of is drawn twice as often.)
sequences = st.lists(st.tuples(st.sampled_from(PEERS), st.one_of(messages(), server_requests(), server_requests())),
                     min_size=1, max_size=10)
# The global server's: each message to its party port (WAN) or its central port (LAN).
global_sequences = st.lists(st.tuples(st.sampled_from(PEERS), st.booleans(),
                                      st.one_of(messages(), server_requests(), server_requests())),
                            min_size=1, max_size=10)
scheduler_sequences = st.lists(st.tuples(st.sampled_from(PEERS), st.one_of(messages(), membership_messages(),
                                                                           membership_messages())),
                               min_size=1, max_size=10)

# How a server learns its clients: "open" (no check), "registered" (its scheduler's list is in from
# the start: FUZZ_TOKENS and the genuine clients'), "pending" (the list comes after the sequence: until
# then requests wait, at most EARLY_REQUESTS of them).
registrations = st.sampled_from(["open", "registered", "pending"])

# Requests whose sender waits for an answer: refused by a handler, the loop answers them with ERROR.
REQUESTS = (MsgType.INIT, MsgType.PUSH, MsgType.PULL, MsgType.PUSHPULL, MsgType.COMMAND, MsgType.STOP)

# The servers' limits in this test (small enough for ten-message sequences to reach them).
LIMITS = {"GEOMX_MAX_KEYS_PER_CLIENT": "1", "GEOMX_MAX_ROUNDS_AHEAD": "1"}
EARLY_REQUESTS = 3
FRESH_KEY = 2 ** 41 + 7  # outside the fuzzed keys (at most 2 ** 40): no peer touched it
# Seconds the loop gets to hand on a message or to answer one (GEOMX_FUZZ_WAIT: shorter while Hypothesis
# shrinks a failure, which waits that long at each try).
WAIT = float(os.environ.get("GEOMX_FUZZ_WAIT", "10"))


def genuine_identity(name: str, token: str) -> bytes:
    return f"{name}#{token}>0".encode()


# -- the node's loop and its handlers ------------------------------------------------------------
# (Every loop here is TCP-only, local_ipc=False: a client of a ROUTER this test binds would otherwise
# take a stale Unix-domain socket file of that port, left by a killed node, for the listener's.)

class Handled:
    """What the event loop handed the handlers of ``links``: (message, origin, the exception it raised
    or None), recorded by wrapping the handlers in the loop's own table, which dispatches through them."""

    def __init__(self, loop: EventLoop, links: Iterable[Link]):
        self.loop = loop
        self.calls: List[Tuple[Message, Origin, Optional[Exception]]] = []
        for link in links:
            link_, handler, routed = loop.handlers[link.sock]
            loop.handlers[link.sock] = (link_, self._recording(handler), routed)

    def _recording(self, handler):
        def handle(msg: Message, origin: Origin) -> None:
            try:
                handler(msg, origin)
            except Exception as exc:
                self.calls.append((msg, origin, exc))
                raise  # to the loop, which refuses (ProtocolError) or counts a failure
            self.calls.append((msg, origin, None))
        return handle

    def after(self, send: Callable[[], None]) -> None:
        """``send()`` one message, then run the loop until a handler took it; a handler's exception
        other than ProtocolError (which the loop only logged) is raised here."""
        before = len(self.calls)
        send()
        run_until(self.loop, lambda: len(self.calls) > before, "the loop to hand the message to its handler")
        exc = self.calls[-1][2]
        if exc is not None and not isinstance(exc, ProtocolError):
            raise exc

    @property
    def refused(self) -> List[Tuple[Message, Origin]]:
        return [(msg, origin) for msg, origin, exc in self.calls if exc is not None]


def run_until(loop: EventLoop, done: Callable[[], bool], what: str, also: Callable[[], None] = lambda: None,
              wait: float = WAIT) -> None:
    end = time.monotonic() + wait
    while not done():
        if time.monotonic() > end:
            raise AssertionError(f"no {what} within {wait:g}s")
        also()
        loop.run_once(0.002)


def refusals(loop: EventLoop) -> Dict[str, float]:
    """geomx_refused_messages_total by reason, as the node's metrics report it."""
    out: Dict[str, float] = collections.Counter()
    for s in loop.metrics.collect():
        if s.name == "geomx_refused_messages_total":
            out[dict(s.labels)["reason"]] += s.value
    return dict(out)


def assert_refusals_counted(loop: EventLoop, handled: Handled) -> None:
    """(a) The loop counted each refusal of a handler as "refused", and nothing as "failed" or "malformed"."""
    n = len(handled.refused)
    assert refusals(loop) == ({"refused": n} if n else {}), (refusals(loop), n)


# -- the peers -----------------------------------------------------------------------------------

class Dealers:
    """One DEALER per identity, connected to a listener's port; what each received, decoded."""

    def __init__(self, ctx: zmq.Context, port: int, identities: Iterable[bytes]):
        self.socks: Dict[bytes, zmq.Socket] = {}
        self.got: Dict[bytes, List[Message]] = {}
        self.taken: Dict[bytes, int] = collections.Counter()
        try:
            for identity in identities:
                sock = ctx.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.IDENTITY, identity)
                sock.connect(f"tcp://127.0.0.1:{port}")
                self.socks[identity], self.got[identity] = sock, []
        except BaseException:
            self.close()
            raise

    def send(self, identity: bytes, msg: Message) -> None:
        self.socks[identity].send_multipart(wire.encode(msg))

    def read(self) -> None:
        for identity, sock in self.socks.items():
            while sock.poll(0):
                self.got[identity].append(wire.decode(sock.recv_multipart()))

    def errors(self) -> collections.Counter:
        self.read()
        return collections.Counter((identity, m.req_id, m.key) for identity, got in self.got.items()
                                   for m in got if m.type == MsgType.ERROR)

    def answer(self, loop: EventLoop, identity: bytes, also: Callable[[], None] = lambda: None,
               wait: float = WAIT) -> Message:
        """The next message to ``identity`` that no call before took, running ``loop`` (and ``also``) until
        it comes."""
        taken = self.taken[identity]
        run_until(loop, lambda: self.read() or len(self.got[identity]) > taken, f"answer to {identity!r}", also,
                  wait)
        self.taken[identity] += 1
        return self.got[identity][taken]

    def close(self) -> None:
        for sock in self.socks.values():
            sock.close(linger=0)


def assert_refusals_answered(loop: EventLoop, handled: Handled, *peers: Dealers) -> None:
    """(a) on a listener: counted, and every refused request answered with ERROR to its peer (by one
    of ``peers``: the global server's have a DEALER on each of its ports)."""
    assert_refusals_counted(loop, handled)
    due = collections.Counter((origin.identity, msg.req_id, msg.key) for msg, origin in handled.refused
                              if msg.type in REQUESTS)
    missing: collections.Counter = collections.Counter()
    end = time.monotonic() + WAIT
    while True:
        missing = due - sum((dealers.errors() for dealers in peers), collections.Counter())
        if not missing or time.monotonic() > end:
            break
        time.sleep(0.002)
    assert not missing, f"refused requests never answered with ERROR (identity, req_id, key): {dict(missing)}"


class Router:
    """A ROUTER posing as the one peer of a client link (its scheduler, one of its servers): it learns
    the client's identity from the first message the client sends it."""

    def __init__(self, ctx: zmq.Context):
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.client: Optional[bytes] = None
        self.got: List[Message] = []

    def read(self) -> None:
        while self.sock.poll(0):
            identity, *frames = self.sock.recv_multipart()
            self.client = identity
            self.got.append(wire.decode(frames))

    def wait_for_client(self, loop: EventLoop) -> None:
        run_until(loop, lambda: self.read() or self.client is not None, "first message from the client")

    def send(self, msg: Message) -> None:
        assert self.client is not None
        self.sock.send_multipart([self.client, *wire.encode(msg)])

    def close(self) -> None:
        self.sock.close(linger=0)


def assert_nothing_answered(routers: Iterable[Router]) -> None:
    """(a) on a client link: the loop answers a refused reply with nothing (it has no one to answer)."""
    for router in routers:
        router.read()
        assert not [m for m in router.got if m.type == MsgType.ERROR], router.got


# -- servers ------------------------------------------------------------------------------------

def assert_server_bounded(server, initial_keys: int) -> None:
    """(b) What the peers made a server hold stays within its limits."""
    for client, declared in server.keys_declared.items():
        assert declared <= server.max_keys_per_client, (client, declared)
    # Keys come from initialised() and from INITs, each counted to its client.
    assert len(server.keys) <= initial_keys + sum(server.keys_declared.values()), \
        (sorted(server.keys), server.keys_declared)
    assert len(server.early) <= server.EARLY_REQUESTS
    states = {id(s): s for ks in server.keys.values() for s in (ks, *ks.slices.values())}
    parked: Dict[int, int] = collections.Counter()
    for (state, client), (count, elements) in server.waiting.items():
        assert state in states, "requests counted as waiting on a state the server no longer holds"
        assert 0 < count <= server.max_rounds_ahead * server.SLICES_PER_ROUND, (client, count)
        assert 0 < elements <= server.max_rounds_ahead * max(states[state].numel, 1), (client, elements)
        parked[state] += count
    # What the server's metrics say it holds is what it holds.
    reading = metrics.to_json(metrics.server_samples(server), {})
    assert metrics.value(reading, "geomx_parked_requests") == sum(parked.values())
    assert metrics.value(reading, "geomx_early_requests") == len(server.early)
    assert metrics.value(reading, "geomx_open_rounds") == sum(len(s.rounds) for s in states.values())
    for state, s in states.items():
        assert len(s.parked) == parked[state], (s.key, len(s.parked), parked[state])
        # A client's pushes run at most GEOMX_MAX_ROUNDS_AHEAD rounds past the last complete one.
        assert all(s.completed <= r < s.completed + server.max_rounds_ahead for r in s.rounds), \
            (s.key, s.completed, sorted(s.rounds))


def stopped_pushers(server) -> bool:
    """A client that pushed and then stopped: no round it did not push can complete any more."""
    return any(c in server.pushing_clients for c in server.stopped_clients)


def assert_value(reply: Message, want: np.ndarray) -> None:
    assert reply.type == MsgType.RESPONSE, (reply.type, reply.meta)
    np.testing.assert_array_equal(reply.data, want)


def assert_round(replies: List[Message], want: np.ndarray, refused: bool) -> None:
    """(c) A complete round of genuine pushes answers each with the round's value, or, where a client that
    pushed before has stopped, refuses each (it can never complete)."""
    for reply in replies:
        if refused:
            assert reply.type == MsgType.ERROR and "stopped before pushing this round" in reply.meta["error"], \
                (reply.type, reply.meta)
        else:
            assert_value(reply, want)


def allow(server, links, tokens) -> None:
    for link in links:
        server.allow(link.name, tokens)


class FakeGlobalServer(Router):
    """The local server's upstream: answers every request at once as a global server without an
    optimizer would (INIT: the key's initial value, ``initial``; PUSHPULL: the party's aggregate back,
    the global sum of one party; commands and STOP: an empty RESPONSE); values over 64 KiB are refused
    (this loop takes messages of at most 1 MiB)."""

    @staticmethod
    def initial(key: int, numel: int, dtype) -> np.ndarray:
        return ((np.arange(numel) + key) % 7).astype(dtype)

    def answer_all(self) -> None:
        self.read()
        for msg in self.got:
            out = Message(MsgType.RESPONSE, req_id=msg.req_id, key=msg.key, offset=msg.offset, total=msg.total)
            dtype = DTYPES.get(msg.dtype)
            if msg.type == MsgType.INIT and dtype is not None and msg.numel * dtype.itemsize <= 1 << 16:
                out.data, out.numel = self.initial(msg.key, msg.numel, dtype), msg.numel
            elif msg.type == MsgType.INIT:
                out = wire.error_reply(msg, "too large for this test's global server")
            elif msg.type == MsgType.PUSHPULL and msg.data is not None:
                out.data, out.numel = msg.data, msg.numel
            self.send(out)
        self.got.clear()


def in_flight(client: KVClient) -> list:
    """The requests ``client`` sent and has no answer to."""
    return list(client.pending.values())


def test_an_init_of_an_empty_slice_is_answered(zmq_ctx):
    """A worker's INIT of elements [0, 0) of a 3-element key is refused (a gap this fuzz found: the local
    server forwarded it as an upstream request of no part, which nothing answers, and the INIT waited for
    ever)."""
    cfg = server_config("local server")
    loop = EventLoop(zmq_ctx, 1 << 20, name="local server", local_ipc=False)
    upstream = FakeGlobalServer(zmq_ctx)
    worker = None
    try:
        server = LocalServer(cfg, loop)
        server.connect_upstream(KVClient(loop, [("127.0.0.1", upstream.port)], identity="ls", sender=0,
                                         bigarray_bound=10 ** 6, wan=False, name="ls"))
        worker = Dealers(zmq_ctx, server.port, [b"w"])
        worker.send(b"w", Message(MsgType.INIT, req_id=1, key=2, numel=0, total=3, dtype=F32))
        reply = worker.answer(loop, b"w", upstream.answer_all, wait=2.0)
        assert reply.type == MsgType.ERROR and reply.req_id == 1, reply
        assert reply.meta["error"].endswith("key 2: an INIT of no element"), reply.meta
    finally:
        if worker is not None:
            worker.close()
        upstream.close()
        loop.close()


@FUZZ
@given(msgs=sequences, registration=registrations)
def test_local_server_handler(zmq_ctx, msgs, registration):
    cfg = server_config("local server", **LIMITS)
    loop = EventLoop(zmq_ctx, 1 << 20, name="fuzz local server", local_ipc=False)
    upstream = FakeGlobalServer(zmq_ctx)
    dealers = genuine = None
    tokens = [uuid.uuid4().hex for _ in range(2)]
    try:
        server = LocalServer(cfg, loop)
        server.EARLY_REQUESTS = EARLY_REQUESTS
        client = KVClient(loop, [("127.0.0.1", upstream.port)], identity="ls", sender=0, bigarray_bound=10 ** 6,
                          wan=False, name="ls")
        server.connect_upstream(client)
        initialised(server, keys=(0, 1))  # keys 2 and 3 start uninitialised
        if registration == "registered":
            allow(server, [server.link], [*FUZZ_TOKENS, *tokens])
        server.require_registration = registration != "open"

        def settle() -> None:  # every request the server sent up answered and handled
            run_until(loop, lambda: not in_flight(client), "answers from the global server", upstream.answer_all)

        dealers = Dealers(zmq_ctx, server.port, PEERS)
        handled = Handled(loop, [server.link])
        for identity, msg in msgs:
            handled.after(lambda: dealers.send(identity, msg))  # noqa: B023 - called at once
            settle()
        assert_refusals_answered(loop, handled, dealers)
        assert_server_bounded(server, initial_keys=2)
        if registration == "pending":
            allow(server, [server.link], [*FUZZ_TOKENS, *tokens])  # the requests that waited are handled now
            settle()
            assert_server_bounded(server, initial_keys=2)

        # (c) Two fresh workers: INIT, PULL and a round of the fresh key, through the global server.
        a, b = (genuine_identity(f"worker{i}", t) for i, t in enumerate(tokens))
        genuine = Dealers(zmq_ctx, server.port, [a, b])

        def ask(identity, msg) -> Message:
            genuine.send(identity, msg)
            return genuine.answer(loop, identity, upstream.answer_all)

        value = FakeGlobalServer.initial(FRESH_KEY, 6, np.float32)
        shape = {"key": FRESH_KEY, "numel": 6, "total": 6, "dtype": F32}
        for i, who in enumerate((a, b)):
            assert_value(ask(who, Message(MsgType.INIT, req_id=100 + i, **shape)), value)
        assert_value(ask(a, Message(MsgType.PULL, req_id=102, **shape)), value)
        grads = [np.full(6, 1 + i, np.float32) for i in range(2)]
        refused = stopped_pushers(server)
        for i, who in enumerate((a, b)):
            genuine.send(who, Message(MsgType.PUSHPULL, req_id=103, key=FRESH_KEY, total=6, data=grads[i]))
        assert_round([genuine.answer(loop, who, upstream.answer_all) for who in (a, b)], grads[0] + grads[1],
                     refused)
    finally:
        for peers in (dealers, genuine):
            if peers is not None:
                peers.close()
        upstream.close()
        loop.close()


@pytest.fixture(scope="module")
def mxnet():
    return pytest.importorskip("mxnet")


@FUZZ
@given(msgs=global_sequences, registration=registrations)
def test_global_server_handler(zmq_ctx, mxnet, msgs, registration):
    # One party and one central worker that trains: a round is their two pushes.
    cfg = server_config("global server", DMLC_NUM_WORKER="1", DMLC_NUM_GLOBAL_WORKER="1", DMLC_NUM_ALL_WORKER="2",
                        DMLC_ENABLE_CENTRAL_WORKER="1", **LIMITS)
    loop = EventLoop(zmq_ctx, 1 << 20, name="fuzz global server", local_ipc=False)
    peers: List[Dealers] = []
    tokens = [uuid.uuid4().hex for _ in range(2)]
    try:
        server = GlobalServer(cfg, loop)
        server.EARLY_REQUESTS = EARLY_REQUESTS
        initialised(server, keys=(0, 1))
        links = [server.wan_link, server.lan_link]
        if registration == "registered":
            allow(server, links, [*FUZZ_TOKENS, *tokens])
        server.require_registration = registration != "open"
        wan, lan = (Dealers(zmq_ctx, port, PEERS) for port in (server.wan_port, server.lan_port))
        peers += [wan, lan]
        handled = Handled(loop, links)
        for identity, central, msg in msgs:
            handled.after(lambda: (lan if central else wan).send(identity, msg))  # noqa: B023 - called at once
        assert_refusals_answered(loop, handled, wan, lan)
        assert_server_bounded(server, initial_keys=2)
        if registration == "pending":
            allow(server, links, [*FUZZ_TOKENS, *tokens])  # the requests that waited are handled now
            assert_server_bounded(server, initial_keys=2)

        # (c) A fresh central worker initialises the fresh key with its value, a fresh party's local server
        # gets it (INIT, PULL), and their two pushes make a round (no optimizer: the value is their sum).
        worker, local_server = genuine_identity("worker0", tokens[0]), genuine_identity("local_server0", tokens[1])
        genuine = {worker: Dealers(zmq_ctx, server.lan_port, [worker]),
                   local_server: Dealers(zmq_ctx, server.wan_port, [local_server])}
        peers += genuine.values()

        def ask(identity, msg) -> Message:
            genuine[identity].send(identity, msg)
            return genuine[identity].answer(loop, identity)

        value = np.arange(6, dtype=np.float32)
        shape = {"key": FRESH_KEY, "numel": 6, "total": 6, "dtype": F32}
        assert_value(ask(worker, Message(MsgType.INIT, req_id=100, data=value, **shape)), value)
        assert_value(ask(local_server, Message(MsgType.INIT, req_id=101, **shape)), value)
        assert_value(ask(local_server, Message(MsgType.PULL, req_id=102, **shape)), value)
        grads = {worker: np.full(6, 1, np.float32), local_server: np.full(6, 2, np.float32)}
        refused = stopped_pushers(server)
        for who, grad in grads.items():
            genuine[who].send(who, Message(MsgType.PUSHPULL, req_id=103, key=FRESH_KEY, total=6, data=grad))
        assert_round([genuine[who].answer(loop, who) for who in grads], sum(grads.values()), refused)
    finally:
        for dealers in peers:
            dealers.close()
        loop.close()


# -- the scheduler --------------------------------------------------------------------------------

NUM_SERVERS, NUM_WORKERS = 1, 2


def _scheduler(ctx) -> Scheduler:
    from geomx.tsengine.tier import TSEngineTier

    return Scheduler("fuzz tier", 0, NUM_SERVERS, NUM_WORKERS, heartbeat_interval=1.0, heartbeat_timeout=20.0,
                     start_timeout=60.0, max_message_bytes=1 << 20, ctx=ctx, local_ipc=False,
                     plugins=[TSEngineTier("ENABLE_INTRA_TS", 0.9)])


def register(role: str, name: str) -> Message:
    return Message(MsgType.REGISTER, meta={"role": role, "host": "127.0.0.1", "port": 1, "name": name,
                                           "token": uuid.uuid4().hex})


@FUZZ
@given(msgs=scheduler_sequences)
def test_scheduler_handler(zmq_ctx, msgs):
    sched = _scheduler(zmq_ctx)
    dealers = fresh = None
    try:
        dealers = Dealers(zmq_ctx, sched.port, PEERS)
        handled = Handled(sched.loop, [sched.link])
        for identity, msg in msgs:
            handled.after(lambda: dealers.send(identity, msg))  # noqa: B023 - called at once
        assert_refusals_answered(sched.loop, handled, dealers)

        # (b) No more members than the tier has places, and barriers hold members only.
        members = list(sched.members.values())
        assert sum(m.role == "server" for m in members) <= NUM_SERVERS
        assert sum(m.role == "worker" for m in members) <= NUM_WORKERS
        for group, waiting in sched.barriers.items():
            assert waiting <= {m.base for m in members}, (group, waiting)

        # (c) Unless the tier ended (a member's failure, or everyone's goodbye), fresh nodes fill its
        # places and are acknowledged (the tier fails as a whole only where a fuzzed member asked for
        # TSEngine and they do not); a complete tier refuses a late node and still answers its members.
        if sched.exit_code is not None:
            return
        if not sched.registered:
            missing = [("server", i) for i in range(NUM_SERVERS - sum(m.role == "server" for m in members))] \
                + [("worker", i) for i in range(NUM_WORKERS - sum(m.role == "worker" for m in members))]
            identities = [f"genuine-{role}{i}".encode() for role, i in missing]
            fresh = Dealers(zmq_ctx, sched.port, identities)
            for identity, (role, i) in zip(identities, missing):
                fresh.send(identity, register(role, f"genuine-{role}{i}"))
            answers = [fresh.answer(sched.loop, identity) for identity in identities]
            if sched.exit_code is None:
                assert sched.registered
                assert [a.type for a in answers] == [MsgType.REGISTER_ACK] * len(answers), answers
                assert all(len(a.meta["servers"]) == NUM_SERVERS for a in answers)
                ranks = collections.Counter(m.role for m in sched.members.values())
                assert ranks == {"server": NUM_SERVERS, "worker": NUM_WORKERS}
                for role, limit in (("server", NUM_SERVERS), ("worker", NUM_WORKERS)):
                    assert sorted(m.rank for m in sched.members.values() if m.role == role) == list(range(limit))
            else:
                assert sched.exit_code == 1 and any(m.ts for m in members), answers
                assert all(a.type == MsgType.PEER_DEAD and "ENABLE_INTRA_TS" in a.meta["reason"] for a in answers)
        else:
            fresh = Dealers(zmq_ctx, sched.port, [b"genuine-late"])
            fresh.send(b"genuine-late", register("worker", "late"))
            late = fresh.answer(sched.loop, b"genuine-late")
            assert late.type == MsgType.PEER_DEAD and "the tier is complete" in late.meta["reason"], late
            member = next(m for m in sched.members.values() if not m.done and not m.left)
            dealers.read()
            seen = len(dealers.got[member.identity])
            dealers.send(member.identity, Message(MsgType.HEARTBEAT, req_id=99))  # fuzzed ids are 0 to 5
            run_until(sched.loop, lambda: dealers.read() or any(  # noqa: B023
                m.type == MsgType.HEARTBEAT_ACK and m.req_id == 99 for m in dealers.got[member.identity][seen:]),
                "a member's HEARTBEAT_ACK")
    finally:
        for peers in (dealers, fresh):
            if peers is not None:
                peers.close()
        sched.loop.close()


# -- a node's scheduler link, a client's server links ------------------------------------------------

answers = messages(types=(MsgType.RESPONSE, MsgType.ERROR, MsgType.REGISTER_ACK, MsgType.BARRIER_ACK,
                          MsgType.HEARTBEAT_ACK, MsgType.PEER_LEFT, MsgType.PEER_DEAD, MsgType.PUSH))
member_replies = st.lists(st.one_of(answers, scheduler_answers(), scheduler_answers()), min_size=1, max_size=10)
client_replies = st.lists(st.one_of(answers, server_answers(), server_answers()), min_size=1, max_size=10)


@FUZZ
@given(msgs=member_replies)
def test_scheduler_link_handler(zmq_ctx, msgs):
    """What a node does with anything its scheduler (or someone posing as it) sends."""
    loop = EventLoop(zmq_ctx, 1 << 20, name="fuzz node", local_ipc=False)
    scheduler = Router(zmq_ctx)
    fatal: List[Exception] = []
    passed: List[int] = []
    try:
        member = TierMember(loop, "party", ("127.0.0.1", scheduler.port), role="worker", host="127.0.0.1", port=0,
                            name="w", heartbeat_interval=1.0, heartbeat_timeout=20.0, on_fatal=fatal.append)
        member.barrier("worker", lambda: passed.append(1))
        scheduler.wait_for_client(loop)
        handled = Handled(loop, [member.link])
        for m in msgs:
            handled.after(lambda: scheduler.send(m))  # noqa: B023 - called at once
        assert_refusals_counted(loop, handled)
        assert_nothing_answered([scheduler])
        # (b) The one barrier it entered is let through at most once; it fails at most once.
        assert len(member._barrier_waiters) + len(passed) == 1 and len(fatal) <= 1
        if fatal:
            return  # told the tier is dead (PEER_DEAD): the node ends
        # (c) Its scheduler's acknowledgements still take: the registration, then the barrier.
        ack = {"rank": 1, "servers": [["127.0.0.1", 9999]], "num_workers": 2, "num_servers": 1}
        handled.after(lambda: scheduler.send(Message(MsgType.REGISTER_ACK, meta=ack)))
        assert member.info is not None and (member.info.rank, member.info.servers) == (1, (("127.0.0.1", 9999),))
        handled.after(lambda: scheduler.send(Message(MsgType.BARRIER_ACK, meta={"group": "worker", "n": 0})))
        assert passed == [1] and not member._barrier_waiters and not fatal
    finally:
        scheduler.close()
        loop.close()


@FUZZ
@given(msgs=client_replies, pending=st.lists(st.sampled_from([MsgType.PULL, MsgType.PUSHPULL, MsgType.COMMAND]),
                                     min_size=1, max_size=4))
def test_client_reply_handler(zmq_ctx, msgs, pending):
    """What a client (worker, local server) does with any reply its servers (or impostors) send, while it
    has requests in flight to two servers."""
    loop = EventLoop(zmq_ctx, 1 << 20, name="fuzz client", local_ipc=False)
    servers: List[Router] = []
    answered: List[int] = []
    try:
        servers.extend(Router(zmq_ctx) for _ in range(2))
        client = KVClient(loop, [("127.0.0.1", s.port) for s in servers], identity="c", sender=0, bigarray_bound=8,
                          wan=False, name="c")
        for i, mtype in enumerate(pending):  # request ids 1, 2, ...: the fuzzed replies' are 0 to 5
            if mtype == MsgType.COMMAND:
                client.broadcast(mtype, lambda r, e, i=i: answered.append(i), meta={"cmd": "get_states"})
            else:
                client.request(mtype, i % 4, 12, np.float32, lambda v, e, i=i: answered.append(i),
                               data=np.zeros(12, np.float32) if mtype == MsgType.PUSHPULL else None)
        for server in servers:  # 12 elements over a bound of 8: every request reaches both servers
            server.wait_for_client(loop)
        handled = Handled(loop, client.links)
        for m in msgs:
            handled.after(lambda: servers[m.sender % 2].send(m))  # noqa: B023 - called at once
        assert_refusals_counted(loop, handled)
        assert_nothing_answered(servers)
        # (b) Each request answered at most once, and replies make it keep nothing of requests it never
        # sent (no new request, no round numbers, no pushes kept for a replay, no slice sizes).
        assert len(answered) == len(set(answered)) and set(client.pending) <= set(range(1, len(pending) + 1))
        assert len(answered) + len(client.pending) == len(pending)
        assert not (client.first_rounds or client.push_rounds or client.retained or client.slices or client.resent)

        # (c) A fresh PULL, and a command to both servers, get their answers.
        value = np.arange(12, dtype=np.float32)
        got: List[Any] = []
        client.request(MsgType.PULL, FRESH_KEY, 12, np.float32, lambda v, e: got.append((v, e)))
        client.broadcast(MsgType.COMMAND, lambda r, e: got.append((r, e)), meta={"cmd": "get_states"})
        for server in servers:
            def fresh(server=server) -> List[Message]:
                return [m for m in server.got if m.req_id > len(pending)]
            run_until(loop, lambda: server.read() or len(fresh()) == 2, "the fresh requests")  # noqa: B023
            for req in fresh():
                reply = Message(MsgType.RESPONSE, req_id=req.req_id, key=req.key, offset=req.offset, total=req.total)
                if req.type == MsgType.PULL:
                    reply.numel, reply.data = req.numel, value[req.offset:req.offset + req.numel]
                server.send(reply)
        run_until(loop, lambda: len(got) == 2, "the fresh requests' answers")
        (pulled, error), (command, cmd_error) = sorted(got, key=lambda g: isinstance(g[0], list))
        assert error is None and cmd_error is None, (error, cmd_error)
        np.testing.assert_array_equal(pulled, value)
        assert [r.type for r in command] == [MsgType.RESPONSE] * 2
    finally:
        for server in servers:
            server.close()
        loop.close()
