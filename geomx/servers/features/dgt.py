"""DGT reception on the global server (ENABLE_DGT; docs/DGT.md): the blocks of a party's push (DGT_BLOCK
over its TCP links, datagrams over UDP in mode 1) are reassembled by a :class:`geomx.dgt.Receiver` and the
push enters the server as the party's ordinary PUSHPULL, so rounds, optimizer and replies are untouched.
The parties learn the mode, the UDP port and their MAC key in the server's INIT replies (meta ``dgt``).
The sending half is the local server's client sender (``geomx.senders.DgtSender``, :class:`geomx.dgt.Sender`)."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from ... import dgt, metrics
from ...errors import ProtocolError, internal_error
from ...transport import Origin, peer_label
from ...wire import Message, MsgType
from .base import ServerFeature

if TYPE_CHECKING:
    from ..base import Client
    from ..global_server import GlobalServer

log = logging.getLogger("geomx.server")

_REFUSED = "DGT block, but DGT is off here (ENABLE_DGT) or it came from a central-party client"


class DGTReception(ServerFeature):
    name = "dgt"
    messages = (MsgType.DGT_BLOCK,)
    off = _REFUSED
    whole_keys = True  # DGT sends the blocks of whole pushes

    server: "GlobalServer"

    def __init__(self, server: "GlobalServer"):
        super().__init__(server)
        cfg = server.cfg
        self.receiver = dgt.Receiver(server.loop, cfg.dgt.grace, self._held, self._deliver, server.name)
        if cfg.dgt.mode == 1:
            self.receiver.open_udp(cfg.bind_address(cfg.global_root_uri, cfg.global_root_port), cfg.dgt_udp_port)

    def _held(self, key: int) -> Optional[tuple]:
        ks = self.server.keys.get(key)
        return None if ks is None or not ks.initialized else (ks.numel, ks.dtype)

    def handle(self, msg: Message, origin: Origin, key_checked: bool) -> bool:
        from ..base import KEY_CHECKED  # (the servers' base module imports this package)

        server = self.server
        identity, link = origin.identity, origin.link
        if link is not server.wan_link:
            raise ProtocolError(_REFUSED)
        assert identity is not None
        main = identity[:-len(dgt.LOW_SUFFIX)] if identity.endswith(dgt.LOW_SUFFIX) else identity
        if server.registered_client(link, main, KEY_CHECKED if key_checked else origin.curve_key) is not True:
            raise ProtocolError(f"DGT block from {peer_label(identity)}, which is not a registered client of "
                                "this server")
        self.receiver.on_tcp_block(msg, identity, link.name)
        return True

    def _deliver(self, msg: Message, identity: bytes) -> None:
        """A reassembled DGT push enters the server as the party's ordinary PUSHPULL (it runs from
        a timer too, so a refusal is answered here rather than by the event loop)."""
        server = self.server
        try:
            # Its blocks' keys were checked as they arrived (the last one over the party's reliable link).
            server.dispatch(msg, Origin(server.wan_link, identity), key_checked=True)
        except ProtocolError as exc:
            server.reply_error(server.wan_link, identity, msg, str(exc))
        except Exception as exc:  # noqa: BLE001 - one bad push must not take the server down
            log.exception("%s: error while handling a DGT push of key %d", server.name, msg.key)
            server.reply_error(server.wan_link, identity, msg, internal_error(exc))

    def reply_meta(self, req: Message, client: "Client", meta: Dict[str, Any]) -> None:
        server = self.server
        if req.type == MsgType.INIT and client[0] == server.wan_link.name:
            meta["dgt"] = self.receiver.advert(client, req.sender, server.cfg.dgt.mode, req.req_id)

    def samples(self) -> List[metrics.Sample]:
        return [metrics.sample("geomx_dgt_blocks_received_total", n, outcome=outcome)
                for outcome, n in self.receiver.stats.as_dict().items()]

    def on_all_stopped(self) -> None:
        log.info("%s: DGT blocks received %s", self.server.name, self.receiver.stats.as_dict())
