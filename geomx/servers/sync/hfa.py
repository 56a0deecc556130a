"""HFA, hierarchical frequency aggregation (MXNET_KVSTORE_USE_HFA=1): workers take K1 local steps
between party averages, and every K2-th party average goes global. The parties exchange model
changes, not gradients, so the global server sums them in FSA rounds and runs no optimizer."""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Optional

import numpy as np

from ... import metrics
from ...errors import GeoMXError
from ...wire import MsgType
from .base import PartyPolicy
from .fsa import FullSync

if TYPE_CHECKING:
    from ..keystate import KeyState


class ModelAveraging(FullSync):
    """The global server under HFA: an FSA round sums the parties' model deltas; the sum is the
    change of the global model."""

    name = "hfa"
    switch_name = "HFA (MXNET_KVSTORE_USE_HFA=1)"
    slices = False  # whole models every K2 rounds: nothing streams behind them

    def check_optimizer(self) -> None:
        super().check_optimizer()
        raise GeoMXError("with HFA (MXNET_KVSTORE_USE_HFA=1) or ESync (GEOMX_USE_ESYNC=1) the global "
                         "servers average the parties' models and run no optimizer; keep the "
                         "optimizer on the workers")

    def leave(self, synchronous: bool) -> None:
        raise GeoMXError(f"{self.switch_name} works with dist_sync only, not dist_async")


class HFAParty(PartyPolicy):
    """The local server under HFA: workers pushed ``weights / num_workers``, so a round's sum is the
    party's average model. Every K2-th average goes global as ``(average - milestone) / parties``;
    the global servers sum those deltas (parties weighted equally, as in GeoMX) and the new
    milestone is ``milestone + sum``. Other rounds stay inside the party."""

    name = "hfa"

    def __init__(self, server) -> None:
        super().__init__(server)
        self.milestones: Dict[int, np.ndarray] = {}  # key -> the global model at the last global round
        self.local_rounds: Dict[int, int] = {}  # key -> party averages since the start
        self.global_rounds: Dict[int, int] = {}  # key -> those averaged across the parties too

    def on_initialized(self, ks: "KeyState", value: np.ndarray) -> None:
        self.milestones[ks.key] = value  # HFA starts from the global model, as every party does

    def samples(self) -> list:
        # (Every key has the same counts; a key that is further along is in its round now.)
        return [metrics.sample("geomx_hfa_party_rounds_total", max(self.local_rounds.values(), default=0)),
                metrics.sample("geomx_hfa_global_rounds_total", max(self.global_rounds.values(), default=0))]

    def goes_global(self, ks: "KeyState") -> bool:
        """Whether this party round of ``ks`` is averaged across the parties too."""
        rounds = self.local_rounds[ks.key] = self.local_rounds.get(ks.key, 0) + 1
        return rounds % self.server.cfg.hfa.k2 == 0

    def push_meta(self, ks: "KeyState") -> Optional[dict]:
        """What the push of a global round carries besides the delta."""
        return None

    def round_done(self, ks: "KeyState", r: int, party_model: np.ndarray) -> None:
        server = self.server
        if not self.goes_global(ks):
            server.finish_round(ks, r, party_model)
            return
        self.global_rounds[ks.key] = self.global_rounds.get(ks.key, 0) + 1
        meta = self.push_meta(ks)
        delta = (party_model - self.milestones[ks.key]) / np.asarray(server.parties, dtype=party_model.dtype)

        def on_global_delta(total: Optional[np.ndarray], error: Optional[Exception]) -> None:
            if error is not None:
                server.fail_upstream(ks, r, error)
                return
            milestone = self.milestones[ks.key] = self.milestones[ks.key] + total
            server.finish_round(ks, r, milestone)

        assert server.upstream is not None
        # The delta crosses the WAN through the party's codec, as FSA's sums do (BSC, MPQ: sparse, with
        # the codec's residual carrying what is not sent yet to the next global round).
        server.upstream.request(MsgType.PUSHPULL, ks.key, ks.numel, ks.dtype, on_global_delta, data=delta,
                                encoder=server.encoder(server.encode(ks, delta)), meta=meta, span=(ks.offset, ks.total))
