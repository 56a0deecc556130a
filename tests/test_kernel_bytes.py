"""What a link's TCP connections carried as the kernel counts it (geomx/transport/kernel_bytes.py):
each message adds exactly its ZMTP wire size (its frames' headers, and CURVE's box around each)
at both ends, and a connection that ended keeps what it carried. A real listener and a real client
(EventLoop, libzmq) over TCP on loopback."""
from __future__ import annotations

import time

import numpy as np
import pytest
from test_connguard import MAX_MESSAGE, curve_keys, listener

from geomx import connguard, metrics, wire
from geomx.transport import EventLoop, connect_dealer
from geomx.wire import Message, MsgType

pytestmark = pytest.mark.unit


def pump(loops, done, what, timeout=20.0):
    """Run both ends' event loops in turn until ``done()``."""
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        for loop in loops:
            loop.run_once(0.005)


def wire_size(msg: Message, curve: bool) -> int:
    frames = wire.encode(msg)
    return sum(connguard.frame_wire_bytes(f.nbytes if isinstance(f, memoryview) else len(f), curve) for f in frames)


@pytest.mark.parametrize("curve", [False, True], ids=["plain", "curve"])
def test_each_message_adds_its_wire_size_at_both_ends(zmq_ctx, curve):
    keys = curve_keys() if curve else None
    loop, link, port, received = listener(zmq_ctx, keys)
    client_loop = EventLoop(zmq_ctx, MAX_MESSAGE, name="test client", keys=keys, local_ipc=False)
    client = connect_dealer(client_loop, "127.0.0.1", port, b"client", "to server", peer="test server")
    loops = (loop, client_loop)

    def settled():
        """Both ends measured, and each direction's bytes sent all acknowledged as received."""
        ours, theirs = client.kernel.totals(), link.kernel.totals()
        return ours is not None and theirs is not None and ours[0] == theirs[1] and ours[1] == theirs[0]

    try:
        client.send(Message(MsgType.PULL, req_id=0, key=0))
        pump(loops, lambda: len(received) == 1 and settled(), "the handshake and the first message")
        sent0, received0 = client.kernel.totals()[0], link.kernel.totals()[1]
        geomx_sent0 = client.bytes_sent
        messages = [Message(MsgType.PUSH, req_id=i, key=i, data=np.zeros(size, np.uint8),
                            meta={"note": "x" * i} if i % 2 else None)
                    for i, size in enumerate([0, 1, 200, 255, 256, 65536, MAX_MESSAGE // 4], start=1)]
        for msg in messages:
            client.send(msg)
        pump(loops, lambda: len(received) == 1 + len(messages) and settled(), "every message")
        expected = sum(wire_size(m, curve) for m in messages)
        assert client.kernel.totals()[0] - sent0 == expected
        assert link.kernel.totals()[1] - received0 == expected
        # More than the messages themselves: the framing (and with CURVE its boxes) is counted too.
        assert expected > client.bytes_sent - geomx_sent0
        reading = metrics.to_json(metrics.link_samples([client]), {})
        assert metrics.value(reading, "geomx_link_tcp_sent_bytes_total") == client.kernel.totals()[0]
        assert metrics.value(reading, "geomx_link_sent_messages_total") == 1 + len(messages)
        assert metrics.value(metrics.to_json(metrics.link_samples([link]), {}),
                             "geomx_link_received_messages_total") == 1 + len(messages)
    finally:
        client.close()  # a client link is its owner's to close, not its loop's
        client_loop.close()
        loop.close()


def test_a_connection_that_ended_keeps_what_it_carried(zmq_ctx):
    loop, link, port, received = listener(zmq_ctx)
    first_loop = EventLoop(zmq_ctx, MAX_MESSAGE, name="first client", local_ipc=False)
    first = connect_dealer(first_loop, "127.0.0.1", port, b"first", "to server", peer="test server")
    try:
        first.send(Message(MsgType.PUSH, req_id=1, key=1, data=np.zeros(1000, np.uint8)))
        pump((loop, first_loop), lambda: len(received) == 1 and link.kernel.totals() is not None
             and link.kernel.totals()[1] == first.kernel.totals()[0], "the first client's message")
        carried = link.kernel.totals()[1]
        first.close()
        pump((loop,), lambda: not link.kernel._live, "the end of the first connection")
        assert link.kernel.totals()[1] == carried
        second_loop = EventLoop(zmq_ctx, MAX_MESSAGE, name="second client", local_ipc=False)
        second = connect_dealer(second_loop, "127.0.0.1", port, b"second", "to server", peer="test server")
        try:
            second.send(Message(MsgType.PUSH, req_id=2, key=1, data=np.zeros(1000, np.uint8)))
            pump((loop, second_loop), lambda: len(received) == 2 and second.kernel.totals() is not None
                 and link.kernel.totals()[1] == carried + second.kernel.totals()[0], "the second client's message")
        finally:
            second.close()
            second_loop.close()
    finally:
        first.close()
        first_loop.close()
        loop.close()
