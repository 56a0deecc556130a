"""What libzmq holds per connection of a listener (geomx/connguard.py): the measure is exact over plain
and CURVE links, a message in progress is never cut, and a message that never ends is cut once it holds
more than one largest message. A real listener (EventLoop, libzmq) and real TCP connections: a geomx
client, or a raw ZMTP socket writing what libzmq's own sockets never would."""
from __future__ import annotations

import os
import socket
import struct

import numpy as np
import pytest
import zmq

from geomx import connguard, security, wire
from geomx.transport import EventLoop, bind_router, connect_dealer
from geomx.wire import Message, MsgType

pytestmark = pytest.mark.unit

MAX_MESSAGE = 1 << 20


@pytest.fixture
def ctx():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def listener(ctx, keys=None, local_ipc=False):
    loop = EventLoop(ctx, MAX_MESSAGE, name="test server", keys=keys, local_ipc=local_ipc)
    link, port = bind_router(loop, 0, "test listener")
    received = []
    loop.add(link, lambda msg, identity, _link: received.append(msg), routed=True)
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
def test_held_bytes_are_exact_over_plain_and_curve_links(ctx, curve):
    """After messages of every size class (0, 1- and 8-byte lengths, with and without meta), what a
    connection holds is its handshake alone: each message's wire size is counted to the byte."""
    keys = curve_keys() if curve else None
    loop, link, port, received = listener(ctx, keys)
    client_loop = EventLoop(ctx, MAX_MESSAGE, name="test client", keys=keys, local_ipc=False)
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


def zmtp_dealer(port: int) -> socket.socket:
    """A raw ZMTP 3.0 connection (NULL mechanism, DEALER)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=20)
    s.sendall(b"\xff" + b"\0" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\0") + b"\0" * 32)
    body = b"\x05READY" + bytes([11]) + b"Socket-Type" + struct.pack(">I", 6) + b"DEALER"
    s.sendall(b"\x04" + bytes([len(body)]) + body)
    return s


def frame(data: bytes, more: bool) -> bytes:
    """One ZMTP frame, its length in one byte when it fits (as libzmq writes them)."""
    if len(data) < 256:
        return bytes([0x01 if more else 0x00, len(data)]) + data
    return bytes([0x03 if more else 0x02]) + struct.pack(">Q", len(data)) + data


def test_a_message_in_progress_is_kept_and_one_that_never_ends_is_cut(ctx):
    """The largest message the listener takes, held half-sent through more checks than it takes to cut,
    is kept and then delivered; frames of a message that never ends are cut once they hold more than
    one largest message (GEOMX_MAX_MESSAGE_BYTES plus headers), and the sender sees its connection end."""
    loop, link, port, received = listener(ctx)
    guard = link.guard
    raw = zmtp_dealer(port)
    try:
        fd = one_connection(loop, link)
        run_until(loop, lambda: guard.held(fd) is not None and guard.held(fd) > 0, "the handshake")
        handshake = guard.held(fd)

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


def test_unix_domain_connections_are_not_measured(ctx):
    """Only this user's processes can open the listener's Unix-domain socket: not measured."""
    loop, link, port, received = listener(ctx, local_ipc=True)
    client_loop = EventLoop(ctx, MAX_MESSAGE, name="test client", local_ipc=True)
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
    guard = connguard.ConnectionGuard("t", False, 0, lambda: True, lambda text, key: None)
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
