"""Fault tests on real processes (127.0.0.1): hostile messages sent to a training topology, and
SIGKILLed workers and servers that the others must detect through heartbeats and report."""
from __future__ import annotations

import functools
import re
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import numpy as np
import pytest
import zmq
from helpers import (
    FAST_HEARTBEATS,
    Cluster,
    LineLog,
    assert_no_process_left,
    header,
    rss_bytes,
    slow_cmd,
)

from geomx import wire
from geomx.launch import Topology, run
from geomx.wire import Flag, Message, MsgType

pytestmark = pytest.mark.system

# -- (a) hostile messages to a live topology ------------------------------------------------------

def hostile_messages() -> Dict[str, List[bytes]]:
    """name -> frames; each is refused by wire.decode or by the receiving node."""
    hostile_header = functools.partial(header, req_id=1)  # as the hostile peer writes them

    def push(req_id: int, key: int, data: np.ndarray) -> List[bytes]:
        return [bytes(f) for f in wire.encode(Message(MsgType.PUSH, req_id=req_id, key=key, data=data))]

    return {
        "truncated header": [hostile_header()[:10]],
        "bad magic": [hostile_header(magic=b"EVIL")],
        "wrong frame count": [hostile_header(flags=int(Flag.HAS_META)), b"{}", b"extra"],
        "unknown type": [header(mtype=99)],
        "data length mismatch": [hostile_header(dtype=1, flags=int(Flag.HAS_DATA), key=0, numel=10, total=10),
                                 b"\0" * 7],
        "oversized meta": [hostile_header(flags=int(Flag.HAS_META)),
                           b'{"a":"' + b"x" * (wire.MAX_META_BYTES + 10) + b'"}'],
        "nested meta": [hostile_header(flags=int(Flag.HAS_META)), b"[" * 200_000],
        "non-object meta": [hostile_header(flags=int(Flag.HAS_META)), b"[1,2,3]"],
        "bad slice": [hostile_header(offset=5, numel=10, total=12)],
        # Well-formed, but wrong for the keys the workers use (key 1 has 7 float32, key 0 has 12): the
        # server refuses them with an ERROR reply and must not fold them into a round.
        "wrong size push": push(1, 1, np.ones(5, np.float32)),
        "wrong dtype push": push(2, 0, np.ones(12, np.float64)),
        "unknown key push": push(3, 987654, np.arange(10, dtype=np.float32)),  # the last one sent
    }


# What each hostile message must leave in the receiver's log.
EXPECTED_LOG = {
    "truncated header": "header is 10 bytes",
    "bad magic": "bad magic",
    "wrong frame count": "3 frames, header announces 2",
    "unknown type": "unknown message type 99",
    "data length mismatch": "data frame is 7 bytes",
    "oversized meta": "exceeds 1048576",
    "nested meta": "nested too deeply",
    "non-object meta": "must be a JSON object",
    "bad slice": "bad slice",
}


def send_raw_garbage(port: int) -> None:
    rng = np.random.default_rng(7)
    for size in (1, 10, 64, 4096, 1 << 16):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            try:
                s.sendall(rng.bytes(size))
                s.settimeout(0.3)
                s.recv(100)
            except OSError:
                pass  # the peer may close on us: that is the point
    # A connection that says nothing and goes away, and a zero-length-frame greeting prefix.
    socket.create_connection(("127.0.0.1", port), timeout=5).close()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"\xff" + b"\0" * 8 + b"\x7f" + b"\x03\x00" + b"NULL" + b"\0" * 16)


def send_hostile(ctx: zmq.Context, port: int, tag: str, wait: float) -> List[Message]:
    """Send every hostile message from one DEALER; return the replies that came back within ``wait``
    seconds (stopping early at the answer to the PUSH for the unknown key)."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, f"fuzz-{tag}".encode())
    sock.setsockopt(zmq.LINGER, 2000)
    sock.connect(f"tcp://127.0.0.1:{port}")
    replies: List[Message] = []
    try:
        for frames in hostile_messages().values():
            sock.send_multipart(frames)
        end = time.monotonic() + wait
        while time.monotonic() < end:
            if not sock.poll(max(1, int((end - time.monotonic()) * 1000))):
                break
            reply = wire.decode(sock.recv_multipart())
            replies.append(reply)
            if reply.key == 987654:
                break
        return replies
    finally:
        sock.close()


def test_hostile_messages_to_live_server_and_scheduler(zmq_ctx):
    topo = Topology(parties=1, workers_per_party=2, env={"GEOMX_START_TIMEOUT": "60"})
    log = LineLog()
    result: Dict[str, int] = {}
    t0 = time.monotonic()
    thread = threading.Thread(target=lambda: result.setdefault("rc", run(topo, slow_cmd(6, 0.8), stream=log,
                                                                           timeout=60, grace=15)))
    thread.start()
    try:
        finished = lambda: not thread.is_alive()  # noqa: E731
        server_port = int(log.wait_for(r"^\[party0/server\] .*serving \d+ worker\(s\) on port (\d+)", 60,
                                       finished).group(1))
        sched_port = int(log.wait_for(r"^\[party0/scheduler\] .*listening on port (\d+)", 10, finished).group(1))
        log.wait_for(r"^\[party0/worker\d\] ROUND 0 OK", 60, finished)

        send_raw_garbage(server_port)
        send_raw_garbage(sched_port)
        replies = send_hostile(zmq_ctx, server_port, "server", wait=10)
        # Only the well-formed requests are answered, each with an error: the sender is not one of
        # the party's registered workers (what a registered but buggy worker gets for the same
        # requests is checked in test_trust.py).
        assert [(r.type, r.req_id) for r in replies] == [(MsgType.ERROR, i) for i in (1, 2, 3)], replies
        assert all("PUSH from fuzz-server, which is not a registered client of this server" in r.meta["error"]
                   for r in replies), replies
        # The scheduler at most refuses (a request from a peer that never registered).
        replies = send_hostile(zmq_ctx, sched_port, "scheduler", wait=1)
        assert all(r.type == MsgType.ERROR for r in replies), replies
        # And a late REGISTER from a stranger is refused once the party is complete.
        sock = zmq_ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, b"fuzz-late-register")
        sock.connect(f"tcp://127.0.0.1:{sched_port}")
        sock.send_multipart(wire.encode(Message(MsgType.REGISTER, meta={
            "role": "worker", "host": "127.0.0.1", "port": 1, "name": "intruder"})))
        sock.send_multipart(wire.encode(Message(MsgType.HEARTBEAT)))
        time.sleep(0.2)
        sock.close(linger=1000)
        # The hostile traffic went in while training was still going on.
        assert "EXACT OK" not in log.text(), "the workers finished before the hostile messages were sent"

        thread.join(60)
        assert not thread.is_alive(), "the topology did not finish"
    finally:
        thread.join(70)  # launch.run's own timeout stops the topology if a check above failed
    elapsed = time.monotonic() - t0
    out = log.text()
    assert result.get("rc") == 0, out[-6000:]
    assert len(re.findall(r"^\[party0/worker\d\] EXACT OK", out, re.M)) == 2, out[-6000:]

    server_log = "\n".join(line for line in out.splitlines() if line.startswith("[party0/server]"))
    sched_log = "\n".join(line for line in out.splitlines() if line.startswith("[party0/scheduler]"))
    for name, needle in EXPECTED_LOG.items():
        assert re.search(rf"dropped a malformed message .*fuzz-server.*{re.escape(needle)}", server_log), \
            f"server log lacks the rejection of the {name} message ({needle!r}):\n{server_log}"
        assert re.search(rf"dropped a malformed message .*fuzz-scheduler.*{re.escape(needle)}", sched_log), \
            f"scheduler log lacks the rejection of the {name} message ({needle!r}):\n{sched_log}"
    assert re.search(r"rejected PUSH from fuzz-server .*not a registered client", server_log), server_log
    assert re.search(r"rejected PUSH .*unregistered peer fuzz-scheduler", sched_log), sched_log
    assert re.search(r"late REGISTER from intruder", sched_log), sched_log
    assert re.search(r"rejected HEARTBEAT .*unregistered peer fuzz-late-register", sched_log), sched_log
    assert elapsed < 60


# -- (b), (c), (d) killed nodes --------------------------------------------------------------------

def _kill_and_watch(topology: Topology, victim: str, wait_pattern: str, dead_pattern: str,
                    expect_in: Dict[str, str]) -> str:
    """Start ``topology`` by hand, SIGKILL ``victim`` once ``wait_pattern`` shows up, and check that every
    other process ends by itself (non-zero unless it had already finished) within 30 s, that the
    processes in ``expect_in`` log a line matching their pattern, and that nothing is left. Returns the
    whole output."""
    cluster = Cluster(topology, slow_cmd(30, 0.5))
    with cluster:
        cluster.log.wait_for(wait_pattern, 60, lambda: cluster.procs[victim].poll() is not None)
        assert cluster.procs[victim].poll() is None, f"{victim} ended before it could be killed"
        finished_before = {n for n, p in cluster.procs.items() if p.poll() is not None}
        killed_at = cluster.kill(victim)
        ended = cluster.wait_all(30)
        took = time.monotonic() - killed_at
        out = cluster.log.text()
        assert ended, f"still running 30 s after {victim} was killed: {cluster.running()}\n{out[-8000:]}"
        for name, p in cluster.procs.items():
            if name == victim:
                assert p.returncode == -signal.SIGKILL
            elif name in finished_before or name == "central/master_worker":
                # The master worker only initialises the keys and leaves: it may be done already.
                assert p.returncode == 0, f"{name} exited with {p.returncode}:\n{cluster.output(name)}"
            else:
                assert p.returncode != 0, f"{name} exited 0 although {victim} died:\n{cluster.output(name)}"
                if not cluster.specs_by_name[name].is_worker:
                    # Servers and schedulers report the failure in a log line; they do not crash.
                    assert "Traceback" not in cluster.output(name), \
                        f"{name} crashed instead of reporting the failure:\n{cluster.output(name)}"
        # The scheduler of the victim's tier names it.
        assert re.search(dead_pattern, out, re.M), f"no line matching {dead_pattern!r}:\n{out[-8000:]}"
        for name, pattern in expect_in.items():
            assert re.search(pattern, cluster.output(name)), \
                f"{name} does not report the failure ({pattern!r}):\n{cluster.output(name)}"
        assert took < 30
        assert_no_process_left(cluster)
    print(f"{victim} killed; topology ended {took:.1f}s later")
    return out


@dataclass(frozen=True)
class Kill:
    """One kill-a-role case: ``victim`` is SIGKILLed in a topology of 2 parties x ``workers`` workers
    once ``wait_pattern`` shows up; then (``_kill_and_watch``) ``dead_pattern`` and each process's line of
    ``expect_in`` must appear; last, ``names`` (patterns with ``{}`` for the groups of ``named_by``,
    which reads the victim's rank or port from the output) must be in the output: whoever reports the
    death names the victim exactly."""
    victim: str
    wait_pattern: str
    dead_pattern: str
    expect_in: Dict[str, str]
    named_by: str
    names: Tuple[str, ...]
    workers: int = 1
    env: Dict[str, str] = field(default_factory=dict)


SCHEDULER_SILENT = r"the {tier} scheduler at 127\.0\.0\.1:{port} has not answered for [\d.]+s; presumed dead"


# A silence across the WAN (a party's local server and the global scheduler, each of the other) is first
# taken for an outage of the link for GEOMX_WAN_OUTAGE_WINDOW (tests/test_ssh_launch.py); these cases
# check the death that follows, so the window is 0 there.
NO_OUTAGE_WINDOW = {"GEOMX_WAN_OUTAGE_WINDOW": "0"}


def _scheduler_kill(tier: str, victim: str, wait_pattern: str, dead_pattern: str, expect_in: Dict[str, str]) -> Kill:
    """(d) a killed scheduler: its nodes notice the silence and stop the rest through the other tier."""
    return Kill(victim, wait_pattern, dead_pattern, expect_in,
                named_by=rf"^\[{re.escape(victim)}\] .*listening on port (\d+)",
                names=(SCHEDULER_SILENT.format(tier=tier, port="{}"),),
                env=dict(NO_OUTAGE_WINDOW) if tier == "global" else {})


# With ENABLE_INTER_TS the local servers also relay partial sums and results to each other: a dead one
# must end the run with the same clear error, not leave the others waiting for a hop.
_LOCAL_SERVER = dict(
    victim="party1/server",
    wait_pattern=r"^\[party1/worker0\] ROUND 0 OK",
    dead_pattern=r"^\[party1/scheduler\] .*ERROR.*server local_server .*presumed dead",
    expect_in={
        "party1/worker0": r"presumed dead",
        "global_scheduler": r"ERROR.*worker local_server .*presumed dead",
        "party0/server": r"ERROR.*presumed dead",
        "party0/worker0": r"presumed dead",
    },
    # The party scheduler names the dead server by its address.
    named_by=r"^\[party1/server\] .*serving \d+ worker\(s\) on port (\d+)",
    names=(r"^\[party1/scheduler\] .*server local_server \(rank 0, 127\.0\.0\.1:{}\) .*presumed dead",))

KILLS = {
    # (b) a killed worker
    "worker": Kill(
        "party0/worker1",
        wait_pattern=r"^\[party0/worker1\] ROUND 0 OK",
        dead_pattern=r"^\[party0/scheduler\] .*ERROR.*worker .*\(rank \d+, .*\) sent no heartbeat for .*presumed dead",
        expect_in={
            "party0/worker0": r"presumed dead",
            "party0/server": r"ERROR.*presumed dead",
            "party1/worker0": r"presumed dead",
            "global_server0": r"ERROR.*presumed dead",
        },
        # The party scheduler names the dead worker by its rank in the party.
        named_by=r"^\[party0/worker1\] RANK (\d+)",
        names=(r"^\[party0/scheduler\] .*worker .*\(rank {}, .*presumed dead",),
        workers=2),
    # (c) killed servers
    "local-server-fsa": Kill(**_LOCAL_SERVER, env=dict(NO_OUTAGE_WINDOW)),
    "local-server-inter-ts": Kill(**_LOCAL_SERVER, env=dict(NO_OUTAGE_WINDOW, ENABLE_INTER_TS="1")),
    "global-server": Kill(
        "global_server0",
        wait_pattern=r"^\[party0/worker0\] ROUND 0 OK",
        dead_pattern=r"^\[global_scheduler\] .*ERROR.*server global_server .*presumed dead",
        expect_in={
            "central/scheduler": r"ERROR.*server global_server .*presumed dead",
            "party0/server": r"ERROR.*presumed dead",
            "party1/server": r"ERROR.*presumed dead",
            "party0/worker0": r"presumed dead",
            "party1/worker0": r"presumed dead",
        },
        # Both of its tiers' schedulers name it by the address it serves that tier on.
        named_by=r"^\[global_server0\] .*serving \d+ party\(ies\) on port (\d+) and \d+ central "
                 r"worker\(s\) on port (\d+)",
        names=(r"^\[global_scheduler\] .*server global_server \(rank 0, 127\.0\.0\.1:{0}\)",
               r"^\[central/scheduler\] .*server global_server \(rank 0, 127\.0\.0\.1:{1}\)")),
    # (d) killed schedulers
    "party-scheduler": _scheduler_kill(
        "party", "party1/scheduler",
        wait_pattern=r"^\[party1/worker0\] ROUND 0 OK",
        # Its local server tells the global tier, whose scheduler stops everyone else.
        dead_pattern=r"^\[global_scheduler\] .*ERROR.*worker local_server .* failed: .*party scheduler .*presumed dead",
        expect_in={
            "party1/worker0": r"party scheduler .* presumed dead",
            "party1/server": r"ERROR.*party scheduler .* presumed dead",
            "global_server0": r"ERROR.*party scheduler .* presumed dead",
            "party0/server": r"ERROR.*party scheduler .* presumed dead",
            "party0/worker0": r"party scheduler .* presumed dead",
        }),
    "global-scheduler": _scheduler_kill(
        "global", "global_scheduler",
        wait_pattern=r"^\[party0/worker0\] ROUND 0 OK",
        # Every global-tier node notices; each tells its other tier's scheduler, which stops that tier.
        dead_pattern=r"^\[party0/scheduler\] .*ERROR.*local_server .* failed: .*global scheduler .*presumed dead",
        expect_in={
            "global_server0": r"ERROR.*global scheduler .* presumed dead",
            "party0/server": r"ERROR.*global scheduler .* presumed dead",
            "party1/server": r"ERROR.*global scheduler .* presumed dead",
            "party0/worker0": r"global scheduler .* presumed dead",
            "party1/worker0": r"global scheduler .* presumed dead",
            "central/scheduler": r"ERROR.*global scheduler .* presumed dead",
        }),
    "central-scheduler": _scheduler_kill(
        "central", "central/scheduler",
        wait_pattern=r"^\[party0/worker0\] ROUND 0 OK",
        dead_pattern=r"^\[global_scheduler\] .*ERROR.*global_server .* failed: .*central scheduler .*presumed dead",
        expect_in={
            "global_server0": r"ERROR.*central scheduler .* presumed dead",
            "party0/server": r"ERROR.*central scheduler .* presumed dead",
            "party1/worker0": r"central scheduler .* presumed dead",
        }),
}


@pytest.mark.parametrize("case", KILLS.values(), ids=KILLS.keys())
def test_killed_role_stops_the_topology(case: Kill):
    topo = Topology(parties=2, workers_per_party=case.workers,
                    env=dict(FAST_HEARTBEATS, GEOMX_START_TIMEOUT="60", **case.env))
    out = _kill_and_watch(topo, case.victim, wait_pattern=case.wait_pattern, dead_pattern=case.dead_pattern,
                          expect_in=case.expect_in)
    named = re.search(case.named_by, out, re.M)
    assert named, f"no line matching {case.named_by!r}:\n{out[-8000:]}"
    for pattern in case.names:
        pattern = pattern.format(*named.groups())
        assert re.search(pattern, out, re.M), f"no line matching {pattern!r}:\n{out[-8000:]}"


# -- (e) a flood from one peer cannot make a server hold more and more memory -----------------------

def test_flood_of_pushes_pulls_and_unread_replies_is_bounded(zmq_ctx):
    """A peer that (a) pushes 100 rounds of a 4 MB key nobody else pushes, (b) parks pulls without end and
    (c) sends 60000 pulls without ever reading the replies: the local server refuses them all (the
    peer is not a registered worker of the party) and drops replies beyond GEOMX_MAX_QUEUED_REPLIES (set to 500),
    says so, holds at most ~16 x 4 MB more, and the party's training finishes exactly. (What a registered worker
    can make the server hold, GEOMX_MAX_ROUNDS_AHEAD, is tested in test_trust.py.)"""
    topo = Topology(parties=1, workers_per_party=2, env={"GEOMX_START_TIMEOUT": "60"},
                    node_env={"party0/server": {"GEOMX_MAX_QUEUED_REPLIES": "500"}})
    cluster = Cluster(topo, slow_cmd(12, 0.8))
    big = 1_000_000  # float32 elements of the flooder's own key (99)
    with cluster:
        log = cluster.log
        log.wait_for(r"^\[party0/worker\d\] ROUND 0 OK", 90)
        port = int(re.search(r"^\[party0/server\] .*serving \d+ worker\(s\) on port (\d+)", log.text(),
                             re.M).group(1))
        server_pid = cluster.procs["party0/server"].pid
        before = rss_bytes(server_pid)
        sock = zmq_ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, b"fuzz-flood")
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 1)  # and then never read: the server's queue must fill
        sock.connect(f"tcp://127.0.0.1:{port}")
        send = lambda m: sock.send_multipart(wire.encode(m), copy=False)  # noqa: E731
        send(Message(MsgType.INIT, req_id=1, key=99, numel=big, total=big, dtype=1))
        data = np.ones(big, np.float32)
        for i in range(100):
            send(Message(MsgType.PUSH, req_id=100 + i, key=99, data=data))
        for i in range(100):
            send(Message(MsgType.PULL, req_id=1000 + i, key=99, numel=big, total=big, dtype=1))
        # Each is refused with a small ERROR reply (the peer is not registered): enough of them to
        # fill the kernel's socket buffers, then the server's queue for this peer.
        for i in range(60_000):
            send(Message(MsgType.PULL, req_id=10_000 + i, key=2, numel=300000, total=300000, dtype=1))
        log.wait_for(r"^\[party0/server\] .*dropped replies to fuzz-flood: it leaves 500 replies unread "
                     r"\(GEOMX_MAX_QUEUED_REPLIES\)", 60)
        grown = rss_bytes(server_pid) - before
        sock.close(linger=0)  # the flood is over (its peer gone) while the party trains on
        out = log.text()
        assert re.search(r"^\[party0/server\] .*rejected PUSH from fuzz-flood .*not a registered client", out,
                         re.M), out[-5000:]
        # 16 held rounds of 4 MB; without the bound the 100 pushes alone would hold 400 MB.
        assert grown < 150 << 20, f"the local server grew by {grown >> 20} MB"
        assert "EXACT OK" not in out, "training finished before the flood was over"
        assert cluster.wait_all(120), f"still running: {cluster.running()}"
        out = log.text()
        codes = {name: p.returncode for name, p in cluster.procs.items()}
        assert set(codes.values()) == {0}, (codes, out[-6000:])
        assert len(re.findall(r"^\[party0/worker\d\] EXACT OK", out, re.M)) == 2
        assert_no_process_left(cluster)
    print(f"local server grew by {grown >> 20} MB under the flood")
