"""DGT's receiving end, in the global server: authenticate blocks, reassemble each push, and hand it
to the server as one ordinary PUSHPULL.

A UDP datagram is taken only if its MAC checks with the key of the party its sender id names
(:mod:`geomx.dgt.datagram`), and only into a replay window: a block already received is ignored,
one of a push older than the last ``RECENT_PUSHES`` of its key is dropped, and one whose request
id is more than ``REQ_WINDOW`` beyond the highest the party has used on its reliable TCP link is
refused. Nothing of a refused datagram is kept, so forged or replayed datagrams cannot displace
genuine blocks or take up the ``MAX_OPEN_PUSHES`` limit.

A push is identified by (party, key, request id). Its last block always comes over the reliable TCP
link and says how many blocks were sent; the push is delivered as soon as all of them are in, or
``grace`` seconds after the last block, whichever comes first. A block still missing then counts as
zero for this round; if it arrives later it is added to the next push delivered for the same party
and key (it is not lost, just one round late). Duplicates are ignored. Nothing waits for a datagram
beyond the grace period.
"""
from __future__ import annotations

import collections
import logging
import math
import socket
from typing import Callable, Dict, Optional, Tuple

import numpy as np

from .. import wire
from ..errors import ProtocolError
from ..security import template
from ..transport import EventLoop, base_identity, log_limited, peer_label
from ..wire import Message, MsgType, meta_field
from . import blocks, datagram

log = logging.getLogger("geomx.dgt")

Client = Tuple[str, bytes]
# key -> (elements this server holds, dtype), or None for an unknown key
Lookup = Callable[[int], Optional[Tuple[int, np.dtype]]]
Deliver = Callable[[Message, bytes], None]

LOW_SUFFIX = b"/low"  # identity suffix of a local server's low-priority TCP link (modes 2, 3)
MAX_OPEN_PUSHES = 16  # unfinished pushes kept per (party, key); more is a misbehaving sender
RECENT_PUSHES = 8  # delivered pushes per (party, key) whose blocks are still recognised when late
UDP_RCVBUF = 8 << 20  # asked for; the kernel caps it at net.core.rmem_max
# How far beyond the highest request id a party has used on its reliable link (INIT, blocks) a
# datagram's request id may be. A party's request ids count all its requests (every key, every
# server); its UDP blocks may overtake its own TCP messages still in flight, which are at most
# GEOMX_MAX_KEYS_PER_CLIENT (100,000) keys times GEOMX_MAX_ROUNDS_AHEAD (16) rounds of them. A
# request id further ahead than this is nothing a party sends.
REQ_WINDOW = 1 << 24


class _Assembly:
    __slots__ = ("req_id", "buf", "seen", "nsent", "identity", "sender", "part_offset", "key_total", "version",
                 "meta")

    def __init__(self, req_id: int, numel: int):
        self.req_id = req_id
        self.buf = np.zeros(numel, dtype=np.float32)
        self.seen: set = set()  # offsets of the blocks received
        self.nsent: Optional[int] = None  # known once the last block arrived
        self.identity = b""
        self.sender = 0
        self.part_offset = 0
        self.key_total = 0
        self.version = 0
        self.meta: Optional[dict] = None


class _KeyStream:
    """The pushes of one party for one key."""

    __slots__ = ("key", "dtype", "open", "recent", "newest", "carry")

    def __init__(self, key: int, dtype: np.dtype) -> None:
        self.key = key
        self.dtype = dtype
        self.open: Dict[int, _Assembly] = {}
        self.recent: "collections.OrderedDict[int, set]" = collections.OrderedDict()
        self.newest = 0  # highest request id delivered
        self.carry: Optional[np.ndarray] = None  # late blocks, added to the next delivery


class Stats:
    # rejected: every block refused; forged: of those, datagrams whose MAC (or sender id) failed;
    # out_of_window: MAC-verified datagrams beyond REQ_WINDOW. duplicates and too_old are ignored
    # blocks (replays among them), not counted as rejected.
    __slots__ = ("blocks", "late", "duplicates", "missing", "too_old", "rejected", "forged", "out_of_window",
                 "pushes")

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def as_dict(self) -> Dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class Receiver:
    def __init__(self, loop: EventLoop, grace: float, lookup: Lookup, deliver: Deliver, name: str = "global server"):
        self.loop = loop
        self.grace = grace
        self.lookup = lookup
        self.deliver = deliver
        self.name = name
        self.client_sender: Dict[Client, int] = {}  # the party's sender id ...
        self.sender_client: Dict[int, Client] = {}
        self.macs: Dict[int, datagram.Mac] = {}  # ... and the MAC of its key, by sender id
        self.client_rank: Dict[Client, int] = {}
        self.high: Dict[Client, int] = {}  # highest request id seen on the party's reliable link
        self.streams: Dict[Tuple[Client, int], _KeyStream] = {}
        self.stats = Stats()
        self._keys: Dict[Client, bytes] = {}
        self.udp: Optional[socket.socket] = None
        self.udp_port = 0
        self._rx = bytearray(datagram.MAX_DATAGRAM + 1)

    # -- set-up -------------------------------------------------------------------------------
    def open_udp(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Bind the UDP socket of mode 1 at ``host`` (``*``: every interface) and ``port`` (0: any free
        port) and poll it in the loop."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RCVBUF)
        try:
            sock.bind(("0.0.0.0" if host == "*" else host, port))
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        self.udp = sock
        self.udp_port = sock.getsockname()[1]
        got = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        log.info("%s: DGT UDP channel on port %d (receive buffer %d bytes; raise net.core.rmem_max if "
                 "datagrams are dropped under bursts)", self.name, self.udp_port, got)
        self.loop.add_fd(sock, self._on_udp_readable)
        return self.udp_port

    def advert(self, client: Client, rank: int, mode: int, req_id: int = 0) -> dict:
        """What a party learns in its INIT replies (``req_id``: the INIT's): the mode, this server's UDP
        port, the party's sender id and its MAC key (random, per party and server; made once and sent
        only over the party's TCP link, which CURVE encrypts)."""
        sender_id = self.client_sender.get(client)
        if sender_id is None:
            sender_id = len(self.client_sender) + 1  # not secret: it only names the key
            key = datagram.new_key()
            self.client_sender[client] = sender_id
            self.sender_client[sender_id] = client
            self.macs[sender_id] = datagram.Mac(key)
            self._keys[client] = key
        self.client_rank[client] = rank
        self.high[client] = max(self.high.get(client, 0), req_id)
        return {"mode": mode, "udp_port": self.udp_port, "sender_id": sender_id, "key": self._keys[client].hex()}

    def close(self) -> None:
        if self.udp is not None:
            self.loop.remove_fd(self.udp)
            self.udp.close()
            self.udp = None

    # -- input --------------------------------------------------------------------------------
    def _reject(self, reason: str, source: str) -> None:
        self.stats.rejected += 1
        self._log(f"{self.name}: dropped a DGT block from {source}: {reason}", source, reason)

    @staticmethod
    def _log(text: str, source: str, reason: str) -> None:
        # Once per 5 s per (peer, kind): a flood of bad datagrams must not flood the log too, and the
        # kind is the reason's template, so attacker-chosen numbers do not make new kinds.
        log_limited(logging.WARNING, text, key=("dgt", source, template(reason)))

    def _on_udp_readable(self) -> None:
        assert self.udp is not None
        view = memoryview(self._rx)
        for _ in range(256):  # bounded, like the event loop's ZeroMQ reads
            try:
                n, addr = self.udp.recvfrom_into(self._rx)
            except (BlockingIOError, InterruptedError):
                return
            buf = view[:n]
            try:
                # The MAC first: until it checks, every byte may be an attacker's, so nothing else
                # of the datagram is read (the source address only names it in the log).
                sender_id = datagram.sender_of(buf)
                datagram.verify(buf, self.macs.get(sender_id))
            except ProtocolError as exc:
                self.stats.forged += 1
                self._reject(str(exc), addr[0])
                continue
            client = self.sender_client[sender_id]
            source = peer_label(client[1])
            try:
                msg = datagram.decode(buf)
                if msg.sender != self.client_rank[client]:
                    raise ProtocolError(f"sender {msg.sender} does not match the key's party "
                                        f"{self.client_rank[client]}")
                ignored = self._on_block(client, msg, last=False, reliable=False)
            except ProtocolError as exc:
                self._reject(str(exc), source)
                continue
            if ignored:
                self._log(f"{self.name}: ignored a DGT datagram from {source}: {ignored}", source, ignored)

    def on_tcp_block(self, msg: Message, identity: bytes, link_name: str) -> None:
        """A block from a party's reliable link or (modes 2, 3) its low-priority TCP link."""
        main = identity[:-len(LOW_SUFFIX)] if identity.endswith(LOW_SUFFIX) else identity
        client = (link_name, base_identity(main))
        try:
            if client not in self.client_sender:
                raise ProtocolError("block from a party that never initialised a key here")
            if msg.sender != self.client_rank[client]:
                raise ProtocolError(f"sender {msg.sender} does not match the link's party {self.client_rank[client]}")
            last = msg.meta is not None and "dgt" in msg.meta
            if last and main != identity:
                raise ProtocolError("the last block of a push must come over the reliable link")
            self._on_block(client, msg, last=last, reliable=main == identity, identity=main)
        except ProtocolError as exc:
            self._reject(str(exc), peer_label(identity))

    # -- reassembly ---------------------------------------------------------------------------
    def _values(self, msg: Message, numel_held: int, dtype: np.dtype) -> np.ndarray:
        """The block's values (validated against the key), float32."""
        if msg.total != numel_held:
            raise ProtocolError(f"key {msg.key}: block of a {msg.total}-element part, this server holds "
                                f"{numel_held}")
        if msg.numel == 0 or msg.data is None:
            raise ProtocolError(f"key {msg.key}: empty block")
        if msg.payload:  # mode 3: 4-bit quantized
            q = meta_field(msg, "payload", dict)
            lo, hi = q.get("lo"), q.get("hi")
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                       for v in (lo, hi)) or hi < lo:
                raise ProtocolError(f"key {msg.key}: quantized block with bad range {lo!r}..{hi!r}")
            if msg.data.size != (msg.numel + 1) // 2:
                raise ProtocolError(f"key {msg.key}: quantized block of {msg.data.size} bytes for "
                                    f"{msg.numel} elements")
            return blocks.dequantize(float(lo), float(hi), msg.data, msg.numel)
        if msg.data.dtype != dtype:
            raise ProtocolError(f"key {msg.key}: block of dtype {msg.data.dtype}, key is {dtype}")
        return msg.data.astype(np.float32, copy=False)

    def _on_block(self, client: Client, msg: Message, last: bool, reliable: bool,
                  identity: bytes = b"") -> Optional[str]:
        """Take one block; ProtocolError if it is refused, or why it was ignored (a duplicate, too old).
        ``identity``: the connection a last block came by, which its push is answered on."""
        if reliable:
            if msg.req_id > self.high[client]:
                self.high[client] = msg.req_id
        elif msg.req_id > self.high[client] + REQ_WINDOW:
            # Before any state is made for it: such a block would open a push that no last block
            # ever finishes, and MAX_OPEN_PUSHES of them would shut the genuine ones out.
            self.stats.out_of_window += 1
            raise ProtocolError(f"request id {msg.req_id} is beyond the replay window (the party's link is at "
                                f"request {self.high[client]}, at most {REQ_WINDOW} ahead is taken)")
        held = self.lookup(msg.key)
        if held is None:
            raise ProtocolError(f"block for key {msg.key}, which this server does not hold")
        numel, dtype = held
        values = self._values(msg, numel, dtype)
        stream = self.streams.get((client, msg.key))
        if stream is None:
            stream = self.streams[(client, msg.key)] = _KeyStream(msg.key, dtype)
        self.stats.blocks += 1
        asm = stream.open.get(msg.req_id)
        if asm is None:
            if msg.req_id <= stream.newest:
                return self._late(stream, msg, values)
            if len(stream.open) >= MAX_OPEN_PUSHES:
                raise ProtocolError(f"key {msg.key}: more than {MAX_OPEN_PUSHES} unfinished pushes")
            asm = stream.open[msg.req_id] = _Assembly(msg.req_id, numel)
        if msg.offset in asm.seen:
            self.stats.duplicates += 1
            return f"block at {msg.offset} of request {msg.req_id} was already received (a replay or a duplicate)"
        if last:
            info = meta_field(msg, "dgt", dict)
            nsent, part_offset, key_total = info.get("nsent"), info.get("offset"), info.get("total")
            version = info.get("version", 0)
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                       for v in (nsent, part_offset, key_total, version)) or part_offset + numel > key_total \
                    or version >= 1 << 32:
                raise ProtocolError(f"key {msg.key}: last block with bad push description {info!r}")
            request_meta = (msg.meta or {}).get("meta")
            if request_meta is not None and not isinstance(request_meta, dict):
                raise ProtocolError(f"key {msg.key}: last block with a non-object request meta")
            asm.nsent, asm.part_offset, asm.key_total, asm.meta = nsent, part_offset, key_total, request_meta
            asm.sender, asm.version = msg.sender, version
            asm.identity = identity or client[1]
        asm.seen.add(msg.offset)
        asm.buf[msg.offset:msg.offset + msg.numel] = values
        if last:
            # Earlier pushes of this key had their last block earlier on the same TCP link: they go
            # first, whatever they still miss, so rounds reach the server in order.
            for older in sorted(r for r in stream.open if r < msg.req_id):
                self._finish(stream, stream.open[older])
            if len(asm.seen) >= asm.nsent:  # type: ignore[operator]
                self._finish(stream, asm)
            else:
                self.loop.call_later(self.grace, lambda: self._expire(stream, asm))
        elif asm.nsent is not None and len(asm.seen) >= asm.nsent:
            self._finish(stream, asm)
        return None

    def _late(self, stream: _KeyStream, msg: Message, values: np.ndarray) -> Optional[str]:
        """A block of a delivered push: added to the next push once, unless it is too old to tell."""
        seen = stream.recent.get(msg.req_id)
        if seen is None:
            self.stats.too_old += 1
            return (f"block of request {msg.req_id} is older than the replay window (the last {RECENT_PUSHES} "
                    f"pushes of key {msg.key})")
        if msg.offset in seen:
            self.stats.duplicates += 1
            return f"block at {msg.offset} of request {msg.req_id} was already received (a replay or a duplicate)"
        seen.add(msg.offset)
        self.stats.late += 1
        if stream.carry is None:
            stream.carry = np.zeros(msg.total, dtype=np.float32)
        stream.carry[msg.offset:msg.offset + msg.numel] += values
        return None

    def _expire(self, stream: _KeyStream, asm: _Assembly) -> None:
        if stream.open.get(asm.req_id) is asm:
            self._finish(stream, asm)

    def _finish(self, stream: _KeyStream, asm: _Assembly) -> None:
        del stream.open[asm.req_id]
        stream.newest = max(stream.newest, asm.req_id)
        stream.recent[asm.req_id] = asm.seen
        while len(stream.recent) > RECENT_PUSHES:
            stream.recent.popitem(last=False)
        data = asm.buf
        if stream.carry is not None:
            data += stream.carry
            stream.carry = None
        if asm.nsent is None:
            # Its last block never came (it was refused): what did arrive joins the next push.
            stream.carry = data
            return
        self.stats.pushes += 1
        self.stats.missing += max(0, asm.nsent - len(asm.seen))
        value = data if stream.dtype == np.float32 else data.astype(stream.dtype)
        msg = Message(MsgType.PUSHPULL, sender=asm.sender, req_id=asm.req_id, key=stream.key,
                      offset=asm.part_offset, numel=data.size, total=asm.key_total, version=asm.version,
                      dtype=wire.dtype_code(value.dtype), meta=asm.meta, data=value)
        self.deliver(msg, asm.identity)
