"""Client senders by name (geomx/senders.py): the registry, the choice from a node's configuration,
and what each sender does with a message on a real socket pair (the exact-oracle topologies with
P3 and DGT run them end to end)."""
from __future__ import annotations

import numpy as np
import pytest

from geomx import config, senders, wire
from geomx.launch import free_ports
from geomx.p3 import CONTROL, DATA
from geomx.transport import EventLoop, bind_router, connect_dealer

pytestmark = pytest.mark.unit


class _FakeDgt:
    """Records what DgtSender hands to DGT (the real geomx.dgt.Sender is tested in test_dgt.py)."""

    def __init__(self):
        self.peers, self.sent, self.relinked = [], [], []

    def attach(self, links, hosts):
        self.peers.extend(links)

    def relink(self, server, link, port):
        self.peers[server] = link
        self.relinked.append(server)

    def send(self, server, msg):
        self.sent.append((server, msg.type.name))


def test_registry_and_choice_from_the_configuration(zmq_ctx):
    loop = EventLoop(zmq_ctx, name="test")
    try:
        assert set(senders.SENDERS) == {"zmq", "p3", "dgt"}
        with pytest.raises(ValueError, match="unknown sender 'udp'; senders: dgt, p3, zmq"):
            senders.create("udp", loop)
        base = {"DMLC_ROLE": "worker", "DMLC_PS_ROOT_URI": "127.0.0.1", "DMLC_PS_ROOT_PORT": "9000",
                "DMLC_NUM_SERVER": "1", "DMLC_NUM_WORKER": "1", "DMLC_NUM_ALL_WORKER": "1"}
        plain = config.load(base)
        assert senders.for_node(plain, loop).name == "zmq" and senders.for_node(plain, loop).slice_size == 0
        p3cfg = config.load({**base, "ENABLE_P3": "1", "GEOMX_P3_SLICE_SIZE": "1000", "GEOMX_P3_WINDOW": "3"})
        p3 = senders.for_node(p3cfg, loop)
        assert (p3.name, p3.slice_size, p3.link_options()) == ("p3", 1000, {"send_window": 3, "send_buffer": 1 << 16})
        assert senders.for_node(plain, loop, dgt=_FakeDgt()).name == "dgt"
    finally:
        loop.close()


def test_each_sender_delivers_over_a_real_socket(zmq_ctx):
    """zmq sends in order at once; p3 reorders by priority (data before control); dgt gives data-path
    messages to DGT and control messages to the socket, and follows a server's link made anew; on_sent
    runs for every data message."""
    loop = EventLoop(zmq_ctx, name="test")
    port = free_ports(1)[0]
    server, _ = bind_router(loop, port, "server")
    got = []
    loop.add(server, lambda msg, origin: got.append((msg.type.name, msg.key)), routed=True)
    data = np.zeros(10, dtype=np.float32)
    try:
        for name, options in (("zmq", {}), ("p3", {"slice_size": 10, "window": 8})):
            got.clear()
            s = senders.create(name, loop, **options)
            link = connect_dealer(loop, "127.0.0.1", port, name.encode(), name, peer="server", **s.link_options())
            loop.add(link, lambda *a: None, routed=False)
            s.attach(0, link, ("127.0.0.1", port))
            sent: list = []
            s.send(0, wire.Message(wire.MsgType.PUSH, key=3, priority=-3, data=data), DATA,
                   lambda _, s=sent: s.append(3))
            s.send(0, wire.Message(wire.MsgType.PUSH, key=1, priority=-1, data=data), DATA,
                   lambda _, s=sent: s.append(1))
            s.send(0, wire.Message(wire.MsgType.STOP), CONTROL)
            loop.run_until(lambda: len(got) == 3, timeout=20, what=f"{name}'s messages")
            assert got == [("PUSH", 3), ("PUSH", 1), ("STOP", 0)] and sorted(sent) == [1, 3], (name, got)
            s.close()
        fake = _FakeDgt()
        s = senders.create("dgt", loop, dgt=fake)
        link = connect_dealer(loop, "127.0.0.1", port, b"dgt", "dgt", peer="server")
        loop.add(link, lambda *a: None, routed=False)
        s.attach(0, link, ("127.0.0.1", port))
        with pytest.raises(RuntimeError, match="out of order"):
            s.attach(2, link, ("127.0.0.1", port))
        # Server 0's link made anew (a reconnection): DGT keeps its state and sends over the new link.
        again = connect_dealer(loop, "127.0.0.1", port, b"dgt~1", "dgt", peer="server")
        loop.add(again, lambda *a: None, routed=False)
        s.attach(0, again, ("127.0.0.1", port))
        assert fake.relinked == [0] and fake.peers == [again] and s.links[0] is again
        got.clear()
        s.send(0, wire.Message(wire.MsgType.PUSHPULL, key=2, data=data), DATA)
        s.send(0, wire.Message(wire.MsgType.STOP), CONTROL)
        loop.run_until(lambda: len(got) == 1, timeout=20, what="dgt's control message")
        assert fake.sent == [(0, "PUSHPULL")] and got == [("STOP", 0)]
    finally:
        loop.close()
