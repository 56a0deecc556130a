"""Cut-through rounds (issue 32): the global servers ask their clients, in each INIT reply, to cut a
dense FSA key's pushes and pulls into slices of GEOMX_WAN_SLICE_BYTES; each slice is a round of its
own, answered as soon as every party's copy of it is in, so results travel down the WAN while later
slices still travel up.

The exact oracles run with it on (test_hips_exact.py: key 2, 300k float32, goes up in 16 slices,
cut inside each global server's part with two of them); here: which keys the servers slice and
which they keep whole, how a client reads the request, pulls that slice differently from the
pushers, and on an emulated 20 Mbit/s WAN the timeline that shows both directions busy at once.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
from helpers import TOKEN, InProcessServer, server_config, trace_rounds

from geomx import p3, senders, wire
from geomx.errors import ConfigError
from geomx.kvclient import KVClient
from geomx.servers.keystate import KeyState
from geomx.transport import EventLoop
from geomx.wire import Message, MsgType

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MASTER = f"master_worker0#{TOKEN}>0".encode()
PARTIES = [f"local_server{i}#{TOKEN}>0".encode() for i in range(2)]


def _send(sock, msg: Message) -> None:
    sock.send_multipart([bytes(f) for f in wire.encode(msg)])


def _keys(server, sizes):
    for key, (numel, dtype) in sizes.items():
        ks = server.keys[key] = KeyState(key, numel, np.dtype(dtype))
        ks.store = np.arange(numel).astype(dtype)
        ks.initialized = True


def _init_meta(srv, sock, key, numel, dtype, req_id):
    _send(sock, Message(MsgType.INIT, req_id=req_id, key=key, offset=0, numel=numel, total=numel,
                        dtype=wire.dtype_code(np.dtype(dtype))))
    (reply,) = srv.replies(sock, 1)
    assert reply.type == MsgType.RESPONSE, reply.meta
    return reply.meta or {}


SIZES = {0: (100_000, np.float32), 1: (100_000, np.float16), 2: (16_384, np.float32), 3: (16_385, np.float32)}


@pytest.mark.unit
@pytest.mark.parametrize("env, sync, want", [
    # 64 KiB by default: 16384 float32 or 32768 float16; a key of one slice or less stays whole.
    ({}, True, {0: 16_384, 1: 32_768, 2: None, 3: 16_384}),
    ({"GEOMX_WAN_SLICE_BYTES": "400000"}, True, {0: None, 1: None, 2: None, 3: None}),
    # At most P3Slices.MAX_SLICES (16) slices per key: 100,000 elements go in slices of 6250.
    ({"GEOMX_WAN_SLICE_BYTES": "8192"}, True, {0: 6250, 1: 6250, 2: 2048, 3: 2048}),
    ({"GEOMX_WAN_SLICE_BYTES": "0"}, True, {0: None, 1: None, 2: None, 3: None}),
    # MixedSync applies each party's whole aggregate on arrival; HFA and ESync average whole models.
    ({}, False, {0: None, 1: None, 2: None, 3: None}),
    ({"MXNET_KVSTORE_USE_HFA": "1"}, True, {0: None, 1: None, 2: None, 3: None}),
    ({"GEOMX_USE_ESYNC": "1"}, True, {0: None, 1: None, 2: None, 3: None}),
    # DGT sends pushes as blocks of whole keys; TSEngine relays whole rounds.
    ({"ENABLE_DGT": "2"}, True, {0: None, 1: None, 2: None, 3: None}),
    ({"ENABLE_INTER_TS": "1"}, True, {0: None, 1: None, 2: None, 3: None}),
])
def test_the_global_server_asks_for_slices_of_dense_fsa_keys_only(env, sync, want):
    srv = InProcessServer("global server", master=True, **env)
    try:
        _keys(srv.server, SIZES)
        master, party = srv.client(MASTER, "lan"), srv.client(PARTIES[0], "wan")
        if not sync:
            _send(master, Message(MsgType.COMMAND, req_id=1, meta={"cmd": "sync_mode", "sync": False}))
            assert srv.replies(master, 1)[0].type == MsgType.RESPONSE
        got = {k: _init_meta(srv, party, k, n, dt, 10 + k).get("slice") for k, (n, dt) in SIZES.items()}
        assert got == want
        # The central party's clients are asked alike (central workers push into the same rounds).
        assert _init_meta(srv, master, 0, *SIZES[0], 20).get("slice") == want[0]
    finally:
        srv.close()


@pytest.mark.unit
def test_a_checkpointing_global_server_keeps_keys_whole(tmp_path):
    srv = InProcessServer("global server", master=True, GEOMX_CHECKPOINT_DIR=str(tmp_path))
    try:
        _keys(srv.server, SIZES)
        assert "slice" not in _init_meta(srv, srv.client(PARTIES[0], "wan"), 0, *SIZES[0], 1)
    finally:
        srv.close()


@pytest.mark.unit
@pytest.mark.parametrize("value, error", [("-1", "must be >= 0"), ("1000", "0 (whole keys) or at least 4096"),
                                          ("x", "must be an integer")])
def test_a_bad_slice_size_names_the_variable(value, error):
    with pytest.raises(ConfigError, match=f"GEOMX_WAN_SLICE_BYTES.*{re.escape(error)}"):
        server_config("global server", GEOMX_WAN_SLICE_BYTES=value)


@pytest.mark.unit
def test_a_client_slices_dense_data_path_requests_as_its_servers_asked():
    import zmq
    ctx = zmq.Context()
    loop = EventLoop(ctx, name="t", local_ipc=False)
    try:
        plain = KVClient(loop, [("127.0.0.1", 9)], identity="a", sender=0, bigarray_bound=10 ** 6, wan=True,
                         name="a")
        reply = Message(MsgType.RESPONSE, key=7, meta={"slice": 4096, "round": 0})
        plain._track_rounds(0, reply, Message(MsgType.INIT, key=7))
        for bad in (True, 10, "4096", -5):  # not an int, or below KVClient.MIN_SLICE: ignored
            plain._track_rounds(0, Message(MsgType.RESPONSE, key=8, meta={"slice": bad}), Message(MsgType.INIT, key=8))
        assert plain.slices == {7: 4096}
        assert [plain.slice_size(t, 7, encoded=False) for t in (MsgType.PUSH, MsgType.PULL, MsgType.PUSHPULL)] \
            == [4096] * 3
        assert plain.slice_size(MsgType.INIT, 7, encoded=False) == 0
        assert plain.slice_size(MsgType.PUSHPULL, 7, encoded=True) == 0  # a codec's payload goes whole
        assert plain.slice_size(MsgType.PUSHPULL, 8, encoded=False) == 0
        # P3's own slices win (GEOMX_P3_SLICE_SIZE is set alike on every local server).
        prio = KVClient(loop, [("127.0.0.1", 9)], identity="b", sender=0, bigarray_bound=10 ** 6, wan=True,
                        name="b", via=senders.create("p3", loop, slice_size=1000, window=2))
        prio._track_rounds(0, reply, Message(MsgType.INIT, key=7))
        assert prio.slice_size(MsgType.PUSHPULL, 7, encoded=True) == 1000
        assert [p[1:] for p in prio.parts(7, 2500, prio.slice_size(MsgType.PUSH, 7, False))] \
            == [(0, 1000), (1000, 1000), (2000, 500)]
    finally:
        loop.close()
        ctx.destroy(linger=0)


@pytest.mark.unit
def test_a_client_that_only_pulls_may_slice_differently_from_the_parties_that_push():
    """P3 parties push 4096-element slices (GEOMX_P3_SLICE_SIZE); the master worker, without P3,
    pulls in the 16384-element slices the server asked for: it reads the parties' sums, assembled."""
    srv = InProcessServer("global server", master=True)
    try:
        numel = 40_000
        _keys(srv.server, {0: (numel, np.float32)})
        master = srv.client(MASTER, "lan")
        parties = [srv.client(identity, "wan") for identity in PARTIES]
        pushes = [(np.arange(numel) % 7).astype(np.float32), (np.arange(numel) % 5).astype(np.float32)]
        for i, (sock, data) in enumerate(zip(parties, pushes)):
            for start in range(0, numel, 4096):
                n = min(4096, numel - start)
                _send(sock, Message(MsgType.PUSH, req_id=100 + start, key=0, offset=start, numel=n, total=numel,
                                    data=data[start:start + n], sender=i))
        for sock in parties:
            assert {r.type for r in srv.replies(sock, len(range(0, numel, 4096)))} == {MsgType.RESPONSE}
        got = np.empty(numel, np.float32)
        for j, start in enumerate(range(0, numel, 16_384)):
            n = min(16_384, numel - start)
            _send(master, Message(MsgType.PULL, req_id=j + 1, key=0, offset=start, numel=n, total=numel))
            (reply,) = srv.replies(master, 1)
            assert reply.type == MsgType.RESPONSE, reply.meta
            got[start:start + n] = reply.data
        np.testing.assert_array_equal(got, pushes[0] + pushes[1])  # no optimizer: the round's sum
        assert sorted(srv.server.keys[0].slices) == list(range(0, numel, 4096))
    finally:
        srv.close()


def _slice_events(events, key):
    """Per round at the local server: [(sent, answered, offset)] of ``key``'s PUSHPULL messages."""
    return [[(e["ts"] / 1e6, (e["ts"] + e["dur"]) / 1e6, e["args"]["offset"]) for e in r]
            for r in trace_rounds(events, "local_server", "PUSHPULL", key)]


@pytest.mark.system
@pytest.mark.skipif(os.geteuid() != 0, reason="the emulated WAN needs root")
@pytest.mark.parametrize("slice_bytes", ["65536", "0"])
def test_results_stream_down_the_wan_while_later_slices_still_go_up(tmp_path, slice_bytes):
    """One party, one worker, a 20 Mbit/s WAN; per round a 2 MB key (500k float32) goes up and its
    result comes down (exact values: tests/workers/p3_order_worker.py). By default the local server
    sends it in 16 slices (at most 16 per key, each at least 64 KiB), and the first slice's result is
    back within a third of the time the key takes to go up (0.8 s at 20 Mbit/s): the link carried
    results down while it still carried the key up. With GEOMX_WAN_SLICE_BYTES=0 (the control) the key
    goes whole, up then down."""
    trace = tmp_path / "trace"
    cmd = [sys.executable, "-m", "geomx.launch", "-p", "1", "-w", "1", "--wan", "20mbit", "--timeout", "240",
           "--env", f"GEOMX_WAN_SLICE_BYTES={slice_bytes}", "--env", f"GEOMX_P3_TRACE={trace}", "--",
           sys.executable, os.path.join(ROOT, "tests", "workers", "p3_order_worker.py"), "--rounds", "2",
           "--backward-s", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "ORDER OK" in out  # every pulled value exact
    rounds = _slice_events(p3.load_traces(str(trace)), 2)
    assert len(rounds) == 2, rounds
    up = 500_000 * 4 * 8 / 20e6  # seconds for the key to cross the link once
    for r in rounds:
        if slice_bytes == "0":
            assert [o for _, _, o in r] == [0]
            continue
        assert [o for _, _, o in r] == list(range(0, 500_000, 31_250))  # 16 slices (MAX_SLICES)
        start = min(s for s, _, _ in r)
        first_back = r[0][1] - start
        last_back = max(d for _, d, _ in r) - start
        # The first result came down while the rest of the key was still going up ...
        assert first_back < up / 3, (first_back, up)
        # ... and the rest followed, at the pace of the key going up.
        assert last_back > up * 0.8, (last_back, up)
