"""Every message reaches its handler with its own Origin (geomx/transport/identity.py): the link it came
by, the peer's identity on a listener, and ``reply`` answers that peer over that link, however the
messages of several peers interleave in one turn of the loop."""
from __future__ import annotations

import gc
import time
from typing import List

import pytest
import zmq

from geomx.transport import EventLoop, Link, Origin, bind_router, connect_dealer
from geomx.wire import Message, MsgType

pytestmark = pytest.mark.unit


def test_each_message_carries_its_own_origin_and_reply_reaches_that_peer(zmq_ctx):
    server = EventLoop(zmq_ctx, name="server", local_ipc=False)
    client = EventLoop(zmq_ctx, name="client", local_ipc=False)
    seen: List[Origin] = []
    answers: dict = {}
    try:
        router, port = bind_router(server, 0, "listener")

        def on_request(msg: Message, origin: Origin) -> None:
            seen.append(origin)
            origin.reply(Message(MsgType.RESPONSE, req_id=msg.req_id, key=msg.key))

        server.add(router, on_request, routed=True)
        links = {}
        for name in (b"peer-a", b"peer-b"):
            link = connect_dealer(client, "127.0.0.1", port, name, name.decode(), peer="listener")
            client.add(link, lambda msg, origin: answers.setdefault(origin.link.name, []).append((msg.key, origin)),
                       routed=False)
            links[name] = link
        for i in range(3):  # interleaved: both peers' requests wait on the listener together
            for key, name in enumerate(links):
                links[name].send(Message(MsgType.PUSH, req_id=i + 1, key=key))
        deadline = time.monotonic() + 5.0
        while sum(len(v) for v in answers.values()) < 6 and time.monotonic() < deadline:
            server.run_once(0.02)
            client.run_once(0.02)
        assert [o.identity for o in seen].count(b"peer-a") == 3 and [o.identity for o in seen].count(b"peer-b") == 3
        assert all(o.link is router and o.curve_key is None for o in seen)  # no keys: no CURVE key name
        assert seen[0].label in ("peer-a", "peer-b")
        # Each reply went to the peer that asked (peer-a sent key 0, peer-b key 1).
        assert sorted(k for k, _ in answers["peer-a"]) == [0, 0, 0]
        assert sorted(k for k, _ in answers["peer-b"]) == [1, 1, 1]
        # A client link's one peer is its server: no identity, the link itself.
        _, origin = answers["peer-a"][0]
        assert origin.identity is None and origin.link is links[b"peer-a"]
        assert origin.label == "?"
    finally:
        client.close()
        server.close()


def test_an_origin_is_immutable_and_the_link_keeps_no_sender(zmq_ctx):
    origin = Origin(link=None, identity=b"w0#" + b"a" * 32 + b">0", curve_key="party0")  # type: ignore[arg-type]
    with pytest.raises(AttributeError):
        origin.curve_key = "party1"  # type: ignore[misc]
    assert origin.label == "w0#aaaaaa...>0"  # the token cut to 6 digits (peer_label)
    link = Link(zmq_ctx.socket(zmq.DEALER), "x")
    assert not hasattr(link, "sender_key")  # who sent a message travels with it, never on the link
    link.close()


def test_loops_made_one_after_another_each_get_their_own_wake_socket(zmq_ctx):
    """A closed loop's inproc wake endpoint stays bound until ZeroMQ's reaper thread has closed its
    socket, and CPython often gives a new loop the memory (so the id()) of the one just freed. A wake
    address made from id() was once refused with 'Address already in use' (CI, the fuzz tests): a closed
    name can be refused for a moment after its socket closed, so no two loops of a process may share one."""
    addresses = set()
    for _ in range(100):
        loop = EventLoop(zmq_ctx, name="short-lived")
        addresses.add(loop._wake_addr)
        loop.close()
        del loop
        gc.collect()  # the loop refers to itself (its metrics' collectors): freed by the collector
    assert len(addresses) == 100
