"""DGT's UDP datagram: a 16-byte sender token, then an ordinary wire header, then the block's bytes.

The token is random, issued by the global server to each local server over the TCP link (in the
meta of INIT replies), so a datagram is accepted only from a party that holds one; everything after
it is validated by :func:`geomx.wire.decode` like any other message, and must be a DGT_BLOCK with
data and no meta.
"""
from __future__ import annotations

import secrets
from typing import List, Tuple

from .. import wire
from ..errors import ProtocolError
from ..wire import Message, MsgType

TOKEN_BYTES = 16
DATAGRAM_HEADER = TOKEN_BYTES + wire.HEADER_SIZE
MAX_DATAGRAM = 65507  # the largest UDP payload over IPv4


def new_token() -> bytes:
    return secrets.token_bytes(TOKEN_BYTES)


def encode(token: bytes, msg: Message) -> List[object]:
    """The datagram's buffers (for ``socket.sendmsg``, which gathers them without a copy)."""
    if msg.type != MsgType.DGT_BLOCK or msg.meta is not None or msg.data is None:
        raise ValueError("a DGT datagram carries one DGT_BLOCK with data and no meta")
    frames = wire.encode(msg)
    return [token, *frames]


def decode(buf: memoryview) -> Tuple[bytes, Message]:
    """(token, block) from one received datagram; ProtocolError naming the problem if it is bad.
    The block's data is a view of ``buf``: use it before the buffer is reused."""
    if len(buf) < DATAGRAM_HEADER:
        raise ProtocolError(f"datagram of {len(buf)} bytes is shorter than its {DATAGRAM_HEADER}-byte header")
    token = bytes(buf[:TOKEN_BYTES])
    msg = wire.decode([buf[TOKEN_BYTES:DATAGRAM_HEADER], buf[DATAGRAM_HEADER:]], MAX_DATAGRAM)
    if msg.type != MsgType.DGT_BLOCK:
        raise ProtocolError(f"datagram carries {msg.type.name}, only DGT_BLOCK travels over UDP")
    if msg.meta is not None or msg.payload:
        raise ProtocolError("a DGT datagram carries no meta and no encoded payload")
    return token, msg
