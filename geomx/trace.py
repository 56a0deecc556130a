"""One timeline across every tier: trace events of each process, merged into one file per run.

With ``GEOMX_TRACE=DIR`` (or its older name ``GEOMX_P3_TRACE``) every process writes
``DIR/<name>-<pid>.json`` in the Trace Event Format (chrome://tracing, ui.perfetto.dev) when it exits:

- clients (workers, and local servers towards the global tier): one span per data-path message slice,
  from its hand-over to the socket to its reply (``push``/``pull``/``pushpull``; ``args`` tell the
  slice, its priority and how long it waited in P3's queue); a worker also marks ``compute``, the time
  between a round's last reply and its next push;
- servers (local and global): one ``aggregate`` span per key and round, from the round's first push to
  its last, and one ``update`` span for what the round's completion does (a local server: hand the sum
  to the WAN; a global server: the optimizer and the replies).

``geomx-trace DIR OUT`` merges a run's files into one, every process a row group named after it. The
timestamps are wall-clock microseconds: on one machine they line up exactly; across hosts they are as
good as the hosts' clock synchronisation (NTP: about a millisecond).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, Dict, List, Optional

log = logging.getLogger("geomx.trace")


class Trace:
    """The trace events of one process, kept in memory (bounded) and written at exit."""

    MAX_EVENTS = 1_000_000  # memory bound for long runs; later events are counted, not kept

    def __init__(self, directory: str, name: str):
        self.directory = directory
        self.name = name
        self.events: List[Dict[str, Any]] = []
        self.dropped = 0

    @staticmethod
    def now() -> float:
        return time.time()

    @staticmethod
    def wall(monotonic: float) -> float:
        """A ``time.monotonic()`` reading as wall-clock time (the files of several processes line up)."""
        return time.time() - (time.monotonic() - monotonic)

    def span(self, name: str, cat: str, start: float, end: float, tid: int, **args: Any) -> None:
        """A complete event from ``start`` to ``end`` (wall-clock seconds) on row ``tid``."""
        if len(self.events) >= self.MAX_EVENTS:
            self.dropped += 1
            return
        self.events.append({"name": name, "cat": cat, "ph": "X", "ts": round(start * 1e6, 1),
                            "dur": round(max(0.0, end - start) * 1e6, 1), "pid": os.getpid(), "tid": tid,
                            "args": args})

    def record(self, mtype: str, key: int, offset: int, numel: int, priority: int, server: int,
               queued: float, sent: Optional[float], replied: float, ok: bool) -> None:
        """One data-path message slice of a client: queued, handed to the socket (``sent``), answered."""
        sent = queued if sent is None else sent
        self.span(f"{mtype} key {key} [{offset}:{offset + numel})", mtype, sent, replied, key, key=key,
                  offset=offset, numel=numel, priority=priority, server=server,
                  queued_us=round((sent - queued) * 1e6, 1), ok=ok)

    def write(self) -> Optional[str]:
        """Write ``<directory>/<name>-<pid>.json``; returns the path (None if it could not)."""
        path = os.path.join(self.directory, f"{self.name.replace('/', '-')}-{os.getpid()}.json")
        meta = [{"name": "process_name", "ph": "M", "pid": os.getpid(), "args": {"name": self.name}}]
        try:
            os.makedirs(self.directory, exist_ok=True)
            with open(path + ".tmp", "w") as f:
                json.dump({"traceEvents": meta + self.events, "displayTimeUnit": "ms",
                           "otherData": {"node": self.name, "dropped_events": self.dropped}}, f)
            os.replace(path + ".tmp", path)
        except OSError as exc:
            log.error("%s: could not write the trace %s: %s", self.name, path, exc)
            return None
        log.info("%s: wrote %d trace events to %s", self.name, len(self.events), path)
        return path


def _documents(directory: str) -> List[Dict[str, Any]]:
    docs = []
    for name in sorted(os.listdir(directory)):
        if name.endswith(".json"):
            with open(os.path.join(directory, name)) as f:
                doc = json.load(f)
            doc.setdefault("otherData", {}).setdefault("node", name)
            docs.append(doc)
    return docs


def load_traces(directory: str) -> List[Dict[str, Any]]:
    """Every span of every trace file in ``directory``, each with its process's ``node`` name (what a
    test or benchmark reads)."""
    return [{**ev, "node": doc["otherData"]["node"]} for doc in _documents(directory)
            for ev in doc["traceEvents"] if ev.get("ph") == "X"]


def merge_traces(directory: str, out: str) -> int:
    """One trace file with every process's events, in time order; returns the number of spans."""
    events = [ev for doc in _documents(directory) for ev in doc["traceEvents"]]
    events.sort(key=lambda ev: (ev.get("ph") != "M", ev.get("ts", 0)))
    with open(out, "w") as f:
        json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, f)
    return sum(1 for ev in events if ev.get("ph") == "X")


# Span colours by category: the worker's computation, its requests, the servers' aggregation and update.
_COLOURS = {"compute": "#4caf50", "PUSH": "#2196f3", "PUSHPULL": "#2196f3", "PULL": "#90caf9",
            "aggregate": "#ff9800", "update": "#e53935"}
_ROLE_ORDER = ("worker", "master_worker", "local_server", "global_server")


def _row_order(node: str) -> tuple:
    base = node.rsplit("/", 1)[-1]
    rank = next((i for i, role in enumerate(_ROLE_ORDER) if base.startswith(role)), len(_ROLE_ORDER))
    return rank, node


def render_svg(events: List[Dict[str, Any]], start: Optional[float] = None, end: Optional[float] = None,
               width: int = 1200) -> str:
    """A timeline of ``events`` (:func:`load_traces`' spans) as SVG: a row per process and category,
    time from ``start`` to ``end`` seconds after the first event (the whole trace by default)."""
    if not events:
        raise ValueError("no spans to draw")
    t0 = min(ev["ts"] for ev in events)
    lo = t0 + (start or 0.0) * 1e6
    hi = t0 + end * 1e6 if end is not None else max(ev["ts"] + ev["dur"] for ev in events)
    if hi <= lo:
        raise ValueError(f"an empty window: from {start} s to {end} s")
    shown = [ev for ev in events if ev["ts"] < hi and ev["ts"] + ev["dur"] > lo]
    rows = sorted({(ev["node"], ev["cat"]) for ev in shown}, key=lambda r: (_row_order(r[0]), r[1]))
    label_w, row_h, top = 260, 22, 30
    scale = (width - label_w - 10) / (hi - lo)
    height = top + row_h * len(rows) + 30
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="12"><rect width="100%" height="100%" fill="white"/>',
           f'<text x="10" y="18">geomx trace: {(hi - lo) / 1e3:.1f} ms from {(lo - t0) / 1e6:.3f} s</text>']
    for i, (node, cat) in enumerate(rows):
        y = top + i * row_h
        out.append(f'<text x="10" y="{y + 15}">{_xml(node)} · {_xml(cat)}</text>')
        out.append(f'<line x1="{label_w}" y1="{y + row_h}" x2="{width - 10}" y2="{y + row_h}" stroke="#eee"/>')
        for ev in shown:
            if (ev["node"], ev["cat"]) != (node, cat):
                continue
            x0 = label_w + (max(ev["ts"], lo) - lo) * scale
            x1 = label_w + (min(ev["ts"] + ev["dur"], hi) - lo) * scale
            out.append(f'<rect x="{x0:.1f}" y="{y + 3}" width="{max(x1 - x0, 0.5):.1f}" height="{row_h - 6}" '
                       f'fill="{_COLOURS.get(cat, "#9e9e9e")}"><title>{_xml(ev["name"])}: '
                       f'{ev["dur"] / 1e3:.2f} ms</title></rect>')
    for k in range(6):  # a time axis in milliseconds
        x = label_w + k * (width - label_w - 10) / 5
        out.append(f'<text x="{x:.0f}" y="{height - 10}">{(hi - lo) / 1e3 * k / 5:.0f} ms</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _xml(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def main(argv: Optional[List[str]] = None) -> int:
    import argparse

    from . import __version__

    # Installed under two names (geomx-p3-merge is the older): each answers --version as itself.
    called = os.path.basename(sys.argv[0])
    p = argparse.ArgumentParser(prog=called if called.startswith("geomx-") else "geomx-trace",
                                description="Merge the per-process trace files of GEOMX_TRACE (GEOMX_P3_TRACE) "
                                            "into one file for chrome://tracing or ui.perfetto.dev")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("directory", help="the GEOMX_TRACE directory (one .json file per process)")
    p.add_argument("out", help="the merged trace file to write")
    p.add_argument("--svg", metavar="FILE", help="also draw the timeline as an SVG image")
    p.add_argument("--from", dest="start", type=float, default=None, metavar="S",
                   help="the SVG's window starts S seconds after the first event")
    p.add_argument("--to", dest="end", type=float, default=None, metavar="S",
                   help="the SVG's window ends S seconds after the first event")
    args = p.parse_args(argv)
    n = merge_traces(args.directory, args.out)
    print(f"{n} events -> {args.out}")
    if args.svg:
        try:
            svg = render_svg(load_traces(args.directory), args.start, args.end)
        except ValueError as exc:
            p.error(str(exc))
        with open(args.svg, "w") as f:
            f.write(svg)
        print(f"timeline -> {args.svg}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
