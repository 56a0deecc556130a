"""P3: slicing and priority scheduling.

The exact oracle with P3 on is in test_hips_exact.py (``p3-*`` cases). Here: the pure parts
(slicing, the send queue's order over a real socket pair, the configuration) and the ordering over
an emulated slow WAN, read back from the GEOMX_P3_TRACE timelines.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import trace_rounds

from geomx import config, p3, wire
from geomx.errors import ConfigError
from geomx.kvclient import partition
from geomx.launch import free_ports
from geomx.transport import EventLoop, bind_router, connect_dealer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.unit
def test_partition_slices_each_server_part():
    # One server: fixed-size slices from 0, the last one partial.
    assert partition(5, 10, 1, 1000, slice_size=4) == [(0, 0, 4), (0, 4, 4), (0, 8, 2)]
    # Below the slice size: whole; an empty key still has one part (so its request completes).
    assert partition(5, 3, 1, 1000, slice_size=4) == [(0, 0, 3)]
    assert partition(5, 0, 1, 1000, slice_size=4) == [(0, 0, 0)]
    # Two servers, split key: each server's half is sliced on its own, slices never straddle.
    assert partition(1, 10, 2, 5, slice_size=3) == [(0, 0, 3), (0, 3, 2), (1, 5, 3), (1, 8, 2)]
    # Small key on two servers: whole server as without P3, then sliced.
    server = partition(7, 4, 2, 1000)[0][0]
    assert partition(7, 4, 2, 1000, slice_size=3) == [(server, 0, 3), (server, 3, 1)]
    for args in [(3, 1_000_003, 1, 10**6), (3, 2_000_001, 3, 10)]:
        parts = partition(*args, slice_size=40_000)
        covered = sorted((o, n) for _, o, n in parts)
        assert sum(n for _, n in covered) == args[1]
        assert all(a[0] + a[1] == b[0] for a, b in zip(covered, covered[1:]))
        assert max(n for _, n in covered) == 40_000


@pytest.mark.unit
def test_send_queue_order_over_a_real_socket(zmq_ctx):
    """The DEALER connects before its server listens, so the socket takes only its window (one
    message) and everything else waits in the queue; once the server binds, the queue must hand the
    rest over best first: key 0 and key 1 overtake the last layer's (key 9) unsent slices, the pull
    of key 9 (given a high priority) still follows key 9's pushes, and the STOP goes last although
    key 1 was queued after it."""
    loop = EventLoop(zmq_ctx, name="test")
    port = free_ports(1)[0]
    link = connect_dealer(loop, "127.0.0.1", port, b"client", "client", peer="server", send_window=1,
                          send_buffer=1 << 16)
    loop.add(link, lambda *a: None, routed=False)
    queue = p3.SendQueue(loop, link)
    got = []
    data = np.zeros(1000, dtype=np.float32)
    try:
        for i in range(6):  # the last layer, in six slices, first
            queue.put(wire.Message(wire.MsgType.PUSH, key=9, offset=1000 * i, total=6000, priority=-9, data=data))
        queue.put(wire.Message(wire.MsgType.PUSH, key=0, priority=0, data=data))
        queue.put(wire.Message(wire.MsgType.PULL, key=9, priority=5, numel=6000, total=6000))
        queue.put(wire.Message(wire.MsgType.STOP), kind=p3.CONTROL)
        queue.put(wire.Message(wire.MsgType.PUSH, key=1, priority=-1, data=data))
        assert len(queue) == 9  # one message went to the socket
        server, _ = bind_router(loop, port, "server")
        loop.add(server, lambda msg, origin: got.append((msg.type.name, msg.key, msg.offset)), routed=True)
        loop.run_until(lambda: len(got) == 10, timeout=20, what="the queued messages")
    finally:
        loop.close()
    assert got == [("PUSH", 9, 0), ("PUSH", 0, 0), ("PUSH", 1, 0)] \
        + [("PUSH", 9, 1000 * i) for i in range(1, 6)] + [("PULL", 9, 0), ("STOP", 0, 0)], got


@pytest.mark.unit
def test_config_p3_variables():
    base = {"DMLC_ROLE": "worker", "DMLC_PS_ROOT_URI": "127.0.0.1", "DMLC_PS_ROOT_PORT": "9000",
            "DMLC_NUM_SERVER": "1", "DMLC_NUM_WORKER": "1", "DMLC_NUM_ALL_WORKER": "1"}
    cfg = config.load(base)
    assert (cfg.p3.enabled, cfg.p3.slice_size, cfg.p3.window, cfg.trace) == (False, 40_000, 2, None)
    cfg = config.load({**base, "ENABLE_P3": "1", "GEOMX_P3_SLICE_SIZE": "1000", "GEOMX_P3_WINDOW": "1",
                       "GEOMX_P3_TRACE": "/tmp/x"})
    assert (cfg.p3.enabled, cfg.p3.slice_size, cfg.p3.window, cfg.trace) == (True, 1000, 1, "/tmp/x")
    for name, bad, text in [("ENABLE_P3", "maybe", "ENABLE_P3 must be 0 or 1"),
                            ("GEOMX_P3_SLICE_SIZE", "0", "GEOMX_P3_SLICE_SIZE must be >= 1"),
                            ("GEOMX_P3_WINDOW", "x", "GEOMX_P3_WINDOW must be an integer")]:
        with pytest.raises(ConfigError, match=text):
            config.load({**base, name: bad})
    with pytest.raises(ConfigError, match="ENABLE_P3 cannot be combined with MXNET_KVSTORE_USE_HFA"):
        config.load({**base, "ENABLE_P3": "1", "MXNET_KVSTORE_USE_HFA": "1"})
    gsrv = {**base, "DMLC_ROLE": "server", "DMLC_ROLE_GLOBAL": "global_server", "DMLC_PS_GLOBAL_ROOT_URI": "h",
            "DMLC_PS_GLOBAL_ROOT_PORT": "9001", "DMLC_NUM_GLOBAL_SERVER": "1", "DMLC_NUM_GLOBAL_WORKER": "1"}
    with pytest.raises(ConfigError, match="ENABLE_P3 cannot be combined with GEOMX_CHECKPOINT_DIR"):
        config.load({**gsrv, "ENABLE_P3": "1", "GEOMX_CHECKPOINT_DIR": "/tmp"})


@pytest.mark.system
def test_p3_with_dist_async_is_refused_clearly(topology_run):
    result = topology_run("hfa_async_worker.py", [], parties=1, workers_per_party=1, timeout=60,
                          env={"ENABLE_P3": "1"})
    assert result.code != 0
    assert "P3 (ENABLE_P3=1) works with dist_sync only, not dist_async" in result.output
    assert not result.lines("NOT REFUSED")


def _rounds(events, node_prefix, cat, key):
    """Per round, (first handed to the socket, last answered) over ``key``'s slices at a node."""
    return [(min(e["ts"] for e in r), max(e["ts"] for e in r), max(e["ts"] + e["dur"] for e in r))
            for r in trace_rounds(events, node_prefix, cat, key)]


@pytest.mark.system
@pytest.mark.skipif(os.geteuid() != 0, reason="the emulated WAN needs root")
@pytest.mark.parametrize("enable_p3", ["1", "0"])
def test_p3_first_layer_overtakes_last_layer_on_slow_wan(tmp_path, enable_p3):
    """One party, one worker, 20 Mbit/s WAN. Per round the worker pushes the 2 MB last layer (key 2)
    first and the small first layer (key 0) 0.2 s later. With P3 the local server's queue holds key
    2's unsent slices back and key 0 crosses the WAN first, so key 0 completes long before key 2, at
    the local server and at the worker. Without P3 (the control) key 2 is one message already on the
    wire and key 0 completes after it."""
    trace = tmp_path / "trace"
    cmd = [sys.executable, "-m", "geomx.launch", "-p", "1", "-w", "1", "--wan", "20mbit", "--timeout", "240",
           "--env", f"ENABLE_P3={enable_p3}", "--env", f"GEOMX_P3_TRACE={trace}", "--",
           sys.executable, os.path.join(ROOT, "tests", "workers", "p3_order_worker.py"), "--rounds", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "ORDER OK" in out
    events = p3.load_traces(str(trace))
    for node, cat in [("local_server", "PUSHPULL"), ("worker", "PUSH"), ("worker", "PULL")]:
        first, last = _rounds(events, node, cat, 0), _rounds(events, node, cat, 2)
        assert len(first) == len(last) == 2, (node, cat, first, last)
        for r, ((_, sent0, done0), (_, sent2, done2)) in enumerate(zip(first, last)):
            if enable_p3 == "1":
                assert done0 < done2, (node, cat, r)  # key 0 completes before key 2's last slice
                if node == "local_server":
                    # ... because it was handed to the WAN socket before key 2's last slice.
                    assert sent0 < sent2, (node, r)
            else:
                assert done0 >= done2, (node, cat, r)
                if node == "local_server":
                    assert sent0 > sent2, (node, r)
