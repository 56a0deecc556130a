"""Server features as plug-ins: each attaches to a local or global server through one interface
(:class:`~.base.ServerFeature`, geomx/servers/features/base.py) and is registered below, where the
servers find the features their configuration switches on (:func:`build`). A new feature is one
module here plus its row in :data:`FEATURES`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Tuple, Type

from .base import Features, ServerFeature
from .checkpointing import Checkpointing
from .dgt import DGTReception
from .p3_slices import P3Slices
from .replay import Replay
from .ts_root import TSRoot

if TYPE_CHECKING:
    from ...config import NodeConfig
    from ..base import ServerBase


@dataclass(frozen=True)
class FeatureRow:
    """``feature`` can attach to the servers of kind ``servers`` ("global", "local": ``ServerBase.kind``)
    and is on there when ``on(cfg, kind)`` says so."""

    feature: Type[ServerFeature]
    servers: Tuple[str, ...]
    on: Callable[["NodeConfig", str], bool]


#: Every server feature, in the order a server calls their hooks.
FEATURES: Tuple[FeatureRow, ...] = (
    # Pushes numbered by their clients (a reconnect's or a restart's resends) summed once.
    FeatureRow(Replay, ("global", "local"), lambda cfg, kind: True),
    FeatureRow(Checkpointing, ("global",), lambda cfg, kind: bool(cfg.checkpoint.dir)),
    # A slice of a key (P3's, or the cut-through slices the global server asks for) is a round of its own.
    FeatureRow(P3Slices, ("global",), lambda cfg, kind: True),
    # The root of the global tier's aggregation tree (ENABLE_INTER_TS) or of a party's (ENABLE_INTRA_TS).
    FeatureRow(TSRoot, ("global", "local"),
               lambda cfg, kind: cfg.tsengine.inter if kind == "global" else cfg.tsengine.intra),
    FeatureRow(DGTReception, ("global",), lambda cfg, kind: bool(cfg.dgt.mode)),
)


def build(server: "ServerBase") -> Features:
    """The features ``server``'s configuration (``server.cfg``) switches on, attached to it."""
    kind = server.kind
    rows = [row for row in FEATURES if kind in row.servers]
    on = [row for row in rows if row.on(server.cfg, kind)]
    return Features(server, [row.feature(server) for row in on],
                    off=[row.feature for row in rows if row not in on])


__all__ = ["FEATURES", "Checkpointing", "DGTReception", "FeatureRow", "Features", "P3Slices", "Replay",
           "ServerFeature", "TSRoot", "build"]
