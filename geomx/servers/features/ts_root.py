"""The server as the root of its tier's TSEngine aggregation tree (the global server with ENABLE_INTER_TS,
a local server with ENABLE_INTRA_TS; docs/System Design.md, section 12c): partial sums (TS_MERGE) arrive
on the server's client sockets and are added into the key's rounds by index, and every complete round's
value goes back down the tree by relay. The root's :class:`~geomx.tsengine.peer.TSPeer` is made once the
tier's scheduler gave the link keys (:meth:`TSRoot.connect`, from geomx.node); until then a TS_MERGE is
handled as any other message."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

import numpy as np

from ...errors import ProtocolError
from ...tsengine.keys import LinkKeys
from ...tsengine.partial import partial_dtype_ok
from ...tsengine.peer import TSPeer
from ...tsengine.policy import ROOT
from ...wire import Message, MsgType
from .base import ServerFeature

if TYPE_CHECKING:
    from ...transport import Origin
    from ..base import ServerBase
    from ..keystate import KeyState


class TSRoot(ServerFeature):
    name = "ts_root"
    messages = (MsgType.TS_MERGE,)
    whole_keys = True  # TSEngine sums and relays whole rounds

    def __init__(self, server: "ServerBase"):
        super().__init__(server)
        self.peer: Optional[TSPeer] = None

    def connect(self, name: str, ask: Callable[[Message], None], on_fatal: Callable[[Exception], None], wan: bool,
                keys: LinkKeys) -> TSPeer:
        """This server's node in the tree (``ask``: to the tier's scheduler, its coordinator)."""
        self.peer = TSPeer(self.server.loop, ROOT, name, self, ask, on_fatal, wan=wan, keys=keys)
        return self.peer

    def handle(self, msg: Message, origin: "Origin", key_checked: bool) -> bool:
        if self.peer is None:
            return False
        self.peer.handle(msg, origin)
        return True

    def on_round_complete(self, ks: "KeyState", r: Optional[int], value: np.ndarray) -> None:
        if self.peer is not None and r is not None:
            self.peer.relay(ks.key, r, value)  # the tier's other nodes get the result by relay

    @property
    def relays(self) -> bool:
        """Whether the tier's other nodes wait for this server's relays (rather than for its replies)."""
        return self.peer is not None

    # -- geomx.tsengine.peer.Owner ---------------------------------------------------------------
    def ts_check(self, kind: MsgType, key: int, rnd: int, data: np.ndarray) -> Optional[str]:
        ks = self.server.keys.get(key)
        if ks is None or not ks.initialized:
            return f"key {key} is not initialised here"
        if data.size != ks.numel:
            return f"key {key}: {data.size} elements sent, this server holds {ks.numel}"
        if not partial_dtype_ok(data.dtype, ks.dtype):
            return f"key {key}: dtype {data.dtype} sent, key is {ks.dtype}"
        if rnd < ks.completed:
            return f"key {key}: round {rnd} is already complete"
        return None

    def ts_merged(self, key: int, rnd: int, data: np.ndarray, count: int) -> bool:
        server = self.server
        ks = server.keys[key]
        round_ = ks.add_contribution(rnd, data, count)
        if round_.elements < server.full_round_pushes() * ks.numel:
            return False
        acc, round_.acc = round_.acc, None
        server.dispatch_round(ks, rnd, ks.round_value(acc))
        return True

    def ts_model(self, key: int, rnd: int, data: np.ndarray) -> None:
        raise ProtocolError("a server is the root of its TSEngine tier and is never sent a model")
