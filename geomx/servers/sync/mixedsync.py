"""MixedSync (dist_async): synchronous inside each party, asynchronous across parties. The global
server applies each party's aggregate the moment it arrives (the master worker's optimizer runs on
it, DC-ASGD compensating the party's delay) and answers that party with the newest weights; only
the central workers, when they train, still sum their pushes in rounds of their own.

A party's local server works as under FSA (:class:`geomx.servers.sync.fsa.Forward`)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List

import numpy as np

from ... import compression, metrics
from ...wire import Message, MsgType
from .base import GlobalPolicy

if TYPE_CHECKING:
    from ...transport import Link
    from ..base import Client
    from ..keystate import KeyState


class MixedSync(GlobalPolicy):
    name = "mixedsync"
    synchronous = False

    def __init__(self, server, outside_rounds=None) -> None:
        super().__init__(server, outside_rounds)
        # (party, key) -> the weights that party holds: what it received last (its DC-ASGD backup);
        # under BSC, the sum of the sparsified changes sent to it.
        self.party_views: Dict[tuple, np.ndarray] = {}
        self.down_codecs: Dict[Any, Any] = {}  # under BSC: one downlink codec (and residual) per party
        # Staleness: (party, key) -> the key's update count when the party last received its weights,
        # and per party [its updates applied, the updates of others each came after, summed].
        self.received_at: Dict[tuple, int] = {}
        self.staleness: Dict[Any, List[int]] = {}

    def samples(self) -> list:
        out = []
        for client, (updates, stale) in list(self.staleness.items()):
            peer = metrics.peer_name(client)
            out += [metrics.sample("geomx_mixedsync_updates_total", updates, peer=peer),
                    metrics.sample("geomx_mixedsync_staleness_total", stale, peer=peer)]
        return out

    def expected_pushes(self, link: "Link") -> int:
        server = self.server
        if link is server.lan_link:
            # The central workers' pushes are summed among themselves and applied once.
            return server.central_workers if server.cfg.enable_central_worker else 0
        return 1  # every party's push is applied on arrival (on_push)

    def rounds_need(self, client: "Client") -> bool:
        # A party's updates are applied outside the rounds (which are the central workers' alone),
        # so a party that stops leaves no round incomplete.
        return client[0] != self.server.wan_link.name

    def check_optimizer(self) -> None:
        pass  # the optimizer runs on each party's arrival, BSC or not

    def check_codec(self, codec: Any) -> None:
        pass  # the new weights go back as sparsified changes (_reply_weight_delta)

    def party_received(self, client: "Client", key: int, value: np.ndarray) -> None:
        # What a party received at INIT is what it holds until its first reply: BSC sends it changes
        # relative to that (not to the initial value: it may join late).
        self.party_views[(client, key)] = value
        self.received_at[(client, key)] = self.outside_rounds.get(key, 0)

    def on_push(self, msg: Message, client: "Client", link: "Link", identity: bytes) -> bool:
        server = self.server
        if link is not server.wan_link:
            return False
        ks = server.pushed_key(msg, link, identity)
        if ks is None or self._applied_already(msg, client, link, identity, ks):
            return True
        if msg.offset != ks.offset or msg.numel != ks.numel:
            # The optimizer step needs the party's whole aggregate of the key at once.
            server.reply_error(link, identity, msg, "dist_async (MixedSync) applies each party's push on arrival "
                                                    "and cannot take P3 slices: unset ENABLE_P3 on the local "
                                                    "servers or use dist_sync")
            return True
        updater = server.updater
        if updater is None:
            server.reply_error(link, identity, msg, "dist_async (MixedSync) needs an optimizer on the global "
                                                    "server: call kv.set_optimizer on the master worker")
            return True
        # DC-ASGD compensates against the weights this party holds, not the key's latest.
        backup = self.party_views[(client, ks.key)] if updater.name == "dcasgd" else None
        ks.store = value = updater.apply(ks.key, ks.update_index, ks.store, msg.data, backup)
        count = self.outside_rounds.get(ks.key, 0)
        stale = self.staleness.setdefault(client, [0, 0])
        stale[0] += 1
        stale[1] += count - self.received_at.get((client, ks.key), count)  # others' updates since its view
        self.outside_rounds[ks.key] = count + 1
        if msg.type == MsgType.PUSHPULL:
            self.received_at[(client, ks.key)] = count + 1  # it gets the weights with its own update in
        if msg.payload and msg.type == MsgType.PUSHPULL:
            self._reply_weight_delta(link, identity, msg, ks, client, value)
        else:
            if msg.type == MsgType.PUSHPULL:
                self.party_views[(client, ks.key)] = value  # the party receives these weights
            server.reply(link, identity, msg, value if msg.type == MsgType.PUSHPULL else None)
        ks.serve_parked()
        server.features.round_complete(ks, None, value)  # an update outside rounds (checkpoints count it)
        return True

    def _applied_already(self, msg: Message, client: "Client", link: "Link", identity: bytes, ks: "KeyState") -> bool:
        """A numbered push (``version`` = the party's count + 1) that was applied already: sent again
        over a new connection after its reply was lost. Answered with the key's weights, whole (the
        change a lost reply carried never reached the party), and not applied again."""
        if not msg.version:
            return False
        count = msg.version - 1
        if count >= ks.pushes_of(client):
            ks.pushes_by[client] = count + 1
            return False
        weights = ks.store if msg.type == MsgType.PUSHPULL else None
        if weights is not None:
            self.party_views[(client, ks.key)] = weights
        self.server.reply(link, identity, msg, weights)
        return True

    def _reply_weight_delta(self, link: "Link", identity: bytes, msg: Message, ks: "KeyState", party: "Client",
                            weights: np.ndarray) -> None:
        """BSC: the new weights are dense, so send the party the change from the weights it holds,
        sparsified by this party's downlink codec (its residual keeps what is not sent yet), and
        remember what the party now holds."""
        params = self.server.compression_params
        assert params is not None
        codec = self.down_codecs.get(party)
        if codec is None:
            codec = self.down_codecs[party] = compression.create(params, link="wan")
        held = self.party_views[(party, ks.key)]
        payload = codec.encode(ks.key, weights - held)
        self.party_views[(party, ks.key)] = held + compression.decode_payload(payload, ks.numel)
        payload_meta, data = compression.to_frames(payload)
        link.send(Message(MsgType.RESPONSE, req_id=msg.req_id, key=msg.key, offset=msg.offset, numel=msg.numel,
                          total=msg.total, meta={"payload": payload_meta, "delta": True}, data=data,
                          payload=True), identity)

    def restore_key(self, ks: "KeyState", progress: int) -> None:
        # MixedSync recorded the updates applied; the central workers' rounds start afresh.
        self.outside_rounds[ks.key] = progress
