"""Slices as rounds of their own, on the global server: a slice of a key (P3's, or a cut-through slice the
server asks its clients for in INIT replies, GEOMX_WAN_SLICE_BYTES) gets a state of its own (rounds,
value, optimizer state), so a slice's round completes, and is answered, as soon as every client pushed
that slice; the first slices' updates travel back while later slices are still arriving (Scheduling.md).
Without this feature (a local server) slices add into the key's round, which completes when every
element is in."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Optional

import numpy as np

from ...wire import Message, MsgType
from ..keystate import KeyState
from .base import ServerFeature

if TYPE_CHECKING:
    from ..base import Client
    from ..global_server import GlobalServer

_ALIKE = "set ENABLE_P3 and GEOMX_P3_SLICE_SIZE alike on every local server"


def _whole(msg: Message, ks: KeyState) -> bool:
    return msg.offset == ks.offset and msg.numel == ks.numel


class P3Slices(ServerFeature):
    name = "p3_slices"
    # Cut-through slices per key at most: a large key gets larger slices, so that the cost of a message
    # per slice stays bounded where the link is fast (its pipeline's fill and drain, 2/MAX_SLICES of the
    # key's time on the wire, stays small where it is slow).
    MAX_SLICES = 16

    server: "GlobalServer"

    def refuse(self, msg: Message, ks: KeyState) -> Optional[str]:
        """A push whose slicing does not fit the other clients' (or that comes before the key has a
        value to start the slice's state from)."""
        whole = _whole(msg, ks)
        if msg.type == MsgType.PULL or (whole and not ks.slices):
            return None
        if whole:  # (a whole push while the key has slices)
            return f"pushed whole while other clients push it in slices: {_ALIKE}"
        if ks.rounds:
            return f"pushed in slices while other clients push it whole: {_ALIKE}"
        start = msg.offset - ks.offset
        child = ks.slices.get(msg.offset)
        if child is None:
            if start == 0:
                ks.slice_size = msg.numel  # the clients' slice size, learnt from the first slice
            size = ks.slice_size
            if size and (start % size or msg.numel != min(size, ks.numel - start)):
                return (f"slice [{msg.offset}, +{msg.numel}) does not fit the {size}-element slices of other "
                        "clients: GEOMX_P3_SLICE_SIZE must be the same on every local server")
            if not ks.initialized:
                return "P3 slice before the key was initialised"
        elif child.numel != msg.numel:
            return (f"slice [{msg.offset}, +{msg.numel}) does not fit the [{msg.offset}, +{child.numel}) slices "
                    "of other clients: GEOMX_P3_SLICE_SIZE must be the same on every local server")
        return None

    def state_for(self, msg: Message, ks: KeyState) -> KeyState:
        """The key's (part's) state, or a slice's own (created by the first push of it from the part's
        value)."""
        if _whole(msg, ks) and not ks.slices:
            return ks
        if msg.type == MsgType.PULL:
            # Only pushes cut a key into slice states; a pull reads the slice's state if there is
            # one of its size, else the part's assembled value. So a client that only pulls (a
            # master worker without P3, asked for cut-through slices by the global servers) may
            # slice differently from the P3 parties that push.
            child = ks.slices.get(msg.offset)
            return child if child is not None and child.numel == msg.numel else ks
        child = ks.slices.get(msg.offset)
        if child is None:
            child = ks.slices[msg.offset] = KeyState(ks.key, msg.numel, ks.dtype, msg.offset, ks.total)
            start = msg.offset - ks.offset
            assert ks.store is not None
            child.store = ks.store[start:start + msg.numel]
            child.initialized = True
            # An index of its own for the optimizer's state and update count (Adam's step t counts
            # this slice's updates): negative, so it never collides with a key.
            child.update_index = -(1 + (ks.key << 35) + msg.offset)
            child.starts = dict(ks.starts)  # a client that joined later starts its slices there too
        return child

    def reply_meta(self, req: Message, client: "Client", meta: Dict[str, Any]) -> None:
        if req.type != MsgType.INIT:
            return
        ks = self.server.keys.get(req.key)
        size = 0 if ks is None else self.slice_size(ks)
        if size:
            meta["slice"] = size

    def slice_size(self, ks: KeyState) -> int:
        """Cut-through rounds: the slice (in elements) this server asks its clients to cut the key's
        pushes and pulls into, 0 for whole keys. Each slice is updated and answered as soon as every
        party's copy of it is in, so while later slices still travel up the WAN the first ones' results
        already travel down: each direction of a party's link stays busy for the whole round instead of
        half of it. Not where rounds are not elementwise sums of whole pushes (HFA, ESync, MixedSync:
        ``GlobalPolicy.slices``), nor with a feature that needs whole keys (``whole_keys``: checkpoints
        and their replay, DGT blocks, TSEngine relays)."""
        server = self.server
        wan_slice_bytes = server.cfg.wan_slice_bytes
        if not wan_slice_bytes or not server.policy.slices or server.features.whole_keys:
            return 0
        size = max(1, wan_slice_bytes // np.dtype(ks.dtype).itemsize, -(-ks.numel // self.MAX_SLICES))
        return size if size < ks.numel else 0
