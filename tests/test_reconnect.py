"""A client whose connection broke (a WAN outage, a reset) connects again under a new identity
(``NAME#TOKEN>0~N``) and sends what was unanswered again: servers take the new connection for the same
client and sum a numbered push once however often it arrives, clients drop a second answer, and
schedulers answer a barrier entered twice once. Real servers, clients and scheduler in the test's
process, over loopback TCP; the whole flow over a real outage is in tests/test_ssh_launch.py."""
from __future__ import annotations

import logging
import time
import uuid

import numpy as np
import pytest
import zmq
from helpers import TOKEN, InProcessServer, free_port_range, initialised

from geomx import wire
from geomx.kvclient import KVClient
from geomx.membership.scheduler import Scheduler
from geomx.transport import EventLoop, base_identity, reconnected_identity, split_identity
from geomx.wire import Message, MsgType

pytestmark = pytest.mark.unit

MASTER = f"master_worker0#{TOKEN}>0".encode()


def party(rank: int, generation: int = 0) -> bytes:
    return reconnected_identity(f"local_server{rank}#{TOKEN}>0".encode(), generation)


def send(sock, msg: Message) -> None:
    sock.send_multipart([bytes(f) for f in wire.encode(msg)])


def push(sock, req_id: int, round_: int, value: float, sender: int, mtype=MsgType.PUSHPULL) -> None:
    """Key 0 (12 elements): the party's push of round ``round_``, numbered as KVClient numbers them."""
    send(sock, Message(mtype, sender=sender, req_id=req_id, key=0, offset=0, numel=12, total=12,
                       version=round_ + 1, data=np.full(12, value, np.float32)))


def test_identities_carry_their_connection_and_name_the_same_client():
    assert reconnected_identity(b"w#t>0", 0) == b"w#t>0"
    assert reconnected_identity(b"w#t>0", 3) == b"w#t>0~3"
    assert split_identity(b"w#t>0~3") == (b"w#t>0", 3)
    assert base_identity(b"w#t>0~3") == base_identity(b"w#t>0") == b"w#t>0"
    # Not a generation: kept whole.
    assert base_identity(b"w#t>0~x") == b"w#t>0~x" and base_identity(b"~2") == b"~2"


def test_a_push_that_arrives_twice_is_summed_once_and_answered_each_time():
    """FSA, two parties, no optimizer (a round's value is the sum of its pushes). party0's reply of round
    0 is lost, it reconnects and sends the push again: it gets the round's result, nothing is added.
    In round 1 party1's push arrives over its old connection and again over a new one: the round sums
    it once and answers both."""
    srv = InProcessServer("global server")
    try:
        initialised(srv.server, keys=(0,))
        p0, p1 = srv.client(party(0), "wan"), srv.client(party(1), "wan")
        push(p0, 1, 0, 1.0, sender=0)
        push(p1, 1, 0, 2.0, sender=1)
        (r0,), (r1,) = srv.replies(p0, 1), srv.replies(p1, 1)
        assert r0.type == r1.type == MsgType.RESPONSE
        np.testing.assert_array_equal(r0.data, np.full(12, 3.0, np.float32))
        p0b = srv.client(party(0, 1), "wan")
        push(p0b, 1, 0, 1.0, sender=0)
        (again,) = srv.replies(p0b, 1)
        assert again.type == MsgType.RESPONSE and again.req_id == 1
        np.testing.assert_array_equal(again.data, np.full(12, 3.0, np.float32))
        ks = srv.server.keys[0]
        assert ks.completed == 1 and not ks.rounds
        p1b = srv.client(party(1, 1), "wan")
        push(p1, 2, 1, 4.0, sender=1)
        push(p1b, 2, 1, 4.0, sender=1)
        push(p0b, 2, 1, 8.0, sender=0)
        replies = srv.replies(p1, 1) + srv.replies(p1b, 1) + srv.replies(p0b, 1)
        assert [r.type for r in replies] == [MsgType.RESPONSE] * 3, [r.meta for r in replies]
        for r in replies:
            np.testing.assert_array_equal(r.data, np.full(12, 12.0, np.float32))
        assert ks.completed == 2
        # The two connections of a party are one client of the server.
        assert sorted(ks.pushes_by.values()) == [2, 2] and len(ks.pushes_by) == 2
    finally:
        srv.close()


def test_mixedsync_applies_a_push_that_arrives_twice_once(mxnet_module):
    """MixedSync applies each party's push on arrival (SGD, learning rate 0.5, integer values): the
    same numbered push again over a new connection is answered with the key's weights, not applied."""
    from geomx.optimizer_spec import optimizer_to_spec

    srv = InProcessServer("global server", master=True)
    try:
        initialised(srv.server, keys=(0,))
        master = srv.client(MASTER, "lan")
        for req_id, meta in ((1, {"cmd": "sync_mode", "sync": False}),
                             (2, {"cmd": "set_optimizer", "spec": optimizer_to_spec(
                                 mxnet_module.optimizer.SGD(learning_rate=0.5, rescale_grad=1.0))})):
            send(master, Message(MsgType.COMMAND, req_id=req_id, meta=meta))
            assert srv.replies(master, 1)[0].type == MsgType.RESPONSE
        start = np.arange(12, dtype=np.float32)
        p0 = srv.client(party(0), "wan")
        push(p0, 3, 0, 2.0, sender=0)
        np.testing.assert_array_equal(srv.replies(p0, 1)[0].data, start - 1.0)
        p0b = srv.client(party(0, 1), "wan")
        push(p0b, 3, 0, 2.0, sender=0)
        np.testing.assert_array_equal(srv.replies(p0b, 1)[0].data, start - 1.0)
        push(p0b, 4, 1, 2.0, sender=0)
        np.testing.assert_array_equal(srv.replies(p0b, 1)[0].data, start - 2.0)
        assert srv.server.policy.progress(srv.server.keys[0]) == 2
    finally:
        srv.close()


@pytest.fixture(scope="module")
def mxnet_module():
    return pytest.importorskip("mxnet")


def test_a_client_sends_what_was_unanswered_again_and_drops_a_second_answer(caplog, zmq_ctx):
    """KVClient.reconnect: a new connection under the next identity carries the unanswered request
    again; the server answers it twice (the request and its copy); the caller gets one answer and the
    client takes the second for a duplicate, not for a protocol error."""
    caplog.set_level(logging.DEBUG, logger="geomx")
    loop = EventLoop(zmq_ctx, name="test client", local_ipc=False)
    router = zmq_ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    try:
        client = KVClient(loop, [("127.0.0.1", port)], identity=f"local_server0#{TOKEN}", sender=0,
                          bigarray_bound=10 ** 6, wan=True, name="local_server0")
        answers = []
        client.request(MsgType.PULL, 5, 4, np.float32, lambda value, error: answers.append((value, error)))

        def received():
            end = time.monotonic() + 10
            while time.monotonic() < end:
                loop.run_once(0.01)
                if router.poll(0):
                    identity, *frames = router.recv_multipart()
                    return identity, wire.decode(frames)
            raise AssertionError("the server got nothing")

        first, request = received()
        assert first == party(0)
        client.reconnect(0, "a test")
        second, copy = received()
        assert second == party(0, 1) and copy.req_id == request.req_id and copy.key == 5
        value = np.arange(4, dtype=np.float32)
        for _ in range(2):
            router.send_multipart([second, *[bytes(f) for f in wire.encode(
                Message(MsgType.RESPONSE, req_id=request.req_id, key=5, offset=0, numel=4, total=4, data=value))]])
        end = time.monotonic() + 5
        while time.monotonic() < end and "second answer" not in caplog.text:
            loop.run_once(0.01)
        assert len(answers) == 1 and answers[0][1] is None
        np.testing.assert_array_equal(answers[0][0], value)
        assert "second answer from server 0 to request 1 (sent again); dropped" in caplog.text
        assert "reply to unknown request" not in caplog.text
    finally:
        router.close(linger=0)
        loop.close()


def test_p3_sends_what_was_unanswered_again_through_its_queue_without_blocking(zmq_ctx):
    """Under P3 a link takes a window of messages only: while the server cannot be reached (nobody
    listens yet), resending a push of 10 slices over the new link must queue them, not block the
    node's loop; once the server listens it gets each slice once, over the new connection."""
    from geomx import senders

    loop = EventLoop(zmq_ctx, name="test client", local_ipc=False)
    port = free_port_range(1)
    router = None
    try:
        via = senders.create("p3", loop, slice_size=4, window=1)
        client = KVClient(loop, [("127.0.0.1", port)], identity=f"local_server0#{TOKEN}", sender=0,
                          bigarray_bound=10 ** 6, wan=True, name="local_server0", via=via)
        client.request(MsgType.PUSH, 7, 40, np.float32, lambda value, error: None,
                       data=np.arange(40, dtype=np.float32))
        for _ in range(20):
            loop.run_once(0.01)
        started = time.monotonic()
        client.reconnect(0, "a test")
        assert time.monotonic() - started < 1.0
        router = zmq_ctx.socket(zmq.ROUTER)
        router.bind(f"tcp://127.0.0.1:{port}")
        got = []
        end = time.monotonic() + 10
        while len(got) < 10 and time.monotonic() < end:
            loop.run_once(0.01)
            while router.poll(0):
                identity, *frames = router.recv_multipart()
                got.append((identity, wire.decode(frames).offset))
        assert sorted(got) == [(party(0, 1), offset) for offset in range(0, 40, 4)]
    finally:
        if router is not None:
            router.close(linger=0)
        loop.close()


class _Peers:
    """Raw DEALERs in front of an in-process scheduler, whose loop runs while they wait for answers
    (their context is the test's ``zmq_ctx``, which ends them all)."""

    def __init__(self, sched: Scheduler, ctx: zmq.Context):
        self.sched, self.ctx, self.socks = sched, ctx, []

    def dealer(self, identity: bytes) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, identity)
        sock.connect(f"tcp://127.0.0.1:{self.sched.port}")
        self.socks.append(sock)
        return sock

    def answers(self, sock: zmq.Socket, count: int, timeout: float = 10) -> list:
        out, end = [], time.monotonic() + timeout
        while len(out) < count and time.monotonic() < end:
            self.sched.loop.run_once(0.01)
            while sock.poll(0):
                out.append(wire.decode(sock.recv_multipart()))
        return out

    def close(self) -> None:
        for sock in self.socks:
            sock.close(linger=0)
        self.sched.loop.close()


def test_a_scheduler_follows_a_reconnected_member_and_lets_a_barrier_through_once(zmq_ctx):
    """A member's messages over a new connection: the scheduler answers there from then on; the barrier
    it entered before the break, entered again, is answered at once and no new barrier starts."""
    sched = Scheduler("party", 0, 1, 1, heartbeat_interval=1.0, heartbeat_timeout=30.0, start_timeout=60.0,
                      max_message_bytes=1 << 20, ctx=zmq_ctx, local_ipc=False)
    peers = _Peers(sched, zmq_ctx)
    dealer, answers = peers.dealer, peers.answers
    try:
        server, worker = dealer(b"local_server@party#1-aa"), dealer(b"worker@party#2-bb")
        send(server, Message(MsgType.REGISTER, meta={"role": "server", "host": "127.0.0.1", "port": 1, "name": "ls"}))
        send(worker, Message(MsgType.REGISTER, meta={"role": "worker", "host": "127.0.0.1", "port": 0, "name": "w"}))
        assert [m.type for m in answers(server, 1) + answers(worker, 1)] == [MsgType.REGISTER_ACK] * 2
        for sock in (server, worker):
            send(sock, Message(MsgType.BARRIER, meta={"group": "all", "n": 0}))
        assert [m.meta["n"] for m in answers(server, 1) + answers(worker, 1)] == [0, 0]
        # The worker's acknowledgement was lost with its connection: it enters barrier 0 again.
        again = dealer(b"worker@party#2-bb~1")
        send(again, Message(MsgType.BARRIER, meta={"group": "all", "n": 0}))
        (ack,) = answers(again, 1)
        assert ack.type == MsgType.BARRIER_ACK and ack.meta["n"] == 0
        assert sched.members[b"worker@party#2-bb"].identity == b"worker@party#2-bb~1"
        assert not sched.barriers["all"]
        # The next barrier is answered over the new connection only.
        send(again, Message(MsgType.BARRIER, meta={"group": "all", "n": 1}))
        send(server, Message(MsgType.BARRIER, meta={"group": "all", "n": 1}))
        (ack,) = answers(again, 1)
        assert ack.meta["n"] == 1 and not answers(worker, 1, timeout=0.5)
        # A late message over the old connection does not take the member back there.
        member = sched.members[b"worker@party#2-bb"]
        seen = member.last_seen
        send(worker, Message(MsgType.HEARTBEAT))
        end = time.monotonic() + 10
        while member.last_seen == seen and time.monotonic() < end:
            sched.loop.run_once(0.01)
        assert member.last_seen > seen and member.identity == b"worker@party#2-bb~1"
    finally:
        peers.close()


def test_a_restarted_scheduler_learns_the_tier_back_and_keeps_a_lost_partys_slot_for_its_rejoin(zmq_ctx):
    """GEOMX_SCHEDULER_RESUME: the global server and party p0's local server come back with their ranks
    (the server naming party p1, lost before, with rank 1); the tier goes on once they are back (p1's
    kept slot counts), a second node claiming a held rank is refused, and a fresh local server of p1
    then rejoins into rank 1, acknowledged only after the server admitted its token."""
    sched = Scheduler("global tier", 0, 1, 2, heartbeat_interval=1.0, heartbeat_timeout=30.0, start_timeout=60.0,
                      max_message_bytes=1 << 20, ctx=zmq_ctx, local_ipc=False, lost_party="continue", resume=True)
    peers = _Peers(sched, zmq_ctx)
    dealer, answers = peers.dealer, peers.answers

    def register(sock, role, party=None, resume=None):
        meta = {"role": role, "host": "127.0.0.1", "port": 1, "name": role, "token": uuid.uuid4().hex}
        meta.update({"party": party} if party else {})
        meta.update({"resume": resume} if resume is not None else {})
        send(sock, Message(MsgType.REGISTER, meta=meta))
        return meta["token"]

    try:
        server = dealer(b"global_server@global#1-aa~1")
        register(server, "server", resume={"rank": 0, "barriers": 2, "left": [[1, "p1", None]]})
        answers(server, 1, timeout=0.3)
        assert not sched.registered and sched.members[b"left:p1#1"].left
        p0 = dealer(b"local_server@global#2-bb~3")
        register(p0, "worker", party="p0", resume={"rank": 0, "barriers": 0})
        assert [m.type for m in answers(p0, 1)] == [MsgType.REGISTER_ACK]
        assert sched.registered and sched.members[b"global_server@global#1-aa"].barriers_passed == 2
        assert sched.lost_party_names == {"p1"}
        (ack,) = answers(server, 1)
        assert ack.type == MsgType.REGISTER_ACK and ack.meta["num_parties"] == 2
        # Nobody else can come back as the local server of rank 0.
        intruder = dealer(b"local_server@global#9-zz~1")
        register(intruder, "worker", party="p0", resume={"rank": 0})
        (refused,) = answers(intruder, 1)
        assert refused.type == MsgType.PEER_DEAD and "whole tier is back already" in refused.meta["reason"]
        assert b"local_server@global#9-zz" not in sched.members
        # p1's site started again: its new local server takes rank 1 once the server admits it.
        fresh = dealer(b"local_server@global#3-cc")
        token = register(fresh, "worker", party="p1")
        (update,) = answers(server, 1)
        assert update.meta["joined"]["token"] == token and update.meta["joined"]["rank"] == 1
        assert token in update.meta["clients"] and not answers(fresh, 1, timeout=0.3)
        send(server, Message(MsgType.ADMITTED, meta={"token": token}))
        (ack,) = answers(fresh, 1)
        assert ack.type == MsgType.REGISTER_ACK and ack.meta["rank"] == 1 and not sched.lost_party_names
    finally:
        peers.close()
