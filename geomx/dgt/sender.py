"""DGT's sending end, in the local server: cut the party's push to a global server into blocks and
send each on the channel its score earns (see :mod:`geomx.dgt.blocks`).

Channel 0 is the party's ordinary TCP link to the global server (the KVClient's), so important
blocks never wait behind unimportant ones. Channels 1..C are, in mode 1, UDP sockets marked with
decreasing IP_TOS, and in modes 2 and 3 one second TCP link (identity ``<main>/low``, IP_TOS 0) on
which the blocks go in channel order. The global server's UDP port, this party's sender id and its
MAC key arrive in the meta of the INIT replies (``meta["dgt"]``), so nothing is configured by hand.
"""
from __future__ import annotations

import logging
import math
import socket
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import zmq

from ..config import NodeConfig
from ..errors import ProtocolError
from ..transport import EventLoop, Link, connect_dealer
from ..wire import Message, MsgType
from . import blocks, datagram
from .receiver import LOW_SUFFIX

log = logging.getLogger("geomx.dgt")

DGT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
MODE_NAMES = {1: "UDP", 2: "TCP, two priority links", 3: "TCP, two priority links, 4-bit low-priority blocks"}


def channel_tos(channel: int, channels: int) -> int:
    """IP_TOS of a low-priority channel: (C - c) * 32 as in GeoMX (precedence bits), capped at 7."""
    return min(channels - channel, 7) << 5


class _Peer:
    """One global server as seen by the sender."""

    __slots__ = ("link", "low", "host", "udp_port", "sender_id", "mac", "mode")

    def __init__(self, link: Link, host: str):
        self.link = link
        self.low: Optional[Link] = None
        self.host = host
        self.udp_port = 0
        self.sender_id = 0
        self.mac: Optional[datagram.Mac] = None
        self.mode = 0  # as the global server announced it; 0 until then


class AdaptiveK:
    """K follows the training loss the party's workers report: K_t = max(K0 * loss_t / loss_0, K_min),
    at most 1. loss_t is the mean of each worker's latest report, loss_0 its value once every worker
    reported once."""

    def __init__(self, k0: float, k_min: float, workers: int, enabled: bool):
        self.k0 = k0
        self.k_min = k_min
        self.workers = workers
        self.enabled = enabled
        self.k = k0
        self.latest: Dict[object, float] = {}
        self.loss0: Optional[float] = None

    def report(self, worker: object, loss: float) -> None:
        if not (isinstance(loss, float) and math.isfinite(loss) and loss > 0):
            raise ProtocolError(f"report_loss needs a finite loss > 0, got {loss!r}")
        self.latest[worker] = loss
        if len(self.latest) < self.workers:
            return
        mean = sum(self.latest.values()) / len(self.latest)
        if self.loss0 is None:
            self.loss0 = mean
        if self.enabled:
            self.k = min(1.0, max(self.k0 * mean / self.loss0, self.k_min))


class Sender:
    def __init__(self, cfg: NodeConfig, loop: EventLoop, name: str = "local server"):
        self.cfg = cfg
        self.loop = loop
        self.name = name
        self.mode = cfg.dgt.mode
        self.channels = cfg.dgt.channels
        self.scorer = blocks.Scorer(cfg.dgt.alpha)
        self.quantizer = blocks.Quantizer() if self.mode == 3 else None
        self.k = AdaptiveK(cfg.dgt.k, cfg.dgt.k_min, cfg.num_worker, cfg.dgt.adaptive_k)
        self.peers: List[_Peer] = []
        self.udp: List[socket.socket] = []
        self.drop_rate = cfg.dgt.test_drop_rate
        # GEOMX_DGT_TEST_DROP_RATE's choices: seeded, so that a test drops the same blocks in every run
        # (unseeded, the accuracy test's result varied by more than its tolerance from run to run).
        self._rng = np.random.default_rng(0)
        self.sent = {"reliable": 0, "low": 0, "dropped_zero": 0, "udp_lost_at_sender": 0}

    # -- set-up -------------------------------------------------------------------------------
    def attach(self, links: Sequence[Link], hosts: Sequence[Tuple[str, int]]) -> None:
        """Use the party's links to the global servers (``hosts``: their advertised addresses), in
        server order; called once per server (geomx.senders.DgtSender) or once for all."""
        first = not self.peers
        for link, (host, port) in zip(links, hosts):
            peer = _Peer(link, host)
            self._connect_low(peer, port, len(self.peers))
            self.peers.append(peer)
        if not first:
            return
        if self.mode == 1:
            for c in range(1, self.channels + 1):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, channel_tos(c, self.channels))
                sock.setblocking(False)
                self.udp.append(sock)
        log.info("%s: DGT mode %d (%s), K=%.3g%s, %d low-priority channel(s), %d-byte blocks",
                 self.name, self.mode, MODE_NAMES[self.mode], self.k.k0,
                 f" adaptive down to {self.k.k_min:.3g}" if self.k.enabled else "", self.channels,
                 self.cfg.dgt.block_size)

    def _connect_low(self, peer: _Peer, port: int, server: int) -> None:
        """Modes 2 and 3: the low-priority link beside ``peer``'s link, under the same identity plus
        LOW_SUFFIX (the global server knows the two as one party)."""
        if self.mode not in (2, 3):
            return
        identity = peer.link.sock.getsockopt(zmq.IDENTITY) + LOW_SUFFIX
        peer.low = connect_dealer(self.loop, peer.host, port, identity, f"{peer.link.name}/low",
                                  peer=f"global server {server} (low priority)", wan=True, cross_party=True)
        peer.low.sock.setsockopt(zmq.TOS, 0)
        self.loop.links.append(peer.low)  # closed with the loop; it receives nothing

    def relink(self, server: int, link: Link, port: int) -> None:
        """Server ``server``'s link was made anew (after its connection broke): send over it, and make
        the low-priority link anew beside it. What the server learnt of this party stays (its UDP
        port, the party's sender id and key)."""
        peer = self.peers[server]
        if peer.low is not None:
            # Out of the loop first: its connection monitor would otherwise be read after the close (CI
            # saw a local server die of that at the end of a run with two global servers).
            self.loop.remove(peer.low)
            peer.low.close()
        peer.link = link
        self._connect_low(peer, port, server)

    def on_server_meta(self, server: int, meta: dict) -> None:
        """Learn a global server's DGT announcement from a reply's meta."""
        info = meta.get("dgt")
        if not isinstance(info, dict) or server >= len(self.peers):
            return
        mode, port, sender_id, key = info.get("mode"), info.get("udp_port"), info.get("sender_id"), info.get("key")
        if not (isinstance(mode, int) and isinstance(port, int) and 0 <= port <= 65535
                and isinstance(sender_id, int) and 0 < sender_id < 1 << 32 and isinstance(key, str)):
            # Not the announcement itself: it holds the key.
            log.error("%s: global server %d sent a malformed DGT announcement (fields mode, udp_port, sender_id, "
                      "key)", self.name, server)
            return
        try:
            raw = bytes.fromhex(key)
        except ValueError:
            raw = b""
        if len(raw) != datagram.KEY_BYTES:
            log.error("%s: global server %d sent a malformed DGT key (field key: %d bytes, expected %d)",
                      self.name, server, len(raw), datagram.KEY_BYTES)
            return
        peer = self.peers[server]
        peer.mode, peer.udp_port, peer.sender_id, peer.mac = mode, port, sender_id, datagram.Mac(raw)

    def not_ready(self, servers: Sequence[int]) -> Optional[str]:
        """Why a push to ``servers`` cannot use DGT (None when it can)."""
        for i in servers:
            peer = self.peers[i]
            if peer.mode != self.mode:
                said = f"ENABLE_DGT={peer.mode}" if peer.mode else "DGT off (ENABLE_DGT unset or 0)"
                return (f"this local server has ENABLE_DGT={self.mode} but global server {i} announced {said}; "
                        "set the same ENABLE_DGT on the global and local servers")
            if self.mode == 1 and not peer.udp_port:
                return f"global server {i} announced no UDP port for DGT mode 1"
            if self.mode == 1 and peer.mac is None:
                return f"global server {i} announced no DGT key (field key) for DGT mode 1"
        return None

    def report_loss(self, worker: object, loss: float) -> None:
        before = self.k.k
        self.k.report(worker, loss)
        if self.k.k != before:
            log.debug("%s: DGT K %.3f -> %.3f (loss %.4g, first %.4g)", self.name, before, self.k.k, loss,
                      self.k.loss0)

    def close(self) -> None:
        for sock in self.udp:
            sock.close()
        self.udp = []

    # -- sending ------------------------------------------------------------------------------
    def send(self, server: int, msg: Message) -> None:
        """KVClient's send hook: a dense float push goes as DGT blocks, anything else unchanged."""
        peer = self.peers[server]
        data = msg.data
        if (msg.type != MsgType.PUSHPULL or data is None or msg.payload or data.dtype not in DGT_DTYPES
                or peer.mode != self.mode):
            peer.link.send(msg)
            return
        per = blocks.block_elements(self.cfg.dgt.block_size, data.dtype)
        scores = self.scorer.update((msg.key, msg.offset), data, per)
        channels = blocks.assign_channels(scores, self.k.k, self.channels)
        last = scores.size - 1
        nsent = int(np.count_nonzero(channels != blocks.DROPPED))
        self.sent["dropped_zero"] += scores.size - nsent
        for i in np.flatnonzero(channels[:last] == blocks.RELIABLE):
            peer.link.send(self._block(msg, int(i), per, 0, exact=True))
        low = np.flatnonzero(channels > 0)
        for i in low[np.argsort(channels[low], kind="stable")]:
            self._send_low(peer, msg, int(i), per, int(channels[i]))
        end = self._block(msg, last, per, 0, exact=True)
        end.meta = {"dgt": {"nsent": nsent, "offset": msg.offset, "total": msg.total, "version": msg.version},
                    "meta": msg.meta}
        peer.link.send(end)
        self.sent["reliable"] += nsent - low.size

    def _block(self, msg: Message, i: int, per: int, channel: int, exact: bool) -> Message:
        data = msg.data
        assert data is not None
        values = data[i * per:(i + 1) * per]
        if exact and self.quantizer is not None:
            values = self.quantizer.flush((msg.key, msg.offset, i), values)
        return Message(MsgType.DGT_BLOCK, sender=msg.sender, req_id=msg.req_id, key=msg.key, offset=i * per,
                       numel=values.size, total=data.size, priority=channel, version=i, data=values)

    def _send_low(self, peer: _Peer, msg: Message, i: int, per: int, channel: int) -> None:
        self.sent["low"] += 1
        if self.mode == 1:
            if self.drop_rate and self._rng.random() < self.drop_rate:
                self.sent["udp_lost_at_sender"] += 1  # GEOMX_DGT_TEST_DROP_RATE: lost on purpose
                return
            block = self._block(msg, i, per, channel, exact=True)
            assert peer.mac is not None
            try:
                self.udp[channel - 1].sendmsg(datagram.encode(peer.sender_id, peer.mac, block), [], 0,
                                              (peer.host, peer.udp_port))
            except OSError:
                # A full socket buffer (or ENOBUFS): this datagram is lost, like one lost on the way.
                self.sent["udp_lost_at_sender"] += 1
            return
        assert peer.low is not None
        if self.quantizer is None:
            peer.low.send(self._block(msg, i, per, channel, exact=True))
            return
        block = self._block(msg, i, per, channel, exact=False)
        lo, hi, packed = self.quantizer.encode((msg.key, msg.offset, i), block.data)  # type: ignore[arg-type]
        block.meta = {"payload": {"lo": lo, "hi": hi}}
        block.data, block.payload = packed, True
        peer.low.send(block)
