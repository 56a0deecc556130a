"""Who a message came from: the :class:`Origin` the event loop hands every handler with the message, and
what a listener reads in a client's identity (its connection's generation, its secret token, a label for
log lines).

The origin is built per message from what the link verified as it arrived (the identity and, over CURVE,
the key the ZAP handler admitted), so a handler never reads it back from shared state.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, NamedTuple, Optional, Tuple

if TYPE_CHECKING:
    from ..wire import Message
    from .zmq_link import Link


class Origin(NamedTuple):
    """Where a received message came from, and how to answer it (immutable; a named tuple because one
    is made per message, and that costs a fraction of what a frozen dataclass does).

    ``link``: the link it arrived on. ``identity``: the peer's identity on a listener (ZeroMQ ROUTER),
    None on a client link (whose one peer is its server). ``curve_key``: over CURVE, the name of the key
    the ZAP handler admitted the peer's connection with (its User-Id); None otherwise."""

    link: "Link"
    identity: Optional[bytes] = None
    curve_key: Optional[str] = None

    @property
    def label(self) -> str:
        """The peer for log lines (:func:`peer_label`: without the secret part of its identity)."""
        return peer_label(self.identity)

    def reply(self, msg: "Message") -> None:
        """Send ``msg`` back to this peer over the link the message came by (a listener never blocks:
        see :meth:`Link.send`)."""
        self.link.send(msg, self.identity)


# A client that lost its connection reconnects under a new identity, its own plus ``~N`` (the N-th
# connection): a listener may still hold the old connection (the peer's TCP has not noticed that it
# is dead), and libzmq ignores a second connection presenting an identity in use (no
# ROUTER_HANDOVER, see zmq_link.bind_router). Listeners know a client by its identity without the suffix.
_GENERATION = b"~"


def reconnected_identity(identity: bytes, generation: int) -> bytes:
    """The identity of a client's ``generation``-th connection (0: the identity itself)."""
    return identity if generation == 0 else identity + _GENERATION + str(generation).encode()


def split_identity(identity: bytes) -> Tuple[bytes, int]:
    """(the client's identity, its connection's generation): see :func:`reconnected_identity`."""
    head, sep, tail = identity.rpartition(_GENERATION)
    if sep and head and tail.isdigit() and len(tail) < 10:
        return head, int(tail)
    return identity, 0


def base_identity(identity: bytes) -> bytes:
    """A client's identity without its connection's generation (see :func:`reconnected_identity`)."""
    return split_identity(identity)[0]


def identity_token(identity: bytes) -> str:
    """The secret a registered node's link carries in its identity (``NAME#TOKEN>WHERE``): a client's
    registration token, or a TSEngine link's key; "" if there is none."""
    return base_identity(identity).rpartition(b">")[0].rpartition(b"#")[2].decode("ascii", "replace")


_TOKEN_IN_IDENTITY = re.compile(r"#([0-9a-f]{6})[0-9a-f]{26}")


def peer_label(identity: Optional[bytes]) -> str:
    """A peer's identity for log lines, without the secret part of a registered client's (its token
    is cut to 6 digits: enough to tell clients apart, not to pose as one)."""
    if identity is None:
        return "?"
    try:
        text = identity.decode("ascii")
    except UnicodeDecodeError:
        return identity.hex()
    return _TOKEN_IN_IDENTITY.sub(r"#\1...", text)
