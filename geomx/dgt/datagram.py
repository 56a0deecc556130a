"""DGT's UDP datagram: a 4-byte sender id, a 16-byte MAC, then an ordinary wire header and the
block's bytes.

Each party (each local server, as a client of one global server) gets a random 32-byte key and a
small sender id from the global server, over its authenticated TCP link (in the meta of INIT
replies; encrypted there when CURVE is on). The sender id is not secret: it only tells the
receiver which key to check with. The MAC is keyed BLAKE2b (16-byte digest) over the sender id,
the wire header and the block bytes, so a datagram that was not written by the key's holder, or
that was changed on the way (any byte, header or data), is refused before any of it is read: the
receiver checks the MAC first, in constant time, and only then decodes the header with
:func:`geomx.wire.decode` (which must give a DGT_BLOCK with data and no meta).

A MAC does not stop a captured genuine datagram from being sent again: the receiver's replay
window (geomx.dgt.receiver) does.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
from typing import List, Optional, Tuple

from .. import wire
from ..errors import ProtocolError
from ..wire import Message, MsgType

SENDER_ID = struct.Struct("<I")
MAC_BYTES = 16
KEY_BYTES = 32
PREFIX = SENDER_ID.size + MAC_BYTES
DATAGRAM_HEADER = PREFIX + wire.HEADER_SIZE
MAX_DATAGRAM = 65507  # the largest UDP payload over IPv4
# BLAKE2b's personalization: a key used for anything else (there is none today) cannot make MACs
# that pass here, and a future datagram format would change it.
_PERSON = b"geomx-dgt-v1"


def new_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


class Mac:
    """The keyed hash of one party's datagrams. Keying BLAKE2b costs a compression of a full block,
    so the keyed state is made once and copied per datagram."""

    __slots__ = ("_keyed",)

    def __init__(self, key: bytes):
        if len(key) != KEY_BYTES:
            raise ValueError(f"a DGT key is {KEY_BYTES} bytes, got {len(key)}")
        self._keyed = hashlib.blake2b(key=key, digest_size=MAC_BYTES, person=_PERSON)

    def digest(self, *parts) -> bytes:
        h = self._keyed.copy()
        for part in parts:
            h.update(part)
        return h.digest()


def encode(sender_id: int, mac: Mac, msg: Message) -> List[object]:
    """The datagram's buffers (for ``socket.sendmsg``, which gathers them without a copy)."""
    if msg.type != MsgType.DGT_BLOCK or msg.meta is not None or msg.data is None:
        raise ValueError("a DGT datagram carries one DGT_BLOCK with data and no meta")
    head, data = wire.encode(msg)
    sid = SENDER_ID.pack(sender_id)
    return [sid + mac.digest(sid, head, data), head, data]


def sender_of(buf: memoryview) -> int:
    """The (unauthenticated) sender id: which key to check the datagram with."""
    if len(buf) < DATAGRAM_HEADER:
        raise ProtocolError(f"datagram of {len(buf)} bytes is shorter than its {DATAGRAM_HEADER}-byte header")
    return SENDER_ID.unpack_from(buf)[0]


def verify(buf: memoryview, mac: Optional[Mac]) -> None:
    """ProtocolError unless ``buf`` carries a MAC made with ``mac``'s key over all its other bytes
    (``mac`` None: the sender id is nobody's). Constant time in the MAC's bytes."""
    if mac is None:
        raise ProtocolError("unknown sender id (not a party of this server)")
    expected = mac.digest(buf[:SENDER_ID.size], buf[PREFIX:])
    if not hmac.compare_digest(expected, buf[SENDER_ID.size:PREFIX]):
        raise ProtocolError("bad MAC (forged, damaged, or made with another key)")


def decode(buf: memoryview) -> Message:
    """The block of a datagram whose MAC :func:`verify` accepted; ProtocolError naming the problem if it
    is malformed. The block's data is a view of ``buf``: use it before the buffer is reused."""
    msg = wire.decode([buf[PREFIX:DATAGRAM_HEADER], buf[DATAGRAM_HEADER:]], MAX_DATAGRAM)
    if msg.type != MsgType.DGT_BLOCK:
        raise ProtocolError(f"datagram carries {msg.type.name}, only DGT_BLOCK travels over UDP")
    if msg.meta is not None or msg.payload:
        raise ProtocolError("a DGT datagram carries no meta and no encoded payload")
    return msg


def open_datagram(buf: memoryview, macs: dict) -> Tuple[int, Message]:
    """(sender id, block) of one received datagram: the MAC is checked before anything else of it is
    used. ``macs``: sender id -> :class:`Mac`."""
    sender_id = sender_of(buf)
    verify(buf, macs.get(sender_id))
    return sender_id, decode(buf)
