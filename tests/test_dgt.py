"""DGT (geomx/dgt): block scoring and channel assignment against a loop-by-loop model, 4-bit
quantization with residuals, reassembly (reordered, duplicated, dropped, late blocks) in a real
event loop, malformed and spoofed datagrams over real UDP sockets, and the start-up checks."""
import logging
import socket
import time

import numpy as np
import pytest
import zmq

from geomx import config, dgt, wire
from geomx.dgt import blocks, datagram
from geomx.errors import ConfigError
from geomx.transport import EventLoop
from geomx.wire import Message, MsgType

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
    def __init__(self, grace=0.2, numel=NUMEL, dtype=np.float32):
        self.ctx = zmq.Context()
        self.loop = EventLoop(self.ctx, name="test")
        self.delivered = []
        self.rx = dgt.Receiver(self.loop, grace, lambda key: (numel, np.dtype(dtype)) if key == 3 else None,
                               lambda msg, ident: self.delivered.append((msg, ident)))
        self.info = self.rx.advert(CLIENT, 0, mode=2)
        self.numel = numel

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
        self.loop.close()
        self.ctx.term()


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


# -- datagrams over real UDP sockets --------------------------------------------------------------


@pytest.mark.unit
def test_malformed_and_spoofed_datagrams_are_dropped_and_serving_continues(caplog):
    h = Harness(grace=5.0)
    port = h.rx.open_udp()
    token = bytes.fromhex(h.info["token"])
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    addr = ("127.0.0.1", port)

    def good(offset, values, tok=token, sender=0):
        b = h.block(1, offset, values, sender=sender)
        return b"".join(bytes(memoryview(f)) for f in datagram.encode(tok, b))

    try:
        with caplog.at_level(logging.WARNING, logger="geomx.dgt"):
            dg = good(0, [1, 2, 3, 4])
            tx.sendto(b"short", addr)
            tx.sendto(dg[:-3], addr)  # truncated data: wrong size
            tx.sendto(dg + b"\0\0\0\0", addr)  # trailing bytes: wrong size
            tx.sendto(good(0, [1, 2, 3, 4], tok=b"\x01" * 16), addr)  # foreign sender (unknown token)
            tx.sendto(good(0, [1, 2, 3, 4], sender=1), addr)  # right token, wrong party rank
            junk = bytearray(dg)
            junk[16:20] = b"XXXX"  # bad magic
            tx.sendto(bytes(junk), addr)
            b = h.block(1, 0, [1, 2, 3, 4])
            b.key = 99
            tx.sendto(b"".join(bytes(memoryview(f)) for f in datagram.encode(token, b)), addr)  # unknown key
            m = Message(MsgType.PUSH, key=3, total=NUMEL, data=np.ones(4, np.float32))
            tx.sendto(token + b"".join(bytes(memoryview(f)) for f in wire.encode(m)), addr)  # not a block
            tx.sendto(dg, addr)  # finally two good ones
            tx.sendto(good(4, [5, 6, 7, 8]), addr)
            deadline = time.monotonic() + 10
            while h.rx.stats.blocks < 2 and time.monotonic() < deadline:
                h.loop.run_once(0.05)
        assert h.rx.stats.rejected == 8, caplog.text
        for reason in ("shorter than", "data frame is", "unknown sender token", "does not match",
                       "bad magic", "does not hold", "only DGT_BLOCK"):
            assert reason in caplog.text, reason
        h.send(h.block(1, 8, [9, 10], last_nsent=3))
        assert h.delivered and h.delivered[0][0].data.tolist() == list(range(1, 11))
    finally:
        tx.close()
        h.rx.close()
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
    assert (cfg.dgt_mode, cfg.dgt_k, cfg.dgt_channels, cfg.dgt_adaptive_k, cfg.dgt_grace) == (2, 0.8, 2, True, 0.02)
    worker = {**BASE, "DMLC_ROLE": "worker", "DMLC_NUM_ALL_WORKER": "1", "ENABLE_DGT": "9"}
    assert config.load(worker).dgt_mode == 0


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
    from geomx.config import NodeConfig
    from geomx.transport import bind_router, connect_dealer

    numel, per = 1000, 16  # 63 blocks of 16 float32 (64-byte blocks), the last one 8 elements
    cfg = NodeConfig(role="server", num_worker=1, dgt_mode=mode, dgt_k=0.4, dgt_channels=2, dgt_block_size=64,
                     dgt_grace=5.0)
    h = Harness(grace=5.0, numel=numel)
    router, port = bind_router(h.loop, 0, "global-clients", wan=True)
    h.loop.add(router, lambda msg, ident, link: h.rx.on_tcp_block(msg, ident, link.name), routed=True)
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
        want = pushes if mode != 3 else model_mode3(pushes, per, 0.4, 2, cfg.dgt_alpha)
        for (msg, _), expected in zip(h.delivered, want):
            assert msg.data.dtype == np.float32 and msg.data.tobytes() == expected.tobytes()
        assert h.rx.stats.missing == 0 and h.rx.stats.rejected == 0
    finally:
        tx.close()
        link.close()
        h.rx.close()
        h.close()
