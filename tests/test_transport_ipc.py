"""Local peers over Unix-domain sockets (geomx/transport/zmq_link.py): a listener offers one next to its TCP
port, a client in the same network namespace uses it, GEOMX_LOCAL_IPC=0 keeps everything on TCP."""
from __future__ import annotations

import os
import socket
import time

import numpy as np
import pytest
import zmq

from geomx.transport import EventLoop, bind_router, connect_dealer, zmq_link
from geomx.wire import Message, MsgType

pytestmark = [pytest.mark.unit,
              pytest.mark.skipif(zmq_link._ipc_path(1) is None, reason="no network namespaces here (not Linux)")]


def exchange(ctx, local_ipc_server: bool, local_ipc_client: bool, drop_tcp: bool, timeout: float = 3.0):
    """A router and a dealer in ``ctx``; the dealer sends one message. Returns what the router got (or
    None)."""
    server = EventLoop(ctx, name="server", local_ipc=local_ipc_server)
    client = EventLoop(ctx, name="client", local_ipc=local_ipc_client)
    got = []
    try:
        router, port = bind_router(server, 0, "listener")
        server.add(router, lambda msg, origin: got.append((msg, origin.identity)), routed=True)
        if drop_tcp:
            router.sock.unbind(f"tcp://127.0.0.1:{port}")  # where bind_router binds by default
        link = connect_dealer(client, "127.0.0.1", port, b"w0", "dealer", peer="listener")
        client.add(link, lambda *a: None, routed=False)
        link.send(Message(MsgType.PUSH, sender=1, req_id=7, key=3, data=np.arange(5, dtype=np.float32)))
        deadline = time.monotonic() + timeout
        while not got and time.monotonic() < deadline:
            server.run_once(0.05)
            client.run_once(0.0)
        return port, (got[0] if got else None)
    finally:
        client.close()
        server.close()


def test_a_local_client_uses_the_unix_socket(zmq_ctx):
    # With the TCP endpoint gone, only the Unix-domain socket can carry the message.
    port, got = exchange(zmq_ctx, True, True, drop_tcp=True)
    assert got is not None, "the message did not arrive over the Unix-domain socket"
    msg, identity = got
    assert identity == b"w0" and msg.key == 3
    np.testing.assert_array_equal(msg.data, np.arange(5, dtype=np.float32))


def test_tcp_only_when_turned_off(zmq_ctx):
    # The client does not look for the socket: without TCP nothing arrives...
    _, got = exchange(zmq_ctx, True, False, drop_tcp=True, timeout=1.0)
    assert got is None
    # ...and with TCP it does.
    _, got = exchange(zmq_ctx, False, False, drop_tcp=False)
    assert got is not None and got[0].key == 3


def test_a_tcp_only_listener_removes_a_stale_socket_file(zmq_ctx):
    # A file that a killed listener left at this port would make local clients connect to nobody.
    loop = EventLoop(zmq_ctx, name="server", local_ipc=False)
    try:
        # A free port, released at once (libzmq closes its listeners later, in its I/O thread).
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("", 0))
            port = probe.getsockname()[1]
        path = zmq_link._ipc_path(port)
        assert path is not None
        # What a killed listener leaves: a socket file nobody listens on (an earlier one of this
        # port, left by another test's killed node, may be there already).
        if os.path.lexists(path):
            os.unlink(path)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
            stale.bind(path)
        assert os.path.exists(path)
        router, bound = bind_router(loop, port, "listener")
        router.close()
        assert bound == port and not os.path.exists(path)
    finally:
        loop.close()


def test_socket_directory_is_private_and_names_the_namespace():
    path = zmq_link._ipc_path(4242)
    directory = os.path.dirname(path)
    assert os.stat(directory).st_mode & 0o777 == 0o700
    assert os.path.basename(path) == f"{os.stat('/proc/self/ns/net').st_ino}-4242.sock"


def test_remote_hosts_are_not_local():
    assert zmq_link._is_local("127.0.0.1")
    assert not zmq_link._is_local("192.0.2.1")  # TEST-NET-1: never an address of this machine


def test_a_port_taken_raises_and_leaves_no_socket_open():
    # A context of its own (not the zmq_ctx fixture): that its term() returns is what this test checks.
    import threading

    ctx = zmq.Context()
    loop = EventLoop(ctx, name="server", local_ipc=False)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("", 0))
        taken.listen()
        with pytest.raises(zmq.ZMQError, match="Address already in use"):
            bind_router(loop, taken.getsockname()[1], "listener")
    loop.close()
    ender = threading.Thread(target=ctx.term, daemon=True)  # blocks while any socket is open
    ender.start()
    ender.join(10)
    try:
        assert not ender.is_alive(), "a socket of the failed listener is still open"
    finally:
        if ender.is_alive():
            for sock in list(getattr(ctx, "_sockets", ())):
                sock.close(linger=0)
