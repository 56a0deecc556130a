"""DGT (geomx/dgt): block scoring and channel assignment against a loop-by-loop model, 4-bit
quantization with residuals, reassembly (reordered, duplicated, dropped, late blocks) in a real
event loop, the datagram MAC (every tampered byte refused) and replay window, malformed, forged and
replayed datagrams over real UDP sockets, and the start-up checks."""
import logging
import socket
import time

import numpy as np
import pytest
import zmq

from geomx import config, dgt, transport, wire
from geomx.dgt import blocks, datagram
from geomx.errors import ConfigError, ProtocolError
from geomx.transport import EventLoop
from geomx.wire import Message, MsgType


@pytest.fixture(autouse=True)
def _fresh_refusal_log():
    # Refusals are logged once per 5 s per peer and kind in a process; each test expects its own.
    transport.log_limited._last.clear()


# -- numpy models of the sender's arithmetic (written independently, element by element) ----------


def model_scores(pushes, per_block, alpha):
    """Moving average of mean(|block|) over successive pushes of one key part."""
    prev = None
    for data in pushes:
        nb = -(-data.size // per_block)
        cur = []
        for i in range(nb):
            block = data[i * per_block:(i + 1) * per_block]
            m = sum(abs(float(x)) for x in block) / len(block)
            cur.append(m if prev is None else alpha * prev[i] + (1 - alpha) * m)
        if prev is None:
            cur = [(1 - alpha) * c for c in cur]
        prev = cur
    return prev


def model_channels(scores, k, channels):
    nb = len(scores)
    out = [-1] * nb
    cands = [i for i in range(nb - 1) if scores[i] != 0]
    ranked = sorted(cands, key=lambda i: (-scores[i], i))
    n_imp = int(k * len(ranked) + 0.5)
    for r, i in enumerate(ranked):
        if r < n_imp:
            out[i] = 0
        else:
            j = r - n_imp
            out[i] = 1 + j * channels // (len(ranked) - n_imp)
    out[nb - 1] = 0
    return out


@pytest.mark.unit
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("k,channels", [(0.5, 3), (0.8, 1), (0.1, 4), (1.0, 3)])
def test_scoring_and_channels_match_model(dtype, k, channels):
    rng = np.random.default_rng(7)
    per = blocks.block_elements(64, dtype)
    scorer = blocks.Scorer(alpha=0.3)
    pushes = []
    for t in range(3):
        data = (rng.standard_normal(per * 9 + 5) * rng.integers(1, 5, per * 9 + 5)).astype(dtype)
        data[per * 2:per * 3] = 0  # an all-zero block: dropped while its history is zero too
        if t == 2:
            data[per * 4:per * 5] = 0  # zero now, not before: still scored > 0, still sent
        pushes.append(data)
        got = scorer.update((5, 0), data, per)
    want = model_scores(pushes, per, 0.3)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    ch = blocks.assign_channels(got, k, channels)
    assert ch.tolist() == model_channels(want, k, channels)
    assert ch[2] == blocks.DROPPED and ch[4] != blocks.DROPPED and ch[-1] == blocks.RELIABLE
    if k < 1:
        assert set(ch[ch > 0].tolist()) == set(range(1, channels + 1))


@pytest.mark.unit
def test_ties_keep_block_order_and_single_block():
    assert blocks.assign_channels(np.array([1.0, 1.0, 1.0, 1.0, 0.5]), 0.5, 2).tolist() == [0, 0, 1, 2, 0]
    assert blocks.assign_channels(np.array([0.0]), 0.5, 3).tolist() == [0]


@pytest.mark.unit
def test_quantizer_matches_model_and_keeps_residual():
    rng = np.random.default_rng(3)
    x = rng.standard_normal(101).astype(np.float32)
    lo, hi, packed = blocks.quantize(x)
    q = [min(15, int(np.floor((float(v) - lo) * 16 / (hi - lo)))) for v in x]
    assert packed.size == 51
    unpacked = [(int(packed[i // 2]) >> (4 * (i % 2))) & 15 for i in range(101)]
    assert unpacked == q
    deq = blocks.dequantize(lo, hi, packed, 101)
    np.testing.assert_allclose(deq, [lo + (b + 0.5) * (hi - lo) / 16 for b in q], rtol=1e-6, atol=1e-6)
    assert np.max(np.abs(deq - x)) <= (hi - lo) / 32 + 1e-6
    # Error feedback: what was lost is sent later, so the sum of what arrives tracks the sum sent.
    qz = blocks.Quantizer()
    sent = np.zeros(101, np.float32)
    for _ in range(50):
        lo, hi, p = qz.encode((1, 0, 0), x)
        sent += blocks.dequantize(lo, hi, p, 101)
    sent += qz.flush((1, 0, 0), np.zeros(101, np.float32))
    np.testing.assert_allclose(sent, 50 * x, rtol=1e-4, atol=1e-3)


# -- reassembly in a real event loop ---------------------------------------------------------------

CLIENT = ("global-clients", b"local_server0>0")
NUMEL = 10  # blocks of 4 elements: offsets 0, 4, 8 (the last, 2 elements)


class Harness:
    """A DGT receiver in an event loop of its own context; :meth:`close` ends the context whatever fails
    before it (and a constructor that fails ends it too)."""

    def __init__(self, grace=0.2, numel=NUMEL, dtype=np.float32):
        self.ctx = zmq.Context()
        try:
            self.loop = EventLoop(self.ctx, name="test")
            self.delivered = []
            self.rx = dgt.Receiver(self.loop, grace, lambda key: (numel, np.dtype(dtype)) if key == 3 else None,
                                   lambda msg, ident: self.delivered.append((msg, ident)))
            self.info = self.rx.advert(CLIENT, 0, mode=2)
            self.numel = numel
        except BaseException:
            self.ctx.destroy(linger=0)
            raise

    def block(self, req, offset, values, last_nsent=None, sender=0):
        values = np.asarray(values, dtype=np.float32)
        m = Message(MsgType.DGT_BLOCK, sender=sender, req_id=req, key=3, offset=offset, numel=values.size,
                    total=self.numel, data=values)
        if last_nsent is not None:
            m.meta = {"dgt": {"nsent": last_nsent, "offset": 0, "total": self.numel}, "meta": None}
        frames = wire.encode(m)
        return wire.decode([bytes(memoryview(f)) for f in frames])

    def send(self, msg, low=False):
        self.rx.on_tcp_block(msg, CLIENT[1] + (b"/low" if low else b""), CLIENT[0])

    def run(self, seconds):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.loop.run_once(0.02)

    def close(self):
        try:
            self.loop.close()
        finally:
            self.ctx.destroy(linger=0)


@pytest.mark.system
def test_reordered_and_duplicated_blocks_reassemble_exactly():
    h = Harness()
    try:
        h.send(h.block(1, 8, [9, 10], last_nsent=3))  # last first
        h.send(h.block(1, 4, [5, 6, 7, 8]), low=True)
        h.send(h.block(1, 4, [5, 6, 7, 8]), low=True)  # duplicate
        assert not h.delivered
        h.send(h.block(1, 0, [1, 2, 3, 4]), low=True)
        assert len(h.delivered) == 1  # complete: delivered at once, no grace wait
        msg, ident = h.delivered[0]
        assert ident == CLIENT[1] and msg.type == MsgType.PUSHPULL and msg.req_id == 1
        assert msg.data.tolist() == list(range(1, 11))
        assert h.rx.stats.duplicates == 1
    finally:
        h.close()


@pytest.mark.unit
def test_dropped_block_counts_zero_and_late_block_joins_next_round():
    h = Harness(grace=0.1)
    try:
        h.send(h.block(1, 0, [1, 1, 1, 1]))
        h.send(h.block(1, 8, [1, 1], last_nsent=3))  # block at offset 4 is missing
        assert not h.delivered
        h.run(0.3)  # the grace period passes: delivered with zeros
        assert [m.data.tolist() for m, _ in h.delivered] == [[1, 1, 1, 1, 0, 0, 0, 0, 1, 1]]
        h.send(h.block(1, 4, [7, 7, 7, 7]), low=True)  # round 1's block, late
        h.send(h.block(1, 4, [7, 7, 7, 7]), low=True)  # ... and again: counted once
        h.send(h.block(2, 0, [2, 2, 2, 2]))
        h.send(h.block(2, 4, [2, 2, 2, 2]))
        h.send(h.block(2, 8, [2, 2], last_nsent=3))
        assert [m.data.tolist() for m, _ in h.delivered][1] == [2, 2, 2, 2, 9, 9, 9, 9, 2, 2]
        assert h.rx.stats.late == 1 and h.rx.stats.missing == 1 and h.rx.stats.duplicates == 1
    finally:
        h.close()


@pytest.mark.unit
def test_pushes_are_delivered_in_order():
    h = Harness(grace=5.0)
    try:
        h.send(h.block(1, 8, [1, 1], last_nsent=3))  # push 1 incomplete, waiting for its grace
        h.send(h.block(2, 0, [2, 2, 2, 2]))
        h.send(h.block(2, 4, [2, 2, 2, 2]))
        h.send(h.block(2, 8, [2, 2], last_nsent=3))  # push 2's last block forces push 1 out first
        assert [m.req_id for m, _ in h.delivered] == [1, 2]
        assert h.delivered[0][0].data.tolist() == [0] * 8 + [1, 1]
    finally:
        h.close()


@pytest.mark.unit
def test_tcp_blocks_from_strangers_and_bad_blocks_are_dropped(caplog):
    h = Harness()
    try:
        with caplog.at_level(logging.WARNING, logger="geomx.dgt"):
            h.rx.on_tcp_block(h.block(1, 0, [1, 1, 1, 1]), b"intruder", CLIENT[0])
            h.send(h.block(1, 0, [1, 1, 1, 1], sender=5))  # wrong sender rank for this link
            h.send(h.block(1, 8, [1, 1], last_nsent=3), low=True)  # last block on the low link
            bad = h.block(1, 0, [1, 1, 1, 1])
            bad.key = 4
            h.send(bad)  # unknown key
        assert h.rx.stats.rejected == 4 and not h.rx.streams
        assert "never initialised" in caplog.text and "does not match" in caplog.text
        assert "reliable link" in caplog.text and "does not hold" in caplog.text
    finally:
        h.close()


# -- the datagram: MAC over every byte --------------------------------------------------------------

KEY = bytes(range(32))


def datagram_bytes(msg, sender_id=1, key=KEY):
    return b"".join(bytes(memoryview(f)) for f in datagram.encode(sender_id, datagram.Mac(key), msg))


@pytest.mark.unit
def test_datagram_round_trip_and_every_tampered_byte_is_refused():
    msg = Message(MsgType.DGT_BLOCK, sender=3, req_id=77, key=3, offset=4, numel=4, total=NUMEL, priority=2,
                  version=1, data=np.array([1.5, -2, 3, 4], np.float32))
    dg = datagram_bytes(msg)
    assert len(dg) == datagram.DATAGRAM_HEADER + 16
    macs = {1: datagram.Mac(KEY)}
    sender_id, got = datagram.open_datagram(memoryview(dg), macs)
    assert sender_id == 1
    assert (got.type, got.sender, got.req_id, got.key, got.offset, got.numel, got.total, got.priority,
            got.version) == (MsgType.DGT_BLOCK, 3, 77, 3, 4, 4, NUMEL, 2, 1)
    assert got.data.tolist() == [1.5, -2, 3, 4]
    # One bit changed anywhere (sender id, MAC, header, data) and the datagram is refused.
    for i in range(len(dg)):
        for bit in (0x01, 0x80):
            bad = bytearray(dg)
            bad[i] ^= bit
            with pytest.raises(ProtocolError, match="bad MAC|unknown sender id"):
                datagram.open_datagram(memoryview(bad), macs)
    # Cut short, extended, another key, another party's sender id, nobody's sender id.
    for bad, needle in ((dg[:-1], "bad MAC"), (dg + b"\0", "bad MAC"), (dg[:40], "shorter than"),
                        (datagram_bytes(msg, key=bytes(32)), "bad MAC"),
                        (datagram_bytes(msg, sender_id=2), "bad MAC"),
                        (datagram_bytes(msg, sender_id=9), "unknown sender id")):
        with pytest.raises(ProtocolError, match=needle):
            datagram.open_datagram(memoryview(bad), {1: datagram.Mac(KEY), 2: datagram.Mac(bytes(32))})
    # A valid MAC over something that is not a block is still refused, by the decoder.
    push = Message(MsgType.PUSH, key=3, total=NUMEL, data=np.ones(4, np.float32))
    head, data = wire.encode(push)
    sid = datagram.SENDER_ID.pack(1)
    forged_push = sid + datagram.Mac(KEY).digest(sid, head, data) + bytes(head) + bytes(data)
    with pytest.raises(ProtocolError, match="only DGT_BLOCK"):
        datagram.open_datagram(memoryview(forged_push), macs)
    with pytest.raises(ValueError, match="32 bytes"):
        datagram.Mac(b"short")


class UdpHarness(Harness):
    """A receiver with its UDP channel, a sending socket, and the party's sender id and MAC."""

    def __init__(self, grace=5.0):
        super().__init__(grace=grace)
        try:
            self.port = self.rx.open_udp()
            self.sender_id = self.info["sender_id"]
            self.key = bytes.fromhex(self.info["key"])
            self.tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.addr = ("127.0.0.1", self.port)
        except BaseException:
            super().close()
            raise

    def datagram(self, req, offset, values, sender=0, key=None, sender_id=None):
        b = self.block(req, offset, values, sender=sender)
        return datagram_bytes(b, self.sender_id if sender_id is None else sender_id, key or self.key)

    sent = 0  # blocks sent, over UDP and TCP

    def sendto(self, *datagrams):
        for dg in datagrams:
            self.tx.sendto(dg, self.addr)
            self.sent += 1

    def send(self, msg, low=False):
        super().send(msg, low)
        self.sent += 1

    def settle(self):
        """Run the loop until every block sent so far has been taken, ignored or refused."""
        deadline = time.monotonic() + 10
        st = self.rx.stats
        while st.blocks + st.rejected < self.sent and time.monotonic() < deadline:
            self.loop.run_once(0.05)
        assert st.blocks + st.rejected == self.sent, st.as_dict()

    def close(self):
        try:
            self.tx.close()
            self.rx.close()
        finally:
            super().close()


@pytest.mark.unit
def test_malformed_and_forged_datagrams_are_dropped_and_serving_continues(caplog):
    h = UdpHarness()
    try:
        with caplog.at_level(logging.WARNING):
            dg = h.datagram(1, 0, [1, 2, 3, 4])
            bad_magic = bytearray(dg)
            bad_magic[datagram.PREFIX:datagram.PREFIX + 4] = b"XXXX"
            h.sendto(b"short",
                     dg[:-3],  # truncated
                     dg + b"\0\0\0\0",  # trailing bytes
                     bytes(bad_magic),  # changed header
                     h.datagram(1, 0, [1, 2, 3, 4], key=bytes(32)),  # another key
                     h.datagram(1, 0, [1, 2, 3, 4], sender_id=77))  # nobody's sender id
            h.settle()
            assert h.rx.stats.forged == 6 and h.rx.stats.rejected == 6 and not h.rx.streams
            unknown_key = h.block(1, 0, [1, 2, 3, 4])
            unknown_key.key = 99
            h.sendto(h.datagram(1, 0, [1, 2, 3, 4], sender=1),  # MAC fine, another party's rank
                     datagram_bytes(unknown_key, h.sender_id, h.key))  # MAC fine, unknown key
            h.sendto(dg, h.datagram(1, 4, [5, 6, 7, 8]))  # finally two good ones
            h.settle()
        assert h.rx.stats.rejected == 8 and h.rx.stats.forged == 6, h.rx.stats.as_dict()
        for reason in ("shorter than", "bad MAC", "unknown sender id", "does not match", "does not hold"):
            assert reason in caplog.text, reason
        h.send(h.block(1, 8, [9, 10], last_nsent=3))
        assert h.delivered and h.delivered[0][0].data.tolist() == list(range(1, 11))
    finally:
        h.close()


@pytest.mark.unit
def test_replayed_and_out_of_window_datagrams_are_refused_and_hold_no_state(caplog):
    """A genuine datagram sent again is ignored while its push is open, after it was delivered, and
    once it is older than the window; one far ahead of the party's request ids (even with a valid
    MAC) and forged ones with far-future request ids never open a push, so the genuine pushes after
    them (more than MAX_OPEN_PUSHES of them) are all delivered, exactly."""
    h = UdpHarness()
    try:
        with caplog.at_level(logging.WARNING):
            # Forged: random MACs, the party's real sender id, far-future request ids. Before the
            # MAC, 16 of these filled the open-push limit of the key.
            rng = np.random.default_rng(5)
            forged = []
            for r in range(40):
                dg = bytearray(h.datagram(2 ** 40 + r, 0, [9, 9, 9, 9]))
                dg[datagram.SENDER_ID.size:datagram.PREFIX] = rng.bytes(datagram.MAC_BYTES)
                forged.append(bytes(dg))
            h.sendto(*forged)
            # Genuine MAC, request id beyond the window.
            h.sendto(h.datagram(dgt.receiver.REQ_WINDOW + 1, 0, [9, 9, 9, 9]))
            h.settle()
            assert h.rx.stats.forged == 40 and h.rx.stats.out_of_window == 1 and h.rx.stats.rejected == 41
            assert not h.rx.streams  # nothing was kept of any of them
            first = h.datagram(1, 0, [1, 2, 3, 4])
            h.sendto(first, first)  # the second is a replay while push 1 is open
            h.settle()
            assert h.rx.stats.duplicates == 1
            h.send(h.block(1, 4, [5, 6, 7, 8]))
            h.send(h.block(1, 8, [9, 10], last_nsent=3))
            h.sendto(first)  # replay after push 1 was delivered: not added to push 2
            h.settle()
            assert h.rx.stats.duplicates == 2
            # 20 more pushes (more than MAX_OPEN_PUSHES and RECENT_PUSHES), then push 1 again.
            for r in range(2, 22):
                h.sendto(h.datagram(r, 0, [r, r, r, r]))
                h.settle()
                h.send(h.block(r, 4, [r, r, r, r]))
                h.send(h.block(r, 8, [r, r], last_nsent=3))
            h.sendto(first)
            h.settle()
        assert h.rx.stats.too_old == 1 and h.rx.stats.late == 0, h.rx.stats.as_dict()
        got = [(m.req_id, m.data.tolist()) for m, _ in h.delivered]
        assert got == [(1, list(range(1, 11)))] + [(r, [r] * 10) for r in range(2, 22)]
        assert "bad MAC" in caplog.text and "beyond the replay window" in caplog.text
        assert "already received" in caplog.text and "older than the replay window" in caplog.text
        # Refusals are logged once per 5 s per (peer, kind): 40 forged datagrams, one line.
        assert len([r for r in caplog.records if "bad MAC" in r.getMessage()]) == 1
    finally:
        h.close()


# -- start-up checks ------------------------------------------------------------------------------

BASE = {"DMLC_ROLE": "server", "DMLC_PS_ROOT_URI": "127.0.0.1", "DMLC_PS_ROOT_PORT": "9000",
        "DMLC_NUM_SERVER": "1", "DMLC_NUM_WORKER": "1", "DMLC_PS_GLOBAL_ROOT_URI": "127.0.0.1",
        "DMLC_PS_GLOBAL_ROOT_PORT": "9001", "DMLC_NUM_GLOBAL_SERVER": "1", "DMLC_NUM_GLOBAL_WORKER": "1"}


@pytest.mark.unit
@pytest.mark.parametrize("env,needle", [
    ({"ENABLE_DGT": "4"}, "ENABLE_DGT must be 0"),
    ({"DMLC_K": "0"}, "DMLC_K must be in (0, 1]"),
    ({"DMLC_K": "1.5"}, "DMLC_K must be in (0, 1]"),
    ({"DMLC_K_MIN": "-0.1"}, "DMLC_K_MIN must be in (0, 1]"),
    ({"DMLC_UDP_CHANNEL_NUM": "0"}, "DMLC_UDP_CHANNEL_NUM must be >= 1"),
    ({"DGT_BLOCK_SIZE": "4094"}, "DGT_BLOCK_SIZE must be a multiple of 4"),
    ({"DGT_BLOCK_SIZE": "70000"}, "DGT_BLOCK_SIZE must be a multiple of 4"),
    ({"DGT_CONTRIBUTION_ALPHA": "1"}, "DGT_CONTRIBUTION_ALPHA must be in [0, 1)"),
    ({"GEOMX_DGT_TEST_DROP_RATE": "1"}, "GEOMX_DGT_TEST_DROP_RATE must be in [0, 1)"),
    ({"MXNET_KVSTORE_USE_HFA": "1"}, "cannot be combined with MXNET_KVSTORE_USE_HFA"),
])
def test_bad_settings_fail_at_start_up(env, needle):
    full = {**BASE, "ENABLE_DGT": "1", **env}
    with pytest.raises(ConfigError) as err:
        config.load(full)
    assert needle in str(err.value) and "role: server" in str(err.value)


@pytest.mark.unit
def test_dgt_with_checkpoints_fails_at_start_up(tmp_path):
    env = {**BASE, "DMLC_ROLE_GLOBAL": "global_server", "DMLC_NUM_ALL_WORKER": "1", "ENABLE_DGT": "2",
           "GEOMX_CHECKPOINT_DIR": str(tmp_path)}
    with pytest.raises(ConfigError, match="cannot be combined with GEOMX_CHECKPOINT_DIR"):
        config.load(env)


@pytest.mark.unit
def test_settings_are_read_by_servers_only():
    cfg = config.load({**BASE, "ENABLE_DGT": "2", "DMLC_K": "0.8", "DMLC_UDP_CHANNEL_NUM": "2",
                       "ADAPTIVE_K_FLAG": "1", "DGT_GRACE_MS": "20"})
    assert (cfg.dgt.mode, cfg.dgt.k, cfg.dgt.channels, cfg.dgt.adaptive_k, cfg.dgt.grace) == (2, 0.8, 2, True, 0.02)
    worker = {**BASE, "DMLC_ROLE": "worker", "DMLC_NUM_ALL_WORKER": "1", "ENABLE_DGT": "9"}
    assert config.load(worker).dgt.mode == 0


@pytest.mark.unit
def test_adaptive_k_follows_the_loss():
    k = dgt.AdaptiveK(0.8, 0.2, workers=2, enabled=True)
    k.report("w0", 2.0)
    assert k.k == 0.8 and k.loss0 is None  # loss_0 is the mean once every worker reported
    k.report("w1", 2.0)
    assert k.loss0 == 2.0 and k.k == 0.8
    k.report("w0", 1.0)  # mean 1.5
    assert k.k == pytest.approx(0.8 * 1.5 / 2.0)
    k.report("w1", 0.1)
    k.report("w0", 0.1)
    assert k.k == 0.2  # K_MIN
    with pytest.raises(Exception, match="finite loss"):
        k.report("w0", float("nan"))


# -- sender to receiver over real sockets (no servers) ---------------------------------------------


def model_mode3(pushes, per, k, channels, alpha):
    """What the receiver should assemble in mode 3: reliable blocks exact (plus the residual their
    earlier quantized sends left), the others through 4-bit quantization with error feedback."""
    scorer, residual, out = blocks.Scorer(alpha), {}, []
    for data in pushes:
        ch = blocks.assign_channels(scorer.update((3, 0), data, per), k, channels)
        got = np.zeros_like(data)
        for i, c in enumerate(ch):
            block = data[i * per:(i + 1) * per] + residual.pop(i, 0)
            if c == blocks.RELIABLE:
                got[i * per:(i + 1) * per] = block
            elif c > 0:
                lo, hi, packed = blocks.quantize(block)
                sent = blocks.dequantize(lo, hi, packed, block.size)
                residual[i] = block - sent
                got[i * per:(i + 1) * per] = sent
        out.append(got)
    return out


@pytest.mark.unit
@pytest.mark.parametrize("mode", [1, 2, 3])
def test_sender_to_receiver_over_sockets(mode):
    from geomx.config import DGTConfig, NodeConfig
    from geomx.transport import bind_router, connect_dealer

    numel, per = 1000, 16  # 63 blocks of 16 float32 (64-byte blocks), the last one 8 elements
    cfg = NodeConfig(role="server", num_worker=1,
                     dgt=DGTConfig(mode=mode, k=0.4, channels=2, block_size=64, grace=5.0))
    h = Harness(grace=5.0, numel=numel)
    router, port = bind_router(h.loop, 0, "global-clients", wan=True)
    h.loop.add(router, lambda msg, origin: h.rx.on_tcp_block(msg, origin.identity, origin.link.name), routed=True)
    if mode == 1:
        h.rx.open_udp()
    link = connect_dealer(h.loop, "127.0.0.1", port, CLIENT[1], "ls->server0", peer="server0", wan=True)
    tx = dgt.Sender(cfg, h.loop)
    tx.attach([link], [("127.0.0.1", port)])
    tx.on_server_meta(0, {"dgt": h.rx.advert(CLIENT, 0, mode)})
    assert tx.not_ready([0]) is None
    rng = np.random.default_rng(11)
    pushes = [(rng.standard_normal(numel) * (1 + np.arange(numel) % 7)).astype(np.float32) for _ in range(4)]
    try:
        for r, data in enumerate(pushes, start=1):
            tx.send(0, Message(MsgType.PUSHPULL, sender=0, req_id=r, key=3, offset=0, numel=numel, total=numel,
                               dtype=wire.dtype_code(np.float32), meta={"x": r}, data=data))
            deadline = time.monotonic() + 10
            while len(h.delivered) < r and time.monotonic() < deadline:
                h.loop.run_once(0.02)
        assert [m.req_id for m, _ in h.delivered] == [1, 2, 3, 4]
        assert [m.meta for m, _ in h.delivered] == [{"x": r} for r in range(1, 5)]
        assert tx.sent["low"] > 0 and tx.sent["reliable"] > 0
        want = pushes if mode != 3 else model_mode3(pushes, per, 0.4, 2, cfg.dgt.alpha)
        for (msg, _), expected in zip(h.delivered, want):
            assert msg.data.dtype == np.float32 and msg.data.tobytes() == expected.tobytes()
        assert h.rx.stats.missing == 0 and h.rx.stats.rejected == 0
    finally:
        tx.close()
        link.close()
        h.rx.close()
        h.close()


@pytest.mark.unit
def test_captured_genuine_datagrams_replayed_or_altered_change_nothing():
    """The local server's real datagrams go through a tap that keeps a copy. After each push is
    delivered, every datagram captured so far is sent again, and again with its request id moved to
    the next push (MAC unchanged): each push still arrives exactly as sent, and every replay is
    ignored or refused."""
    from geomx.config import DGTConfig, NodeConfig
    from geomx.transport import bind_router, connect_dealer

    numel = 1000
    cfg = NodeConfig(role="server", num_worker=1,
                     dgt=DGTConfig(mode=1, k=0.4, channels=2, block_size=64, grace=5.0))
    h = Harness(grace=5.0, numel=numel)
    router, port = bind_router(h.loop, 0, "global-clients", wan=True)
    h.loop.add(router, lambda msg, origin: h.rx.on_tcp_block(msg, origin.identity, origin.link.name), routed=True)
    udp_port = h.rx.open_udp()
    tap = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tap.bind(("127.0.0.1", 0))
    tap.setblocking(False)
    captured = []

    def forward():
        while True:
            try:
                dg = tap.recv(65535)
            except BlockingIOError:
                return
            captured.append(dg)
            tap.sendto(dg, ("127.0.0.1", udp_port))

    h.loop.add_fd(tap, forward)
    link = connect_dealer(h.loop, "127.0.0.1", port, CLIENT[1], "ls->server0", peer="server0", wan=True)
    tx = dgt.Sender(cfg, h.loop)
    tx.attach([link], [("127.0.0.1", port)])
    advert = h.rx.advert(CLIENT, 0, 1)
    tx.on_server_meta(0, {"dgt": {**advert, "udp_port": tap.getsockname()[1]}})  # the party sends to the tap
    rng = np.random.default_rng(3)
    pushes = [rng.standard_normal(numel).astype(np.float32) for _ in range(4)]
    attacker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    replayed = 0
    try:
        for r, data in enumerate(pushes, start=1):
            tx.send(0, Message(MsgType.PUSHPULL, sender=0, req_id=r, key=3, offset=0, numel=numel, total=numel,
                               dtype=wire.dtype_code(np.float32), data=data))
            deadline = time.monotonic() + 10
            while len(h.delivered) < r and time.monotonic() < deadline:
                h.loop.run_once(0.02)
            assert len(h.delivered) == r
            before = h.rx.stats.blocks + h.rx.stats.rejected
            for dg in list(captured):
                attacker.sendto(dg, ("127.0.0.1", udp_port))
                moved = bytearray(dg)
                # The header's request id (little-endian u64 after magic, type, dtype, flags, sender).
                at = datagram.PREFIX + 12
                moved[at:at + 8] = (r + 1).to_bytes(8, "little")
                attacker.sendto(bytes(moved), ("127.0.0.1", udp_port))
                replayed += 2
            deadline = time.monotonic() + 10
            while h.rx.stats.blocks + h.rx.stats.rejected < before + 2 * len(captured) \
                    and time.monotonic() < deadline:
                h.loop.run_once(0.02)
        assert tx.sent["low"] > 0 and captured
        for (msg, _), expected in zip(h.delivered, pushes):
            assert msg.data.tobytes() == expected.tobytes()
        st = h.rx.stats
        assert st.late == 0 and st.missing == 0, st.as_dict()
        assert st.forged == replayed // 2 and st.duplicates == replayed // 2, st.as_dict()
    finally:
        attacker.close()
        tx.close()
        link.close()
        h.loop.remove_fd(tap)
        tap.close()
        h.rx.close()
        h.close()
