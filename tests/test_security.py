"""CURVE on geomx's links (geomx/security.py, transport.EventLoop.secure): key files and their
configuration, then real sockets in one process (a listener and a client, each with its own event
loop and ZeroMQ context, as two nodes would have): admitted, refused for an unknown key, refused for a
wrong server key, refused for a plain peer; every refusal logged on both sides."""
from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import pytest
import zmq
from helpers import INIT_BYTES, PUSH_BYTES, REPO, Cluster, LineLog, assert_no_process_left, slow_cmd, zmtp_null_dealer

from geomx import config, security, wire
from geomx.config import ConfigError
from geomx.launch import Topology, run
from geomx.transport import EventLoop, bind_router, connect_dealer
from geomx.wire import Message, MsgType

pytestmark = [pytest.mark.skipif(not zmq.has("curve"), reason="this libzmq was built without CURVE"),
              pytest.mark.usefixtures("fresh_refusal_log")]  # conftest.py


@pytest.fixture
def keydir(tmp_path):
    """central, party0 and (outside the allow-list) intruder key pairs."""
    allowed = tmp_path / "allowed"
    for name in ("central", "party0"):
        security.generate(str(allowed), name)
    security.generate(str(tmp_path / "other"), "intruder")
    return tmp_path


# -- key files and configuration ------------------------------------------------------------------

@pytest.mark.unit
def test_generate_writes_a_private_secret_and_refuses_to_overwrite(tmp_path):
    public, secret = security.generate(str(tmp_path), "party0")
    assert public.name == "party0.key" and secret.name == "party0.key_secret"
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    pub, sec = security.load_secret(str(secret))
    assert len(pub) == len(sec) == 40 and pub != sec
    assert security.load_allow_list(str(tmp_path)) == {pub: "party0"}
    with pytest.raises(security.KeyFileError, match="exists already"):
        security.generate(str(tmp_path), "party0")
    new_public, _ = security.generate(str(tmp_path), "party0", force=True)
    assert security.load_secret(str(secret))[0] != pub


@pytest.mark.system
def test_geomx_keys_command(tmp_path, capsys):
    out = subprocess.run([sys.executable, "-m", "geomx.security", "generate", "--dir", str(tmp_path), "--name",
                          "partyA"], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.returncode == 0, out.stderr
    assert "partyA.key_secret" in out.stdout
    assert security.main(["show", str(tmp_path / "partyA.key")]) == 0
    assert capsys.readouterr().out.strip().encode() == security.load_secret(str(tmp_path / "partyA.key_secret"))[0]
    assert security.main(["generate", "--dir", str(tmp_path), "--name", "partyA"]) == 2
    assert "exists already" in capsys.readouterr().err


_PARTY = {"DMLC_PS_ROOT_URI": "127.0.0.1", "DMLC_PS_ROOT_PORT": "9093", "DMLC_NUM_SERVER": "1",
          "DMLC_NUM_WORKER": "1"}
_GLOBAL = {"DMLC_PS_GLOBAL_ROOT_URI": "127.0.0.1", "DMLC_PS_GLOBAL_ROOT_PORT": "9092",
           "DMLC_NUM_GLOBAL_SERVER": "1", "DMLC_NUM_GLOBAL_WORKER": "1"}
LOCAL_SERVER = {"DMLC_ROLE": "server", **_PARTY, **_GLOBAL}
WORKER = {"DMLC_ROLE": "worker", **_PARTY, "DMLC_NUM_ALL_WORKER": "1"}


@pytest.mark.unit
def test_config_reads_the_keys(keydir):
    allowed = keydir / "allowed"
    cfg = config.load(dict(LOCAL_SERVER, GEOMX_CURVE_SECRET_KEY=str(allowed / "party0.key_secret"),
                           GEOMX_CURVE_PUBLIC_KEYS_DIR=str(allowed)))
    party0 = security.load_secret(str(allowed / "party0.key_secret"))[0]
    central = security.load_secret(str(allowed / "central.key_secret"))[0]
    assert cfg.curve.public == party0 and cfg.curve.central == central and cfg.curve.inside_party
    assert set(cfg.curve.allowed.values()) == {"central", "party0"}
    # Without keys CURVE is off; a worker needs only its party's secret key.
    assert config.load(LOCAL_SERVER).curve is None
    worker = config.load(dict(WORKER, GEOMX_CURVE_SECRET_KEY=str(allowed / "party0.key_secret"),
                              GEOMX_CURVE_INSIDE_PARTY="0"))
    assert worker.curve.public == party0 and not worker.curve.inside_party


@pytest.mark.unit
@pytest.mark.parametrize("change, needle", [
    ({"GEOMX_CURVE_SECRET_KEY": "{d}/allowed/nope.key_secret"}, "GEOMX_CURVE_SECRET_KEY is unusable: cannot read"),
    ({"GEOMX_CURVE_SECRET_KEY": "{d}/allowed/party0.key"}, "GEOMX_CURVE_SECRET_KEY is unusable: .* holds no secret"),
    ({"GEOMX_CURVE_PUBLIC_KEYS_DIR": None}, "GEOMX_CURVE_PUBLIC_KEYS_DIR is required with GEOMX_CURVE_SECRET_KEY"),
    ({"GEOMX_CURVE_PUBLIC_KEYS_DIR": "{d}/empty"}, "GEOMX_CURVE_PUBLIC_KEYS_DIR is unusable: .* no public key"),
    ({"GEOMX_CURVE_SECRET_KEY": None}, "GEOMX_CURVE_PUBLIC_KEYS_DIR is set but GEOMX_CURVE_SECRET_KEY is not"),
    ({"GEOMX_CURVE_CENTRAL_KEY": "hq"}, "GEOMX_CURVE_CENTRAL_KEY is unusable: no public key named 'hq'"),
    ({"GEOMX_CURVE_INSIDE_PARTY": "maybe"}, "GEOMX_CURVE_INSIDE_PARTY must be 0 or 1"),
    # Links CURVE cannot protect are refused rather than left in clear.
    ({"ENABLE_INTER_TS": "1"}, "ENABLE_INTER_TS cannot be combined with GEOMX_CURVE_SECRET_KEY"),
])
def test_config_errors_name_the_variable(keydir, change, needle):
    (keydir / "empty").mkdir()
    env = dict(LOCAL_SERVER, GEOMX_CURVE_SECRET_KEY=f"{keydir}/allowed/party0.key_secret",
               GEOMX_CURVE_PUBLIC_KEYS_DIR=f"{keydir}/allowed")
    for k, v in change.items():
        if v is None:
            env.pop(k)
        else:
            env[k] = v.replace("{d}", str(keydir))
    with pytest.raises(ConfigError, match=needle + r".*\(role: server\)"):
        config.load(env)


# -- real sockets -----------------------------------------------------------------------------------

def keys_of(keydir: Path, name: str, central: Optional[str] = "central", inside_party: bool = True):
    folder = "other" if name == "intruder" else "allowed"
    return security.load(str(keydir / folder / f"{name}.key_secret"), str(keydir / "allowed"), central,
                         inside_party)


class Pair:
    """A listener (``server_keys``) and a client (``client_keys``), each in its own context and loop (a
    context has one ZAP handler: the client's must not be the listener's). :meth:`close` ends both
    contexts whatever happened, also when the pair could not be made."""

    def __init__(self, server_keys, client_keys, cross_party: bool = True, local_ipc: bool = True):
        self.contexts = [zmq.Context(), zmq.Context()]
        self.loops: List[EventLoop] = []
        try:
            self.server = EventLoop(self.contexts[0], name="listener", keys=server_keys, local_ipc=local_ipc)
            self.loops.append(self.server)
            self.client = EventLoop(self.contexts[1], name="client", keys=client_keys, local_ipc=local_ipc)
            self.loops.append(self.client)
            self.received: List[Message] = []
            self.refused: List[str] = []
            self.server_link, self.port = bind_router(self.server, 0, "test-listener", cross_party=cross_party)
            self.server.add(self.server_link, lambda m, origin: self.received.append(m), routed=True)
            self.client_link = connect_dealer(self.client, "127.0.0.1", self.port, b"client", "test-client-link",
                                              peer="the test listener", cross_party=cross_party)
            self.client_link.on_refused = self.refused.append
            self.client.add(self.client_link, lambda m, origin: None, routed=False)
        except BaseException:
            self.close()
            raise

    def exchange(self, seconds: float = 3.0, until=lambda p: False) -> "Pair":
        self.client_link.send(Message(MsgType.PUSH, key=7, data=np.arange(16, dtype=np.float32)))
        end = time.monotonic() + seconds
        while time.monotonic() < end and not until(self):
            self.server.run_once(0.01)
            self.client.run_once(0.01)
        return self

    def close(self) -> None:
        with contextlib.ExitStack() as stack:  # each step runs even if one before it raised
            for ctx in self.contexts:
                stack.callback(ctx.destroy, linger=0)
            for loop in self.loops:
                stack.callback(loop.close)


@pytest.fixture
def pair_factory():
    with contextlib.ExitStack() as pairs:  # every pair closed, in reverse order, even if one close fails

        def make(*args, **kw) -> Pair:
            pair = Pair(*args, **kw)
            pairs.callback(pair.close)
            return pair

        yield make


@pytest.mark.unit
def test_allowed_key_gets_through_encrypted(keydir, pair_factory):
    pair = pair_factory(keys_of(keydir, "central", None), keys_of(keydir, "party0")).exchange(
        until=lambda p: p.received)
    assert pair.server_link.curve and pair.client_link.curve
    assert [(m.type, m.key, m.data.tolist()) for m in pair.received] == [(MsgType.PUSH, 7, list(range(16)))]
    assert pair.refused == []


@pytest.mark.unit
@pytest.mark.parametrize("local_ipc", [False, True], ids=["tcp", "unix"])
def test_unknown_key_is_refused_and_logged_on_both_sides(keydir, pair_factory, caplog, local_ipc):
    caplog.set_level(logging.INFO, logger="geomx")
    intruder = keys_of(keydir, "intruder")
    pair = pair_factory(keys_of(keydir, "central", None), intruder, local_ipc=local_ipc).exchange(
        until=lambda p: p.refused)
    assert pair.received == []
    assert len(pair.refused) == 1 and "REFUSED this node's CURVE key" in pair.refused[0]
    assert "the test listener at 127.0.0.1:" in pair.refused[0]
    server_lines = [r.getMessage() for r in caplog.records if "listener: REFUSED" in r.getMessage()]
    assert server_lines and f"its public key {intruder.public.decode()} is not in the allow-list" in server_lines[0]
    # The client is named by its address: over a Unix-domain socket, by its process (this one).
    client = (f"a local process (pid {os.getpid()}, uid {os.getuid()}) over a Unix-domain socket"
              if local_ipc else "127.0.0.1")
    assert f"to test-listener from {client}:" in server_lines[0]


@pytest.mark.system
def test_wrong_server_key_is_refused(keydir, pair_factory, caplog):
    # The client takes party0's key for the central party's: the handshake cannot decrypt.
    caplog.set_level(logging.INFO, logger="geomx")
    pair = pair_factory(keys_of(keydir, "central", None), keys_of(keydir, "party0", central="party0")).exchange(
        seconds=20.0, until=lambda p: p.refused)
    assert pair.received == []
    assert pair.refused and "it expects another key for this party" in pair.refused[0]
    assert any("REFUSED a CURVE handshake that did not decrypt" in r.getMessage() for r in caplog.records)


@pytest.mark.unit
@pytest.mark.parametrize("plain_side", ["client", "server"])
def test_curve_on_one_side_only_is_refused(keydir, pair_factory, caplog, plain_side):
    caplog.set_level(logging.INFO, logger="geomx")
    server_keys = None if plain_side == "server" else keys_of(keydir, "central", None)
    client_keys = None if plain_side == "client" else keys_of(keydir, "party0")
    pair = pair_factory(server_keys, client_keys).exchange(until=lambda p: p.refused)
    assert pair.received == []
    # Which of the two events the client sees first is a race (the peer's error, or its closing).
    expected = {"client": r"uses CURVE and (the other|this node) does not",
                "server": r"one side uses CURVE and the other does not|runs without CURVE"}[plain_side]
    assert pair.refused and re.search(expected, pair.refused[0]), pair.refused
    # Running without keys across parties is allowed, but said to be insecure.
    assert any("INSECURE: CURVE is off" in r.getMessage() for r in caplog.records) or security._warned_insecure


@pytest.mark.unit
def test_curve_listener_logs_a_plaintext_client(keydir, pair_factory, caplog):
    # Whether the listener of a libzmq pair sees a plaintext client's greeting is a race: when the
    # client reads the listener's greeting first, it hangs up (often before the listener read its
    # greeting) and, a protocol error, never reconnects. A raw client that stays connected shows what the
    # listener does with such a connection, every time.
    caplog.set_level(logging.INFO, logger="geomx")
    pair = pair_factory(keys_of(keydir, "central", None), None)
    with zmtp_null_dealer(pair.port):
        pair.server.run_until(lambda: any("test-listener: REFUSED a connection that does not use CURVE"
                                          in r.getMessage() for r in caplog.records),
                              timeout=20.0, what="the listener's refusal")
    assert pair.received == []


@pytest.mark.unit
def test_inside_party_links_may_stay_in_clear(keydir, pair_factory):
    server = keys_of(keydir, "party0", None, inside_party=False)
    client = keys_of(keydir, "party0", None, inside_party=False)
    inside = pair_factory(server, client, cross_party=False).exchange(until=lambda p: p.received)
    assert not inside.server_link.curve and not inside.client_link.curve and len(inside.received) == 1
    # ... while the same keys still encrypt a link to another party.
    across = pair_factory(keys_of(keydir, "central", None, inside_party=False),
                          keys_of(keydir, "party0", inside_party=False)).exchange(until=lambda p: p.received)
    assert across.server_link.curve and across.client_link.curve and len(across.received) == 1


# -- whole topologies -------------------------------------------------------------------------------

class LoopbackCapture:
    """Records the TCP payload bytes that cross the loopback interface, per (source port, destination
    port), from a raw packet socket (needs root or CAP_NET_RAW): what anyone on the path would see."""

    def __init__(self):
        self.flows: Dict[Tuple[int, int], bytearray] = collections.defaultdict(bytearray)
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003))
        self.sock.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE (root): no drops
        self.sock.bind(("lo", 0))
        self.sock.settimeout(0.2)
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop:
            try:
                frame, addr = self.sock.recvfrom(1 << 17)
            except socket.timeout:
                continue
            if addr[2] == socket.PACKET_OUTGOING:
                continue  # every loopback packet is seen twice, outgoing and incoming
            ip = frame[14:]  # Ethernet header on lo
            if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != socket.IPPROTO_TCP:
                continue
            ihl = (ip[0] & 0x0F) * 4
            total = struct.unpack("!H", ip[2:4])[0]
            tcp = ip[ihl:total]
            sport, dport = struct.unpack("!HH", tcp[:4])
            payload = tcp[(tcp[12] >> 4) * 4:]
            if payload:
                self.flows[(sport, dport)] += payload

    def flows_of(self, port: int) -> Dict[Tuple[int, int], bytes]:
        return {k: bytes(v) for k, v in list(self.flows.items()) if port in k}

    def __enter__(self) -> "LoopbackCapture":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop = True
        self._thread.join(5)
        self.sock.close()


def can_capture() -> bool:
    try:
        socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003)).close()
        return True
    except (PermissionError, AttributeError, OSError):
        return False


# INIT_BYTES and PUSH_BYTES (helpers.py) cross the party links in clear: the initial value of key 2 of
# tests/workers/exact_worker.py and party 0's round-0 push of it.


@pytest.mark.system
@pytest.mark.skipif(not can_capture(), reason="capturing loopback traffic needs root (CAP_NET_RAW)")
@pytest.mark.parametrize("curve", [True, False], ids=["curve", "clear"])
def test_party_link_carries_no_tensor_bytes_with_curve(tmp_path, curve):
    # TCP as between hosts: on one host the links would take Unix-domain sockets, which no capture sees.
    topo = Topology(parties=2, workers_per_party=1, env={"GEOMX_START_TIMEOUT": "60", "GEOMX_LOCAL_IPC": "0"})
    if curve:
        topo.make_curve_keys(str(tmp_path))
    log = LineLog()
    with LoopbackCapture() as capture:
        code = run(topo, slow_cmd(2, 0), stream=log, timeout=120)
    out = log.text()
    assert code == 0, out[-6000:]
    assert len(re.findall(r"^\[party\d/worker0\] EXACT OK", out, re.M)) == 2, out[-6000:]
    wan_port = int(re.search(r"^\[global_server0\] .*serving \d+ party\(ies\) on port (\d+)", out, re.M).group(1))
    flows = capture.flows_of(wan_port)
    # Both parties' connections were captured, with at least the two initial values and round sums.
    assert len([f for f in flows if f[1] == wan_port]) >= 2, sorted(flows)
    assert sum(len(b) for b in flows.values()) > 4 * 1_200_000, {k: len(v) for k, v in flows.items()}
    saw_init = any(INIT_BYTES in b for (src, _), b in flows.items() if src == wan_port)
    saw_push = any(PUSH_BYTES in b for (_, dst), b in flows.items() if dst == wan_port)
    assert (saw_init, saw_push) == ((False, False) if curve else (True, True))
    assert ("INSECURE: CURVE is off" in out) == (not curve)


@pytest.mark.system
def test_intruders_are_refused_while_the_topology_trains_on(tmp_path, zmq_ctx):
    topo = Topology(parties=1, workers_per_party=2, env={"GEOMX_START_TIMEOUT": "60"})
    topo.make_curve_keys(str(tmp_path / "keys"))
    _, intruder_secret = security.generate(str(tmp_path / "intruder"), "intruder")
    intruder_public, intruder_key = security.load_secret(str(intruder_secret))
    central_public = security.load_secret(str(tmp_path / "keys" / "central.key_secret"))[0]
    cluster = Cluster(topo, slow_cmd(12, 0.8))
    with cluster:
        log = cluster.log
        # 1. A real worker of party 0, but with a key pair of its own, started with the others: refused
        # at its first connection (it takes the party's public key to be its own).
        spec = cluster.specs_by_name["party0/worker0"]
        intruder = subprocess.Popen(spec.argv, env=dict(spec.env, GEOMX_CURVE_SECRET_KEY=str(intruder_secret)),
                                    cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            log.wait_for(r"^\[party0/worker\d\] ROUND 0 OK", 90)
            out = log.text()
            global_port = int(re.search(r"^\[global_scheduler\] .*listening on port (\d+)", out, re.M).group(1))
            wan_port = int(re.search(r"^\[global_server0\] .*serving \d+ party\(ies\) on port (\d+)", out,
                                     re.M).group(1))
            # 2. A client without CURVE at the global scheduler; 3. a CURVE client that knows the central
            # party's public key but holds an unknown key of its own, at the global server's party port.
            plain, stranger = zmq_ctx.socket(zmq.DEALER), zmq_ctx.socket(zmq.DEALER)
            try:
                plain.connect(f"tcp://127.0.0.1:{global_port}")
                plain.send_multipart(wire_frames(Message(MsgType.REGISTER, meta={"role": "worker"})))
                stranger.curve_publickey, stranger.curve_secretkey = intruder_public, intruder_key
                stranger.curve_serverkey = central_public
                stranger.connect(f"tcp://127.0.0.1:{wan_port}")
                stranger.send_multipart(wire_frames(Message(MsgType.PULL, key=2, numel=300000, total=300000)))
                # (The listener's log line for a client without CURVE depends on libzmq reporting the
                # broken handshake, which it does not always do in a busy process; it is awaited in
                # test_curve_on_one_side_only_is_refused. Here: nothing is answered.)
                log.wait_for(rf"^\[global_server0\] .*REFUSED a connection to global-clients from 127\.0\.0\.1: "
                             rf"its public key {re.escape(intruder_public.decode())} is not in the allow-list", 20)
                assert plain.poll(500) == 0 and stranger.poll(0) == 0  # nothing was answered
            finally:  # the intruders leave while the topology trains on
                plain.close(linger=0)
                stranger.close(linger=0)
            assert "EXACT OK" not in log.text(), "training finished before the intruders came"
            intruder_out = intruder.communicate(timeout=90)[0]
        finally:
            intruder.kill()
        party_port = int(re.search(r"^\[party0/scheduler\] .*listening on port (\d+)", log.text(), re.M).group(1))
        assert intruder.returncode != 0
        assert re.search(rf"SecurityError: the CURVE handshake with the party scheduler at 127\.0\.0\.1:{party_port} "
                         r"failed: it expects another key for this party", intruder_out), intruder_out
        assert cluster.wait_all(120), f"still running: {cluster.running()}"
        out = log.text()
        codes = {name: p.returncode for name, p in cluster.procs.items()}
        assert set(codes.values()) == {0}, (codes, out[-6000:])
        assert len(re.findall(r"^\[party0/worker\d\] EXACT OK", out, re.M)) == 2
        assert re.search(r"^\[party0/scheduler\] .*REFUSED a CURVE handshake that did not decrypt", out, re.M), out
        assert_no_process_left(cluster)


def wire_frames(msg: Message) -> List[bytes]:
    return [bytes(f) for f in wire.encode(msg)]
