"""FSA, fully synchronous aggregation (dist_sync): every party (and every central worker, when they
train) pushes each round of a key; the global server sums the round, runs the master worker's
optimizer on the sum if it set one, and answers everyone with the new value.

The local server's half, :class:`Forward`, is also MixedSync's: each complete party round goes
across the WAN as the party's aggregate and the global tier's answer is the party's next value."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Optional

import numpy as np

from ...errors import GeoMXError
from ...wire import MsgType
from .base import GlobalPolicy, PartyPolicy

if TYPE_CHECKING:
    from ...transport import Link
    from ..keystate import KeyState


class FullSync(GlobalPolicy):
    name = "fsa"
    slices = True

    def expected_pushes(self, link: "Link") -> int:
        server = self.server
        central = server.central_workers if server.cfg.enable_central_worker else 0
        if link is server.lan_link and not central:
            return 0
        # The central workers push into the parties' rounds: a round is complete once every party
        # and every central worker pushed, whichever link the last push came by (counting only the
        # central ones on their link completed rounds before the parties had pushed).
        return server.parties - len(server.lost_party_names) + central

    def leave(self, synchronous: bool) -> None:
        cfg = self.server.cfg
        if cfg.tsengine.inter:
            raise GeoMXError("ENABLE_INTER_TS=1 works with dist_sync only, not dist_async (MixedSync "
                             "applies each party's push on arrival; there is no round to aggregate)")
        if cfg.p3.enabled:
            raise GeoMXError("P3 (ENABLE_P3=1) works with dist_sync only, not dist_async: MixedSync "
                             "applies each party's whole aggregate on arrival")


class Forward(PartyPolicy):
    """FSA and MixedSync on a local server: a complete round's sum goes up (over TSEngine's tree
    with ENABLE_INTER_TS), and the global tier's answer finishes the round."""

    name = "fsa"

    def __init__(self, server) -> None:
        super().__init__(server)
        # Keys whose pending global reply is a change to the weights this party holds (MixedSync
        # with BSC, announced in the reply's meta) rather than the weights.
        self.delta_replies: set = set()

    def on_upstream_meta(self, key: int, meta: dict) -> None:
        if meta.get("delta") is True:
            self.delta_replies.add(key)

    def round_done(self, ks: "KeyState", r: int, acc: np.ndarray) -> None:
        server = self.server
        if server.inter_ts is not None:
            server.forward_inter_ts(ks, r, acc)
            return
        if server.updater_error is not None:
            server.fail_upstream(ks, r, GeoMXError(server.updater_error))
            return
        if server.updater is not None:
            try:
                acc = server.party_step(ks, acc)  # answered with the parties' summed steps (a delta)
            except GeoMXError as exc:
                server.fail_upstream(ks, r, exc)
                return
        payload = server.encode(ks, acc)
        held = server.held_back(acc, payload)
        sent = time.monotonic()

        def on_global_result(value: Optional[np.ndarray], error: Optional[Exception]) -> None:
            server.round_trips.add(time.monotonic() - sent)
            if error is not None:
                server.fail_upstream(ks, r, error)
                return
            own = held
            if ks.key in self.delta_replies:
                self.delta_replies.discard(ks.key)
                value = ks.store + value
                if server.updater is None:
                    own = None  # MixedSync: the global optimizer's change; what this party held back is gradient
            if own is not None:
                value = value + own
            server.finish_round(ks, r, value)

        assert server.upstream is not None
        # The workers' priority goes on across the WAN (P3 orders the global tier's slices by it).
        server.upstream.request(MsgType.PUSHPULL, ks.key, ks.numel, ks.dtype, on_global_result, data=acc,
                                encoder=server.encoder(payload), span=(ks.offset, ks.total), priority=ks.priority)
