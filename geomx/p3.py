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

:class:`Trace` records, per slice, when it was queued, handed to the socket and answered, and writes
them as a chrome://tracing (Trace Event Format) JSON file, one per client process.
"""
from __future__ import annotations

import heapq
import itertools
import json
import logging
import os
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import zmq

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

    def put(self, msg: Message, kind: int = DATA, on_sent: Optional[Callable[[], None]] = None) -> None:
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
                on_sent()

    def clear(self) -> None:
        self._heap.clear()
        self._key_floor.clear()


class Trace:
    """Per-slice timestamps of one client's data-path requests, written as chrome://tracing JSON.

    One complete ("X") event per slice, from the moment it was handed to the socket to its reply,
    on a row per key; ``args`` hold the slice, its priority and how long it waited in the P3 queue.
    Timestamps are wall-clock microseconds, so the files of several processes line up.
    """

    MAX_EVENTS = 1_000_000  # memory bound for long runs; later slices are counted, not kept

    def __init__(self, directory: str, name: str):
        self.directory = directory
        self.name = name
        self.events: List[Dict[str, Any]] = []
        self.dropped = 0

    @staticmethod
    def now() -> float:
        return time.time()

    def record(self, mtype: str, key: int, offset: int, numel: int, priority: int, server: int,
               queued: float, sent: Optional[float], replied: float, ok: bool) -> None:
        if len(self.events) >= self.MAX_EVENTS:
            self.dropped += 1
            return
        sent = queued if sent is None else sent
        self.events.append({
            "name": f"{mtype} key {key} [{offset}:{offset + numel})", "cat": mtype, "ph": "X",
            "ts": round(sent * 1e6, 1), "dur": round(max(0.0, replied - sent) * 1e6, 1),
            "pid": os.getpid(), "tid": key,
            "args": {"key": key, "offset": offset, "numel": numel, "priority": priority, "server": server,
                     "queued_us": round((sent - queued) * 1e6, 1), "ok": ok},
        })

    def write(self) -> Optional[str]:
        """Write ``<directory>/<name>-<pid>.json``; returns the path (None if it could not)."""
        path = os.path.join(self.directory, f"{self.name}-{os.getpid()}.json")
        meta = [{"name": "process_name", "ph": "M", "pid": os.getpid(), "args": {"name": self.name}}]
        try:
            os.makedirs(self.directory, exist_ok=True)
            with open(path + ".tmp", "w") as f:
                json.dump({"traceEvents": meta + self.events, "displayTimeUnit": "ms",
                           "otherData": {"node": self.name, "dropped_events": self.dropped}}, f)
            os.replace(path + ".tmp", path)
        except OSError as exc:
            log.error("%s: could not write the P3 trace %s: %s", self.name, path, exc)
            return None
        log.info("%s: wrote %d trace events to %s", self.name, len(self.events), path)
        return path


def load_traces(directory: str) -> List[Dict[str, Any]]:
    """Every slice event of every trace file in ``directory`` (what a test or benchmark reads)."""
    events: List[Dict[str, Any]] = []
    for name in sorted(os.listdir(directory)):
        if name.endswith(".json"):
            with open(os.path.join(directory, name)) as f:
                doc = json.load(f)
            node = doc.get("otherData", {}).get("node", name)
            for ev in doc["traceEvents"]:
                if ev.get("ph") == "X":
                    events.append({**ev, "node": node})
    return events


def merge_traces(directory: str, out: str) -> int:
    """One chrome://tracing file with every process's events; returns the number of events."""
    docs = []
    for name in sorted(os.listdir(directory)):
        if name.endswith(".json"):
            with open(os.path.join(directory, name)) as f:
                docs.append(json.load(f))
    events = [ev for doc in docs for ev in doc["traceEvents"]]
    with open(out, "w") as f:
        json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, f)
    return sum(1 for ev in events if ev.get("ph") == "X")


def main(argv: Optional[List[str]] = None) -> int:
    import argparse

    from . import __version__

    p = argparse.ArgumentParser(prog="geomx-p3-merge",
                                description="Merge the per-process trace files of GEOMX_P3_TRACE into one "
                                            "file for chrome://tracing or ui.perfetto.dev")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("directory", help="the GEOMX_P3_TRACE directory (one .json file per process)")
    p.add_argument("out", help="the merged trace file to write")
    args = p.parse_args(argv)
    n = merge_traces(args.directory, args.out)
    print(f"{n} slice events -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
