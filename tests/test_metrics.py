"""The metrics of a node (geomx/metrics.py): the catalogue against its documentation, the exposition
format against exact expected text, and the listener over a real socket and a real event loop, fresh
while the loop runs and marked stale when it does not answer."""
from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
import urllib.request

import pytest

from geomx import config, metrics
from geomx.errors import ConfigError
from geomx.launch.topology import free_port_range
from geomx.transport import EventLoop

pytestmark = pytest.mark.unit

DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "Observability.md")


def test_every_metric_is_documented_with_its_kind_unit_and_labels():
    rows = {}
    for line in open(DOC):
        m = re.match(r"\| `(geomx_\w+)` \| (\w+) \| ([^|]+) \| ([^|]+) \|", line)
        if m:
            labels = tuple(x.strip() for x in m.group(4).split(",")) if m.group(4).strip() != "–" else ()
            rows[m.group(1)] = (m.group(2), m.group(3).strip().replace("–", ""), labels)
    assert rows == {name: (f.kind, f.unit, f.labels) for name, f in metrics.CATALOGUE.items()}


def test_counters_end_in_total_and_units_are_in_the_name():
    for name, f in metrics.CATALOGUE.items():
        assert name.endswith("_total") == (f.kind == "counter"), name
        if f.unit:
            assert f"_{f.unit}" in name, name


def test_text_format_exact():
    m = metrics.Metrics("local_server", "local_server1", "party1")
    m.inc("geomx_refused_messages_total", link="party-clients", peer='w"1\\', reason="malformed")
    m.inc("geomx_refused_messages_total", 2, link="party-clients", peer='w"1\\', reason="malformed")
    m.set("geomx_training_loss", 0.25)
    m.add_collector(lambda: [metrics.sample("geomx_keys", 7)])
    samples = [s for s in m.collect() if not s.name.startswith("geomx_process_")]
    text = metrics.render_text(samples)
    f = metrics.CATALOGUE
    assert text == (
        f"# HELP geomx_keys {f['geomx_keys'].help}\n# TYPE geomx_keys gauge\ngeomx_keys 7\n"
        f"# HELP geomx_node_info {f['geomx_node_info'].help}\n# TYPE geomx_node_info gauge\n"
        'geomx_node_info{role="local_server",node="local_server1",party="party1"} 1\n'
        f"# HELP geomx_refused_messages_total {f['geomx_refused_messages_total'].help}\n"
        "# TYPE geomx_refused_messages_total counter\n"
        'geomx_refused_messages_total{link="party-clients",peer="w\\"1\\\\",reason="malformed"} 3\n'
        f"# HELP geomx_training_loss {f['geomx_training_loss'].help}\n# TYPE geomx_training_loss gauge\n"
        "geomx_training_loss 0.25\n")


def test_unknown_names_and_wrong_labels_are_refused_where_they_are_counted():
    m = metrics.Metrics("worker", "worker0")
    with pytest.raises(KeyError):
        m.inc("geomx_no_such_metric")
    with pytest.raises(ValueError, match="takes the labels"):
        m.inc("geomx_refused_messages_total", link="x")


def test_a_broken_collector_does_not_hide_the_others():
    m = metrics.Metrics("worker", "worker0")
    m.add_collector(lambda: [1 / 0])
    m.add_collector(lambda: [metrics.sample("geomx_pending_requests", 3)])
    assert metrics.sample("geomx_pending_requests", 3) in m.collect()


def _get(port: int, path: str = "/metrics.json"):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return r.headers.get("Content-Type"), r.read()


def test_listener_reads_in_the_loop_thread_and_marks_a_stuck_loop_stale(zmq_ctx):
    loop = EventLoop(zmq_ctx, name="worker")
    loop.metrics.identify(role="worker", node="worker3", party="party1")
    rounds = {"n": 0}
    readers = []

    def collector():
        readers.append(threading.current_thread())
        return [metrics.sample("geomx_rounds_total", rounds["n"])]

    loop.metrics.add_collector(collector)
    server = metrics.MetricsServer(loop.metrics, loop, "127.0.0.1", 0, wait=0.5)
    stop = threading.Event()
    thread = threading.Thread(target=lambda: loop.run_until(stop.is_set, timeout=60))
    try:
        thread.start()
        rounds["n"] = 5
        ctype, body = _get(server.port)
        assert ctype == "application/json"
        reading = json.loads(body)
        assert reading["node"] == {"role": "worker", "node": "worker3", "party": "party1"}
        assert metrics.value(reading, "geomx_rounds_total") == 5
        assert metrics.value(reading, "geomx_metrics_stale") == 0
        assert readers and all(t is thread for t in readers)
        ctype, body = _get(server.port, "/metrics")
        assert ctype.startswith("text/plain; version=0.0.4")
        assert "geomx_rounds_total 5\n" in body.decode()
        stop.set()
        thread.join()
        rounds["n"] = 9  # the loop is gone: the last reading comes back, marked stale
        reading = json.loads(_get(server.port)[1])
        assert metrics.value(reading, "geomx_rounds_total") == 5
        assert metrics.value(reading, "geomx_metrics_stale") == 1
        with pytest.raises(urllib.error.HTTPError, match="404"):
            _get(server.port, "/other")
    finally:
        stop.set()
        server.close()
        loop.close()


def test_a_taken_port_names_the_variable(zmq_ctx):
    loop = EventLoop(zmq_ctx, name="worker")
    taken = socket.socket()
    try:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ConfigError, match="GEOMX_METRICS_PORT"):
            metrics.serve(taken.getsockname()[1], "127.0.0.1", loop)
        assert metrics.serve(0, "127.0.0.1", loop) is None
    finally:
        taken.close()
        loop.close()


def test_a_listener_serves_a_bounded_number_of_connections_and_closes_silent_ones(caplog):
    """Connections held open without a request take a thread each: at most ``limit`` are served at once,
    one more is closed at once (and logged), and each silent one is closed after ``idle_timeout``,
    after which requests are answered again."""
    listener = metrics.HTTPListener("127.0.0.1", 0, lambda path: (b"ok", "text/plain") if path == "/" else None,
                                    "only /", "test-listener", limit=2, idle_timeout=3.0)
    silent = [socket.create_connection(("127.0.0.1", listener.port), timeout=20) for _ in range(2)]
    try:
        for s in silent:  # the start of a request line, never ended
            s.sendall(b"G")
        deadline = time.monotonic() + 20
        while listener.httpd.active != 2:  # both connections accepted and taken by their threads
            assert time.monotonic() < deadline, "the two connections were not taken"
            time.sleep(0.01)
        with caplog.at_level("WARNING", logger="geomx.security"):
            one_more = socket.create_connection(("127.0.0.1", listener.port), timeout=20)
            assert one_more.recv(100) == b""  # closed without an answer
            one_more.close()
        assert any("test-listener: REFUSED a connection from 127.0.0.1: already serving 2" in r.getMessage()
                   for r in caplog.records)
        for s in silent:  # closed by the listener once silent for idle_timeout (the recv would wait 20 s)
            assert s.recv(100) == b""
        assert _get(listener.port, "/") == ("text/plain", b"ok")
        with pytest.raises(urllib.error.HTTPError, match="404"):
            _get(listener.port, "/other")
    finally:
        for s in silent:
            s.close()
        listener.close()


def test_a_connection_that_sends_its_request_a_byte_at_a_time_is_cut_at_its_deadline():
    listener = metrics.HTTPListener("127.0.0.1", 0, lambda path: (b"ok", "text/plain"), "only /", "test-listener",
                                    idle_timeout=5.0, deadline=1.0)
    drip = socket.create_connection(("127.0.0.1", listener.port), timeout=0.2)
    try:
        start = time.monotonic()
        closed = False
        while not closed:  # never silent for idle_timeout: only the deadline can end it
            assert time.monotonic() - start < 20, "the dripping connection was never cut"
            try:
                drip.sendall(b"G")
                closed = drip.recv(100) == b""
            except socket.timeout:
                pass
            except OSError:  # reset by the cut
                closed = True
        assert time.monotonic() - start >= 1.0
        assert _get(listener.port, "/") == ("text/plain", b"ok")
    finally:
        drip.close()
        listener.close()


def test_a_metrics_listener_closes_with_its_loop(zmq_ctx):
    loop = EventLoop(zmq_ctx, name="worker")
    port = free_port_range(1)
    try:
        assert metrics.serve(port, "127.0.0.1", loop).port == port
        assert metrics.value(json.loads(_get(port)[1]), "geomx_metrics_stale") == 1  # the loop does not run
    finally:
        loop.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_metrics_port_is_read_and_checked_against_the_other_listeners():
    env = {"DMLC_ROLE": "server", "DMLC_PS_ROOT_URI": "127.0.0.1", "DMLC_PS_ROOT_PORT": "9000",
           "DMLC_NUM_SERVER": "1", "DMLC_NUM_WORKER": "1", "DMLC_PS_GLOBAL_ROOT_URI": "127.0.0.1",
           "DMLC_PS_GLOBAL_ROOT_PORT": "9001", "DMLC_NUM_GLOBAL_SERVER": "1", "DMLC_NUM_GLOBAL_WORKER": "1",
           "GEOMX_METRICS_PORT": "9100"}
    assert config.load(env).metrics_port == 9100
    with pytest.raises(ConfigError, match="GEOMX_METRICS_PORT and GEOMX_SERVER_PORT are both 9100"):
        config.load(dict(env, GEOMX_SERVER_PORT="9100"))
    with pytest.raises(ConfigError, match="GEOMX_METRICS_PORT"):
        config.load(dict(env, GEOMX_METRICS_PORT="http"))


def test_peers_named_by_the_network_cannot_grow_a_counter_without_bound():
    m = metrics.Metrics("global_server", "global_server0")
    for i in range(metrics.MAX_SERIES + 50):
        m.inc("geomx_refused_messages_total", link="global-clients", peer=f"stranger{i}", reason="unregistered")
    refused = [s for s in m.collect() if s.name == "geomx_refused_messages_total"]
    assert len(refused) == metrics.MAX_SERIES + 1
    assert sum(s.value for s in refused) == metrics.MAX_SERIES + 50
    other = [s for s in refused if dict(s.labels)["peer"] == "other"]
    assert len(other) == 1 and other[0].value == 50


def test_peer_names_drop_the_secret_token():
    assert metrics.peer_name(("global-clients", b"local_server1#0123456789abcdef0123456789abcdef>x")) == \
        "local_server1"
    assert metrics.peer_name(None) == "?"


def test_durations_keep_count_and_sum_of_all_and_quantiles_of_the_latest_window():
    d = metrics.Durations(window=10)
    assert d.quantiles() is None
    for i in range(1, 101):
        d.add(float(i))
    assert (d.count, d.total, len(d.recent)) == (100, 5050.0, 10)
    assert d.quantiles() == (95.5, 99.9)  # over 91..100 (statistics.quantiles, exclusive method)
