"""A running topology seen from outside: every node's metrics over HTTP, scraped by a real Prometheus
server (Debian's package) and queried in PromQL, and the merged trace of a run (geomx-trace).

The workers (tests/workers/metrics_worker.py) run exact rounds, then hold until the test has read what
it needs, so every figure is compared while the topology is alive and quiet: Prometheus' values against
the nodes' own, the global and local servers' round counts against the rounds the workers ran, and the
bytes a party's local server sent on its WAN link against what the global server received from it.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
import urllib.parse
import urllib.request

import pytest
from helpers import REPO, WORKERS, free_port_range

from geomx import metrics, trace

pytestmark = pytest.mark.system

ROUNDS = 4
KEYS = 2  # metrics_worker.SIZES
# Whole keys on the WAN (no cut-through slices), so a round is a key's round at every server.
ENV = ["--env", "GEOMX_WAN_SLICE_BYTES=0"]


def launch(args, hold, parties=2, workers=1):
    cmd = [sys.executable, "-m", "geomx.launch", "--parties", str(parties), "--workers", str(workers), *ENV, *args,
           "--", sys.executable, str(WORKERS / "metrics_worker.py"), "--slice", "{slice}", "--rounds", str(ROUNDS),
           "--hold", str(hold)]
    return cmd


class Run:
    """A topology started in the background; ``wait_trained`` returns once every training worker
    printed TRAINED (or fails with the output so far)."""

    def __init__(self, cmd, trainers: int):
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
        self.lines = []
        self.trained = threading.Event()
        self.trainers = trainers
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            if sum("TRAINED" in x for x in self.lines) >= self.trainers + 1:  # + the master worker
                self.trained.set()
        self.trained.set()

    def wait_trained(self, timeout=180):
        assert self.trained.wait(timeout), "the workers did not finish:\n" + "".join(self.lines[-60:])
        assert self.proc.poll() is None, "the topology ended early:\n" + "".join(self.lines[-60:])

    def finish(self, hold, timeout=120):
        open(hold, "w").close()
        code = self.proc.wait(timeout)
        self.thread.join(10)
        return code, "".join(self.lines)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def reading(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics.json", timeout=10) as r:
        return json.load(r)


def prometheus_targets(config_text):
    """(process name, role, site, port) of each target in a scrape configuration we wrote."""
    out = []
    lines = config_text.splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith("- targets:"):
            port = int(json.loads(line.split(":", 1)[1].strip())[0].rsplit(":", 1)[1])
            labels = lines[i + 1].split("labels:", 1)[1].strip().strip("{}")
            fields = dict((k.strip(), json.loads(v.strip())) for k, v in (f.split(":", 1) for f in labels.split(", ")))
            out.append((fields["geomx_process"], fields["geomx_role"], fields["geomx_site"], port))
    return out


def test_prometheus_scrapes_each_party_link_while_it_trains(tmp_path):
    if shutil.which("prometheus") is None:
        pytest.skip("Debian's prometheus is not installed (.ci/run installs it as root)")
    base = free_port_range(13)  # 12 processes, then Prometheus
    hold = tmp_path / "hold"
    printed = subprocess.run(launch(["--metrics-port", str(base), "--print-prometheus"], hold), cwd=REPO,
                             capture_output=True, text=True, timeout=60)
    assert printed.returncode == 0, printed.stderr
    config_text = printed.stdout.replace("scrape_interval: 5s", "scrape_interval: 1s").replace(
        "scrape_timeout: 5s", "scrape_timeout: 1s")
    targets = prometheus_targets(config_text)
    assert sorted(port for *_, port in targets) == list(range(base, base + len(targets)))
    (tmp_path / "prometheus.yml").write_text(config_text)
    check = subprocess.run(["promtool", "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True,
                           text=True) if shutil.which("promtool") else None
    assert check is None or check.returncode == 0, check.stdout + check.stderr
    prom_port = base + len(targets)
    prom = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "w"))
    run = Run(launch(["--metrics-port", str(base)], hold), trainers=2)
    try:
        run.wait_trained()
        by_name = {name: (role, site, port) for name, role, site, port in targets}
        readings = {name: reading(port) for name, (_, _, port) in by_name.items()}
        local = {by_name[n][1]: r for n, r in readings.items() if by_name[n][0] == "local_server"}
        glob = readings["global_server0"]
        assert sorted(local) == ["party0", "party1"]
        # Every round the workers ran is a round at their party's local server and at the global server,
        # and each of the global server's rounds waited for one of the two parties.
        assert metrics.value(glob, "geomx_rounds_total") == KEYS * ROUNDS
        waited = {s[1]["peer"]: s[2] for s in glob["samples"] if s[0] == "geomx_round_waited_for_total"}
        assert sum(waited.values()) == KEYS * ROUNDS and set(waited) <= {"local_server0", "local_server1"}
        for r in local.values():
            assert metrics.value(r, "geomx_rounds_total") == KEYS * ROUNDS
            assert metrics.value(r, "geomx_wan_round_trips_total") == KEYS * ROUNDS
        # What each party's local server sent on its WAN link, the global server received from it.
        wan_sent = {}
        for site, r in local.items():
            wan_sent[site] = metrics.value(r, "geomx_link_sent_bytes_total", scope="wan",
                                           link=f"{r['node']['node']}->server0")
            assert wan_sent[site] > KEYS * ROUNDS * 4 * 1000
            assert metrics.value(glob, "geomx_peer_received_bytes_total", peer=r["node"]["node"]) == wan_sent[site]
        for name, (role, _, _) in by_name.items():
            if role == "worker":
                assert metrics.value(readings[name], "geomx_training_accuracy") == 1.0
                assert metrics.value(readings[name], "geomx_training_loss") == 1.0 / ROUNDS
                assert metrics.value(readings[name], "geomx_training_steps") == ROUNDS
                assert metrics.value(readings[name], "geomx_training_steps_planned") == ROUNDS

        # PromQL: one series per party link, each equal to the local server's own count.
        query = 'geomx_link_sent_bytes_total{geomx_role="local_server",scope="wan"}'
        deadline = time.monotonic() + 60
        while True:
            url = f"http://127.0.0.1:{prom_port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
            try:
                with urllib.request.urlopen(url, timeout=10) as r:
                    result = json.load(r)["data"]["result"]
            except OSError:
                result = []
            got = {s["metric"]["geomx_site"]: float(s["value"][1]) for s in result}
            if got == wan_sent:
                break
            assert time.monotonic() < deadline, f"Prometheus has {got}, the nodes {wan_sent}:\n" + \
                (tmp_path / "prometheus.log").read_text()[-3000:]
            time.sleep(0.5)  # Prometheus scrapes every second: poll its answer
        code, out = run.finish(hold)
        assert code == 0, out[-4000:]
    finally:
        run.kill()
        prom.terminate()
        prom.wait(30)


def test_one_trace_file_shows_an_iteration_across_every_tier(tmp_path):
    hold = tmp_path / "hold"
    hold.touch()
    tdir = tmp_path / "trace"
    proc = subprocess.run(launch(["--env", f"GEOMX_TRACE={tdir}"], hold), cwd=REPO, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "merged.json"
    svg = tmp_path / "timeline.svg"
    merged = subprocess.run([sys.executable, "-m", "geomx.trace", str(tdir), str(out), "--svg", str(svg)],
                            capture_output=True, text=True, timeout=60)
    assert merged.returncode == 0, merged.stderr
    events = trace.load_traces(str(tdir))
    names = {json.load(open(os.path.join(tdir, f)))["otherData"]["node"] for f in os.listdir(tdir)}
    assert names == {"global_server0", "local_server0", "local_server1", "party0/worker0", "party1/worker0",
                     "central/master_worker0"}
    merged_events = json.load(open(out))["traceEvents"]
    assert sum(ev["ph"] == "X" for ev in merged_events) == len(events)

    def spans(node, cat):
        return [ev for ev in events if ev["node"] == node and ev["cat"] == cat]

    for party in ("party0", "party1"):
        # A round trip per key and round, and the computation between a key's answer and its next push.
        assert len(spans(f"{party}/worker0", "PUSHPULL")) == KEYS * ROUNDS
        assert len(spans(f"{party}/worker0", "compute")) == KEYS * (ROUNDS - 1)
    glob_updates = spans("global_server0", "update")
    assert len(spans("global_server0", "aggregate")) == len(glob_updates) == KEYS * ROUNDS
    # Causality on one clock: each global update begins inside both parties' WAN requests for that key
    # and round (after their pushes arrived, before the answer it sends reached them).
    for up in glob_updates:
        key, r = up["args"]["key"], up["args"]["round"]
        for ls in ("local_server0", "local_server1"):
            wan = [ev for ev in spans(ls, "PUSHPULL") if ev["args"]["key"] == key]
            assert len(wan) == ROUNDS
            req = sorted(wan, key=lambda ev: ev["ts"])[r]
            assert req["ts"] <= up["ts"] <= req["ts"] + req["dur"], (ls, up, [(e["ts"], e["dur"]) for e in wan])
    assert svg.read_text().startswith("<svg") and "global_server0 · update" in svg.read_text()


def _status(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status.json", timeout=10) as r:
        return json.load(r)


def test_launcher_status_page_follows_the_run_to_its_end(tmp_path):
    """geomx-launch --status: every process gets a metrics port, the page sees them all and the rounds
    the workers ran, then the launcher tells it each exit and the end, and it serves on (--status-linger)
    until the launcher is interrupted."""
    hold = tmp_path / "hold"
    port = free_port_range(1)
    run = Run(launch(["--status", f"127.0.0.1:{port}", "--status-linger", "120"], hold), trainers=2)
    try:
        run.wait_trained()
        deadline = time.monotonic() + 60
        while True:  # the page polls each node about once a second
            try:
                status = _status(port)
            except OSError:
                status = None
            if status and status["rounds"]["total"] == KEYS * ROUNDS and \
                    all(n["state"] == "up" for n in status["nodes"]):
                break
            assert time.monotonic() < deadline, status
            time.sleep(0.2)
        assert len(status["nodes"]) == 10 and status["shape"] == {"parties": ["party0", "party1"], "global_servers": 1}
        assert status["waits"]["parties"]["party0"]["rounds"] + status["waits"]["parties"]["party1"]["rounds"] == \
            KEYS * ROUNDS
        hold.touch()
        while True:  # the run ends; the page stays
            status = _status(port)
            if status["run"]["state"] == "ended":
                break
            assert time.monotonic() < deadline + 60, status["run"]
            time.sleep(0.2)
        assert status["run"]["status"] == 0 and status["run"]["ok"]
        exits = {e["node"] for e in status["events"] if e["kind"] == "exit"}
        assert exits == {n["name"] for n in status["nodes"]}
        run.proc.send_signal(signal.SIGINT)  # ends the linger
        assert run.proc.wait(60) == 0, "".join(run.lines[-40:])
        with pytest.raises(OSError):
            _status(port)
    finally:
        run.kill()


def test_progress_line_on_a_terminal_and_nothing_of_it_in_a_pipe(tmp_path):
    """On a terminal the launcher draws the progress line (accuracy reported by the workers included)
    and, at the end, its table; with the output in a pipe, neither."""
    import pty

    hold = tmp_path / "hold"
    main_fd, child_fd = pty.openpty()
    # A terminal 200 columns wide: the line is cut at the terminal's width, and this one must show it whole.
    fcntl.ioctl(child_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 200, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    proc = subprocess.Popen(launch([], hold), stdout=child_fd, stderr=child_fd, stdin=subprocess.DEVNULL, cwd=REPO,
                            close_fds=True, env=env)
    os.close(child_fd)
    out = b""
    try:
        deadline = time.monotonic() + 180
        while b"acc 1.000" not in out:  # every worker reported its last accuracy, and a poll saw it
            assert time.monotonic() < deadline and proc.poll() is None, out.decode(errors="replace")[-3000:]
            try:
                out += os.read(main_fd, 65536)
            except OSError:
                break
        hold.touch()
        while True:
            try:
                chunk = os.read(main_fd, 65536)
            except OSError:  # the terminal's other end closed: the launcher is gone
                break
            if not chunk:
                break
            out += chunk
        assert proc.wait(60) == 0, out.decode(errors="replace")[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(main_fd)
    text = out.decode(errors="replace")
    assert "\r\x1b[2K[geomx 0:" in text
    # The poll that saw both workers' last accuracy saw their last step too (reported before it).
    assert re.search(r"\[geomx 0:\d\d:\d\d\] 100% ETA 0:00:00 \| rounds .*\| acc 1\.000", text), text[-3000:]
    table = text[text.index("[geomx] "):]
    assert "  party0->gs0 " in table and "  party1->gs0 " in table
    assert "  party0/worker0           accuracy 1.0000  loss 0.25" in table.replace("\r", "")
    piped = subprocess.run(launch([], hold), capture_output=True, text=True, cwd=REPO, timeout=180)
    assert piped.returncode == 0 and "[geomx" not in piped.stdout + piped.stderr
