"""The launcher's progress line and final table (geomx/launch/progress.py), from exact figures, and
the stream it shares with the processes' output: each line of theirs takes the progress line away,
is written, and the progress line comes back under it."""
from __future__ import annotations

import io

import pytest

from geomx.launch import progress, status

pytestmark = pytest.mark.unit

FIGURES = {
    "rounds": {"total": 1234, "per_second": 12.34, "keys": 2, "per_key": 617},
    "wan": {"up_bytes": 50e6, "down_bytes": 45.1e6, "total": 95.1e6, "up_bps": 1.2e6, "down_bps": 1.1e6},
    "links": [{"id": "party0->gs0", "up_bytes": 30e6, "down_bytes": 25e6},
              {"id": "party1->gs0", "up_bytes": 20e6, "down_bytes": 20.1e6}],
    "waits": {"parties": {"party0": {"share": 0.25}, "party1": {"share": 0.75}}, "slowest": "party1",
              "slowest_recent": None},
    "training": {"party0/worker0": {"accuracy": 0.9, "loss": 0.25}, "party1/worker0": {"accuracy": 0.924,
                                                                                      "loss": None}},
    "refusals_total": 0,
}


def test_line_exact():
    assert progress.line(FIGURES, 83.9) == ("[geomx 0:01:23] rounds 1,234 (12.3/s) | WAN up 1.20 MB/s down 1.10 MB/s, "
                                            "95.10 MB | acc 0.912 | waits for party1")
    assert progress.line(dict(FIGURES, refusals_total=3), 0).endswith("| waits for party1 | 3 refused")


def test_line_with_the_share_done_and_the_time_left():
    assert progress.line(dict(FIGURES, done=0.41, eta_seconds=120.4), 83.9) == (
        "[geomx 0:01:23] 41% ETA 0:02:00 | rounds 1,234 (12.3/s) | WAN up 1.20 MB/s down 1.10 MB/s, 95.10 MB "
        "| acc 0.912 | waits for party1")
    assert progress.line(dict(FIGURES, done=0.41), 83.9).startswith("[geomx 0:01:23] 41% | rounds 1,234")


def test_eta_from_how_fast_the_share_done_grew_since_first_seen():
    eta = status.Eta()
    assert eta.update(10.0, None) is None
    assert eta.update(20.0, 0.2) is None  # first seen: the start's seconds do not count
    assert eta.update(30.0, 0.2) is None  # no growth yet
    assert eta.update(40.0, 0.4) == 60.0  # 0.2 in 20 s: 0.6 left takes 60 s
    assert eta.update(50.0, 0.6) == 30.0  # 0.4 in 30 s: 0.4 left takes 30 s
    assert eta.update(60.0, 1.0) == 0.0
    assert eta.update(70.0, 0.1) is None  # a slower worker's first report, below the first share: from here on
    assert eta.update(80.0, 0.2) == 80.0  # 0.1 in 10 s: 0.8 left takes 80 s


def test_line_before_any_figure():
    assert progress.line({"rounds": None, "wan": None, "waits": None, "training": None}, 3725) == \
        "[geomx 1:02:05] rounds 0 | WAN up – MB/s down – MB/s, – MB"


def test_table_exact():
    assert progress.table(FIGURES, 3725) == [
        "[geomx] 1:02:05, 1,234 global rounds (617 per key), WAN 95.10 MB",
        "  WAN link                      up MB    down MB",
        "  party0->gs0                   30.00      25.00",
        "  party1->gs0                   20.00      20.10",
        "  rounds waited for: party0 25%, party1 75%",
        "  party0/worker0           accuracy 0.9000  loss 0.25",
        "  party1/worker0           accuracy 0.9240  loss –",
    ]


class _Page:
    def __init__(self):
        self.events = []

    def status(self):
        return FIGURES

    def process_exited(self, name, code, reason=""):
        self.events.append(("exit", name, code))

    def run_ended(self, status, message=""):
        self.events.append(("end", status))


def test_the_processes_lines_scroll_above_the_progress_line():
    out = io.StringIO()
    page = _Page()
    p = progress.Progress(out, page, interval=3600)  # drawn by hand below, not by its thread
    p.write("[party0/worker0] a\n")
    assert out.getvalue() == "[party0/worker0] a\n"  # nothing drawn yet: nothing to take away
    p._shown = "[geomx] LINE"
    out.truncate(0)
    out.seek(0)
    p.write("[party0/worker0] b\n")
    assert out.getvalue() == "\r\x1b[2K[party0/worker0] b\n[geomx] LINE"
    p.process_exited("party0/worker0", 0)
    out.truncate(0)
    out.seek(0)
    p.run_ended(0, "ok")
    assert page.events == [("exit", "party0/worker0", 0), ("end", 0)]
    assert out.getvalue().startswith("\r\x1b[2K[geomx] ") and out.getvalue().endswith("loss –\n")
