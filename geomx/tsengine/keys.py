"""TSEngine link keys: one per ordered pair of a tier's nodes, so that a partial sum or a result
that claims to come from node i was sent by node i.

The tier's scheduler draws a secret and derives ``key(i -> j) = HMAC-SHA256(secret, "i>j")``. Node
i is told the keys of its links to every other node (``to``) and of theirs to it (``from``): it can
send as itself to anyone and check who sent to it, but it holds no key of a link between two other
nodes, so it cannot pose as one of them (one secret per tier, as before, let any node of the tier
send as any other). A link carries its key in its ZeroMQ identity, which CURVE encrypts; without
CURVE it travels in clear, like every token of a tier (docs/Deployment.md, "Trust")."""
from __future__ import annotations

import dataclasses
import hashlib
import hmac
import secrets
from typing import Any, Dict, Iterable, Mapping

from ..errors import ProtocolError


def tier_secret() -> bytes:
    return secrets.token_bytes(32)


def link_key(secret: bytes, sender: int, receiver: int) -> str:
    return hmac.new(secret, f"{sender}>{receiver}".encode(), hashlib.sha256).hexdigest()[:32]


def keys_meta(secret: bytes, node: int, nodes: Iterable[int]) -> Dict[str, Dict[str, str]]:
    """What the scheduler tells ``node`` (JSON: node ids as strings)."""
    others = [n for n in nodes if n != node]
    return {"to": {str(n): link_key(secret, node, n) for n in others},
            "from": {str(n): link_key(secret, n, node) for n in others}}


@dataclasses.dataclass(frozen=True)
class LinkKeys:
    """This node's keys: ``to[j]`` for its link to node j, ``from_[i]`` for node i's link to it."""

    to: Mapping[int, str] = dataclasses.field(default_factory=dict)
    from_: Mapping[int, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_meta(cls, meta: Any) -> "LinkKeys":
        """The keys as a REGISTER_ACK carries them (checked: they come from the network)."""
        if meta is None or meta == {}:
            return cls()
        try:
            to, from_ = meta["to"], meta["from"]
            parsed = [{int(n): k for n, k in table.items() if isinstance(k, str) and len(k) == 32}
                      for table in (to, from_)]
        except (TypeError, KeyError, ValueError, AttributeError):
            raise ProtocolError("REGISTER_ACK with malformed TSEngine link keys") from None
        return cls(*parsed)
