"""Synchronization algorithms by name: each has a global-server half and a local-server half
(geomx/servers/sync/base.py). A new algorithm is one module here plus its rows below (and, if a
switch selects it, a line in :func:`chosen`)."""
from __future__ import annotations

from typing import Dict, Type

from ...config import NodeConfig
from .base import GlobalPolicy, PartyPolicy
from .esync import ESYNC_KEY, ESync, ESyncParty
from .fsa import Forward, FullSync
from .hfa import HFAParty, ModelAveraging
from .mixedsync import MixedSync

GLOBAL_POLICIES: Dict[str, Type[GlobalPolicy]] = {
    "fsa": FullSync,
    "mixedsync": MixedSync,
    "hfa": ModelAveraging,
    "esync": ESync,
}

PARTY_POLICIES: Dict[str, Type[PartyPolicy]] = {
    "fsa": Forward,
    "mixedsync": Forward,  # a party's round goes up as under FSA; the global server differs
    "hfa": HFAParty,
    "esync": ESyncParty,
}


def chosen(cfg: NodeConfig, synchronous: bool = True) -> str:
    """The algorithm this process's switches select: ESync or HFA if set (both dist_sync only),
    else FSA for dist_sync and MixedSync for dist_async (the master worker's kvstore type)."""
    if cfg.esync.enabled:
        return "esync"
    if cfg.hfa.enabled:
        return "hfa"
    return "fsa" if synchronous else "mixedsync"


__all__ = ["ESYNC_KEY", "GLOBAL_POLICIES", "PARTY_POLICIES", "GlobalPolicy", "PartyPolicy", "chosen"]
