"""The launcher's progress line on a terminal, and its table at the end of a run.

While a run trains, one line at the bottom of the terminal, redrawn every second::

    [geomx 0:01:23] 41% ETA 0:02:00 | rounds 1,234 (12.3/s) | WAN up 1.20 MB/s down 1.10 MB/s, 95.1 MB
        | acc 0.912 | waits for party1    (one line)

from the same figures as the status page (:class:`.status.StatusPage`, polling every process's
metrics; the share done and the time left when the workers say their length, ``report_progress``). The
processes' own output keeps scrolling above it: the supervisor writes their lines
through :meth:`Progress.write`, which takes the line away, writes, and draws it again. At the end, a
table per party link and worker. Nothing of this when the output is not a terminal (logs and pipes
get the processes' lines only).
"""
from __future__ import annotations

import logging
import shutil
import threading
import time
from typing import IO, Any, Dict, List, Optional

log = logging.getLogger("geomx.launch")

_CLEAR = "\r\x1b[2K"  # to the line's start, and erase it


def _mb(n: Optional[float]) -> str:
    return "–" if n is None else f"{n / 1e6:.2f}"


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def line(figures: Dict[str, Any], elapsed: float) -> str:
    """The progress line for ``figures`` (a :meth:`.status.StatusPage.status`), ``elapsed`` seconds in."""
    rounds = figures.get("rounds") or {}
    wan = figures.get("wan") or {}
    parts = []
    if figures.get("done") is not None:  # first: a narrow terminal cuts the line's end
        eta = figures.get("eta_seconds")
        parts.append(f"{figures['done']:.0%}" + ("" if eta is None else f" ETA {_clock(eta)}"))
    parts.append(f"rounds {int(rounds.get('total') or 0):,}"
                 + (f" ({rounds['per_second']:.1f}/s)" if rounds.get("per_second") else ""))
    parts.append(f"WAN up {_mb(wan.get('up_bps'))} MB/s down {_mb(wan.get('down_bps'))} MB/s, "
                 f"{_mb(wan.get('total'))} MB")
    accuracies = [w["accuracy"] for w in (figures.get("training") or {}).values() if w.get("accuracy") is not None]
    if accuracies:
        parts.append(f"acc {sum(accuracies) / len(accuracies):.3f}")
    waits = figures.get("waits") or {}
    slowest = waits.get("slowest_recent") or waits.get("slowest")
    if slowest:
        parts.append(f"waits for {slowest}")
    if figures.get("refusals_total"):
        parts.append(f"{int(figures['refusals_total'])} refused")
    return f"[geomx {_clock(elapsed)}] " + " | ".join(parts)


def table(figures: Dict[str, Any], elapsed: float) -> List[str]:
    """The summary at the end of a run: its rounds, each WAN link's bytes, each worker's last figures."""
    rounds = figures.get("rounds") or {}
    out = [f"[geomx] {_clock(elapsed)}, {int(rounds.get('total') or 0):,} global rounds"
           f" ({int(rounds.get('per_key') or 0):,} per key), WAN {_mb((figures.get('wan') or {}).get('total'))} MB"]
    links = figures.get("links") or []
    if links:
        out.append(f"  {'WAN link':<24} {'up MB':>10} {'down MB':>10}")
        for link in links:
            out.append(f"  {link['id']:<24} {_mb(link.get('up_bytes')):>10} "
                       f"{_mb(link.get('down_bytes')):>10}")
    waits = (figures.get("waits") or {}).get("parties") or {}
    if waits:
        out.append("  rounds waited for: " + ", ".join(f"{p} {w['share']:.0%}" for p, w in sorted(waits.items())))
    for worker, t in sorted((figures.get("training") or {}).items()):
        if t.get("accuracy") is not None or t.get("loss") is not None:
            acc = "–" if t.get("accuracy") is None else f"{t['accuracy']:.4f}"
            loss = "–" if t.get("loss") is None else f"{t['loss']:.4g}"
            out.append(f"  {worker:<24} accuracy {acc}  loss {loss}")
    if figures.get("refusals_total"):
        out.append(f"  {int(figures['refusals_total'])} message(s) refused (see the processes' logs)")
    return out


class Progress:
    """The progress line over ``out`` (a terminal): the supervisor's stream and the run's observer.

    ``page`` is the run's :class:`.status.StatusPage` (served or not), whose figures it shows."""

    def __init__(self, out: IO[str], page: Any, interval: float = 1.0) -> None:
        self.out = out
        self.page = page
        self.interval = interval
        self.start = time.monotonic()
        self._lock = threading.Lock()
        self._shown = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._draw_forever, name="geomx-progress", daemon=True)
        self._thread.start()

    # ---- the supervisor's stream
    def write(self, text: str) -> None:
        with self._lock:
            self.out.write(_CLEAR if self._shown else "")
            self.out.write(text)
            if self._shown:
                self.out.write(self._shown)
            self.out.flush()

    def flush(self) -> None:
        self.out.flush()

    # ---- the run's observer
    def process_exited(self, name: str, code: int, reason: str = "") -> None:
        self.page.process_exited(name, code, reason)

    def run_ended(self, status: int, message: str = "") -> None:
        self.page.run_ended(status, message)
        self._stop.set()
        self._thread.join(timeout=self.interval + 1)
        with self._lock:
            if self._shown:
                self.out.write(_CLEAR)
                self._shown = ""
            self.out.write("\n".join(table(self.page.status(), time.monotonic() - self.start)) + "\n")
            self.out.flush()

    def _draw_forever(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                # One terminal line: a longer one would wrap, and only its last row would be taken away.
                width = shutil.get_terminal_size().columns - 1
                text = line(self.page.status(), time.monotonic() - self.start)[:max(width, 20)]
            except Exception:  # noqa: BLE001 - a figure it cannot read must not end the line for good
                log.exception("progress line")
                continue
            with self._lock:
                self.out.write(_CLEAR + text)
                self.out.flush()
                self._shown = text
