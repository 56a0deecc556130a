"""Control commands carried in COMMAND messages, and how replies from several global servers are
merged into one message (so a party worker, which only talks to its local server, sees the same
reply as the master worker, which talks to every global server)."""
from __future__ import annotations

from typing import Any, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from .errors import ProtocolError

SET_OPTIMIZER = "set_optimizer"
SYNC_MODE = "sync_mode"
GET_STATES = "get_states"
SET_STATES = "set_states"
SET_COMPRESSION = "set_gradient_compression"
SAVE_CHECKPOINT = "save_checkpoint"
# A worker's training loss, for DGT's adaptive K (ADAPTIVE_K_FLAG); answered by the local server.
REPORT_LOSS = "report_loss"
# Commands a local server passes on to the global servers for its workers.
RELAYED = (SET_OPTIMIZER, GET_STATES, SET_STATES, SET_COMPRESSION, SAVE_CHECKPOINT)
# Only the central party's master worker may send these to a global server; a SET_OPTIMIZER from
# anyone else changes nothing (see GlobalServer.on_command). SET_STATES stays open to every
# registered client: the store's API lets a party worker load saved optimizer states.
MASTER_ONLY = (SYNC_MODE, SET_COMPRESSION)
ALL = (SET_OPTIMIZER, SYNC_MODE, GET_STATES, SET_STATES, SET_COMPRESSION, SAVE_CHECKPOINT, REPORT_LOSS)


class Reply(NamedTuple):
    """A (meta, data) pair shaped like a received reply."""

    meta: dict
    data: Optional[np.ndarray]


def merge_replies(replies: Sequence[Any]) -> Tuple[dict, np.ndarray]:
    """One (meta, data) holding every server's reply, in server order."""
    metas = [r.meta or {} for r in replies]
    datas = [r.data if r.data is not None else np.zeros(0, np.uint8) for r in replies]
    blobs = [np.ascontiguousarray(d).view(np.uint8) for d in datas]
    data = np.concatenate(blobs) if blobs else np.zeros(0, np.uint8)
    return {"parts": metas, "sizes": [int(b.size) for b in blobs]}, data


def split_merged(meta: dict, data: Optional[np.ndarray]) -> List[Tuple[dict, np.ndarray]]:
    """Inverse of :func:`merge_replies`; validates the sizes against the data."""
    parts, sizes = meta.get("parts"), meta.get("sizes")
    if not isinstance(parts, list) or not isinstance(sizes, list) or len(parts) != len(sizes):
        raise ProtocolError("merged reply without matching 'parts' and 'sizes'")
    blob = np.zeros(0, np.uint8) if data is None else np.ascontiguousarray(data).view(np.uint8)
    if not all(isinstance(s, int) and s >= 0 for s in sizes) or sum(sizes) != blob.size:
        raise ProtocolError("merged reply sizes do not add up to its data")
    out, offset = [], 0
    for part, size in zip(parts, sizes):
        if not isinstance(part, dict):
            raise ProtocolError("merged reply part is not an object")
        out.append((part, blob[offset:offset + size]))
        offset += size
    return out
