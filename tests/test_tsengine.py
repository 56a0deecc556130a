"""TSEngine: the pure policy (injected throughput tables, seeded RNGs), the coordinator's decisions,
the node protocol over real ZeroMQ sockets, and refusals of combinations that cannot work."""
from __future__ import annotations

import collections
import random

import numpy as np
import pytest
import zmq

from geomx import config, wire
from geomx.errors import ConfigError, ProtocolError
from geomx.transport import EventLoop, bind_router
from geomx.tsengine.coordinator import Coordinator
from geomx.tsengine.keys import LinkKeys, keys_meta, link_key
from geomx.tsengine.peer import TSPeer
from geomx.tsengine.policy import ROOT, Session, ThroughputTable, choose_receiver, orient
from geomx.wire import Message, MsgType

SECRET = b"5" * 32  # a tier's secret, from which its scheduler derives the link keys (geomx/tsengine/keys.py)


def node_keys(node, nodes):
    """``node``'s link keys in a tier of ``nodes``, as its scheduler hands them out (via the wire's JSON)."""
    return LinkKeys.from_meta(wire.decode(wire.encode(Message(MsgType.REGISTER_ACK, meta=keys_meta(
        SECRET, node, nodes)))).meta)


def table_of(rates):
    t = ThroughputTable()
    for (src, dst), rate in rates.items():
        t.record(src, dst, rate)
    return t


# -- policy ---------------------------------------------------------------------------------------

@pytest.mark.unit
def test_throughput_table_is_a_moving_average_and_ignores_broken_measurements():
    t = ThroughputTable(alpha=0.25)
    assert t.get(0, 1) is None and t.uplink(0) is None
    t.record(0, 1, 100.0)
    t.record(0, 1, 200.0)
    assert t.get(0, 1) == 0.25 * 200 + 0.75 * 100
    for broken in (0.0, -5.0, float("inf"), float("nan")):
        t.record(0, 1, broken)
    assert t.get(0, 1) == 125.0
    t.record(0, 2, 75.0)
    assert t.uplink(0) == (125.0 + 75.0) / 2
    assert t.get(1, 0) is None  # directions are separate
    with pytest.raises(ValueError):
        ThroughputTable(alpha=0)


@pytest.mark.unit
def test_greedy_choice_takes_the_fastest_measured_link():
    t = table_of({(ROOT, 0): 10.0, (ROOT, 1): 300.0, (ROOT, 2): 50.0, (1, 0): 999.0})
    rng = random.Random(1)
    # All links from the root known, rate 1: always greedy, always the fastest.
    assert {choose_receiver(ROOT, [0, 1, 2], t, 1.0, rng) for _ in range(50)} == {1}
    # Among the ones not yet served.
    assert {choose_receiver(ROOT, [0, 2], t, 1.0, rng) for _ in range(50)} == {2}


@pytest.mark.unit
def test_greed_rate_zero_explores_uniformly():
    t = table_of({(ROOT, 0): 10.0, (ROOT, 1): 300.0, (ROOT, 2): 50.0})
    rng = random.Random(7)
    picks = collections.Counter(choose_receiver(ROOT, [0, 1, 2], t, 0.0, rng) for _ in range(3000))
    assert set(picks) == {0, 1, 2}
    for node in (0, 1, 2):  # uniform: about 1000 each
        assert 850 < picks[node] < 1150, picks


@pytest.mark.unit
def test_greedy_probability_is_capped_by_what_is_known():
    # One of four candidates measured (and it is the fastest): greedy with probability 1/4 only, so
    # the known node is picked 1/4 + 3/4 * 1/4 = 7/16 of the time (float division, not the
    # original's integer division, which made it 0).
    t = table_of({(ROOT, 3): 1e9})
    rng = random.Random(3)
    picks = collections.Counter(choose_receiver(ROOT, [0, 1, 2, 3], t, 0.9, rng) for _ in range(4000))
    assert abs(picks[3] / 4000 - 7 / 16) < 0.04, picks
    # The cap: everything known, rate 0.9 -> greedy 0.9 + 0.1 / 4 of the time.
    t = table_of({(ROOT, n): r for n, r in [(0, 1.0), (1, 2.0), (2, 3.0), (3, 4.0)]})
    picks = collections.Counter(choose_receiver(ROOT, [0, 1, 2, 3], t, 0.9, rng) for _ in range(4000))
    assert abs(picks[3] / 4000 - (0.9 + 0.1 / 4)) < 0.03, picks


@pytest.mark.unit
def test_orient_sends_toward_the_root_and_the_faster_uplink():
    t = ThroughputTable()
    assert orient(ROOT, 4, t) == (4, ROOT)
    assert orient(4, ROOT, t) == (4, ROOT)
    assert orient(1, 2, t) == (1, 2)  # nothing known: the earlier asker sends
    # Node 1 sends slowly (its uplink is slow): it is the leaf, 2 receives and forwards the sum.
    t = table_of({(1, ROOT): 10.0, (2, ROOT): 100.0})
    assert orient(1, 2, t) == (1, 2)
    assert orient(2, 1, t) == (1, 2)
    # Equal uplinks (both average 50): the faster direction between the two.
    t = table_of({(1, 2): 5.0, (1, ROOT): 95.0, (2, 1): 50.0, (2, ROOT): 50.0})
    assert orient(1, 2, t) == (2, 1)


@pytest.mark.unit
def test_session_pairs_ready_nodes_into_a_tree_that_ends_at_the_root():
    t = table_of({(0, ROOT): 100.0, (1, ROOT): 10.0, (2, ROOT): 100.0, (3, ROOT): 100.0})
    s = Session([0, 1, 2, 3])
    assert s.ask_push(0, t) == [(0, ROOT)]  # the root waits in the queue from the start
    assert s.ask_push(1, t) == []
    assert s.ask_push(2, t) == [(1, 2)]  # the slow uplink sends, the fast one forwards
    assert s.ask_push(ROOT, t) == []  # the root received 0's sum and waits for more
    assert s.ask_push(3, t) == [(3, ROOT)]
    assert s.ask_push(ROOT, t) == []
    with pytest.raises(ValueError):
        s.ask_push(ROOT, t)  # the root is already waiting
    assert s.ask_push(2, t) == [(2, ROOT)]  # 2 holds 1's and its own


@pytest.mark.unit
def test_session_relay_serves_everyone_once_and_then_finishes():
    s = Session([0, 1, 2])
    t = ThroughputTable()
    rng = random.Random(0)
    first = s.next_receiver(ROOT, t, 0.9, rng)
    second = s.next_receiver(first, t, 0.9, rng)
    third = s.next_receiver(ROOT, t, 0.9, rng)
    assert sorted([first, second, third]) == [0, 1, 2]
    assert not s.finished
    for holder in (ROOT, first, second, third):
        assert s.next_receiver(holder, t, 0.9, rng) is None
    assert s.finished


# -- coordinator --------------------------------------------------------------------------------

class Recorder:
    def __init__(self):
        self.sent = []

    def __call__(self, node, msg):
        self.sent.append((node, msg))

    def pop(self):
        out, self.sent = self.sent, []
        return out


def coordinator(greed, seed=0, workers=4):
    rec = Recorder()
    addresses = {ROOT: ("10.0.0.1", 9000), **{w: (f"10.0.1.{w}", 9100 + w) for w in range(workers)}}
    return Coordinator("test tier", addresses, rec, greed, rng=random.Random(seed)), rec


def relay_order(coord, rec, key=0, rnd=0):
    """Run a whole relay of (key, round) in which each holder asks in turn (a breadth-first order),
    reporting a fixed throughput of 1 byte/s for each hop; returns the (sender, receiver) hops."""
    hops, holders = [], collections.deque([(ROOT, None)])
    while holders:
        node, last = holders.popleft()
        meta = None if last is None else {"to": last, "bytes_per_s": 1.0}
        coord.handle(Message(MsgType.TS_ASK_RELAY, key=key, version=rnd, meta=meta), node)
        [(to_node, answer)] = rec.pop()
        assert to_node == node and answer.type == MsgType.TS_RELAY_TO
        target = (answer.meta or {}).get("rank")
        if target is not None:
            assert (answer.meta["host"], answer.meta["port"]) == coord.addresses[target]
            hops.append((node, target))
            holders.append((node, target))
            holders.append((target, None))
    assert (key, rnd) not in coord.sessions  # finished and forgotten
    return hops


@pytest.mark.unit
def test_relay_prefers_fast_links_from_an_injected_table():
    coord, rec = coordinator(greed=1.0)
    # Party 3 sits behind a slow link: everyone reaches it slowly. Fast links to 0, 1, 2.
    for src in (ROOT, 0, 1, 2, 3):
        for dst, rate in ((0, 9e8), (1, 8e8), (2, 7e8), (3, 1e6)):
            if src != dst:
                coord.table.record(src, dst, rate)
    coord.table.alpha = 1e-9  # keep the injected table as it is despite the 1 byte/s reports
    hops = relay_order(coord, rec)
    assert hops[0] == (ROOT, 0)  # the fastest link first
    assert [dst for _, dst in hops][-1] == 3  # the slow party is served last, by one hop ...
    assert all(src != 3 for src, _ in hops)  # ... and never relays (off the critical path)


@pytest.mark.unit
def test_relay_with_greed_rate_zero_explores():
    firsts = collections.Counter()
    for seed in range(200):
        coord, rec = coordinator(greed=0.0, seed=seed)
        for dst, rate in ((0, 9e8), (1, 8e8), (2, 7e8), (3, 1e6)):
            coord.table.record(ROOT, dst, rate)
        firsts[relay_order(coord, rec)[0][1]] += 1
    assert set(firsts) == {0, 1, 2, 3}  # the slow party is tried too: its link gets measured
    assert max(firsts.values()) < 100, firsts


@pytest.mark.unit
def test_relay_reports_update_the_table():
    coord, rec = coordinator(greed=0.9)
    relay_order(coord, rec)
    # Every hop's report (1 byte/s) is in the table: one measured link per served node.
    assert sorted(v for v in coord.table.snapshot().values()) == [1.0] * 4


@pytest.mark.unit
def test_coordinator_pairs_pushes_and_rejects_bad_questions():
    coord, rec = coordinator(greed=0.9)
    coord.handle(Message(MsgType.TS_ASK_PUSH, key=5, version=2), 1)
    [(node, answer)] = rec.pop()
    assert node == 1 and answer.type == MsgType.TS_PUSH_TO and answer.meta["rank"] == ROOT
    assert (answer.key, answer.version) == (5, 2)
    with pytest.raises(ProtocolError):
        coord.handle(Message(MsgType.TS_ASK_PUSH, key=5, version=2), 9)  # not a node of the tier
    with pytest.raises(ProtocolError):
        coord.handle(Message(MsgType.TS_ASK_RELAY, key=5, version=2), 2)  # 2 was never sent the model
    with pytest.raises(ProtocolError):
        coord.handle(Message(MsgType.TS_REPORT, key=5, version=2, meta={"to": 77, "bytes_per_s": 1.0}), 2)
    with pytest.raises(ProtocolError):
        coord.handle(Message(MsgType.TS_REPORT, key=5, version=2, meta={"to": "x", "bytes_per_s": 1.0}), 2)
    coord.handle(Message(MsgType.TS_ASK_PUSH, key=5, version=2), 2)  # still serving after bad questions
    coord.handle(Message(MsgType.TS_ASK_PUSH, key=5, version=2), 3)
    [(node, answer)] = rec.pop()
    assert node == 2 and answer.meta["rank"] == 3


# -- the node protocol over real sockets (one process, one event loop) ---------------------------

class SumOwner:
    """A minimal server/worker behind a TSPeer: the root sums partial sums and starts the relay when
    ``expected`` pushes are in; the others keep the model they are sent."""

    def __init__(self, expected=0):
        self.expected = expected
        self.peer = None
        self.sums = {}
        self.models = {}

    def ts_check(self, kind, key, rnd, data):
        return None

    def ts_merged(self, key, rnd, data, count):
        acc, n = self.sums.get((key, rnd), (np.zeros(data.size, np.float32), 0))
        acc, n = acc + data, n + count
        self.sums[(key, rnd)] = (acc, n)
        if n == self.expected:
            self.peer.relay(key, rnd, acc)
            return True
        return False

    def ts_model(self, key, rnd, data):
        self.models[(key, rnd)] = np.array(data)


def via_wire(msg):
    return wire.decode(wire.encode(msg))


@pytest.mark.unit
def test_tree_and_relay_over_sockets_give_the_exact_sum_to_every_node(zmq_ctx):
    loop = EventLoop(zmq_ctx, name="test")
    workers = 5
    owners = {ROOT: SumOwner(expected=workers), **{w: SumOwner() for w in range(workers)}}
    addresses, peers = {}, {}
    failures = []
    decisions = []
    coord = None

    def deliver(node, msg):
        if msg.type == MsgType.TS_PUSH_TO:
            decisions.append((msg.key, msg.version, node, msg.meta["rank"]))
        loop.call_later(0, lambda: peers[node].on_answer(via_wire(msg)))

    for node, owner in owners.items():
        link, port = bind_router(loop, 0, f"ts-{node}")
        addresses[node] = ("127.0.0.1", port)

        def ask(msg, node=node):
            loop.call_later(0, lambda: coord.handle(via_wire(msg), node))

        peers[node] = owner.peer = TSPeer(loop, node, f"node{node}", owner, ask, failures.append, wan=True,
                                          keys=node_keys(node, list(owners)))
        loop.add(link, peers[node].handle, routed=True)
    coord = Coordinator("test tier", addresses, deliver, 0.9, rng=random.Random(5))
    # Node 2 sends slowly: it should hand its sum to a peer rather than receive one.
    for w in range(workers):
        coord.table.record(w, ROOT, 1.0 if w == 2 else 1e9)
    try:
        keys = {0: 7, 1: 1000}
        for rnd in range(3):
            for w in range(workers):  # all ready together: 0 -> root, then pairs among the others
                for key, n in keys.items():
                    push = ((np.arange(n) % 11) - 5 + key) * (w + 1) * (rnd + 1)
                    peers[w].contribute(key, rnd, push.astype(np.float32), np.float32)
            done = [(k, rnd) for k in keys]
            loop.run_until(lambda: all(d in owners[w].models for w in range(workers) for d in done)  # noqa: B023
                           or bool(failures), timeout=30, what="the relay")
            assert not failures, failures
            for key, n in keys.items():
                expected = ((np.arange(n) % 11) - 5 + key) * (rnd + 1) * sum(range(1, workers + 1))
                for w in range(workers):
                    assert np.array_equal(owners[w].models[(key, rnd)], expected.astype(np.float32))
        # A node holding a result that others wait for is not idle (it must not leave yet: a local
        # server whose workers are done keeps relaying to the other parties first).
        went_idle = []
        for node, p in peers.items():
            p.when_idle(lambda node=node: went_idle.append(node))
        loop.run_until(lambda: not coord.sessions and all(p.idle for p in peers.values()),
                       timeout=10, what="the relays to finish")
        assert sorted(went_idle) == sorted(peers)
        # All ready together in round 0 (before anything was measured): 0 goes to the root, then
        # pairs among the others, the slow node 2 sending rather than receiving.
        for key in keys:
            first = [(s, r) for k, rnd, s, r in decisions if (k, rnd) == (key, 0)]
            assert first[:3] == [(0, ROOT), (2, 1), (3, 4)], first
            assert all(r != 2 for _, r in first), first
        # Every link used was measured (wall clock, bytes per second).
        assert coord.table.snapshot() and all(v > 0 for v in coord.table.snapshot().values())
    finally:
        loop.close()
        for p in peers.values():
            p.close()


@pytest.mark.unit
def test_a_refused_hop_ends_the_sender_with_the_reason(zmq_ctx):
    loop = EventLoop(zmq_ctx, name="test")

    class Refusing(SumOwner):
        def ts_check(self, kind, key, rnd, data):
            return "this party is not waiting for key 0 round 0"

    failures = []
    link, port = bind_router(loop, 0, "ts-0")
    receiver = TSPeer(loop, 0, "node0", Refusing(), lambda m: None, failures.append, wan=True,
                      keys=node_keys(0, [ROOT, 0]))
    loop.add(link, receiver.handle, routed=True)
    sender = TSPeer(loop, ROOT, "root", SumOwner(), lambda m: None, failures.append, wan=True,
                    keys=node_keys(ROOT, [ROOT, 0]))
    try:
        sender.models[(0, 0)] = np.ones(4, np.float32)
        sender.on_answer(Message(MsgType.TS_RELAY_TO, key=0, version=0,
                                 meta={"rank": 0, "host": "127.0.0.1", "port": port}))
        loop.run_until(lambda: bool(failures), timeout=10, what="the refusal")
        assert "refused TS_MODEL of key 0 round 0: this party is not waiting" in str(failures[0])
    finally:
        loop.close()
        sender.close()


@pytest.mark.unit
def test_neither_a_stranger_nor_another_node_of_the_tier_can_send_as_a_node(zmq_ctx):
    """A TS_MERGE or TS_MODEL is taken only from a link that carries the key of the link from the node
    it names (``sender``) to this node. A stranger (a made-up key, none, or a node of another tier)
    and a registered node of the same tier posing as another (its own key, another's node id: with one
    secret per tier this was taken) get a TS_ACK that says why, and reach neither the partial sums nor
    the owner; node 9's own hop is taken."""
    loop = EventLoop(zmq_ctx, name="test")
    failures = []
    owner = SumOwner()
    link, port = bind_router(loop, 0, "ts-0")
    nodes = [ROOT, 0, 5, 9]
    receiver = TSPeer(loop, 0, "node0", owner, lambda m: None, failures.append, wan=True, keys=node_keys(0, nodes))
    loop.add(link, receiver.handle, routed=True)
    cases = {"stranger": "f" * 32, "no key": None, "another tier": link_key(b"6" * 32, 9, 0),
             "node 5 posing as 9": link_key(SECRET, 5, 0), "9's key to another node": link_key(SECRET, 9, 5),
             "node 9": link_key(SECRET, 9, 0)}
    try:
        acks = {}
        for who, key in cases.items():
            sock = zmq_ctx.socket(zmq.DEALER)
            tail = "" if key is None else f"#{key}"
            sock.setsockopt(zmq.IDENTITY, f"worker9-ts9{tail}>127.0.0.1:{port}".encode())
            sock.connect(f"tcp://127.0.0.1:{port}")
            sock.send_multipart([bytes(f) for f in wire.encode(Message(
                MsgType.TS_MODEL, sender=9, req_id=1, key=0, version=0, total=4, data=np.ones(4, np.float32)))])
            loop.run_until(lambda: sock.poll(0), timeout=10, what=f"the {who}'s TS_ACK")  # noqa: B023
            acks[who] = wire.decode(sock.recv_multipart())
            sock.close(linger=0)
            if who != "node 9":
                assert not owner.models, who  # nothing taken before the genuine hop
        for who in cases:
            if who != "node 9":
                assert acks[who].type == MsgType.TS_ACK
                assert "not from TSEngine node 9 of this tier" in acks[who].meta["error"], (who, acks[who])
        assert acks["node 9"].type == MsgType.TS_ACK and acks["node 9"].meta is None
        assert list(owner.models) == [(0, 0)] and not failures
    finally:
        loop.close()
        receiver.close()


@pytest.mark.unit
def test_each_node_holds_only_the_keys_of_its_own_links():
    """A node can send as itself and check its senders, but holds no key of a link between two other
    nodes; malformed keys from the network are refused, naming what."""
    nodes = [ROOT, 0, 1, 2]
    keys = {n: node_keys(n, nodes) for n in nodes}
    for n in nodes:
        others = sorted(m for m in nodes if m != n)
        assert sorted(keys[n].to) == others and sorted(keys[n].from_) == others
        for m in others:
            assert keys[n].to[m] == keys[m].from_[n]  # what n sends with is what m expects from n
    held = {k for n in (0,) for k in (*keys[n].to.values(), *keys[n].from_.values())}
    between_others = {link_key(SECRET, a, b) for a in nodes for b in nodes if a != b and 0 not in (a, b)}
    assert not held & between_others
    assert len({k for n in nodes for k in keys[n].to.values()}) == len(nodes) * (len(nodes) - 1)
    with pytest.raises(ProtocolError, match="malformed TSEngine link keys"):
        LinkKeys.from_meta({"to": {"x": "0" * 32}, "from": {}})
    assert LinkKeys.from_meta({}) == LinkKeys()


# -- configuration and refusals -------------------------------------------------------------------

def server_env(**extra):
    env = {"DMLC_ROLE": "server", "DMLC_PS_ROOT_URI": "127.0.0.1", "DMLC_PS_ROOT_PORT": "9000",
           "DMLC_NUM_SERVER": "1", "DMLC_NUM_WORKER": "2", "DMLC_PS_GLOBAL_ROOT_URI": "127.0.0.1",
           "DMLC_PS_GLOBAL_ROOT_PORT": "9001", "DMLC_NUM_GLOBAL_SERVER": "1", "DMLC_NUM_GLOBAL_WORKER": "2"}
    env.update(extra)
    return env


@pytest.mark.unit
def test_config_reads_the_tsengine_variables():
    cfg = config.load(server_env(ENABLE_INTER_TS="1", ENABLE_INTRA_TS="1", MAX_GREED_RATE_TS="0"))
    assert cfg.tsengine.inter and cfg.tsengine.intra and cfg.tsengine.max_greed_rate == 0.0
    assert config.load(server_env()).tsengine.max_greed_rate == 0.9
    # A worker never takes part across parties, whatever its environment says.
    worker = {"DMLC_ROLE": "worker", "DMLC_PS_ROOT_URI": "127.0.0.1", "DMLC_PS_ROOT_PORT": "9000",
              "DMLC_NUM_SERVER": "1", "DMLC_NUM_WORKER": "2", "DMLC_NUM_ALL_WORKER": "4", "ENABLE_INTER_TS": "1"}
    assert not config.load(worker).tsengine.inter


@pytest.mark.unit
@pytest.mark.parametrize("extra, message", [
    ({"MAX_GREED_RATE_TS": "1.5"}, "MAX_GREED_RATE_TS must be in [0, 1]"),
    ({"MAX_GREED_RATE_TS": "greedy"}, "MAX_GREED_RATE_TS must be a number"),
    ({"ENABLE_INTER_TS": "yes please"}, "ENABLE_INTER_TS must be 0 or 1"),
    ({"ENABLE_INTER_TS": "1", "DMLC_NUM_GLOBAL_SERVER": "2"}, "ENABLE_INTER_TS=1 needs DMLC_NUM_GLOBAL_SERVER=1"),
    ({"ENABLE_INTER_TS": "1", "MXNET_KVSTORE_USE_HFA": "1"}, "cannot be combined with MXNET_KVSTORE_USE_HFA"),
    ({"ENABLE_INTER_TS": "1", "GEOMX_USE_ESYNC": "1"}, "cannot be combined with GEOMX_USE_ESYNC"),
    ({"ENABLE_INTER_TS": "1", "DMLC_NUM_SERVER": "2"}, "ENABLE_INTER_TS=1 needs one local server per party"),
    ({"ENABLE_INTER_TS": "1", "GEOMX_CHECKPOINT_DIR": "/tmp", "DMLC_ROLE_GLOBAL": "global_server",
      "DMLC_NUM_ALL_WORKER": "2"}, "cannot be combined with GEOMX_CHECKPOINT_DIR"),
    ({"ENABLE_INTRA_TS": "1", "DMLC_NUM_SERVER": "2"}, "ENABLE_INTRA_TS=1 needs one local server per party"),
])
def test_config_refuses_what_cannot_work(extra, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        config.load(server_env(**extra))


@pytest.mark.system
def test_inter_ts_on_some_servers_only_fails_the_tier_at_start(topology_run):
    result = topology_run("exact_worker.py", ["--slice", "{slice}", "--rounds", "1"], parties=2,
                          workers_per_party=1, timeout=60, node_env={"party1/server": {"ENABLE_INTER_TS": "1"}})
    assert result.code != 0
    assert result.lines("ENABLE_INTER_TS=1 is set on local_server but not on"), result.output[-3000:]


@pytest.mark.system
@pytest.mark.parametrize("what, message", [
    ("bsc", "bsc cannot be combined with ENABLE_INTER_TS=1"),
    ("async", "ENABLE_INTER_TS=1 works with dist_sync only"),
])
def test_inter_ts_refuses_codecs_and_mixedsync_at_start(topology_run, what, message):
    result = topology_run("ts_refusal_worker.py", [what], parties=1, workers_per_party=1, timeout=60,
                          env={"ENABLE_INTER_TS": "1"})
    assert result.code != 0
    assert result.lines(message), result.output[-3000:]
    assert not result.lines("NOT REFUSED")


@pytest.mark.system
def test_membership_does_not_import_tsengine():
    """TSEngine plugs into the scheduler (geomx/tsengine/tier.py) instead of being imported by it."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", "import sys, geomx.membership; "
                          "print(sorted(m for m in sys.modules if m.startswith('geomx.tsengine')))"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
