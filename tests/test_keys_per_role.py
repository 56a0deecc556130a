"""Keys per site and role (issue 15, items 1 and 2): with CURVE a party's key opens its own party's
listeners and the global tier's, never another party's nor the central party's own; a registration
is bound to the key it came with; a server takes a registered token only with the key it registered
with; and only the central party's master worker sets what it decides for everyone.

In-process cases use real listeners (a scheduler, a global server) over real CURVE sockets, driven by
the test; the last case attacks a live CURVE topology with a legitimate party's key while it trains
to the exact oracle."""
from __future__ import annotations

import logging
import re
import time
import uuid
from typing import List

import numpy as np
import pytest
import zmq
from helpers import Cluster, DrivenLoop, assert_no_process_left, server_config, slow_cmd

from geomx import security, transport, wire
from geomx.launch import Topology
from geomx.membership.scheduler import Scheduler
from geomx.transport import EventLoop, bind_router
from geomx.wire import Message, MsgType

pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="this libzmq was built without CURVE")


@pytest.fixture(autouse=True)
def _fresh_refusal_log():
    transport.log_limited._last.clear()


@pytest.fixture
def keys(tmp_path):
    """Key pairs of the central party and two parties, every public key in one allow-list."""
    for name in ("central", "party0", "party1"):
        security.generate(str(tmp_path), name)

    def of(name: str, central=None):
        return security.load(str(tmp_path / f"{name}.key_secret"), str(tmp_path), central, True)
    return of


class Listener(DrivenLoop):
    """An event loop of ``owner``'s keys in this process, and CURVE clients of other parties' keys."""

    def __init__(self, owner_keys):
        self._own_context()
        self.owner = owner_keys
        with self._closed_on_error():
            self.loop = EventLoop(self.ctx, name="listener", keys=owner_keys, local_ipc=False)

    def client(self, client_keys, port: int, identity: bytes = b"") -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.curve_publickey, sock.curve_secretkey = client_keys.public, client_keys.secret
        sock.curve_serverkey = self.owner.public
        if identity:
            sock.setsockopt(zmq.IDENTITY, identity)
        sock.connect(f"tcp://127.0.0.1:{port}")
        self.socks.append(sock)
        return sock

    def run(self, seconds: float, until=lambda: False) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end and not until():
            self.loop.run_once(0.01)



def frames(msg: Message) -> List[bytes]:
    return [bytes(f) for f in wire.encode(msg)]


@pytest.mark.unit
def test_a_party_key_opens_only_its_own_party_listeners_and_the_global_tier(keys, caplog):
    """party0's listeners (here one inside the party and one other parties reach) admit party0's own
    key on both, and party1's and the central party's only on the cross-party one."""
    caplog.set_level(logging.INFO, logger="geomx")
    listener = Listener(keys("party0", "central"))
    try:
        got = {}
        inside, inside_port = bind_router(listener.loop, 0, "party-clients", cross_party=False)
        across, across_port = bind_router(listener.loop, 0, "global-clients", cross_party=True)
        for link in (inside, across):
            listener.loop.add(link, lambda m, origin: got.setdefault((origin.link.name, origin.curve_key), m.key),
                              routed=True)
        for name in ("party0", "party1", "central"):
            for port, key in ((inside_port, 1), (across_port, 2)):
                listener.client(keys(name), port).send_multipart(frames(Message(MsgType.PUSH, key=key)))
        listener.run(5, until=lambda: len(got) == 4 and len(caplog.records) >= 2)
        # The key name each admitted message came with is what the ZAP handler admitted.
        assert got == {("party-clients", "party0"): 1, ("global-clients", "party0"): 2,
                       ("global-clients", "party1"): 2, ("global-clients", "central"): 2}
        refusals = [r.getMessage() for r in caplog.records if "REFUSED" in r.getMessage()]
        for name in ("party1", "central"):
            assert any(f"to party-clients from 127.0.0.1: its key {name} belongs to another party; only "
                       f"party0's own key opens this party's listeners" in line for line in refusals), refusals
    finally:
        listener.close()


def _register(role: str, party=None, master=False, token=None) -> Message:
    meta = {"role": role, "host": "127.0.0.1", "port": 1, "name": f"{role}-{uuid.uuid4().hex[:4]}",
            "token": token or uuid.uuid4().hex, "master": master}
    if party is not None:
        meta["party"] = party
    return Message(MsgType.REGISTER, meta=meta)


@pytest.mark.unit
def test_registrations_are_bound_to_their_keys(keys, caplog, zmq_ctx):
    """At the global scheduler: a party cannot register a global server (the central key's role), nor
    register for a party another key holds, nor hold two parties; the servers learn each client's key."""
    caplog.set_level(logging.INFO, logger="geomx")
    central = keys("central")
    sched = Scheduler("global", 0, 1, 2, heartbeat_interval=1.0, heartbeat_timeout=30.0, start_timeout=60.0,
                      max_message_bytes=1 << 20, ctx=zmq_ctx, keys=central, cross_party=True, local_ipc=False)
    listener = Listener(central)
    try:
        listener.loop.close()  # the scheduler's own loop serves; the helper only makes clients
        socks = {}
        for label, name in (("p0", "party0"), ("p1", "party1"), ("p1b", "party1"), ("p1c", "party1"),
                            ("gs", "central")):
            socks[label] = listener.client(keys(name), sched.port)
        tokens = {"p0": uuid.uuid4().hex, "p1": uuid.uuid4().hex}

        def step(label: str, msg: Message, members: int) -> None:
            """Send a REGISTER and run the scheduler until it took it or refused it (a new log line)."""
            before, logged = len(sched.members), len(caplog.records)
            socks[label].send_multipart(frames(msg))
            end = time.monotonic() + 10
            while time.monotonic() < end and len(sched.members) == before and len(caplog.records) == logged:
                sched.loop.run_once(0.01)
            assert len(sched.members) == members, [r.getMessage() for r in caplog.records]

        step("p0", _register("worker", party="10.0.0.2:9094", token=tokens["p0"]), 1)
        caplog.clear()
        step("p1", _register("server"), 1)  # party1 as a global server
        assert "only central's own key may register this tier's servers" in caplog.text
        caplog.clear()
        step("p1b", _register("worker", party="10.0.0.2:9094"), 1)  # party1 in party0's name
        assert "that party registered with the key party0" in caplog.text
        step("p1c", _register("worker", party="10.0.0.3:9094", token=tokens["p1"]), 2)
        caplog.clear()
        step("p1b", _register("worker", party="10.0.0.4:9094"), 2)  # party1 as a third party
        assert "which registered party '10.0.0.3:9094' already" in caplog.text
        step("gs", _register("server"), 3)  # the central party's global server completes the tier
        acks = []
        end = time.monotonic() + 10
        while not acks and time.monotonic() < end:
            sched.loop.run_once(0.01)
            if socks["gs"].poll(0):
                acks.append(wire.decode(socks["gs"].recv_multipart()))
        assert acks and acks[0].type == MsgType.REGISTER_ACK
        assert acks[0].meta["client_keys"] == {tokens["p0"]: "party0", tokens["p1"]: "party1"}
        assert sorted(acks[0].meta["clients"]) == sorted(tokens.values())
    finally:
        listener.close()
        sched.loop.close()


@pytest.mark.unit
def test_a_party_cannot_take_another_partys_local_server_slot(keys, caplog, zmq_ctx):
    """GEOMX_PARTY_SERVERS (the launcher sets it): before the global tier is complete, party1 (an allowed
    key) registers its one local server and then tries a second one for itself, which would have taken
    party0's slot (party0's own then failed with "more workers than the 2 expected"); and party0's key
    first names a party the variable does not know. Both refused, naming the variable; party0's
    genuine local server still takes its slot and the tier completes."""
    caplog.set_level(logging.INFO, logger="geomx")
    central = keys("central")
    sched = Scheduler("global", 0, 1, 2, heartbeat_interval=1.0, heartbeat_timeout=30.0, start_timeout=60.0,
                      max_message_bytes=1 << 20, ctx=zmq_ctx, keys=central, cross_party=True, local_ipc=False,
                      party_servers={"10.0.0.2:9094": 1, "10.0.0.3:9094": 1})
    listener = Listener(central)
    try:
        listener.loop.close()
        socks = {label: listener.client(keys(name), sched.port)
                 for label, name in (("p0", "party0"), ("p0b", "party0"), ("p1", "party1"), ("p1b", "party1"),
                                     ("gs", "central"))}

        def step(label: str, msg: Message, members: int) -> None:
            before, logged = len(sched.members), len(caplog.records)
            socks[label].send_multipart(frames(msg))
            end = time.monotonic() + 10
            while time.monotonic() < end and len(sched.members) == before and len(caplog.records) == logged:
                sched.loop.run_once(0.01)
            assert len(sched.members) == members, [r.getMessage() for r in caplog.records]

        step("p1", _register("worker", party="10.0.0.3:9094"), 1)
        caplog.clear()
        step("p1b", _register("worker", party="10.0.0.3:9094"), 1)
        assert "that party's 1 local server(s) registered already (GEOMX_PARTY_SERVERS)" in caplog.text
        caplog.clear()
        step("p0b", _register("worker", party="10.0.0.9:9094"), 1)
        assert "GEOMX_PARTY_SERVERS on the global scheduler names no such party" in caplog.text
        step("p0", _register("worker", party="10.0.0.2:9094"), 2)
        step("gs", _register("server"), 3)
        assert sched.registered
    finally:
        listener.close()
        sched.loop.close()


@pytest.fixture(scope="module")
def mxnet_module():
    return pytest.importorskip("mxnet")


TOKENS = {"party0": "a" * 32, "party1": "b" * 32, "master": "c" * 32, "central_worker": "d" * 32}


@pytest.mark.unit
def test_global_server_takes_a_token_only_with_its_key_and_master_commands_only_from_the_master(
        keys, mxnet_module):
    """A registered party that learnt another's token still cannot push or STOP in its name (its key
    does not match); a party's SET_OPTIMIZER claiming to be the master's changes nothing, and its
    SET_COMPRESSION and SYNC_MODE are refused; a central worker is not the master either."""
    from geomx.servers import GlobalServer

    central = keys("central")
    listener = Listener(central)
    try:
        cfg = server_config("global server", DMLC_NUM_ALL_WORKER="2", DMLC_ENABLE_CENTRAL_WORKER="1")
        server = GlobalServer(cfg, listener.loop)
        server.allow(server.wan_link.name, [TOKENS["party0"], TOKENS["party1"]],
                     {TOKENS["party0"]: "party0", TOKENS["party1"]: "party1"})
        server.allow(server.lan_link.name, [TOKENS["master"], TOKENS["central_worker"]],
                     {TOKENS["master"]: "central", TOKENS["central_worker"]: "central"}, TOKENS["master"])
        posing = listener.client(keys("party1"), server.wan_port, f"local_server0#{TOKENS['party0']}>0".encode())
        party1 = listener.client(keys("party1"), server.wan_port, f"local_server1#{TOKENS['party1']}>0".encode())
        worker = listener.client(central, server.lan_port, f"worker1#{TOKENS['central_worker']}>0".encode())
        master = listener.client(central, server.lan_port, f"master_worker0#{TOKENS['master']}>0".encode())
        sgd = {"name": "sgd", "params": {"learning_rate": 0.5}}

        def command(sock, req_id, **meta) -> Message:
            sock.send_multipart(frames(Message(MsgType.COMMAND, req_id=req_id, meta=meta)))
            (reply,) = listener.replies(sock, 1)
            return reply

        posed = []
        for i, msg in enumerate([Message(MsgType.INIT, key=0, numel=4, total=4, data=np.zeros(4, np.float32)),
                                 Message(MsgType.STOP)]):
            posing.send_multipart(frames(Message(msg.type, req_id=1 + i, key=msg.key, numel=msg.numel,
                                                 total=msg.total, data=msg.data)))
            posed += listener.replies(posing, 1)
        assert [r.type for r in posed] == [MsgType.ERROR, MsgType.ERROR], posed
        assert all("not a registered client of this server" in r.meta["error"] for r in posed)
        assert not server.keys and not server.stopped_clients

        # A party (and a central worker) claiming to be the master worker.
        for sock in (party1, worker):
            assert command(sock, 10, cmd="set_optimizer", spec=sgd, master=True).type == MsgType.RESPONSE
            assert server.optimizer_spec is None and server.updater is None
            for cmd, meta in (("set_gradient_compression", {"params": {"type": "fp16"}}),
                              ("sync_mode", {"sync": False})):
                reply = command(sock, 11, cmd=cmd, **meta)
                assert reply.type == MsgType.ERROR and "is the master worker's to send" in reply.meta["error"]
        assert server.compression_params is None and server.global_sync
        # The master worker itself.
        assert command(master, 20, cmd="set_gradient_compression", params={"type": "fp16"}).type == MsgType.RESPONSE
        assert command(master, 21, cmd="set_optimizer", spec=sgd).type == MsgType.RESPONSE
        assert server.optimizer_spec == sgd and server.compression_params["type"] == "fp16"
        # ... and a party still cannot replace it.
        assert command(party1, 22, cmd="set_optimizer", spec={"name": "sgd", "params": {"learning_rate": 9.0}},
                       master=True).type == MsgType.RESPONSE
        assert server.optimizer_spec == sgd
    finally:
        listener.close()


@pytest.mark.system
def test_a_party_key_cannot_reach_another_party_while_the_topology_trains(tmp_path, zmq_ctx):
    """A live CURVE topology of two parties trains to the exact oracle while a process holding party1's
    (legitimate) key connects to party0's scheduler and local server and to the global server's central
    port: each is refused by name, and nothing reaches those listeners."""
    topo = Topology(parties=2, workers_per_party=1, env={"GEOMX_START_TIMEOUT": "60"})
    topo.make_curve_keys(str(tmp_path / "keys"))
    party1 = security.load(str(tmp_path / "keys" / "party1.key_secret"), str(tmp_path / "keys"), "central", True)
    allowed = security.load_allow_list(str(tmp_path / "keys"))
    public = {name: key for key, name in allowed.items()}
    cluster = Cluster(topo, slow_cmd(12, 0.8))
    with cluster:
        log = cluster.log
        log.wait_for(r"^\[party0/worker\d\] ROUND 0 OK", 90)
        out = log.text()

        def port(pattern: str) -> int:
            return int(re.search(pattern, out, re.M).group(1))

        central_port = port(r"^\[global_server0\] .*serving \d+ party\(ies\) on port \d+ and \d+ central worker\(s\) "
                            r"on port (\d+)")
        ports = {  # listener: (port, its public key, its name, whose key alone opens it)
            "party0 scheduler": (port(r"^\[party0/scheduler\] .*listening on port (\d+)"), public["party0"],
                                 r"party@\d+-scheduler", "party0"),
            "party0 local server": (port(r"^\[party0/server\] .*serving \d+ worker\(s\) on port (\d+)"),
                                    public["party0"], "party-clients", "party0"),
            "central port": (central_port, public["central"], "central-clients", "central"),
        }
        socks = []
        try:
            for at, server_key, _, _ in ports.values():
                sock = zmq_ctx.socket(zmq.DEALER)
                socks.append(sock)
                sock.curve_publickey, sock.curve_secretkey = party1.public, party1.secret
                sock.curve_serverkey = server_key
                sock.connect(f"tcp://127.0.0.1:{at}")
                sock.send_multipart(frames(_register("worker")))
                sock.send_multipart(frames(Message(MsgType.PULL, key=2, numel=300000, total=300000)))
            for _, _, domain, owner in ports.values():
                log.wait_for(rf"REFUSED a connection to {domain} from 127\.0\.0\.1: its key party1 belongs to "
                             rf"another party; only {owner}'s own key opens this party's listeners", 20)
            assert not any(sock.poll(200) for sock in socks)  # nothing was answered
            assert "EXACT OK" not in log.text(), "training finished before the attacker came"
        finally:  # the attacker leaves while the topology trains on
            for sock in socks:
                sock.close(linger=0)
        assert cluster.wait_all(120), f"still running: {cluster.running()}"
        out = log.text()
        codes = {name: p.returncode for name, p in cluster.procs.items()}
        assert set(codes.values()) == {0}, (codes, out[-6000:])
        assert len(re.findall(r"^\[party\d/worker\d\] EXACT OK", out, re.M)) == 2
        assert_no_process_left(cluster)


@pytest.mark.unit
def test_a_second_connection_cannot_take_over_a_connected_identity(zmq_ctx):
    """A listener ignores a second connection that presents an identity already connected: the first
    keeps receiving its replies, and the second's messages are never handled (with ROUTER_HANDOVER
    the second took the first's replies)."""
    loop = EventLoop(zmq_ctx, name="listener", local_ipc=False)
    got: List[int] = []
    link, port = bind_router(loop, 0, "party-clients")
    loop.add(link, lambda m, origin: (got.append(m.key), origin.reply(Message(MsgType.RESPONSE, key=m.key))),
             routed=True)
    try:
        socks = []
        for key in (1, 2):
            sock = zmq_ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.IDENTITY, b"worker0#" + b"e" * 32 + b">0")
            sock.connect(f"tcp://127.0.0.1:{port}")
            socks.append(sock)
            sock.send_multipart(frames(Message(MsgType.PULL, key=key)))
            end = time.monotonic() + 3
            while time.monotonic() < end and len(got) < key:
                loop.run_once(0.01)
        first, second = socks
        first.send_multipart(frames(Message(MsgType.PULL, key=3)))
        end = time.monotonic() + 3
        while time.monotonic() < end and len(got) < 3:
            loop.run_once(0.01)
        assert got == [1, 3]
        replies = []
        while first.poll(500):
            replies.append(wire.decode(first.recv_multipart()).key)
        assert replies == [1, 3] and second.poll(100) == 0
    finally:
        loop.close()
