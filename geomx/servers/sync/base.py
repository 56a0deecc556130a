"""What a synchronization algorithm decides, on each of the two servers it runs on.

The servers own the mechanics (sockets, key states, rounds, parked pulls, checkpoints); a policy
owns the algorithm: which pushes make a global round, what a complete round's sum becomes, what a
reply carries, and what a party's local server sends across the WAN when its own round completes.
Each algorithm (geomx/servers/sync/fsa.py, mixedsync.py, hfa.py, esync.py) is one module holding
both of its halves, registered by name in geomx/servers/sync/__init__.py.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Optional

import numpy as np

from ...errors import GeoMXError
from ...wire import Message

if TYPE_CHECKING:  # the servers import this module
    from ...transport import Link
    from ..base import Client
    from ..global_server import GlobalServer
    from ..keystate import KeyState
    from ..local_server import LocalServer


class GlobalPolicy:
    """The global server's half: how the parties' (and central workers') pushes of a key become its
    next value. One instance per server, replaced when the master worker switches the tier to
    dist_async (:meth:`leave`)."""

    name = ""
    # The parties' pushes form numbered rounds: what checkpoint replay counts (the clients number
    # their pushes from the "round" an INIT reply carries).
    synchronous = True
    # A round of a key may be cut into slices, each a round of its own (cut-through rounds,
    # GEOMX_WAN_SLICE_BYTES): only where every push of a round is summed elementwise.
    slices = False

    def __init__(self, server: "GlobalServer", outside_rounds: Optional[Dict[int, int]] = None):
        self.server = server
        # key -> updates applied outside rounds (MixedSync's), carried over when the tier switches.
        self.outside_rounds: Dict[int, int] = dict(outside_rounds or {})

    def expected_pushes(self, link: "Link") -> int:
        """Pushes that complete a round of a key, for a push that came by ``link`` (0: its clients
        may not push)."""
        raise NotImplementedError

    def on_push(self, msg: Message, client: "Client", link: "Link", identity: bytes) -> bool:
        """A push arrived, before it is added to a round: True when the policy handled it itself."""
        return False

    def round_result(self, ks: "KeyState", acc: np.ndarray) -> np.ndarray:
        """The key's new value from a complete round's sum: the optimizer's step when the master
        worker set one (the sum of the parties' steps under a sparse codec: ``party_optimizer``), the
        sum itself otherwise (the workers run the optimizer)."""
        updater = self.server.updater
        if updater is None:
            return acc
        if self.server.party_optimizer:
            return ks.store + acc  # the parties' optimizer steps, each weighted by its local server
        ks.store = updater.apply(ks.key, ks.update_index, ks.store, acc)
        return ks.store

    def reply_meta(self, req: Message, client: "Client", meta: dict) -> None:
        """Add what a reply to ``req`` carries for this algorithm to ``meta``."""

    def samples(self) -> list:
        """This algorithm's own metrics (geomx/metrics.py samples), read in the loop's thread."""
        return []

    def party_received(self, client: "Client", key: int, value: np.ndarray) -> None:
        """A party was sent ``value`` as key ``key``'s weights (its INIT reply)."""

    def rounds_need(self, client: "Client") -> bool:
        """Whether open rounds wait for ``client``'s pushes (so that they fail when it stops)."""
        return True

    def check_optimizer(self) -> None:
        """Raise GeoMXError if the global servers may not take the master worker's optimizer now."""
        codec = self.server.sparse_codec
        if codec is not None:
            self.check_party_optimizer(codec)
            if any(ks.initialized for ks in self.server.keys.values()):
                raise GeoMXError(f"with {codec}, set the optimizer before kv.init: each party's local "
                                 "server runs it and learns it with its keys' INIT replies")

    def check_codec(self, codec: Any) -> None:
        """Raise GeoMXError if the gradient codec ``codec`` cannot serve this algorithm."""
        if codec.sparse and self.server.updater is not None:
            self.check_party_optimizer(codec.name, self.server.updater)

    def check_party_optimizer(self, codec: str, updater: Any = None) -> None:
        """A sparse codec with an optimizer (``updater``, once it is built): each party's local server
        steps it on the party's dense gradient and the WAN carries the steps (FSA's Forward). Local
        servers run the numpy engine only (they never load MXNet), and central workers pushing
        gradients into the parties' rounds would be summed with those steps."""
        if updater is not None and updater.engine != "numpy":
            raise GeoMXError(f"{codec} with an optimizer on the servers runs the optimizer on each party's local "
                             f"server, in numpy: SGD, Adam, RMSProp, AdaGrad (MXNet's or torch.optim's rules); "
                             f"{updater.name!r} needs MXNet's engine ({updater.engine_reason}). Keep it on the "
                             "workers (update_on_kvstore=False) or use one of those")
        if self.server.cfg.enable_central_worker:
            raise GeoMXError(f"{codec} with an optimizer on the servers runs the optimizer on each party's local "
                             "server, so central workers (DMLC_ENABLE_CENTRAL_WORKER=1) cannot push gradients into "
                             "the rounds; keep the optimizer on the workers (update_on_kvstore=False) or unset "
                             "central training")

    def leave(self, synchronous: bool) -> None:
        """The master worker chose dist_sync (``synchronous``) or dist_async, which this policy is
        not: raise GeoMXError if the tier cannot change to it."""

    def progress(self, ks: "KeyState") -> int:
        """Updates of the key so far: its rounds plus those applied outside any round (MixedSync's
        party updates); what periodic checkpoints count and record."""
        return ks.completed + self.outside_rounds.get(ks.key, 0)

    def restore_key(self, ks: "KeyState", progress: int) -> None:
        """A key restored from a checkpoint that recorded ``progress`` for it: the rounds every
        client is taken to have pushed already."""
        ks.completed = ks.first_round = progress


class PartyPolicy:
    """A party's local server's half: what it does with a complete round of its workers' pushes
    (whose sum the round holds) and with what the global tier answers."""

    name = ""

    def __init__(self, server: "LocalServer"):
        self.server = server

    def on_initialized(self, ks: "KeyState", value: np.ndarray) -> None:
        """The key got its initial value (the master worker's, from the global servers)."""

    def round_done(self, ks: "KeyState", r: int, acc: np.ndarray) -> None:
        """The party's round ``r`` of ``ks`` is complete with sum ``acc``; the policy finishes it
        (``server.finish_round``) when its value is known, or fails it."""
        raise NotImplementedError

    def on_upstream_meta(self, key: int, meta: dict) -> None:
        """What a global server's reply carried for key ``key`` besides its data."""

    def samples(self) -> list:
        """This algorithm's own metrics at the local server (geomx/metrics.py samples)."""
        return []

    def reply_meta(self, req: Message) -> Optional[dict]:
        """Extra information a reply to a worker's ``req`` carries."""
        return None
