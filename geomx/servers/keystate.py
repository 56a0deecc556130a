"""Per-key bookkeeping shared by local and global servers: initialisation, synchronous aggregation
rounds, and pulls parked until the round a client pushed into has completed."""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from .. import kernels
from ..kernels import accumulate

Reply = Callable[[Optional[np.ndarray]], None]

log = logging.getLogger("geomx.server")


def _answer(reply: Callable[[Any], None], value: Any) -> None:
    """Call one waiter's ``reply``; an exception in it is logged and does not stop the caller's loop
    over the other waiters (each would otherwise wait forever: its round is gone already)."""
    try:
        reply(value)
    except Exception:  # noqa: BLE001
        log.exception("a reply failed; answering the other waiters")


class Round:
    __slots__ = ("acc", "owned", "elements", "waiters", "opened", "last", "last_at")

    def __init__(self) -> None:
        # When the round opened, and the client whose push came last, when (the round's metrics:
        # who it waited for and how long; a clock read per push costs tens of nanoseconds).
        self.opened = time.monotonic()
        self.last: Any = None
        self.last_at = self.opened
        self.acc: Optional[np.ndarray] = None
        self.owned = False  # False while acc is a borrowed, read-only received buffer
        # Elements pushed into this round by all clients: a round is complete when every client
        # pushed every element, whole or in P3 slices.
        self.elements = 0
        # (reply, wants the new value back)
        self.waiters: List[Any] = []


class KeyState:
    """One key (or this server's part of it: elements ``[offset, offset + numel)`` of ``total``).

    Pushes and pulls may cover the whole part or a slice of it (P3). A client's n-th push of a slice
    goes into round n; a round is complete when every expected client pushed every element.

    ``store`` is replaced, never written in place, once it has been sent: sends are zero-copy, so an
    in-place update could change bytes still queued in libzmq.
    """

    __slots__ = ("key", "numel", "dtype", "offset", "total", "store", "initialized", "rounds", "completed",
                 "pushes_by", "slice_pushes", "parked", "init_requested", "priority", "first_round", "slices",
                 "slice_size", "update_index", "starts")

    def __init__(self, key: int, numel: int, dtype: np.dtype, offset: int = 0, total: Optional[int] = None):
        self.key = key
        self.numel = numel
        # This server's slice of the key: [offset, offset + numel) of ``total`` elements.
        self.offset = offset
        self.total = numel if total is None else total
        self.dtype = dtype
        self.store: Optional[np.ndarray] = None
        self.initialized = False
        self.init_requested = False
        self.rounds: Dict[int, Round] = {}
        self.completed = 0  # rounds finished
        self.pushes_by: Dict[Any, int] = {}  # client -> rounds it has pushed into (whole or a slice)
        self.slice_pushes: Dict[Any, int] = {}  # (client, slice offset) -> pushes of that slice
        self.priority = 0  # of the latest push (a local server forwards the round with it)
        # Servers with per-slice rounds (the global server under P3): absolute offset -> the state of
        # that slice, a KeyState of its own; slice_size is the clients' P3 slice size, learnt from
        # the slice at the part's start.
        self.slices: Dict[int, "KeyState"] = {}
        self.slice_size = 0
        # The optimizer's index for this state: the key, or a slice's own (see Updater.apply).
        self.update_index = key
        self.parked: List[Any] = []  # (client, reply): pulls waiting for a round or for the init
        # Rounds every client is taken to have pushed already: 0, or the rounds a restored
        # checkpoint holds (the parties resend only the rounds after it).
        self.first_round = 0
        # Clients that joined later (a lost party's local server that rejoined): the round each one's
        # first push goes into, instead of first_round; the rounds before it do not wait for it.
        self.starts: Dict[Any, int] = {}

    def pushes_of(self, client: Any) -> int:
        """How many pushes of ``client`` this key has seen (its next push opens that round)."""
        pushes = self.pushes_by.get(client)
        return pushes if pushes is not None else self.starts.get(client, self.first_round)

    def next_round(self, client: Any, start: int = 0) -> int:
        """The round a push of the slice at ``start`` (relative to this part) from ``client`` goes into."""
        pushes = self.slice_pushes.get((client, start))
        return pushes if pushes is not None else self.starts.get(client, self.first_round)

    def start_client(self, client: Any) -> int:
        """A client joining now: its rounds begin after every round another client has opened (whole
        or, P3, in any slice), so no open round waits for it; returns that round."""
        states = [self, *self.slices.values()]
        start = max(max([s.completed for s in states] + [p for s in states for p in s.pushes_by.values()]),
                    max(self.starts.values(), default=0))
        for s in states:
            s.starts[client] = start
        return start

    def add_push(self, client: Any, data: np.ndarray, reply: Reply, want_value: bool, start: int = 0,
                 priority: int = 0) -> tuple:
        """Fold ``data`` (elements ``start ..`` of this part) into the client's next round of that
        slice; returns (round index, Round)."""
        r = self.next_round(client, start)
        self.slice_pushes[(client, start)] = r + 1
        self.pushes_by[client] = max(self.pushes_of(client), r + 1)
        self.priority = priority
        rnd = self.round(r)
        rnd.elements += data.size
        rnd.waiters.append((reply, want_value))
        rnd.last, rnd.last_at = client, time.monotonic()
        if start != 0 or data.size != self.numel:
            self._add_slice(rnd, start, data)
            return r, rnd
        rnd.acc, rnd.owned = accumulate(rnd.acc, rnd.owned, data, self.dtype)
        return r, rnd

    def _add_slice(self, rnd: Round, start: int, data: np.ndarray) -> None:
        """A P3 slice: the round's sum is a full-size array owned by the server, added into in place."""
        wide = np.float32 if self.dtype == np.float16 else self.dtype
        if rnd.acc is None:
            rnd.acc, rnd.owned = np.zeros(self.numel, dtype=wide), True
        elif not rnd.owned:
            rnd.acc, rnd.owned = np.array(rnd.acc, dtype=wide), True
        if self.dtype == np.float16:
            data = kernels.f16_to_f32(np.ascontiguousarray(data))
        kernels.sum_into(rnd.acc[start:start + data.size], data)

    def value(self) -> Optional[np.ndarray]:
        """The part's current value; with per-slice states, assembled from their latest values."""
        if not self.slices or self.store is None:
            return self.store
        out = np.array(self.store)
        for child in self.slices.values():
            start = child.offset - self.offset
            out[start:start + child.numel] = child.store
        return out

    def round(self, r: int) -> Round:
        rnd = self.rounds.get(r)
        if rnd is None:
            rnd = self.rounds[r] = Round()
        return rnd

    def add_contribution(self, r: int, data: np.ndarray, count: int) -> Round:
        """Fold a partial sum of ``count`` whole pushes into round ``r`` (TSEngine: the partial sums
        of an aggregation tree name their round; they carry no reply)."""
        rnd = self.round(r)
        rnd.acc, rnd.owned = accumulate(rnd.acc, rnd.owned, data, self.dtype)
        rnd.elements += count * self.numel
        return rnd

    def round_value(self, acc: np.ndarray) -> np.ndarray:
        """A complete round's sum in the key's own dtype (fp16 sums were accumulated in float32)."""
        return kernels.f32_to_f16(acc) if acc.dtype != self.dtype else acc

    def pull_ready(self, client: Any) -> bool:
        return self.initialized and self.completed >= self.pushes_of(client)

    def park_pull(self, client: Any, reply: Reply) -> None:
        self.parked.append((client, reply))

    def finish_round(self, r: int, value: np.ndarray, answer: Optional[np.ndarray] = None) -> None:
        """Round ``r`` is done and ``value`` is the key's new value: answer its pushes (with ``answer``
        when given, e.g. the change to the value, else the value) and due pulls (with the value)."""
        rnd = self.rounds.pop(r)
        self.store = value
        self.completed = r + 1
        sent = value if answer is None else answer
        for reply, want_value in rnd.waiters:
            _answer(reply, sent if want_value else None)
        self.serve_parked()

    def fail_round(self, r: int, error: Exception) -> None:
        """Round ``r`` can never complete: refuse every push waiting on it with ``error``, and every
        parked pull that waits for it (its client pushed into round ``r`` or later), which would
        otherwise wait forever."""
        for reply, _ in self.rounds.pop(r).waiters:
            _answer(reply, error)
        self.answer_parked(error, lambda client: self.initialized and self.pushes_of(client) > r)

    def serve_parked(self) -> None:
        """Answer every parked pull whose round has completed with the key's value."""
        if self.parked:
            self.answer_parked(self.store, self.pull_ready)

    def answer_parked(self, value: Any, due: Optional[Callable[[Any], bool]] = None) -> int:
        """Answer with ``value`` (the key's value, or an exception that refuses) every parked request
        whose client ``due`` accepts (every one without ``due``); the others stay parked. Returns how
        many were answered. The one way parked requests leave the list."""
        # Taken off first: a reply that parks again lands in the new list, not in the one being read.
        parked, self.parked = self.parked, []
        answered = 0
        for client, reply in parked:
            if due is None or due(client):
                _answer(reply, value)
                answered += 1
            else:
                self.parked.append((client, reply))
        return answered
