"""Tests of the emulated WAN (geomx.testing.wan) and of the benchmark suite's pure parts.

Everything but ``test_two_party_wan_rate_and_teardown`` runs without root. That test builds a real
two-party WAN (network namespaces, veth, bridge, tbf), pushes a bounded TCP transfer through a capped
link and checks the delivered rate and that teardown leaves no namespace.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from geomx.testing import wan
from geomx.testing.wan import LinkCounters, WanError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))


# ---- specification ------------------------------------------------------------------------------

@pytest.mark.unit
def test_parse_rate_units():
    assert wan.parse_rate("20mbit") == 20e6
    assert wan.parse_rate("1gbit") == 1e9
    assert wan.parse_rate("500kbit") == 500e3
    assert wan.parse_rate("2.5mbps") == 20e6  # bytes per second
    assert wan.parse_rate("1e6") == 1e6  # bare number: bits per second
    assert wan.parse_rate("none") is None and wan.parse_rate("inf") is None
    for bad in ("fast", "20 parsecs", "", "1bit"):
        with pytest.raises(WanError):
            wan.parse_rate(bad)


@pytest.mark.unit
def test_format_rate_round_trip():
    for text in ("20mbit", "1gbit", "500kbit", "2.5mbit"):
        assert wan.format_rate(wan.parse_rate(text)) == text
    assert wan.format_rate(None) == "uncapped"


@pytest.mark.unit
def test_parse_spec_default_applies_to_parties_only():
    spec = wan.parse_spec("20mbit", parties=2)
    assert spec.rates == {"central": None, "party0": 20e6, "party1": 20e6}
    assert spec.delay_ms == 0


@pytest.mark.unit
def test_parse_spec_delay():
    spec = wan.parse_spec("20mbit,delay=25ms", parties=2)
    assert spec.delay_ms == 25 and spec.rates["party1"] == 20e6
    assert "delay=25ms" in spec.describe()
    assert wan.parse_spec("delay=10", parties=1).rates == {"central": None, "party0": None}


@pytest.mark.unit
def test_parse_spec_heterogeneous_and_overrides():
    spec = wan.parse_spec("party0=100mbit,party1=10mbit,central=1gbit", parties=2)
    assert spec.rates == {"central": 1e9, "party0": 100e6, "party1": 10e6}
    spec = wan.parse_spec("20mbit, party1=5mbit", parties=3)
    assert spec.rates == {"central": None, "party0": 20e6, "party1": 5e6, "party2": 20e6}
    spec = wan.parse_spec("all=50mbit,party0=none", parties=2)
    assert spec.rates == {"central": 50e6, "party0": None, "party1": 50e6}
    assert "party1=50mbit" in spec.describe()


@pytest.mark.unit
@pytest.mark.parametrize("text, message", [
    ("party2=10mbit", "only 2 parties"),
    ("moon=10mbit", "unknown link"),
    ("20mbit,30mbit", "two default rates"),
    ("", "empty"),
    ("delay=abc", "invalid delay"),
])
def test_parse_spec_errors(text, message):
    with pytest.raises(WanError, match=message):
        wan.parse_spec(text, parties=2)


# ---- counters, bounds, report -------------------------------------------------------------------

SAMPLE_IP_JSON = json.dumps([
    {"ifindex": 1, "ifname": "lo", "stats64": {"rx": {"bytes": 5, "packets": 1}, "tx": {"bytes": 5, "packets": 1}}},
    {"ifindex": 2, "ifname": "br0", "stats64": {"rx": {"bytes": 99, "packets": 3}, "tx": {"bytes": 0, "packets": 0}}},
    {"ifindex": 3, "ifname": "dc0", "master": "br0", "link_netnsid": 1,
     "stats64": {"rx": {"bytes": 1000, "packets": 10, "errors": 0, "dropped": 0},
                 "tx": {"bytes": 3000, "packets": 30, "errors": 0, "dropped": 0}}},
    {"ifindex": 4, "ifname": "dc1", "master": "br0",
     "stats64": {"rx": {"bytes": 2_500_000, "packets": 2000}, "tx": {"bytes": 2_500_000, "packets": 1900}}},
])


@pytest.mark.unit
def test_parse_link_counters_router_view():
    c = wan.parse_link_counters(SAMPLE_IP_JSON, {"dc0": "central", "dc1": "party0"})
    # router rx = the DC's upload, router tx = its download
    assert c["central"] == LinkCounters(up=1000, down=3000, up_packets=10, down_packets=30)
    assert c["party0"].total == 5_000_000
    with pytest.raises(WanError, match="no interface dc7"):
        wan.parse_link_counters(SAMPLE_IP_JSON, {"dc7": "party1"})
    with pytest.raises(WanError, match="cannot parse"):
        wan.parse_link_counters("not json", {})


@pytest.mark.unit
def test_parse_link_counters_old_stats_key():
    text = json.dumps([{"ifname": "dc0", "stats": {"rx": {"bytes": 7}, "tx": {"bytes": 8}}}])
    assert wan.parse_link_counters(text, {"dc0": "central"})["central"].total == 15


@pytest.mark.unit
def test_parse_proc_net_dev_and_busy_fractions():
    text = ("Inter-|   Receive                                                |  Transmit\n"
            " face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls "
            "carrier compressed\n"
            "   dc0:  1000  10 0 0 0 0 0 0  2000 20 0 0 0 0 0 0\n"
            "    lo: 5 1 0 0 0 0 0 0 5 1 0 0 0 0 0 0\n")
    assert wan.parse_proc_net_dev(text, ["dc0", "dc9"]) == {"dc0": (1000, 2000)}
    # 8 Mbit/s = 10_000 bytes per 10 ms: busy at a tenth of that or more.
    rates = {"party0": 8e6, "central": None}
    ups = [0, 10_000, 20_000, 24_000, 24_000, 34_000]
    downs = [0, 0, 5_000, 15_000, 25_000, 25_000]
    samples = [(i * 0.01, {"party0": (u, d), "central": (u, d)}) for i, (u, d) in enumerate(zip(ups, downs))]
    busy = wan.busy_fractions(samples, rates, 0.0, 0.05)
    assert busy == {"party0": {"up": pytest.approx(0.8), "down": pytest.approx(0.6)}}
    # Only the samples inside [start, end] count.
    assert wan.busy_fractions(samples, rates, 0.025, 0.05) == {"party0": {"up": 0.5, "down": 0.5}}
    assert wan.busy_fractions(samples[:1], rates, 0.0, 1.0) == {}
    # One character per interval: '#' half the rate or more, '+' a tenth or more, '.' less.
    assert wan.timeline(samples, 8e6, "party0", 0.0, 0.05) == ("##+.#", ".###.")


@pytest.mark.unit
def test_counter_delta():
    before = {"party0": LinkCounters(100, 200, 1, 2)}
    after = {"party0": LinkCounters(1100, 700, 11, 7), "party1": LinkCounters(5, 6)}
    d = wan.counter_delta(after, before)
    assert d["party0"] == LinkCounters(1000, 500, 10, 5)
    assert d["party1"] == LinkCounters(5, 6)


@pytest.mark.unit
def test_lower_bound_wan_and_compute():
    counters = {"central": LinkCounters(10_000_000, 10_000_000),
                "party0": LinkCounters(2_500_000, 2_500_000),
                "party1": LinkCounters(1_250_000, 1_250_000)}
    rates = {"central": None, "party0": 20e6, "party1": 20e6}
    b = wan.lower_bound(0.5, counters, rates)
    assert b["bottleneck"] == "party0"
    assert b["wan_s"] == pytest.approx(2.0)  # 5 MB * 8 / 20 Mbit/s
    assert b["bound_s"] == pytest.approx(2.0)
    duplex = wan.lower_bound(0.5, counters, rates, duplex=True)
    assert duplex["wan_s"] == pytest.approx(1.0)
    slow = wan.lower_bound(3.0, counters, rates)
    assert slow["bottleneck"] == "compute" and slow["bound_s"] == 3.0
    # heterogeneous links: the slower link can be the bottleneck with fewer bytes
    b = wan.lower_bound(0.0, counters, {"central": None, "party0": 100e6, "party1": 5e6})
    assert b["bottleneck"] == "party1" and b["wan_s"] == pytest.approx(4.0)
    assert wan.lower_bound(0.0, counters, {})["bottleneck"] is None


@pytest.mark.unit
def test_format_report():
    counters = {"central": LinkCounters(0, 0), "party0": LinkCounters(2_500_000, 1_000_000)}
    text = wan.format_report(counters, {"central": None, "party0": 20e6}, seconds=1.0)
    assert "| party0 | 20mbit | 2.50 MB | 1.00 MB | 3.50 MB | 20mbit / 8mbit |" in text
    assert "| central | uncapped |" in text
    assert text.splitlines()[-1].startswith("| all |")


@pytest.mark.unit
def test_require_root_message(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(WanError, match="needs root"):
        wan.require_root()
    with pytest.raises(WanError, match="needs root"):
        wan.Wan.create(["central", "party0"], wan.parse_spec("20mbit", 1))


# ---- launcher placement (no root needed: dry run) -----------------------------------------------

@pytest.mark.unit
def test_launch_placement_rewrites_hosts_and_argv():
    from geomx.launch import Topology

    hosts = {"central": "10.77.0.1", "party0": "10.77.0.2", "party1": "10.77.0.3"}
    topo = Topology(parties=2, workers_per_party=1, dc_hosts=hosts,
                    dc_prefix={dc: ["ip", "netns", "exec", f"ns-{dc}"] for dc in hosts})
    specs = {s.name: s for s in topo.processes(["python", "train.py"])}
    w = specs["party1/worker0"]
    assert w.argv[:4] == ["ip", "netns", "exec", "ns-party1"] and w.argv[4:] == ["python", "train.py"]
    assert w.env["DMLC_NODE_HOST"] == "10.77.0.3" and w.env["DMLC_PS_ROOT_URI"] == "10.77.0.3"
    srv = specs["party0/server"]
    assert srv.env["DMLC_PS_GLOBAL_ROOT_URI"] == "10.77.0.1" and srv.env["DMLC_NODE_HOST"] == "10.77.0.2"
    gs = specs["global_server0"]
    assert gs.argv[:4] == ["ip", "netns", "exec", "ns-central"] and gs.env["DMLC_NODE_HOST"] == "10.77.0.1"
    # default: unchanged
    plain = {s.name: s for s in Topology(parties=2, workers_per_party=1).processes(["python", "t.py"])}
    assert plain["party1/worker0"].argv == ["python", "t.py"]
    assert plain["party1/worker0"].env["DMLC_NODE_HOST"] == "127.0.0.1"


@pytest.mark.unit
def test_launch_wan_flag_without_root(monkeypatch, capsys):
    from geomx import launch

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert launch.main(["--wan", "20mbit", "-p", "2", "-w", "1", "--", "true"]) == 2
    assert "needs root" in capsys.readouterr().err
    assert launch.main(["--wan", "party5=1mbit", "-p", "2", "--", "true"]) == 2


# ---- benchmark suite: rows, summary, report -----------------------------------------------------

@pytest.mark.unit
def test_suite_rows_and_summary(tmp_path):
    import suite

    names = [r.name for r in suite.ROWS]
    assert names[0] == "native" and "geomx-fsa" in names
    assert all(r.system in ("native", "geomx", "ddp", "geomx-torch") for r in suite.ROWS)
    assert not any(r.default for r in suite.ROWS if r.system == "ddp")  # torch DDP rows: only when named
    rates = {"central": None, "party0": 20e6, "party1": 20e6}
    results = [{"worker": i, "iter_ms": [1000.0, 1100.0, 1050.0], "compute_ms": [100.0, 120.0, 110.0],
                "batch": 32} for i in range(4)]
    counters = {"central": LinkCounters(0, 0), "party0": LinkCounters(2_000_000, 2_000_000),
                "party1": LinkCounters(2_000_000, 2_000_000)}
    row = suite.summarise_throughput(results, counters, iters=3, rates=rates)
    assert row["median_s"] == pytest.approx(1.05)
    assert row["samples_per_s"] == pytest.approx(4 * 32 / 1.05)
    assert row["wan_bytes_per_iter"] == pytest.approx(4_000_000 / 3)  # bytes entering the WAN
    assert row["bound_s"] == pytest.approx(4_000_000 / 3 * 8 / 20e6)
    assert row["closeness"] == pytest.approx(row["median_s"] / row["bound_s"])
    evals = [{"t": 1.0, "it": 10, "acc": 0.5}, {"t": 2.0, "it": 20, "acc": 0.91}, {"t": 3.0, "it": 30, "acc": 0.95}]
    tta = suite.summarise_accuracy(evals, target=0.9)
    assert tta == {"time_to_target_s": 2.0, "iters_to_target": 20, "final_acc": 0.95, "evals": evals}
    assert suite.summarise_accuracy(evals, target=0.99)["time_to_target_s"] is None

    report = {"rows": [
        {"row": "native", "model": "cnn", "ok": True, **row, "ratio": 1.0, "time_to_target_s": 40.0,
         "final_acc": 0.95, "evals": evals},
        {"row": "geomx-fsa", "model": "cnn", "ok": True, **dict(row, median_s=0.5), "ratio": 2.1,
         "time_to_target_s": 20.0, "final_acc": 0.96, "evals": evals},
        {"row": "geomx-fsa", "model": "big", "ok": False, "status": 124},
    ], "config": {"target_acc": 0.9}}
    md = suite.markdown(report)
    assert md.count("\n") >= 4 and "geomx-fsa" in md and "FAILED" in md and "2.10x" in md
    png = tmp_path / "plot.png"
    if suite.plot(report, str(png)):
        assert png.stat().st_size > 1000


@pytest.mark.unit
def test_summary_merges_repeated_accuracy_runs(tmp_path):
    import suite
    import summary

    assert all(suite.row_by_name(n) for n in summary.SUMMARY_ROWS)  # every summary row exists
    def reading(role, **values):
        return {"node": {"role": role}, "samples": [[name, {}, v] for name, v in values.items()]}

    readings = {"central/global_server0": reading("global_server", geomx_process_cpu_seconds_total=12.5,
                                                  geomx_process_peak_resident_memory_bytes=310 * 2**20),
                "party0/local_server0": reading("local_server", geomx_process_cpu_seconds_total=2.0,
                                                geomx_process_peak_resident_memory_bytes=2**20,
                                                geomx_wan_round_trip_p50_seconds=0.25,
                                                geomx_wan_round_trip_p90_seconds=0.5),
                "party1/local_server0": reading("local_server", geomx_wan_round_trip_p50_seconds=0.3,
                                                geomx_wan_round_trip_p90_seconds=0.4),
                "party0/worker0": reading("worker", geomx_process_cpu_seconds_total=9.0)}
    assert suite.resources(readings) == {"central/global_server0": {"cpu_s": 12.5, "max_rss_mb": 310.0},
                                         "party0/local_server0": {"cpu_s": 2.0, "max_rss_mb": 1.0},
                                         "party1/local_server0": {"cpu_s": 0.0, "max_rss_mb": 0.0}}
    assert suite.round_trips(readings) == {"push_p50_s": 0.3, "push_p90_s": 0.5}  # the worst party's
    assert suite.round_trips({}) is None

    def run(t, acc, s_iter, ok=True):
        evals = [{"t": 1.0, "it": 5, "acc": 0.5}, {"t": 2.0, "it": 10, "acc": acc}]
        return {"row": "geomx-fsa", "ok": ok, "time_to_target_s": t, "final_acc": acc, "tta_mean_s": s_iter,
                "wan_bytes_per_iter": 2e6, "evals": evals, "status": 0 if ok else 124}

    m = summary.merge_accuracy_runs([run(10.0, 0.95, 0.5), run(14.0, 0.96, 0.7), run(12.0, 0.93, 0.6),
                                     run(None, 0.0, 0.0, ok=False)])
    assert (m["runs"], m["ok_runs"], m["reached"]) == (4, 3, 3)
    assert m["time_to_target_s"] == 12.0 and m["s_per_iter"] == 0.6 and m["final_acc"] == 0.95
    assert m["tta_spread"] == pytest.approx(14.0 / 10.0 - 1.0)
    assert m["evals"][-1]["acc"] == 0.93  # the median run's curve (time to target 12 s)
    never = summary.merge_accuracy_runs([run(None, 0.5, 0.1), run(None, 0.6, 0.1), run(11.0, 0.91, 0.1)])
    assert never["reached"] == 1 and never["time_to_target_s"] == 11.0 and never["evals"][-1]["acc"] == 0.6
    nat = dict(summary.merge_accuracy_runs([run(60.0, 0.95, 1.5)]), row="native")
    rows = [nat, m, summary.merge_accuracy_runs([run(None, 0.0, 0.0, ok=False)])]
    summary.add_ratios(rows)
    assert rows[1]["speed_ratio"] == pytest.approx(2.5) and rows[1]["tta_ratio"] == pytest.approx(5.0)
    report = {"rows": rows, "config": {"target_acc": 0.9, "wan": "20mbit,delay=50ms",
                                       "rows": [{"name": "geomx-fsa", "flags": "(default)"}]}}
    md = summary.markdown(report)
    assert "| geomx-fsa | 0.600 | 2.50x | 12.0 | 40% | 3/3 | 5.00x | 0.950 | 2.00 | (default) |" in md
    assert "FAILED" in md
    png = tmp_path / "summary.png"
    if summary.plot(report, str(png)):
        assert png.stat().st_size > 1000


# ---- root: a real two-party WAN -----------------------------------------------------------------

_RECEIVER = textwrap.dedent("""
    import socket, sys, time
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], 5201)); s.listen(1); print("ready", flush=True)
    s.settimeout(20); c, _ = s.accept(); c.settimeout(20)
    n, t0 = 0, None
    while True:
        b = c.recv(1 << 20)
        if not b: break
        if t0 is None: t0 = time.perf_counter(); first = len(b)
        n += len(b)
    print(n, n - first, time.perf_counter() - t0, flush=True)
""")
_SENDER = textwrap.dedent("""
    import socket, sys
    c = socket.create_connection((sys.argv[1], 5201), timeout=20)
    buf = b"x" * (1 << 16); total = int(sys.argv[2])
    while total > 0:
        c.sendall(buf[:min(total, len(buf))]); total -= len(buf)
    c.close()
""")


@pytest.mark.system
@pytest.mark.skipif(os.geteuid() != 0, reason="building an emulated WAN needs root "
                    "(network namespaces, veth, tc); run the tests as root to include this one")
def test_two_party_wan_rate_and_teardown():
    rate = 40e6  # party0's link; 4 MB take ~0.8 s
    nbytes = 4_000_000
    spec = wan.parse_spec("party0=40mbit,party1=10mbit", parties=2)
    w = wan.Wan.create(wan.dc_names(2), spec, prefix=f"gmxwantest{os.getpid()}")
    names = list(w.all_namespaces())
    try:
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert all(ns in listed for ns in names)
        recv = subprocess.Popen(w.exec_argv("central") + [sys.executable, "-c", _RECEIVER, w.address("central")],
                                stdout=subprocess.PIPE, text=True)
        try:
            assert recv.stdout.readline().strip() == "ready"
            w.start_sampling(0.01)
            subprocess.run(w.exec_argv("party0") + [sys.executable, "-c", _SENDER, w.address("central"),
                                                    str(nbytes)], check=True, timeout=30)
            out, _ = recv.communicate(timeout=30)
            samples = w.stop_sampling()
        finally:
            if recv.poll() is None:
                recv.kill()
        # The sampler saw party0's link busy upwards for the transfer (~0.8 s at 40 Mbit/s), never
        # downwards (acknowledgements only), and party1's link idle.
        span = samples[-1][0] - samples[0][0]
        busy = wan.busy_fractions(samples, w.rates(), samples[0][0], samples[-1][0])
        assert 0.6 < busy["party0"]["up"] * span < 1.2, (busy, span)
        assert busy["party0"]["down"] == 0 and busy["party1"] == {"up": 0, "down": 0}, busy
        assert "central" not in busy  # uncapped
        total, after_first, seconds = out.split()
        assert int(total) == nbytes
        measured = int(after_first) * 8 / float(seconds)
        # tbf counts L2 frames; payload is ~3-5% less than the rate (headers): allow 15%.
        assert abs(measured - rate) / rate < 0.15, f"delivered {measured / 1e6:.1f} Mbit/s on a 40 Mbit/s link"
        c = w.counters()
        assert c["party0"].up >= nbytes and c["central"].down >= nbytes
        assert c["party1"].total < 10_000  # idle link
        assert "party0" in w.report()
    finally:
        w.close()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(ns in listed for ns in names), listed
    w.close()  # idempotent


_ECHO = textwrap.dedent("""
    import socket, sys
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], 5202)); s.listen(1); print("ready", flush=True)
    s.settimeout(20); c, _ = s.accept()
    while True:
        b = c.recv(65536)
        if not b: break
        c.sendall(b)
""")
_PING = textwrap.dedent("""
    import socket, sys, time
    c = socket.create_connection((sys.argv[1], 5202), timeout=20)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rtts = []
    for _ in range(8):
        t = time.perf_counter(); c.sendall(b"x" * 100); n = 0
        while n < 100: n += len(c.recv(100 - n))
        rtts.append((time.perf_counter() - t) * 1e3)
    print(sorted(rtts)[len(rtts) // 2])
""")


@pytest.mark.system
@pytest.mark.skipif(os.geteuid() != 0, reason="building an emulated WAN needs root")
@pytest.mark.skipif(shutil.which("nft") is None, reason="added latency needs nft (apt-get install nftables)")
def test_delay_relay_adds_latency():
    w = wan.Wan.create(wan.dc_names(1), wan.parse_spec("delay=20ms", 1), prefix=f"gmxwantestd{os.getpid()}")
    names = list(w.all_namespaces())
    try:
        echo = subprocess.Popen(w.exec_argv("central") + [sys.executable, "-c", _ECHO, w.address("central")],
                                stdout=subprocess.PIPE, text=True)
        try:
            assert echo.stdout.readline().strip() == "ready"
            out = subprocess.run(w.exec_argv("party0") + [sys.executable, "-c", _PING, w.address("central")],
                                 capture_output=True, text=True, check=True, timeout=30).stdout
        finally:
            echo.kill()
            echo.wait()
        rtt = float(out)
        assert 38.0 <= rtt <= 80.0, f"median RTT {rtt:.1f} ms for 20 ms one way"
    finally:
        w.close()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(ns in listed for ns in names)


@pytest.mark.unit
def test_parse_spec_global_server_links_default_to_central():
    spec = wan.parse_spec("20mbit,central=10mbit,gs1=5mbit", parties=2, global_server_dcs=3)
    assert spec.rates == {"central": 10e6, "party0": 20e6, "party1": 20e6, "gs0": 10e6, "gs1": 5e6, "gs2": 10e6}
    assert wan.parse_spec("all=1gbit", parties=1, global_server_dcs=1).rates["gs0"] == 1e9
    with pytest.raises(wan.WanError, match="gs0 .*data centers of their own"):
        wan.parse_spec("gs0=5mbit", parties=1)
