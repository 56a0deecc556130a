"""What libzmq holds per connection of a listener (geomx/connguard.py): the measure is exact over plain
and CURVE links, a message in progress is never cut, and a message that never ends is cut once it holds
more than one largest message. A real listener (EventLoop, libzmq) and real TCP connections: a geomx
client, or a raw ZMTP socket writing what libzmq's own sockets never would."""
from __future__ import annotations

import os
import socket
import struct
import threading

import numpy as np
import pytest
import zmq
from helpers import ZMTP_HANDSHAKE, zmtp_null_dealer

from geomx import connguard, security, wire
from geomx.transport import EventLoop, bind_router, connect_dealer
from geomx.wire import Message, MsgType

pytestmark = pytest.mark.unit

MAX_MESSAGE = 1 << 20


def listener(ctx, keys=None, local_ipc=False):
    loop = EventLoop(ctx, MAX_MESSAGE, name="test server", keys=keys, local_ipc=local_ipc)
    link, port = bind_router(loop, 0, "test listener")
    received = []
    loop.add(link, lambda msg, origin: received.append(msg), routed=True)
    return loop, link, port, received


def run_until(loop, done, what, timeout=20.0):
    loop.run_until(done, timeout=timeout, what=what)


def one_connection(loop, link):
    run_until(loop, lambda: len(link.guard.connections) == 1, "the connection to be accepted")
    return next(iter(link.guard.connections))


def curve_keys():
    public, secret = zmq.curve_keypair()
    return security.CurveKeys(public=public, secret=secret, allowed={public: "party0"}, central=public)


@pytest.mark.parametrize("curve", [False, True], ids=["plain", "curve"])
def test_held_bytes_are_exact_over_plain_and_curve_links(zmq_ctx, curve):
    """After messages of every size class (0, 1- and 8-byte lengths, with and without meta), what a
    connection holds is its handshake alone: each message's wire size is counted to the byte."""
    keys = curve_keys() if curve else None
    loop, link, port, received = listener(zmq_ctx, keys)
    client_loop = EventLoop(zmq_ctx, MAX_MESSAGE, name="test client", keys=keys, local_ipc=False)
    client = connect_dealer(client_loop, "127.0.0.1", port, b"client", "to server", peer="test server")
    try:
        assert link.guard is not None and link.guard.curve == curve
        sizes = [0, 1, 200, 222, 223, 224, 255, 256, 1000, 65536, MAX_MESSAGE // 4]
        client.send(Message(MsgType.PULL, req_id=0, key=0))
        fd = one_connection(loop, link)
        run_until(loop, lambda: len(received) == 1, "the first message")
        handshake = link.guard.held(fd)
        assert 0 < handshake < 1024
        for i, size in enumerate(sizes, start=1):
            meta = {"note": "x" * i} if i % 2 else None
            client.send(Message(MsgType.PUSH, req_id=i, key=i, data=np.zeros(size, np.uint8), meta=meta))
        run_until(loop, lambda: len(received) == 1 + len(sizes), "every message")
        assert [m.req_id for m in received] == list(range(len(sizes) + 1))
        assert link.guard.held(fd) == handshake
    finally:
        client_loop.close()
        loop.close()


def frame(data: bytes, more: bool) -> bytes:
    """One ZMTP frame, its length in one byte when it fits (as libzmq writes them)."""
    if len(data) < 256:
        return bytes([0x01 if more else 0x00, len(data)]) + data
    return bytes([0x03 if more else 0x02]) + struct.pack(">Q", len(data)) + data


def test_a_message_in_progress_is_kept_and_one_that_never_ends_is_cut(zmq_ctx):
    """The largest message the listener takes, held half-sent through more checks than it takes to cut,
    is kept and then delivered; frames of a message that never ends are cut once they hold more than
    one largest message (GEOMX_MAX_MESSAGE_BYTES plus headers), and the sender sees its connection end."""
    loop, link, port, received = listener(zmq_ctx)
    guard = link.guard
    raw = zmtp_null_dealer(port)
    try:
        fd = one_connection(loop, link)
        run_until(loop, lambda: guard.held(fd) == ZMTP_HANDSHAKE, "the handshake")
        handshake = ZMTP_HANDSHAKE

        largest = [bytes(f) for f in wire.encode(Message(MsgType.PUSH, req_id=1, key=3, meta={"m": "x" * 1000},
                                                         data=np.ones(MAX_MESSAGE // 4, np.float32)))]
        wire_bytes = b"".join(frame(f, more=i < len(largest) - 1) for i, f in enumerate(largest))
        half, rest = wire_bytes[:-1000], wire_bytes[-1000:]
        raw.sendall(half)
        run_until(loop, lambda: guard.held(fd) == handshake + len(half), "the first part to arrive")
        for _ in range(connguard.STRIKES + 2):
            guard.check()
        assert guard.cut == 0 and fd in guard.connections
        raw.sendall(rest)
        run_until(loop, lambda: len(received) == 1, "the largest message")
        assert received[0].req_id == 1 and received[0].data.nbytes == MAX_MESSAGE
        assert guard.held(fd) == handshake

        chunk = frame(b"y" * MAX_MESSAGE, more=True)
        sent = 0
        while sent <= guard.limit:
            raw.sendall(chunk)
            sent += len(chunk)
        run_until(loop, lambda: guard.cut == 1, "the connection holding an unfinished message to be cut")
        assert fd not in guard.connections
        assert received[1:] == []
        greeting = b""  # the listener's ZMTP greeting and READY, then the end of the connection
        while True:
            try:
                data = raw.recv(4096)
            except ConnectionResetError:
                break
            if not data:
                break
            greeting += data
            assert len(greeting) < 4096
    finally:
        raw.close()
        loop.close()


def test_unix_domain_connections_are_not_measured(zmq_ctx):
    """Only this user's processes can open the listener's Unix-domain socket: not measured."""
    loop, link, port, received = listener(zmq_ctx, local_ipc=True)
    client_loop = EventLoop(zmq_ctx, MAX_MESSAGE, name="test client", local_ipc=True)
    client = connect_dealer(client_loop, "127.0.0.1", port, b"client", "to server", peer="test server")
    try:
        assert client.sock.getsockopt(zmq.LAST_ENDPOINT).startswith(b"ipc://")
        client.send(Message(MsgType.PULL, req_id=0, key=0))
        run_until(loop, lambda: len(received) == 1, "the message")
        assert link.guard.connections == {}
    finally:
        client_loop.close()
        loop.close()


def test_frame_wire_bytes():
    assert [connguard.frame_wire_bytes(n, False) for n in (0, 255, 256)] == [2, 257, 265]
    assert [connguard.frame_wire_bytes(n, True) for n in (0, 222, 223)] == [35, 257, 265]
    assert connguard.limit_for(MAX_MESSAGE) > MAX_MESSAGE + wire.MAX_META_BYTES


def test_a_reused_descriptor_is_not_measured():
    """A descriptor closed and reused for another connection is not the one that was accepted: it is
    neither measured nor cut."""
    guard = connguard.ConnectionGuard("t", False, 0, lambda: None, lambda: None, lambda text, key: None)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        a = socket.create_connection(server.getsockname())
        b = socket.create_connection(server.getsockname())
        first, _ = server.accept()
        second, _ = server.accept()
        fd = first.fileno()
        guard.accepted(fd)
        a.sendall(b"z")
        try:
            assert guard.held(fd) in (0, 1)  # the byte is received and still queued, or not yet here
            os.dup2(second.fileno(), fd)  # the descriptor now stands for another connection
            assert guard.held(fd) is None
            guard.check()  # limit 0: the accepted connection would be struck; the other is dropped
            assert fd not in guard.connections and guard.cut == 0
            b.sendall(b"still open")
            assert second.recv(100) == b"still open"
        finally:
            for s in (first, second, a, b):
                s.close()


def test_messages_counted_to_a_connection_that_did_not_send_them_give_it_no_credit():
    """An earlier connection's messages on a reused descriptor, counted to the new one, make it hold
    less than nothing: the count is clamped, so its next bytes count in full."""
    guard = connguard.ConnectionGuard("t", False, 0, lambda: None, lambda: None, lambda text, key: None)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
        try:
            guard.accepted(accepted.fileno())
            guard.connections[accepted.fileno()].delivered = 1000  # as if another's messages were counted
            assert guard.held(accepted.fileno()) == 0
            client.sendall(b"0123456789")
            assert accepted.recv(10, socket.MSG_WAITALL) == b"0123456789"  # read, as libzmq would
            assert guard.held(accepted.fileno()) == 10
        finally:
            client.close()
            accepted.close()


def test_a_flood_of_complete_messages_does_not_keep_an_unfinished_one_from_being_cut(zmq_ctx):
    """One connection keeps the listener busy with complete (malformed) messages, faster than they are
    read; another holds a message that never ends: that one is still cut, and the flood is not."""
    loop, link, port, received = listener(zmq_ctx)
    guard = link.guard
    flooder, holder = zmtp_null_dealer(port), zmtp_null_dealer(port)
    stop = threading.Event()
    burst = frame(b"z", more=False) * 20_000

    def flood():
        try:
            while not stop.is_set():
                flooder.sendall(burst)
        except OSError:
            pass

    thread = threading.Thread(target=flood, daemon=True)
    try:
        run_until(loop, lambda: len(guard.connections) == 2, "both connections to be accepted")
        thread.start()
        # The flood is under way before the unfinished message starts (asserted after the cut, it
        # failed once in CI at load 10: the flooding thread had barely run by then).
        run_until(loop, lambda: link.bytes_received > 100_000, "the flood to reach the listener")
        chunk = frame(b"y" * MAX_MESSAGE, more=True)
        for _ in range(guard.limit // MAX_MESSAGE + 2):
            holder.sendall(chunk)
        run_until(loop, lambda: guard.cut == 1, "the connection holding an unfinished message to be cut")
        assert holder.recv(65536) is not None  # its handshake, or the end
        assert len(guard.connections) == 1  # the flooder's: it delivers what it sends
    finally:
        stop.set()
        flooder.shutdown(socket.SHUT_RDWR)  # ends a sendall blocked on a listener that stopped reading
        thread.join(10)
        flooder.close()
        holder.close()
        loop.close()


def test_a_zmtp2_peer_is_served_without_a_connection_descriptor(zmq_ctx):
    """A ZMTP 2.0 peer's messages carry no metadata (no ZMQ_SRCFD): the listener still takes them and
    keeps serving (before, looking the descriptor up raised out of the event loop)."""
    loop, link, port, received = listener(zmq_ctx)
    old = socket.create_connection(("127.0.0.1", port), timeout=20)
    try:
        old.sendall(b"\xff" + b"\0" * 8 + b"\x7f" + b"\x01" + b"\x05")  # ZMTP 2.0 greeting, DEALER
        old.sendall(frame(b"", more=False))  # its (empty) identity
        request = [bytes(f) for f in wire.encode(Message(MsgType.PULL, req_id=5, key=1))]
        old.sendall(b"".join(frame(f, more=i < len(request) - 1) for i, f in enumerate(request)))
        run_until(loop, lambda: len(received) == 1, "the ZMTP 2.0 peer's message")
        assert received[0].req_id == 5
    finally:
        old.close()
        loop.close()
