"""P3 (Priority-based Parameter Propagation) on the sending side, and the request timeline.

With ``ENABLE_P3=1`` a client (worker, or local server towards the global tier) cuts every data-path
request into slices (:func:`geomx.kvclient.partition` with a slice size) and hands them to one
:class:`SendQueue` per server link instead of to the socket. The queue is a heap ordered by the
request's ``priority`` (the examples pass ``-idx``, so the first layers win) and gives the socket at
most ``GEOMX_P3_WINDOW`` messages at a time (ZeroMQ's send high-water mark, with a small kernel send
buffer): everything else stays in the heap, where a slice pushed later with a higher priority
overtakes lower-priority slices that are not on the wire yet. That is the point of P3: backward
produces the last layer's gradient first, but the next forward needs the first layer's weights
first.

The request timeline (when each slice was queued, handed to the socket and answered) is recorded by
:class:`geomx.trace.Trace`, which this module re-exports with ``load_traces`` and ``merge_traces``.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import time
from typing import Callable, Dict, List, Optional, Tuple

import zmq

from .trace import Trace, load_traces, main, merge_traces  # noqa: F401 - their old home
from .transport import EventLoop, Link
from .wire import Message

log = logging.getLogger("geomx.p3")

# Messages of this class go after every queued data-path message (commands, STOP): they must not
# overtake data queued before them (a STOP ahead of the last pushes would strand them).
DATA, CONTROL = 0, 1


class SendQueue:
    """The messages for one server link not yet handed to its socket, best first.

    Order: data before control; higher ``priority`` first; then first come, first served. A message
    never overtakes an earlier queued message of the same key (a pull must not pass the push it
    follows, whatever priorities the caller gave them): it is queued at the lowest priority among
    them.
    """

    def __init__(self, loop: EventLoop, link: Link):
        self.loop = loop
        self.link = link
        self._heap: List[Tuple[int, int, int, Message, Optional[Callable[[], None]]]] = []
        self._seq = itertools.count()
        self._key_floor: Dict[int, List[int]] = {}  # key -> [lowest queued priority, queued count]
        self._waiting = False  # for POLLOUT

    def __len__(self) -> int:
        return len(self._heap)

    def put(self, msg: Message, kind: int = DATA, on_sent: Optional[Callable[[float], None]] = None) -> None:
        priority = msg.priority
        if kind == DATA:
            floor = self._key_floor.get(msg.key)
            if floor is None:
                self._key_floor[msg.key] = [priority, 1]
            else:
                priority = min(priority, floor[0])
                floor[0], floor[1] = priority, floor[1] + 1
        heapq.heappush(self._heap, (kind, -priority, next(self._seq), msg, on_sent))
        self.pump()

    def pump(self) -> None:
        """Hand queued messages to the socket until it is full (then wait for POLLOUT)."""
        self._waiting = False
        while self._heap:
            kind, _, _, msg, on_sent = self._heap[0]
            handed = time.time()  # before the hand-over (see geomx.senders.OnSent)
            try:
                self.link.send(msg, block=False)
            except zmq.Again:
                self._waiting = True
                self.loop.when_writable(self.link, self.pump)
                return
            heapq.heappop(self._heap)
            if kind == DATA:
                floor = self._key_floor[msg.key]
                floor[1] -= 1
                if floor[1] == 0:
                    del self._key_floor[msg.key]
            if on_sent is not None:
                on_sent(handed)

    def clear(self) -> None:
        self._heap.clear()
        self._key_floor.clear()
