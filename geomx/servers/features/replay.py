"""Replay: a push that a client numbered (header ``version`` = round + 1) is summed once however often
it arrives. A client sends its unanswered pushes again over a new connection after a WAN outage, and
its kept pushes to a global server restarted from a checkpoint (geomx/servers/features/checkpointing.py);
a copy of a round already summed is answered with the key's value, a copy of an open round joins that
round's waiters, a gap is refused. A global server tells each client, in its INIT replies, the round
its pushes of the key are numbered from (meta ``round``) and whether it keeps them for a replay after a
restart (meta ``checkpoints``)."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Dict

from ...errors import GeoMXError
from ...transport import peer_label
from ...wire import Message, MsgType
from .base import ServerFeature
from .checkpointing import Checkpointing

if TYPE_CHECKING:
    from ...transport import Link
    from ..base import Client, ServerBase
    from ..keystate import KeyState

log = logging.getLogger("geomx.server")


class Replay(ServerFeature):
    name = "replay"

    def __init__(self, server: "ServerBase"):
        super().__init__(server)
        # The global server's clients (local servers, central workers) number their pushes from the
        # round its INIT replies give; a local server's workers do not number theirs.
        self.announce = server.kind == "global"

    def take_push(self, msg: Message, ks: "KeyState", client: "Client", link: "Link", identity: bytes) -> bool:
        """A numbered push: True when it was handled here because it repeats a round this server
        already has."""
        if not msg.version:
            return False
        server = self.server
        r, expected = msg.version - 1, ks.pushes_of(client)
        if r == expected:
            return False
        if r > expected:
            server.reply_error(link, identity, msg, f"key {msg.key}: push of round {r} from "
                                                    f"{peer_label(identity)}, expected round {expected}")
            return True
        reply = server.replier(link, identity, msg)
        want_value = msg.type == MsgType.PUSHPULL
        if r < ks.completed:
            # Already summed (before the checkpoint, or replayed earlier): the key's value includes
            # it. It is the round's own result when r is the last completed round.
            log.info("%s: key %d round %d pushed again by %s (over a new connection); summed once already",
                     server.name, msg.key, r, peer_label(identity))
            reply(ks.store if want_value else None)
        else:
            # This process already holds the push in the open round r: answer when it completes.
            log.info("%s: key %d round %d pushed again by %s (over a new connection); held once", server.name,
                     msg.key, r, peer_label(identity))
            rnd = ks.rounds.get(r)
            if rnd is None:
                reply(GeoMXError(f"key {msg.key}: round {r} was refused"))
            else:
                rnd.waiters.append((reply, want_value))
        return True

    def reply_meta(self, req: Message, client: "Client", meta: Dict[str, Any]) -> None:
        if not self.announce or req.type != MsgType.INIT:
            return
        ks = self.server.keys.get(req.key)
        if ks is not None:
            # The client numbers its pushes of the key from here, so that one it sends twice (over a
            # new connection after a WAN outage, or to this server restarted from a checkpoint) is
            # summed once; with checkpoints it keeps them until a checkpoint holds their round.
            meta["round"] = ks.pushes_of(client)
            meta["checkpoints"] = self.server.features.get(Checkpointing) is not None
