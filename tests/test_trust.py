"""Zero-trust hardening (issue 15): what a hostile or broken peer sends is refused with a reply that
says why, nothing it sends makes the others wait forever or grow without bound, and training stays
exact. The network cases attack real processes over real sockets (tests/test_faults.py's Cluster)."""
from __future__ import annotations

import re
import sys
import time
from typing import List

import numpy as np
import pytest
import zmq
from test_faults import Cluster, assert_no_process_left

from geomx import transport, wire
from geomx.errors import ProtocolError
from geomx.launch import Topology
from geomx.servers.keystate import KeyState
from geomx.wire import Message, MsgType

REPO_WORKERS = "tests/workers"


@pytest.fixture(autouse=True)
def _fresh_refusal_log():
    # Refusals are logged once per 5 s per peer and kind in a process; each test expects its own.
    transport.log_limited._last.clear()


def raw_request(mtype: MsgType, meta_json: bytes, *, req_id: int = 1, key: int = 0,
                data: np.ndarray = None) -> List[bytes]:
    """A request whose meta frame is the given bytes, as a hostile peer writes them (json.dumps would
    not write NaN into a geomx message)."""
    frames = [bytes(f) for f in wire.encode(Message(mtype, req_id=req_id, key=key, data=data, meta={}))]
    frames[1] = meta_json
    return frames


# -- 1. numbers are finite ------------------------------------------------------------------------

@pytest.mark.parametrize("text, field", [
    (b'{"esync_seconds":Infinity}', "'esync_seconds' is inf"),
    (b'{"esync_seconds":-Infinity}', "'esync_seconds' is -inf"),
    (b'{"esync_seconds":NaN}', "'esync_seconds' is nan"),
    (b'{"esync_seconds":1e999}', "'esync_seconds' is inf"),
    (b'{"spec":{"params":{"learning_rate":[1,-1e400]}}}', "'spec'['params']['learning_rate'][1] is -inf"),
    (b'{"rank":9223372036854775808}', "'rank' is an integer outside the signed 64-bit range"),
])
def test_decode_refuses_non_finite_and_out_of_range_numbers(text, field):
    frames = raw_request(MsgType.PUSHPULL, text, req_id=7, key=3, data=np.ones(2, np.float32))
    with pytest.raises(wire.MetaError, match=re.escape(field)) as info:
        wire.decode(frames)
    # The header is sound: the receiver can answer the request it belongs to.
    assert (info.value.request.type, info.value.request.req_id, info.value.request.key) == (MsgType.PUSHPULL, 7, 3)
    # The largest and smallest int64 are fine.
    assert wire.decode(raw_request(MsgType.PULL, b'{"a":[9223372036854775807,-9223372036854775808]}')).meta


def test_encode_refuses_non_finite_numbers_naming_them():
    with pytest.raises(ProtocolError, match=r"PUSHPULL: meta holds a number that is not finite .*'esync_seconds'"):
        wire.encode(Message(MsgType.PUSHPULL, meta={"esync_steps": 1, "esync_seconds": float("inf")}))


def test_a_failing_reply_does_not_leave_the_other_waiters_of_a_round_unanswered():
    ks = KeyState(0, 3, np.dtype(np.float32))
    ks.initialized = True
    answered = []

    def broken(value):
        raise ZeroDivisionError("float division by zero")

    ks.add_push("a", np.ones(3, np.float32), broken, want_value=True)
    ks.add_push("b", np.ones(3, np.float32), lambda v: answered.append(("b", v)), want_value=True)
    ks.park_pull("c", lambda v: answered.append(("c", v)))
    ks.finish_round(0, np.full(3, 2, np.float32))
    assert [name for name, _ in answered] == ["b", "c"]
    assert all(np.array_equal(v, [2, 2, 2]) for _, v in answered)


def _port(cluster: Cluster, pattern: str) -> int:
    return int(re.search(pattern, cluster.log.text(), re.M).group(1))


def test_esync_timings_that_are_not_finite_are_refused_while_training_stays_exact():
    """The issue's case: a party (or a stranger at the global server's party port) reports an ESync
    timing of Infinity. Before the fix the speed 0 it gave made the global server divide by zero while
    answering a finished round, whose other waiters then waited forever. Every such push is refused
    with an ERROR naming the field; the parties' models stay identical every round."""
    topo = Topology(parties=2, workers_per_party=1, env={"GEOMX_USE_ESYNC": "1", "GEOMX_START_TIMEOUT": "60"})
    rounds = 6
    cluster = Cluster(topo, [sys.executable, f"{REPO_WORKERS}/esync_worker.py", "--slice", "{slice}", "--rounds",
                             str(rounds), "--step-sleep", "0.3"])
    attacks = {
        b'{"esync_steps":1,"esync_seconds":Infinity}': "'esync_seconds' is inf, not a finite number",
        b'{"esync_steps":1,"esync_seconds":1e999}': "'esync_seconds' is inf, not a finite number",
        b'{"esync_steps":1,"esync_seconds":NaN}': "'esync_seconds' is nan, not a finite number",
        b'{"esync_steps":1,"esync_seconds":0}': "'esync_seconds' is 0.0, must be in [1e-06, 3.1536e+07]",
        b'{"esync_steps":1,"esync_seconds":1e-300}': "'esync_seconds' is 1e-300, must be in",
        b'{"esync_steps":0,"esync_seconds":1}': "'esync_steps' is 0, must be in [1, 64]",
        b'{"esync_steps":1,"esync_seconds":-5}': "'esync_seconds' is -5.0, must be in",
    }
    with cluster:
        log = cluster.log
        log.wait_for(r"^\[party\d/worker0\] ESYNC round 0 ", 120)
        wan_port = _port(cluster, r"^\[global_server0\] .*serving \d+ party\(ies\) on port (\d+)")
        ctx = zmq.Context()
        try:
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.IDENTITY, b"attacker>0")
            sock.connect(f"tcp://127.0.0.1:{wan_port}")
            model = np.ones(24, np.float32)  # key 0 is (4, 6) float32, as the workers push it
            for i, text in enumerate(attacks):
                sock.send_multipart(raw_request(MsgType.PUSHPULL, text, req_id=100 + i, key=0, data=model))
            replies = {}
            end = time.monotonic() + 30
            while len(replies) < len(attacks) and sock.poll(max(1, int((end - time.monotonic()) * 1000))):
                reply = wire.decode(sock.recv_multipart())
                replies[reply.req_id] = reply
        finally:
            ctx.destroy(linger=0)
        assert f"ESYNC round {rounds - 1}" not in log.text(), "training finished before the attack"
        for i, needle in enumerate(attacks.values()):
            reply = replies.get(100 + i)
            assert reply is not None and reply.type == MsgType.ERROR, (i, reply)
            assert needle in reply.meta["error"], (needle, reply.meta["error"])
        assert cluster.wait_all(150), f"still running: {cluster.running()}\n{log.text()[-4000:]}"
        out = log.text()
        codes = {name: p.returncode for name, p in cluster.procs.items()}
        assert set(codes.values()) == {0}, (codes, out[-6000:])
        models = {}
        for m in re.finditer(r"ESYNC round (\d+) party (\d+) steps \d+ model (\w+)", out):
            models.setdefault(int(m.group(1)), set()).add((int(m.group(2)), m.group(3)))
        assert sorted(models) == list(range(rounds)), out[-4000:]
        for rnd, entries in models.items():
            assert len(entries) == 2 and len({model for _, model in entries}) == 1, (rnd, entries)
        assert "Traceback" not in out and "cannot answer" not in out, out[-6000:]
        assert_no_process_left(cluster)

