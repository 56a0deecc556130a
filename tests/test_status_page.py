"""The launcher's live status page (geomx/launch/status.py): its sums from readings given by hand (exact
numbers: rates between two readings, each party's WAN link, the party the rounds waited for), the poller
against listeners in this process, and a real two-party run looked at by headless Chromium while it trains.
"""
from __future__ import annotations

import http.server
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from html.parser import HTMLParser

import pytest
from helpers import EXAMPLES, REPO, dead_port, free_port_range, kill_group

from geomx import metrics
from geomx.launch import Ports, Topology
from geomx.launch.status import Node, Seen, Series, StatusPage, nodes_of, rate, summarize

# -- readings made by hand ----------------------------------------------------------------------------


def reading(node, t, *samples, role="", party=""):
    """A /metrics.json reading of ``node`` at node time ``t``: ``samples`` are ``(name, labels, value)``."""
    return {"node": {"role": role, "node": node, "party": party}, "time": t,
            "samples": [[name, dict(labels), float(v)] for name, labels, v in samples]}


def wan(link, sent, received):
    return [("geomx_link_sent_bytes_total", {"link": link, "scope": "wan"}, sent),
            ("geomx_link_received_bytes_total", {"link": link, "scope": "wan"}, received)]


LAN = [("geomx_link_sent_bytes_total", {"link": "party-clients", "scope": "lan"}, 10 ** 9),
       ("geomx_link_received_bytes_total", {"link": "party-clients", "scope": "lan"}, 10 ** 9)]

# Two parties, two global servers. Party 0's local server ranked itself local_server1 (the ranks of the
# global tier are not the parties' numbers), party 1's local_server0.
NODES = [
    Node("global_scheduler", "global_scheduler", "central", "http://x/metrics.json"),
    Node("global_server0", "global_server", "central", "http://x/metrics.json"),
    Node("global_server1", "global_server", "central", "http://x/metrics.json"),
    Node("party0/server", "local_server", "party0", "http://x/metrics.json"),
    Node("party0/worker0", "worker", "party0", "http://x/metrics.json"),
    Node("party1/server", "local_server", "party1", "http://x/metrics.json"),
    Node("party1/worker0", "worker", "party1", ""),
]
PARTIES = ["party0", "party1"]


@pytest.mark.unit
def test_a_rate_is_the_difference_of_two_readings_by_the_nodes_clock():
    before = reading("local_server1", 100.0, ("geomx_rounds_total", {}, 40))
    after = reading("local_server1", 102.5, ("geomx_rounds_total", {}, 90))
    assert rate(Seen(after, before, True), "geomx_rounds_total") == 20.0
    # No rate from one reading, nor from a node that did not answer the latest poll.
    assert rate(Seen(after, None, True), "geomx_rounds_total") is None
    assert rate(Seen(after, before, False), "geomx_rounds_total") is None
    # A counter that went down was reset by a restart: it counts from 0.
    restarted = reading("local_server1", 104.5, ("geomx_rounds_total", {}, 8))
    assert rate(Seen(restarted, after, True), "geomx_rounds_total") == 4.0


@pytest.mark.unit
def test_each_partys_wan_link_to_each_global_server_both_ways():
    seen = {
        "party0/server": Seen(
            reading("local_server1", 12.0, *wan("local_server1->server0", 5000, 7000),
                    *wan("local_server1->server1", 300, 400), *LAN),
            reading("local_server1", 10.0, *wan("local_server1->server0", 1000, 1000),
                    *wan("local_server1->server1", 100, 100), *LAN), True),
        # Party 1 did not answer the latest poll: its bytes are those last seen, its rates unknown.
        "party1/server": Seen(reading("local_server0", 11.0, *wan("local_server0->server0", 800, 900)),
                              reading("local_server0", 10.0, *wan("local_server0->server0", 0, 0)), False),
    }
    f = summarize(NODES, PARTIES, 2, seen)
    links = {k["id"]: k for k in f["links"]}
    assert list(links) == ["party0->gs0", "party0->gs1", "party1->gs0", "party1->gs1"]
    p0g0, p0g1, p1g0, p1g1 = (links[i] for i in links)
    assert (p0g0["up_bytes"], p0g0["down_bytes"], p0g0["up_bps"], p0g0["down_bps"]) == (5000, 7000, 2000, 3000)
    assert (p0g1["up_bytes"], p0g1["down_bytes"], p0g1["up_bps"], p0g1["down_bps"]) == (300, 400, 100, 150)
    assert (p1g0["up_bytes"], p1g0["down_bytes"], p1g0["up_bps"], p1g0["down_bps"]) == (800, 900, None, None)
    # A link nobody has counted yet is drawn all the same (the topology's shape), without figures.
    assert (p1g1["up_bytes"], p1g1["down_bytes"], p1g1["up_bps"]) == (None, None, None)
    # The WAN in all: both ways, every party; LAN bytes are not in it.
    assert f["wan"] == {"up_bytes": 6100, "down_bytes": 8300, "total": 14400, "up_bps": 2100, "down_bps": 3150}


@pytest.mark.unit
def test_rounds_and_the_party_the_rounds_waited_for():
    def gs(t, rounds, keys, waited, waits, seconds):
        return reading("global_server", t, ("geomx_rounds_total", {}, rounds), ("geomx_keys", {}, keys),
                       ("geomx_round_seconds_total", {}, seconds),
                       *[("geomx_round_waited_for_total", {"peer": p}, n) for p, n in waited.items()],
                       *[("geomx_round_wait_seconds_total", {"peer": p}, s) for p, s in waits.items()])

    # The global servers name the parties' local servers by their rank in the global tier (local_server1
    # is party 0's, as its own reading says) or by party; either is mapped onto the party.
    seen = {
        "party0/server": Seen(reading("local_server1", 5.0), None, True),
        "global_server0": Seen(gs(20.0, 300, 6, {"local_server1": 200, "local_server0": 100},
                                  {"local_server1": 4.0, "local_server0": 1.0}, 30.0),
                               gs(19.0, 240, 6, {"local_server1": 150, "local_server0": 90},
                                  {"local_server1": 3.0, "local_server0": 0.9}, 24.0), True),
        "global_server1": Seen(gs(20.5, 100, 4, {"party1": 60, "party0": 40}, {"party1": 2.0, "party0": 0.0}, 10.0),
                               gs(20.0, 80, 4, {"party1": 45, "party0": 35}, {"party1": 1.5, "party0": 0.0}, 8.0),
                               True),
    }
    f = summarize(NODES, PARTIES, 2, seen)
    r = f["rounds"]
    assert (r["total"], r["per_second"], r["keys"], r["per_key"], r["mean_seconds"]) == (400, 100.0, 10, 40.0, 0.1)
    assert [(s["name"], s["rounds"], s["per_second"]) for s in r["servers"]] == [
        ("global_server0", 300, 60.0), ("global_server1", 100, 40.0)]
    w = f["waits"]["parties"]
    # party0: 200 (as local_server1) + 40; party1: 100 (as local_server0, unknown to the page: shown as is) ...
    assert w["party0"]["rounds"] == 240 and w["party0"]["recent"] == 50 + 5
    assert w["party1"]["rounds"] == 60 and w["party1"]["recent"] == 15
    assert w["local_server0"]["rounds"] == 100 and w["local_server0"]["recent"] == 10
    assert w["party0"]["share"] == 0.6 and w["party1"]["share"] == 0.15
    assert w["party0"]["mean_wait_seconds"] == 4.0 / 240 and w["party1"]["mean_wait_seconds"] == 2.0 / 60
    assert f["waits"]["slowest"] == "party0" and f["waits"]["slowest_recent"] == "party0"

    # ... until its own reading says local_server0 is party 1's local server.
    seen["party1/server"] = Seen(reading("local_server0", 5.0), None, True)
    w = summarize(NODES, PARTIES, 2, seen)["waits"]["parties"]
    assert set(w) == {"party0", "party1"} and w["party1"]["rounds"] == 160 and w["party1"]["recent"] == 25


@pytest.mark.unit
def test_servers_that_do_not_count_waits_show_none_and_an_empty_run_has_no_figures():
    empty = summarize(NODES, PARTIES, 1, {})
    assert empty["waits"] is None and empty["rounds"]["total"] is None and empty["wan"]["total"] is None
    assert [k["id"] for k in empty["links"]] == ["party0->gs0", "party1->gs0"]
    seen = {"global_server0": Seen(reading("global_server0", 1.0, ("geomx_rounds_total", {}, 7)))}
    f = summarize(NODES, PARTIES, 1, seen)
    assert f["waits"] is None and f["rounds"]["total"] == 7 and f["rounds"]["per_second"] is None


@pytest.mark.unit
def test_training_gauges_and_refusals():
    seen = {
        "party0/worker0": Seen(reading("worker0", 3.0, ("geomx_training_loss", {}, 0.25),
                                       ("geomx_training_accuracy", {}, 0.875), ("geomx_training_steps", {}, 30),
                                       ("geomx_training_steps_planned", {}, 120))),
        "global_server0": Seen(reading("global_server0", 3.0, (
            "geomx_refused_messages_total", {"link": "global-clients", "peer": "10.0.0.9", "reason": "malformed"}, 3))),
    }
    f = summarize(NODES, PARTIES, 1, seen)
    assert f["training"] == {"party0/worker0": {"loss": 0.25, "accuracy": 0.875, "steps": 30, "planned": 120},
                             "party1/worker0": {"loss": None, "accuracy": None, "steps": None, "planned": None}}
    assert f["done"] == 0.25  # party1's worker did not say its length: not counted
    seen["party1/worker0"] = Seen(reading("worker0", 3.0, ("geomx_training_steps", {}, 5),
                                          ("geomx_training_steps_planned", {}, 100)))
    assert summarize(NODES, PARTIES, 1, seen)["done"] == 0.05  # the worker furthest behind
    assert summarize(NODES, PARTIES, 1, {})["done"] is None
    assert f["refusals"] == [{"node": "global_server0", "link": "global-clients", "peer": "10.0.0.9",
                              "reason": "malformed", "count": 3}]
    assert f["refusals_total"] == 3


@pytest.mark.unit
def test_a_series_keeps_the_whole_run_at_a_bounded_size():
    s = Series(8)
    for t in range(100):
        s.add(t, t * 2.0)
    s.add(100, None)  # no figure: no point
    assert 4 <= len(s.points) <= 8
    assert s.points[0] == [0, 0.0] and s.points[-1][0] >= 90
    assert all(a[0] < b[0] for a, b in zip(s.points, s.points[1:]))


@pytest.mark.unit
def test_the_nodes_of_the_launchers_process_list():
    topo = Topology(parties=2, workers_per_party=1, global_servers=2,
                    node_env={"global_server1": {"GEOMX_METRICS_PORT": "9101"},
                              "party1/server": {"GEOMX_METRICS_PORT": "9102", "GEOMX_BIND_HOST": "10.1.2.3"},
                              "party0/worker0": {"GEOMX_METRICS_PORT": "9103", "GEOMX_BIND_HOST": "*"}})
    specs = topo.processes(["python", "train.py"], Ports(1, 2, [3, 4]))
    nodes = {n.name: n for n in nodes_of(specs)}
    assert {n: (v.role, v.site) for n, v in nodes.items()} == {
        "global_scheduler": ("global_scheduler", "central"), "central/scheduler": ("scheduler", "central"),
        "global_server0": ("global_server", "central"), "global_server1": ("global_server", "central"),
        "central/master_worker": ("master_worker", "central"),
        "party0/scheduler": ("scheduler", "party0"), "party0/server": ("local_server", "party0"),
        "party0/worker0": ("worker", "party0"),
        "party1/scheduler": ("scheduler", "party1"), "party1/server": ("local_server", "party1"),
        "party1/worker0": ("worker", "party1")}
    assert nodes["global_server1"].url == "http://127.0.0.1:9101/metrics.json"
    assert nodes["party1/server"].url == "http://10.1.2.3:9102/metrics.json"
    assert nodes["party0/worker0"].url == "http://127.0.0.1:9103/metrics.json"  # a wildcard: its advertised host
    assert nodes["global_server0"].url == ""  # no metrics port: shown, not polled
    # The page of a process list: its shape read from it (no metrics ports here: nothing is polled).
    specs = Topology(parties=3, global_servers=2).processes(["python", "train.py"], Ports(1, 2, [3, 4, 5]))
    page = StatusPage.of_processes(specs, interval=60)
    try:
        assert (page.parties, page.global_servers, len(page.nodes)) == (["party0", "party1", "party2"], 2, 17)
    finally:
        page.close()


# -- the poller and the page's server, against listeners in this process ------------------------------

class FakeNode:
    """A node's /metrics.json served from this process; ``reading`` is what it answers (None: HTTP 500)."""

    def __init__(self, reading):
        self.reading = reading
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                if owner.reading is None:
                    self.send_error(500)
                    return
                body = json.dumps(owner.reading).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/metrics.json"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def get(url):
    with urllib.request.urlopen(url, timeout=5) as reply:
        return reply.headers.get("Content-Type"), reply.read().decode()


def wait_for(predicate, timeout=10.0, what="a condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.unit
def test_the_page_polls_its_nodes_marks_the_silent_ones_and_outlives_the_run():
    gs = FakeNode(reading("global_server0", 1.0, ("geomx_rounds_total", {}, 10), ("geomx_keys", {}, 2)))
    ls = FakeNode(reading("local_server0", 1.0, *wan("local_server0->server0", 100, 200)))
    nodes = [Node("global_server0", "global_server", "central", gs.url),
             Node("party0/server", "local_server", "party0", ls.url),
             Node("party1/server", "local_server", "party1", f"http://127.0.0.1:{dead_port()}/metrics.json"),
             Node("party1/worker0", "worker", "party1")]
    page = StatusPage(nodes, ["party0", "party1"], 1, interval=0.05, timeout=0.5, title="a <test> run")
    try:
        def status():
            return json.loads(get(page.url + "status.json")[1])

        s = wait_for(lambda: (s := status())["last_poll"] and s, what="a first poll")
        assert s["run"]["state"] == "running"
        states = {n["name"]: n["state"] for n in s["nodes"]}
        assert states == {"global_server0": "up", "party0/server": "up", "party1/server": "waiting",
                          "party1/worker0": "not polled"}
        assert s["wan"]["total"] == 300 and s["rounds"]["total"] == 10

        # The counters move on: rates by the nodes' clocks.
        gs.reading = reading("global_server0", 3.0, ("geomx_rounds_total", {}, 30), ("geomx_keys", {}, 2))
        s = wait_for(lambda: (s := status())["rounds"]["per_second"] == 10.0 and s, what="the rate")
        assert [p[1] for p in s["history"]["rounds_per_second"]][-1] == 10.0

        # A node whose loop is busy answers its last reading again, marked stale: shown so, and no rate from
        # it; the next true reading's rate is from the last true one.
        gs.reading = reading("global_server0", 4.0, ("geomx_rounds_total", {}, 30), ("geomx_keys", {}, 2),
                             ("geomx_metrics_stale", {}, 1))
        s = wait_for(lambda: (s := status())["nodes"][0]["state"] == "stale" and s, what="stale")
        assert s["rounds"]["per_second"] is None and s["rounds"]["total"] == 30
        gs.reading = reading("global_server0", 5.0, ("geomx_rounds_total", {}, 50), ("geomx_keys", {}, 2))
        wait_for(lambda: status()["rounds"]["per_second"] == 10.0 and status()["nodes"][0]["state"] == "up",
                 what="the rate after a stale reading")

        # A refusal counted by a node is an event as it happens; a node that stops answering is unreachable,
        # with when it was last seen.
        ls.reading = reading("local_server0", 2.0, *wan("local_server0->server0", 100, 200), (
            "geomx_refused_messages_total", {"link": "party-clients", "peer": "worker7", "reason": "unauthorised"}, 2))
        wait_for(lambda: status()["refusals_total"] == 2, what="the refusal")
        ls.reading = None
        s = wait_for(lambda: (s := status())["nodes"][1]["state"] == "unreachable" and s, what="unreachable")
        silent = s["nodes"][1]
        assert silent["last_seen"] <= s["time"] and "500" in silent["error"]
        assert s["wan"]["total"] == 300  # its last figures stay
        texts = [e["text"] for e in s["events"]]
        assert "party0/server refused 2 message(s) from worker7 on party-clients: unauthorised" in texts
        assert any(t.startswith("party0/server does not answer") for t in texts)

        # What the launcher tells it.
        page.process_exited("party1/server", 137, "killed (SIGKILL)")
        page.run_ended(1, "party1/server exited with code 137")
        gs.close()
        ls.close()
        time.sleep(0.2)
        s = status()
        assert s["run"]["state"] == "ended" and s["run"]["status"] == 1 and s["run"]["ok"] is False
        assert s["run"]["message"] == "party1/server exited with code 137"
        exited = s["nodes"][2]
        assert exited["state"] == "exited" and exited["exit"]["code"] == 137
        assert s["events"][0]["text"] == "the run ended with status 1: party1/server exited with code 137"
        # Polling stopped: the last figures are served on, without rates (nothing flows); the processes the
        # launcher did not report stopped with the run.
        assert s["rounds"]["total"] == 50 and s["wan"]["total"] == 300
        assert s["rounds"]["per_second"] is None and s["wan"]["up_bps"] is None
        assert [n["state"] for n in s["nodes"]] == ["stopped", "stopped", "exited", "not polled"]

        # The page itself: served after the run, its present status in it, text from the run escaped.
        ctype, html = get(page.url)
        assert ctype.startswith("text/html")
        assert "<title>a &lt;test&gt; run</title>" in html and "<test>" not in html
        for element in ("topology", "wan-bytes-total", "rounds-total", "rounds-per-second", "slowest-party",
                        "events", "run-state", "chart-loss", "chart-accuracy"):
            assert f'id="{element}"' in html
        initial = re.search(r'<script id="initial" type="application/json">(.*?)</script>', html, re.S).group(1)
        assert json.loads(initial)["run"]["status"] == 1
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html), "it loads nothing from elsewhere"
        with pytest.raises(urllib.error.HTTPError):
            get(page.url + "metrics")
    finally:
        page.close()
        gs.close()
        ls.close()


# -- a real run, looked at by headless Chromium ------------------------------------------------------

def chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class DomIds(HTMLParser):
    """Every element's attributes, by id and by data-site / data-link."""

    def __init__(self, html):
        super().__init__()
        self.ids, self.sites, self.links, self.text = {}, {}, {}, {}
        self._open = None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids[attrs["id"]] = attrs
            self._open = attrs["id"]
        if "data-site" in attrs:
            self.sites[attrs["data-site"]] = attrs
        if tag == "g" and "data-link" in attrs:
            self.links[attrs["data-link"]] = attrs

    def handle_data(self, data):
        if self._open is not None:
            self.text[self._open] = self.text.get(self._open, "") + data

    def handle_endtag(self, tag):
        self._open = None


def browse(url, *args, budget_ms=2500, timeout=90):
    """Headless Chromium on ``url``: ``--dump-dom`` (the page after ``budget_ms`` of its own time) or a
    screenshot (``args``). Its stdout."""
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           "--disable-extensions", f"--virtual-time-budget={budget_ms}", *args, url]
    out = subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)
    assert out.returncode == 0, f"chromium failed ({out.returncode}): {out.stderr.decode()[-2000:]}"
    return out.stdout.decode()


def node_truth(nodes):
    """The WAN bytes (local servers) and rounds (global servers) as the nodes themselves count them now."""
    wan_bytes = rounds = 0.0
    for n in nodes:
        if n.role not in ("local_server", "global_server"):
            continue
        with urllib.request.urlopen(n.url, timeout=5) as reply:
            r = json.load(reply)
        if n.role == "local_server":
            wan_bytes += (metrics.value(r, "geomx_link_sent_bytes_total", scope="wan")
                          + metrics.value(r, "geomx_link_received_bytes_total", scope="wan"))
        else:
            rounds += metrics.value(r, "geomx_rounds_total")
    return wan_bytes, rounds


@pytest.mark.system
@pytest.mark.skipif(chromium() is None, reason="no headless browser: install Debian's chromium (.ci/run does)")
@pytest.mark.skipif(importlib.util.find_spec("mxnet") is None, reason="examples/cnn.py trains with MXNet")
def test_the_page_in_a_browser_while_a_two_party_run_trains_and_after_it_ends(tmp_path):
    topo = Topology(parties=2, workers_per_party=1)
    names = [spec.name for spec in topo.processes(["train"], Ports(1, 2, [3, 4]))]
    first = free_port_range(len(names))
    node_env = {name: {"GEOMX_METRICS_PORT": str(first + i)} for i, name in enumerate(names)}
    nodes = nodes_of(Topology(parties=2, workers_per_party=1, node_env=node_env).processes(
        ["train"], Ports(1, 2, [3, 4])))
    assert all(n.url for n in nodes)

    # The launcher, as a user starts it, with one metrics port per process.
    cmd = [sys.executable, "-m", "geomx.launch", "--parties", "2", "--workers", "1"]
    for name, env in node_env.items():
        cmd += ["--node-env", f"{name}:GEOMX_METRICS_PORT={env['GEOMX_METRICS_PORT']}"]
    cmd += ["--", sys.executable, str(EXAMPLES / "cnn.py"), "--cpu", "--data-slice-idx", "{slice}",
            "--epoch", "20", "--eval-every", "10"]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    page = StatusPage(nodes, ["party0", "party1"], 1, title="geomx: 2 parties x 1 worker")
    launcher = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
    output = []

    def relay():  # what the launcher's integration will do: each exit it reports goes to the page
        for raw in launcher.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            output.append(line)
            m = re.match(r"\[launch\] (\S+) exited with code (-?\d+)", line)
            if m:
                page.process_exited(m.group(1), int(m.group(2)))

    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    try:
        def status():
            return json.loads(get(page.url + "status.json")[1])

        wait_for(lambda: status()["rounds"]["per_second"] or launcher.poll() is not None, timeout=120,
                 what="training")
        assert launcher.poll() is None, "the run ended before it trained:\n" + "\n".join(output[-40:])

        # What the nodes count, then the page's status from a poll that began later (its last_poll); the DOM;
        # the page's status again, then the nodes: each figure can only have grown along that chain.
        truth_before = node_truth(nodes)
        after = time.time()
        before = wait_for(lambda: (s := status())["last_poll"] > after and s, what="a later poll")
        dom = DomIds(browse(page.url, "--dump-dom"))
        later = status()
        truth_after = node_truth(nodes)
        assert launcher.poll() is None and later["run"]["state"] == "running", \
            "the run ended while the browser looked: make it longer"

        assert {"global", "party0", "party1"} <= set(dom.sites)
        assert set(dom.links) == {"party0->gs0", "party1->gs0"}
        assert dom.ids["run-state"]["data-state"] == "running"
        shown_at = float(dom.ids["status-time"]["data-value"])
        assert before["time"] <= shown_at <= later["time"]
        shown_wan = float(dom.ids["wan-bytes-total"]["data-value"])
        shown_rounds = float(dom.ids["rounds-total"]["data-value"])
        assert truth_before[0] <= before["wan"]["total"] <= shown_wan <= later["wan"]["total"] <= truth_after[0]
        assert truth_before[1] <= before["rounds"]["total"] <= shown_rounds <= later["rounds"]["total"] \
            <= truth_after[1]
        assert shown_wan > 0 and shown_rounds > 0
        for link_id, attrs in dom.links.items():
            b, lt = (next(k for k in s["links"] if k["id"] == link_id) for s in (before, later))
            assert b["up_bytes"] <= float(attrs["data-up-bytes"]) <= lt["up_bytes"]
            assert b["down_bytes"] <= float(attrs["data-down-bytes"]) <= lt["down_bytes"]
        per_second = dom.ids["rounds-per-second"]["data-value"]
        assert per_second == "" or float(per_second) > 0  # "": the global server's loop was busy (stale)
        assert dom.ids["node-party0/server"]["data-state"] in ("up", "stale")

        shot = tmp_path / "status-page.png"
        browse(page.url, f"--screenshot={shot}", "--window-size=1280,900")
        data = shot.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000

        # The run ends: the launcher's status goes to the page, which still loads and says so.
        rc = launcher.wait(timeout=300)
        reader.join(timeout=10)
        assert rc == 0, "\n".join(output[-40:])
        page.run_ended(rc, "all processes exited with code 0")
        final = status()
        dom = DomIds(browse(page.url, "--dump-dom"))
        assert dom.ids["run-state"]["data-state"] == "ended"
        assert "status 0" in dom.text["run-end"] and "all processes exited with code 0" in dom.text["run-end"]
        assert float(dom.ids["wan-bytes-total"]["data-value"]) == final["wan"]["total"] >= later["wan"]["total"]
        assert dom.ids["node-party0/worker0"]["data-state"] == "exited"
        assert {n["name"] for n in final["nodes"] if n["state"] == "exited"} == set(names)
    finally:
        kill_group(launcher)
        page.close()
