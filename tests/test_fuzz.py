"""Fuzzing of the control-message handlers (the wire decoder itself is fuzzed in test_wire.py): every
message a peer can get past ``wire.decode`` is fed to the handler that would receive it — a
scheduler, a local server, a global server, a node's scheduler link and a client's server links —
in random sequences from a few peers. The only exception a handler may raise is ProtocolError (the
event loop logs it, answers ERROR and keeps serving); anything else is a crash this test reports.

A fixed budget runs in the suite (GEOMX_FUZZ_EXAMPLES examples per target, default 100, a few
seconds each); a longer run: ``GEOMX_FUZZ_EXAMPLES=20000 pytest tests/test_fuzz.py tests/test_wire.py``.
"""
from __future__ import annotations

import os
from typing import Any, List, Tuple

import numpy as np
import pytest
import zmq
from helpers import SERVER_ENV, dead_port, initialised
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from geomx import commands, config, wire
from geomx.errors import ProtocolError
from geomx.kvclient import KVClient
from geomx.membership import Scheduler, TierMember
from geomx.membership.scheduler import GROUPS
from geomx.servers import GlobalServer, LocalServer
from geomx.transport import EventLoop, Origin
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


PEERS = [b"peer-a", b"peer-b", b"worker@party#1"]
sequences = st.lists(st.tuples(st.sampled_from(PEERS), messages()), min_size=1, max_size=10)


def feed(handler, link, msgs: List[Tuple[bytes, Message]], routed: bool = True) -> None:
    for identity, msg in msgs:
        try:
            handler(msg, Origin(link, identity if routed else None))
        except ProtocolError:
            pass  # refused: the event loop logs it and answers ERROR


@pytest.fixture(scope="module")
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def _scheduler(ctx) -> Scheduler:
    from geomx.tsengine.tier import TSEngineTier

    return Scheduler("fuzz tier", 0, 1, 2, heartbeat_interval=1.0, heartbeat_timeout=20.0, start_timeout=60.0,
                     max_message_bytes=1 << 20, ctx=ctx, plugins=[TSEngineTier("ENABLE_INTRA_TS", 0.9)])


@FUZZ
@given(msgs=sequences)
def test_scheduler_handler(ctx, msgs):
    sched = _scheduler(ctx)
    try:
        feed(sched._handle, sched.link, msgs)
    finally:
        sched.loop.close()


@FUZZ
@given(msgs=sequences)
def test_local_server_handler(ctx, msgs):
    cfg = config.load(dict(SERVER_ENV, DMLC_ROLE="server"))
    loop = EventLoop(ctx, 1 << 20, name="fuzz local server")
    try:
        server = LocalServer(cfg, loop)
        server.connect_upstream(KVClient(loop, [("127.0.0.1", dead_port())], identity="ls", sender=0,
                                         bigarray_bound=10 ** 6, wan=False, name="ls"))
        initialised(server, keys=(0, 1))  # keys 2 and 3 start uninitialised
        feed(server.handle_client, server.link, msgs)
    finally:
        loop.close()


@pytest.fixture(scope="module")
def mxnet():
    return pytest.importorskip("mxnet")


@FUZZ
@given(msgs=sequences, central=st.booleans())
def test_global_server_handler(ctx, mxnet, msgs, central):
    cfg = config.load(dict(SERVER_ENV, DMLC_ROLE_GLOBAL="global_server", DMLC_ROLE="server",
                           DMLC_NUM_ALL_WORKER="4", DMLC_ENABLE_CENTRAL_WORKER="1"))
    loop = EventLoop(ctx, 1 << 20, name="fuzz global server")
    try:
        server = GlobalServer(cfg, loop)
        initialised(server, keys=(0, 1))
        link = server.lan_link if central else server.wan_link
        feed(server.handle_client, link, msgs)
    finally:
        loop.close()


replies = st.lists(messages(types=(MsgType.RESPONSE, MsgType.ERROR, MsgType.REGISTER_ACK, MsgType.BARRIER_ACK,
                                   MsgType.HEARTBEAT_ACK, MsgType.PEER_LEFT, MsgType.PEER_DEAD, MsgType.PUSH)),
                   min_size=1, max_size=10)


@FUZZ
@given(msgs=replies)
def test_scheduler_link_handler(ctx, msgs):
    """What a node does with anything its scheduler (or someone posing as it) sends."""
    loop = EventLoop(ctx, 1 << 20, name="fuzz node")
    fatal: List[Exception] = []
    try:
        member = TierMember(loop, "party", ("127.0.0.1", dead_port()), role="worker", host="127.0.0.1", port=0,
                            name="w", heartbeat_interval=1.0, heartbeat_timeout=20.0, on_fatal=fatal.append)
        member.barrier("worker", lambda: None)
        feed(member._handle, member.link, [(b"", m) for m in msgs], routed=False)
    finally:
        loop.close()


@FUZZ
@given(msgs=replies, pending=st.lists(st.sampled_from([MsgType.PULL, MsgType.PUSHPULL, MsgType.COMMAND]),
                                     min_size=1, max_size=4))
def test_client_reply_handler(ctx, msgs, pending):
    """What a client (worker, local server) does with any reply its servers (or impostors) send, while it
    has requests in flight to two servers."""
    loop = EventLoop(ctx, 1 << 20, name="fuzz client")
    results: List[Any] = []
    try:
        client = KVClient(loop, [("127.0.0.1", dead_port())] * 2, identity="c", sender=0, bigarray_bound=8,
                          wan=False, name="c")
        for i, mtype in enumerate(pending):
            if mtype == MsgType.COMMAND:
                client.broadcast(mtype, lambda r, e: results.append((r, e)), meta={"cmd": "get_states"})
            else:
                client.request(mtype, i % 4, 12, np.float32, lambda v, e: results.append((v, e)),
                               data=np.zeros(12, np.float32) if mtype == MsgType.PUSHPULL else None)
        for m in msgs:
            server = m.sender % 2
            try:
                client._on_reply(server, m)
            except ProtocolError:
                pass
    finally:
        loop.close()

