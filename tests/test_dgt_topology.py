"""DGT through real topologies: with no loss the aggregate is exactly plain FSA's (modes 1 and 2,
integer oracle of tests/workers/exact_worker.py, zero tolerance), mode 1 also with CURVE and while an
attacker sends forged and replayed datagrams at the global server's UDP port; mismatched or
impossible settings end in a clear error; with 10% of the UDP datagrams dropped on purpose, training
on load_digits stays within 3 points of FSA."""
import io
import random
import re
import socket
import struct
import sys
import threading
import time

import numpy as np
import pytest
from helpers import EXAMPLES, Cluster, assert_no_process_left, curves, exact_slices, iterations_per_epoch

from geomx import metrics, wire
from geomx.dgt import datagram
from geomx.launch import Topology, run
from geomx.wire import Message, MsgType

pytestmark = pytest.mark.system

# A long grace period: a loss-free run must not depend on how fast this (shared) machine is. A
# complete push is delivered as soon as its last block is in, so this does not slow the run down.
EXACT_ENV = {"DMLC_K": "0.5", "DGT_GRACE_MS": "5000"}

CASES = {
    "udp": ({"ENABLE_DGT": "1"}, dict(parties=2, workers_per_party=2)),
    # Two global servers, and key 2 (300k elements) cut in two: blocks are per server slice. K adapts
    # to the loss the workers report (4, 2, 4/3, 1 before rounds 0..3): 0.5 * 1/4 -> K_MIN = 0.2.
    "tcp-two-global-servers-adaptive-k": ({"ENABLE_DGT": "2", "MXNET_KVSTORE_BIGARRAY_BOUND": "1000",
                                           "ADAPTIVE_K_FLAG": "1", "DMLC_K_MIN": "0.2"},
                                          dict(parties=2, workers_per_party=1, global_servers=2)),
    # Two local servers per party and two global servers: each local server sends its own parts.
    "udp-two-local-servers": ({"ENABLE_DGT": "1", "MXNET_KVSTORE_BIGARRAY_BOUND": "1000"},
                              dict(parties=2, workers_per_party=1, global_servers=2, local_servers=2)),
}

WORKERS = EXAMPLES.parent / "tests" / "workers"


def sent_blocks(reading):
    """A local server's DGT blocks by what became of them (its metrics: reliable, low, ...)."""
    return metrics.by_label(reading, "geomx_dgt_blocks_sent_total", "kind")


def received_blocks(reading):
    """A global server's DGT blocks by outcome (its metrics: blocks, missing, late, rejected, ...)."""
    return metrics.by_label(reading, "geomx_dgt_blocks_received_total", "outcome")


def assert_none_missing_or_late(global_servers):
    assert global_servers, "no global server's metrics"
    for reading in global_servers:
        got = received_blocks(reading)
        assert got["blocks"] > 0 and got["missing"] == 0 and got["late"] == 0, got


@pytest.mark.parametrize("case", sorted(CASES))
def test_dgt_aggregate_equals_fsa_exactly(topology_run, case):
    env, topo = CASES[case]
    workers = topo["parties"] * topo["workers_per_party"]
    adaptive = "ADAPTIVE_K_FLAG" in env
    result = topology_run("exact_worker.py", ["--slice", "{slice}", "--rounds", "4", "--mode", "pushpull",
                                              "--optimizer", "sgd"] + (["--report-loss"] if adaptive else []),
                          env={**EXACT_ENV, **env, "PS_VERBOSE": "0"}, **topo)
    assert result.code == 0, result.output[-4000:]
    assert exact_slices(result) == list(range(workers)), (result.reports, result.output[-4000:])
    # DGT really carried the pushes: every local server sent blocks on both kinds of channel.
    local = result.of_role("local_server")
    senders = topo["parties"] * topo.get("local_servers", 1)
    assert len(local) == senders, (sorted(result.readings), result.output[-4000:])
    sent = [sent_blocks(r) for r in local]
    assert all(s["reliable"] > 0 and s["low"] > 0 for s in sent), sent
    assert_none_missing_or_late(result.of_role("global_server"))
    assert [metrics.value(r, "geomx_dgt_k") for r in local] == [0.2 if adaptive else 0.5] * senders


def _exact(out: str, workers: int, readings) -> None:
    assert not re.findall(r"MISMATCH", out), out[-6000:]
    assert len(re.findall(r"^\[party\d/worker\d\] EXACT OK", out, re.M)) == workers, out[-6000:]
    assert_none_missing_or_late(metrics.of_role(readings, "global_server"))


def test_dgt_udp_with_curve_is_exact(tmp_path):
    """Mode 1 alongside CURVE (refused at start-up before datagrams carried a MAC): the MAC keys travel
    in the INIT replies over the CURVE-encrypted party links, and the run reaches the exact oracle."""
    topo = Topology(parties=2, workers_per_party=1, env={**EXACT_ENV, "ENABLE_DGT": "1", "PS_VERBOSE": "0",
                                                         "GEOMX_METRICS_DIR": str(tmp_path / "metrics")})
    topo.make_curve_keys(str(tmp_path))
    stream = io.StringIO()
    code = run(topo, [sys.executable, str(WORKERS / "exact_worker.py"), "--slice", "{slice}", "--rounds", "4",
                      "--mode", "pushpull", "--optimizer", "sgd"], timeout=180, stream=stream)
    out = stream.getvalue()
    assert code == 0, out[-6000:]
    assert "INSECURE: CURVE is off" not in out
    readings = metrics.load_dumps(str(tmp_path / "metrics"))
    _exact(out, 2, readings)
    sent = [sent_blocks(r) for r in metrics.of_role(readings, "local_server")]
    assert len(sent) == 2 and all(s["low"] > 0 for s in sent), sent  # blocks really went over UDP
    assert received_blocks(readings["central/global_server0"])["rejected"] == 0


class UdpSniffer:
    """Copies of the UDP datagrams that cross the loopback interface to one port (a raw packet socket:
    needs root or CAP_NET_RAW), as anyone on the path could take them."""

    def __init__(self, port: int, ignore_source: int):
        self.port, self.ignore_source = port, ignore_source
        self.datagrams = []
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003))
        self.sock.bind(("lo", 0))
        self.sock.settimeout(0.2)
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop:
            try:
                frame, addr = self.sock.recvfrom(1 << 17)
            except socket.timeout:
                continue
            if addr[2] == socket.PACKET_OUTGOING:
                continue  # every loopback packet is seen twice
            ip = frame[14:]
            if len(ip) < 28 or ip[0] >> 4 != 4 or ip[9] != socket.IPPROTO_UDP:
                continue
            ihl = (ip[0] & 0x0F) * 4
            sport, dport, length = struct.unpack("!HHH", ip[ihl:ihl + 6])
            if dport == self.port and sport != self.ignore_source:
                self.datagrams.append(bytes(ip[ihl + 8:ihl + length]))

    def close(self):
        self._stop = True
        self._thread.join(timeout=2)
        self.sock.close()


def _can_sniff() -> bool:
    try:
        socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003)).close()
        return True
    except (PermissionError, AttributeError, OSError):
        return False


REQ_AT = datagram.PREFIX + 12  # the request id in a datagram (after magic, type, dtype, flags, sender)


def _forged_block(rng: random.Random, req_id: int) -> bytes:
    """A well-formed block of key 2 (1000 x 300 float32) of tests/workers/exact_worker.py under a guessed
    sender id and rank and a random MAC: what an attacker without the party's key can write."""
    # At a block's offset (1024 elements), but short: small datagrams leave room in the server's
    # receive buffer for the genuine ones (a volume flood is not what this test is about).
    offset = rng.randrange(300_000 // 1024) * 1024
    block = Message(MsgType.DGT_BLOCK, sender=rng.randrange(16), req_id=req_id, key=2, offset=offset, numel=64,
                    total=300_000, priority=1, data=np.full(64, 1e6, np.float32))
    head, data = wire.encode(block)
    return (datagram.SENDER_ID.pack(rng.randrange(1, 5)) + rng.randbytes(datagram.MAC_BYTES) + bytes(head)
            + bytes(data))


def test_forged_and_replayed_datagrams_leave_a_training_topology_exact(tmp_path):
    """While two parties train with DGT mode 1 against the exact oracle, an attacker sends the global
    server's UDP port forged blocks (random MACs; far-future request ids, which used to fill the
    open-push limit so that the genuine last block was dropped and the push hung; and plausible ones,
    which would land in real pushes), junk, and (with a raw socket) every genuine datagram it
    captures, as is and with its request id changed. Training stays exact, nothing hangs, every
    forged datagram is counted as refused and the log stays short."""
    rounds = 8
    topo = Topology(parties=2, workers_per_party=1,
                    env={**EXACT_ENV, "ENABLE_DGT": "1", "PS_VERBOSE": "0", "GEOMX_START_TIMEOUT": "60",
                         "GEOMX_METRICS_DIR": str(tmp_path)})
    cluster = Cluster(topo, [sys.executable, str(WORKERS / "exact_worker.py"), "--slice", "{slice}", "--rounds",
                             str(rounds), "--mode", "pushpull", "--optimizer", "sgd", "--sleep", "0.4"])
    sent = {"forged": 0, "replayed": 0, "altered": 0}
    with cluster:
        log = cluster.log
        port = int(log.wait_for(r"^\[global_server0\] .*DGT UDP channel on port (\d+)", 90).group(1))
        attacker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        attacker.bind(("127.0.0.1", 0))
        sniffer = UdpSniffer(port, attacker.getsockname()[1]) if _can_sniff() else None
        rng = random.Random(15)
        target = ("127.0.0.1", port)
        workers = [n for n in cluster.procs if "worker" in n]
        replayed_upto = 0
        try:
            while any(cluster.procs[n].poll() is None for n in workers):
                for _ in range(10):
                    attacker.sendto(_forged_block(rng, 2 ** 40 + rng.randrange(1 << 20)), target)
                    attacker.sendto(_forged_block(rng, rng.randrange(1, 400)), target)
                    sent["forged"] += 2
                attacker.sendto(rng.randbytes(rng.randrange(200)), target)
                sent["forged"] += 1
                captured = sniffer.datagrams[replayed_upto:] if sniffer else []
                replayed_upto += len(captured)
                for dg in captured:
                    attacker.sendto(dg, target)
                    altered = bytearray(dg)
                    req = int.from_bytes(altered[REQ_AT:REQ_AT + 8], "little")
                    altered[REQ_AT:REQ_AT + 8] = (req + rng.randrange(1, 20)).to_bytes(8, "little")
                    attacker.sendto(bytes(altered), target)
                    sent["replayed"] += 1
                    sent["altered"] += 1
                time.sleep(0.01)  # pacing only: a flood would just starve this 2-core machine
        finally:
            attacker.close()
            if sniffer:
                sniffer.close()
        assert cluster.wait_all(120), f"still running: {cluster.running()}\n{log.text()[-6000:]}"
        out = log.text()
        codes = {name: p.returncode for name, p in cluster.procs.items()}
        assert set(codes.values()) == {0}, (codes, out[-6000:])
        assert_no_process_left(cluster)
    readings = metrics.load_dumps(str(tmp_path))
    _exact(out, 2, readings)
    print(f"[dgt attack] sent {sent}", flush=True)
    assert sent["forged"] > 1000, sent
    got = received_blocks(readings["central/global_server0"])
    print(f"[dgt attack] global server {got}", flush=True)
    # Every block the server took was one a party sent (or a replay of one, ignored): none of the
    # forged or altered ones, which were all refused by their MAC (those sent after the server had
    # stopped reading are not counted at all).
    genuine = sum(s["reliable"] + s["low"] for s in map(sent_blocks, metrics.of_role(readings, "local_server")))
    assert got["blocks"] == genuine + got["duplicates"] + got["too_old"], (got, genuine)
    assert got["forged"] == got["rejected"] and got["forged"] > 1000, got
    assert got["out_of_window"] == 0
    if sniffer:
        assert sent["replayed"] > 50, sent  # the capture saw the parties' datagrams ...
        assert got["duplicates"] + got["too_old"] > 50, got  # ... and their replays were ignored
    # Rate-limited refusal log: a few lines per kind every 5 s, not one per datagram.
    refusals = [line for line in out.splitlines() if "dropped a DGT block" in line or "ignored a DGT datagram" in line]
    assert len(refusals) < 60, len(refusals)


def test_dgt_on_local_servers_only_is_refused_clearly(topology_run):
    result = topology_run("exact_worker.py", ["--slice", "{slice}", "--rounds", "1"],
                          node_env={"party*/server": {"ENABLE_DGT": "2"}}, parties=1, workers_per_party=1,
                          timeout=90)
    assert result.code != 0
    assert "set the same ENABLE_DGT on the global and local servers" in result.output, result.output[-3000:]


def test_dgt_with_bsc_is_refused_clearly():
    topo = Topology(parties=1, workers_per_party=1, env={"ENABLE_DGT": "2"})
    stream = io.StringIO()
    code = run(topo, [sys.executable, str(EXAMPLES / "cnn_bsc.py"), "--cpu", "-ep", "1"], timeout=90, stream=stream)
    assert code != 0
    assert "cannot be combined with DGT" in stream.getvalue(), stream.getvalue()[-3000:]


# -- loss tolerance -------------------------------------------------------------------------------

EPOCHS, BATCH, LR = 2, 8, 0.003
ITERS_PER_EPOCH = iterations_per_epoch(2, BATCH)  # 2 parties x 1 worker: 94
TOLERANCE = 0.03


def _train(env, out, label):
    topo = Topology(parties=2, workers_per_party=1, env=env)
    stream = io.StringIO()
    start = time.monotonic()
    try:
        code = run(topo, [sys.executable, str(EXAMPLES / "cnn.py"), "--cpu", "-ds", "{slice}", "-ep", str(EPOCHS),
                          "-bs", str(BATCH), "-lr", str(LR), "--eval-every", str(ITERS_PER_EPOCH)],
                   timeout=240, stream=stream)
    except Exception as exc:  # reported by the assertions below
        code = -1
        stream.write(f"{type(exc).__name__}: {exc}")
    out[label] = (code, stream.getvalue(), time.monotonic() - start)


def _final(label, result):
    code, output, seconds = result
    assert code == 0, f"{label}: exit status {code}\n{output[-4000:]}"
    accs = curves(output)
    assert len(accs) == 2, output[-4000:]
    for points in accs.values():
        assert points[-1][0] == EPOCHS * ITERS_PER_EPOCH, points
    final = sum(p[-1][1] for p in accs.values()) / len(accs)
    print(f"[dgt] {label}: final test accuracy {final:.4f} in {seconds:.1f} s", flush=True)
    return final


def test_training_with_dropped_datagrams_stays_close_to_fsa(tmp_path):
    out = {}
    lossy = {"ENABLE_DGT": "1", "DMLC_K": "0.5", "GEOMX_DGT_TEST_DROP_RATE": "0.1", "GEOMX_METRICS_DIR": str(tmp_path)}
    threads = [threading.Thread(target=_train, args=({}, out, "FSA")),
               threading.Thread(target=_train, args=(lossy, out, "DGT udp, 10% dropped"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    fsa = _final("FSA", out["FSA"])
    lossy_acc = _final("DGT udp, 10% dropped", out["DGT udp, 10% dropped"])
    readings = metrics.load_dumps(str(tmp_path))
    lost = [sent_blocks(r)["udp_lost_at_sender"] for r in metrics.of_role(readings, "local_server")]
    missing = received_blocks(readings["central/global_server0"])["missing"]
    assert len(lost) == 2 and all(n > 0 for n in lost), lost  # the drops really happened
    assert missing >= sum(lost) * 0.5, (missing, lost)  # ... and the server saw them missing
    assert fsa >= 0.9, f"FSA reached only {fsa:.4f}: the comparison would mean nothing"
    assert lossy_acc >= fsa - TOLERANCE, f"DGT with drops {lossy_acc:.4f} vs FSA {fsa:.4f}"
