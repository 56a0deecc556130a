"""Topology files (geomx/launch/sitefile.py) and ``geomx-launch --topology``: the validation table, the
placement of every process, the firewall list, and three sites started by three separate
``geomx-launch --site`` commands (real processes) reaching the exact-sum oracle."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
from helpers import REPO, free_port_range, kill_group, listening

from geomx.launch import Ports, Topology, main
from geomx.launch.sitefile import TopologyFileError, load, loads

EXAMPLES = REPO / "examples" / "topologies"

# The minimal form of issue 14, as written.
MINIMAL = """
[central]                 # the central data center: global scheduler + global server(s) + master worker
host = "10.1.0.1"         # SSH target (user@host also accepted) and the address others reach
global_servers = 1
[[party]]
name = "party0"
host = "10.1.0.2"
workers = 2
[[party]]
name = "party1"
host = "10.1.0.3"
workers = 2
"""

CENTRAL = '[central]\nhost = "10.1.0.1"\n'
PARTY0 = '[[party]]\nname = "party0"\nhost = "10.1.0.2"\nworkers = 1\n'

# text -> the error it must give (after "<topology>: ")
BAD = {
    "unknown top-level key": ('colour = "red"\n' + CENTRAL + PARTY0,
                              "top level: unknown key 'colour' (known: "),
    "unknown site key": (CENTRAL + PARTY0 + '[[party]]\nname = "p1"\nhost = "h"\nwokers = 2\n',
                         "[[party]] 'p1': unknown key 'wokers' (known: "),
    "unknown central key": (CENTRAL + "workers = 2\n" + PARTY0, "[central]: unknown key 'workers'"),
    "zero workers": (CENTRAL + PARTY0.replace("workers = 1", "workers = 0"),
                     "[[party]] 'party0': workers must be >= 1, got 0"),
    "negative workers": (CENTRAL + PARTY0.replace("workers = 1", "workers = -2"),
                         "[[party]] 'party0': workers must be >= 1, got -2"),
    "workers missing": (CENTRAL + PARTY0.replace("workers = 1\n", ""), "[[party]] 'party0': workers is required"),
    "workers not a number": (CENTRAL + PARTY0.replace("workers = 1", 'workers = "2"'),
                             "[[party]] 'party0': workers must be an integer, got '2'"),
    "zero global servers": (CENTRAL + "global_servers = 0\n" + PARTY0,
                            "[central]: global_servers must be >= 1, got 0"),
    "negative central workers": (CENTRAL + "central_workers = -1\n" + PARTY0,
                                 "[central]: central_workers must be >= 0, got -1"),
    "zero local servers": (CENTRAL + PARTY0 + "local_servers = 0\n",
                           "[[party]] 'party0': local_servers must be >= 1, got 0"),
    "party host missing": (CENTRAL + PARTY0.replace('host = "10.1.0.2"\n', ""),
                           "[[party]] 'party0': host is required"),
    "central host missing": ("[central]\nglobal_servers = 1\n" + PARTY0, "[central]: host is required"),
    "party name missing": (CENTRAL + PARTY0.replace('name = "party0"\n', ""), "[[party]] #1: name is required"),
    "bad party name": (CENTRAL + PARTY0.replace('"party0"', '"party 0"'),
                       "[[party]] #1: name must be letters, digits, '_', '.', '-', got 'party 0'"),
    "name used twice": (CENTRAL + PARTY0 + PARTY0, "[[party]] #2: name 'party0' is used twice (also [[party]] #1)"),
    "party named central": (CENTRAL + PARTY0.replace('"party0"', '"central"'),
                            "[[party]] #1: name 'central' is used twice (also [central])"),
    "two listeners on one host:port": (
        '[central]\nhost = "127.0.0.1"\nports = "9000-9009"\n'
        '[[party]]\nname = "party0"\nhost = "127.0.0.1"\nworkers = 1\nports = "9003-9009"\n',
        "two listeners at 127.0.0.1:9003 (tcp): global_server0 of site 'central' and party0/scheduler of site "
        "'party0'; give the sites on one host distinct `ports` ranges"),
    "shared address, no ranges": ('[central]\nhost = "127.0.0.1"\n[[party]]\nname = "p"\nhost = "127.0.0.1"\n'
                                  'workers = 1\nports = 9000\n', "two listeners at 127.0.0.1:9000 (tcp)"),
    "port range too small": (CENTRAL + 'ports = "9000-9001"\n' + PARTY0,
                             "[central]: ports 9000-9001 hold 2 port(s), too few for the listeners on 10.1.0.1"),
    "bad port range": (CENTRAL + 'ports = "9000:9010"\n' + PARTY0,
                       "[central]: ports must be a first port (9000) or a range (\"9000-9019\"), got '9000:9010'"),
    "port out of range": (CENTRAL + "ports = 70000\n" + PARTY0, "[central]: ports must be a TCP port (1-65535)"),
    "no party": (CENTRAL, "top level: at least one [[party]] is required"),
    "no central": (PARTY0, "top level: [central] is required"),
    "not TOML": (CENTRAL + "workers = \n", "not valid TOML: "),
    "env sets a role variable": (CENTRAL + PARTY0 + 'env = { DMLC_ROLE = "worker" }\n',
                                 "[[party]] 'party0': env.DMLC_ROLE: the launcher sets DMLC_ROLE from the topology "
                                 "file"),
    "env sets a port": ('[env]\nGEOMX_SERVER_PORT = 1\n' + CENTRAL + PARTY0,
                        "top level: env.GEOMX_SERVER_PORT: the launcher sets"),
    "unknown role": (CENTRAL + "[central.role_env.cook]\nX = 1\n" + PARTY0,
                     "[central]: role_env: unknown role 'cook' (roles: global_scheduler, "),
    "unknown security": ('security = "tls"\n' + CENTRAL + PARTY0,
                         "top level: security must be \"curve\" or \"none\", got 'tls'"),
    "generated keys, site on two hosts": (CENTRAL + PARTY0 + 'worker_hosts = ["10.1.0.3"]\n',
                                          "[[party]] 'party0': CURVE keys generated by the launcher need each site "
                                          "on one host (a site's hosts share its key pair): set keys_dir, or "
                                          "security = \"none\""),
    "keys for some sites only": (CENTRAL + PARTY0 + 'keys_dir = "/k"\n',
                                 "[central]: keys_dir is set for other sites but not here: give it for every site, "
                                 "or for none (the launcher then generates the keys)"),
    "empty worker hosts": (CENTRAL + PARTY0 + "worker_hosts = []\n",
                           "[[party]] 'party0': worker_hosts must be a non-empty list of hosts, got []"),
    "outage window not seconds": ('outage_window = "5m"\n' + CENTRAL + PARTY0,
                                  "top level: outage_window must be seconds in [0, 604800], got '5m'"),
    "outage window twice": ('outage_window = 60\n[env]\nGEOMX_WAN_OUTAGE_WINDOW = 60\n' + CENTRAL + PARTY0,
                            "top level: outage_window and env.GEOMX_WAN_OUTAGE_WINDOW are both set; keep one"),
    "metrics not a boolean": ('metrics = "yes"\n' + CENTRAL + PARTY0,
                              "top level: metrics must be true or false, got 'yes'"),
    "lost party policy": ('lost_party = "wait"\n' + CENTRAL + PARTY0,
                          "top level: lost_party must be one of stop, continue, rejoin, got 'wait'"),
    # Feature switches are read by the nodes' rule (geomx.config), which the listeners follow.
    "switch neither on nor off": (CENTRAL + PARTY0 + 'env = { ENABLE_INTRA_TS = "maybe" }\n',
                                  "[[party]] 'party0': ENABLE_INTRA_TS must be 0 or 1, got 'maybe' (role: launcher)"),
    "unknown DGT mode": (CENTRAL + "[central.role_env.global_server]\nENABLE_DGT = 4\n" + PARTY0,
                         "[central]: ENABLE_DGT must be 0 (off), 1 (UDP), 2 (TCP) or 3 (TCP + 4-bit), got 4"),
    "unknown host key": (CENTRAL + PARTY0 + 'worker_hosts = [{ host = "a", gpu = 1 }]\n',
                         "[[party]] 'party0' worker_hosts[0]: unknown key 'gpu'"),
}


@pytest.mark.unit
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_topology_files(case):
    text, message = BAD[case]
    with pytest.raises(TopologyFileError) as info:
        loads(text, "<topology>")
    assert str(info.value).startswith("<topology>: "), str(info.value)
    assert message in str(info.value), str(info.value)


@pytest.mark.unit
def test_bad_file_from_the_command_line(tmp_path, capsys):
    path = tmp_path / "t.toml"
    path.write_text(BAD["zero workers"][0])
    assert main(["--topology", str(path), "--dry-run", "--", "x"]) == 2
    assert f"geomx-launch: {path}: [[party]] 'party0': workers must be >= 1, got 0" in capsys.readouterr().err
    assert main(["--topology", str(tmp_path / "missing.toml"), "--dry-run", "--", "x"]) == 2
    assert "cannot read the topology file: No such file or directory" in capsys.readouterr().err


@pytest.mark.unit
def test_minimal_form_as_written():
    topo = loads(MINIMAL, "m.toml")
    specs = topo.processes(["python", "cnn.py", "-ds", "{slice}"])
    by = {s.name: s for s in specs}
    assert list(by) == ["global_scheduler", "central/scheduler", "party0/scheduler", "party1/scheduler",
                        "global_server0", "party0/server", "party1/server", "central/master_worker",
                        "party0/worker0", "party0/worker1", "party1/worker0", "party1/worker1"]
    assert {s.name: s.host for s in specs} == {n: "10.1.0.1" if not n.startswith("party") else
                                               f"10.1.0.{2 + int(n[5])}" for n in by}
    assert [s.site for s in specs] == [s.name.split("/")[0] if "/" in s.name else "central" for s in specs]
    gs = by["global_server0"].env
    assert (gs["DMLC_PS_GLOBAL_ROOT_URI"], gs["DMLC_PS_GLOBAL_ROOT_PORT"]) == ("10.1.0.1", "9000")
    assert (gs["DMLC_PS_ROOT_URI"], gs["DMLC_PS_ROOT_PORT"]) == ("10.1.0.1", "9001")
    assert (gs["GEOMX_SERVER_PORT"], gs["GEOMX_CENTRAL_PORT"]) == ("9002", "9003")
    assert (gs["DMLC_NODE_HOST"], gs["GEOMX_BIND_HOST"]) == ("10.1.0.1", "10.1.0.1")
    ls = by["party1/server"].env
    assert (ls["DMLC_PS_ROOT_URI"], ls["DMLC_PS_ROOT_PORT"], ls["GEOMX_SERVER_PORT"]) == ("10.1.0.3", "9000", "9001")
    assert (ls["DMLC_PS_GLOBAL_ROOT_URI"], ls["DMLC_PS_GLOBAL_ROOT_PORT"]) == ("10.1.0.1", "9000")
    w = by["party1/worker1"]
    assert w.argv == ["python", "cnn.py", "-ds", "3"] and w.env["DMLC_NUM_ALL_WORKER"] == "4"
    # Several hosts: CURVE by default, with keys the launcher generates on each site's host.
    assert topo.security == "curve" and topo.auto_keys and topo.insecure_warning() is None
    assert w.env["GEOMX_CURVE_SECRET_KEY"] == "<keys generated at start>/party1.key_secret"
    w = {s.name: s for s in topo.processes(["x"], keys_dir="/tmp/k")}["party1/worker1"]
    assert (w.env["GEOMX_CURVE_SECRET_KEY"], w.env["GEOMX_CURVE_PUBLIC_KEYS_DIR"]) == ("/tmp/k/party1.key_secret",
                                                                                      "/tmp/k")
    clear = loads('security = "none"\n' + MINIMAL, "m.toml")
    assert clear.security == "none" and "INSECURE: m.toml spans several hosts and runs with security = \"none\"" \
        in clear.insecure_warning()
    assert "GEOMX_CURVE_SECRET_KEY" not in clear.processes(["x"])[-1].env


@pytest.mark.unit
def test_minimal_form_firewall(tmp_path, capsys):
    path = tmp_path / "m.toml"
    path.write_text(MINIMAL)
    assert main(["--topology", str(path), "--print-firewall"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "# central (10.1.0.1): 4 port(s)",
        "tcp 10.1.0.1:9000  global_scheduler (global scheduler)  from central (10.1.0.1), party0 (10.1.0.2), "
        "party1 (10.1.0.3)",
        "tcp 10.1.0.1:9001  central/scheduler (central scheduler)  from central (10.1.0.1)",
        "tcp 10.1.0.1:9002  global_server0 (global server, for the parties)  from party0 (10.1.0.2), "
        "party1 (10.1.0.3)",
        "tcp 10.1.0.1:9003  global_server0 (global server, for the central workers)  from central (10.1.0.1)",
        "# party0 (10.1.0.2): 2 port(s)",
        "tcp 10.1.0.2:9000  party0/scheduler (party scheduler)  from party0 (10.1.0.2)",
        "tcp 10.1.0.2:9001  party0/server (local server, for its workers)  from party0 (10.1.0.2)",
        "# party1 (10.1.0.3): 2 port(s)",
        "tcp 10.1.0.3:9000  party1/scheduler (party scheduler)  from party1 (10.1.0.3)",
        "tcp 10.1.0.3:9001  party1/server (local server, for its workers)  from party1 (10.1.0.3)",
    ]


@pytest.mark.unit
def test_metrics_take_ports_after_every_other_listener_and_show_in_the_firewall_and_the_scrape_config(
        tmp_path, capsys):
    path = tmp_path / "m.toml"
    path.write_text("metrics = true\n" + MINIMAL)
    topo = load(str(path))
    by = {s.name: s for s in topo.processes(["x"])}
    plain = {s.name: s for s in loads(MINIMAL, "m.toml").processes(["x"])}
    # Every other port as without metrics; then each process one port of its site's range, in start order.
    for name, s in by.items():
        assert {k: v for k, v in s.env.items() if k != "GEOMX_METRICS_PORT"} == plain[name].env
    assert {n: s.env["GEOMX_METRICS_PORT"] for n, s in by.items()} == {
        "global_scheduler": "9004", "central/scheduler": "9005", "global_server0": "9006",
        "central/master_worker": "9007", "party0/scheduler": "9002", "party0/server": "9003",
        "party0/worker0": "9004", "party0/worker1": "9005", "party1/scheduler": "9002", "party1/server": "9003",
        "party1/worker0": "9004", "party1/worker1": "9005"}
    assert main(["--topology", str(path), "--print-firewall"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "# central (10.1.0.1): 8 port(s)" in lines
    assert "tcp 10.1.0.2:9004  party0/worker0 (metrics (/metrics for Prometheus))  from party0 (10.1.0.2)" in lines
    assert main(["--topology", str(path), "--print-prometheus", "--", "x"]) == 0
    config = capsys.readouterr().out
    assert config.count("- targets:") == 12
    assert '- targets: ["10.1.0.3:9003"]\n        labels: {geomx_process: "party1/server", ' \
           'geomx_role: "local_server", geomx_site: "party1"}' in config
    path.write_text(MINIMAL)
    assert main(["--topology", str(path), "--print-prometheus", "--", "x"]) == 2
    assert "--print-prometheus needs `metrics = true` in the topology file" in capsys.readouterr().err


@pytest.mark.unit
def test_optional_fields():
    text = """
port_base = 7000
keys_dir = "/keys"
python = "/venv/bin/python"
outage_window = 600
lost_party = "continue"
[env]
PS_VERBOSE = 1
[role_env.server]
ENABLE_INTER_TS = 1
[central]
host = "admin@gw.example.org"
address = "203.0.113.10"
bind = "10.0.0.10"
global_servers = 2
central_workers = 2
server_hosts = ["10.0.0.11", { host = "10.0.0.12", python = "/other/python", workdir = "/srv" }]
[central.role_env.global_server]
ENABLE_DGT = 2
[[party]]
name = "eu"
host = "10.1.0.11"
worker_hosts = ["10.1.0.11", "gpu@10.1.0.12"]
workers = 3
local_servers = 2
ports = "9100-9109"
env = { ENABLE_INTRA_TS = 1, OMP_NUM_THREADS = 4 }
"""
    topo = loads(text, "t.toml")
    assert topo.security == "curve" and topo.insecure_warning() is None
    specs = {s.name: s for s in topo.processes(["{python}", "train.py"])}
    g = specs["global_scheduler"]
    assert g.host == "admin@gw.example.org" and g.env["DMLC_PS_GLOBAL_ROOT_URI"] == "203.0.113.10"
    assert g.env["GEOMX_BIND_HOST"] == "10.0.0.10" and g.env["DMLC_PS_GLOBAL_ROOT_PORT"] == "7000"
    # The central scheduler is reached inside the site, at the bound (private) address.
    assert specs["global_server0"].env["DMLC_PS_ROOT_URI"] == "10.0.0.10"
    assert specs["eu/server0"].env["DMLC_PS_GLOBAL_ROOT_URI"] == "203.0.113.10"
    # Global servers on the server hosts, round-robin, each with its own python and directory.
    gs1 = specs["global_server1"]
    assert gs1.host == "10.0.0.12" and gs1.argv[0] == "/other/python" and gs1.cwd == "/srv"
    assert gs1.env["DMLC_NODE_HOST"] == gs1.env["GEOMX_BIND_HOST"] == "10.0.0.12"
    assert specs["global_server0"].host == "10.0.0.11" and specs["global_server0"].argv[0] == "/venv/bin/python"
    assert specs["central/worker1"].host == "admin@gw.example.org"
    assert specs["central/worker1"].argv == ["/venv/bin/python", "train.py"]
    assert [specs[f"eu/worker{i}"].host for i in range(3)] == ["10.1.0.11", "gpu@10.1.0.12", "10.1.0.11"]
    # Fixed ports: the site's range for eu (TSEngine listeners too, as the env enables them), a shared
    # counter from port_base on each address for the others.
    assert specs["eu/scheduler"].env["DMLC_PS_ROOT_PORT"] == "9100"
    assert (specs["eu/server0"].env["GEOMX_SERVER_PORT"], specs["eu/server0"].env["GEOMX_TS_PORT"]) == ("9101", "9102")
    assert (specs["eu/server1"].env["GEOMX_SERVER_PORT"], specs["eu/server1"].env["GEOMX_TS_PORT"]) == ("9103", "9104")
    assert [specs[f"eu/worker{i}"].env["GEOMX_TS_PORT"] for i in range(3)] == ["9105", "9100", "9106"]
    assert specs["global_server1"].env["GEOMX_SERVER_PORT"] == "7000"  # its own host
    for name, s in specs.items():
        site = "central" if not name.startswith("eu/") else "eu"
        assert s.env["GEOMX_CURVE_SECRET_KEY"] == f"/keys/{site}.key_secret"
        assert s.env["GEOMX_CURVE_CENTRAL_KEY"] == "central" and s.env["PS_VERBOSE"] == "1"
        assert s.env["GEOMX_WAN_OUTAGE_WINDOW"] == "600" and s.env["GEOMX_LOST_PARTY"] == "continue"
        assert s.party_may_be_lost == (site == "eu") and s.party == ("eu" if site == "eu" else "")
    assert specs["global_server0"].env["ENABLE_DGT"] == "2" and "ENABLE_DGT" not in specs["eu/server0"].env
    assert specs["eu/worker0"].env["OMP_NUM_THREADS"] == "4" and "OMP_NUM_THREADS" not in g.env


@pytest.mark.unit
@pytest.mark.parametrize("inter, dgt, ts_port, udp_port", [("yes", "1", True, True), ("off", "2", False, False),
                                                           ("true", "0", True, False), ("0", "3", False, False)])
def test_listeners_follow_the_switches_as_the_nodes_read_them(inter, dgt, ts_port, udp_port):
    """TSEngine's relay port and DGT's UDP channels are opened by the rule the nodes read the switches with
    (any spelling geomx.config accepts; DGT's UDP channels in mode 1 only)."""
    text = (CENTRAL + f'[central.role_env.global_server]\nENABLE_DGT = "{dgt}"\n' + PARTY0
            + f'env = {{ ENABLE_INTER_TS = "{inter}" }}\n')
    specs = {s.name: s.env for s in loads(text, "t.toml").processes(["x"])}
    assert ("GEOMX_TS_PORT" in specs["party0/server"]) == ts_port
    assert ("GEOMX_DGT_UDP_PORT" in specs["global_server0"]) == udp_port


@pytest.mark.unit
def test_examples_load():
    for path in sorted(EXAMPLES.glob("*.toml")):
        topo = load(str(path))
        assert topo.processes(["x"]), path


@pytest.mark.unit
def test_dry_run_per_host_and_site_selection(capsys):
    path = str(EXAMPLES / "two-datacenters.toml")
    assert main(["--topology", path, "--dry-run", "--", "{python}", "cnn.py", "-ds", "{slice}"]) == 0
    out = capsys.readouterr().out.splitlines()
    hosts = [line for line in out if line.startswith("# ---- host ")]
    assert hosts == ["# ---- host geomx@gw.central.example.org (site central)", "# ---- host 10.1.0.11 (site eu)",
                     "# ---- host 10.2.0.11 (site us)", "# ---- host gpu@10.1.0.12 (site eu)"]
    worker = out[out.index("# eu/worker1 (worker)") + 1]
    assert worker.startswith("cd /opt/geomx && env ") and "DMLC_NODE_HOST=10.1.0.12" in worker
    assert worker.endswith(" /home/gpu/venv/bin/python cnn.py -ds 1")
    assert main(["--topology", path, "--site", "eu@gpu@10.1.0.12", "--dry-run", "--", "x"]) == 0
    names = [line for line in capsys.readouterr().out.splitlines() if line.startswith("# eu/")]
    assert names == ["# eu/worker1 (worker)", "# eu/worker3 (worker)"]
    assert main(["--topology", path, "--site", "eu", "--dry-run", "--", "x"]) == 2
    assert "site 'eu' spans several hosts (10.1.0.11, gpu@10.1.0.12): start each with --site eu@HOST" in \
        capsys.readouterr().err
    assert main(["--topology", path, "--site", "asia", "--dry-run", "--", "x"]) == 2
    assert "no site named 'asia' (sites: central, eu, us)" in capsys.readouterr().err


@pytest.mark.unit
@pytest.mark.parametrize("argv, message", [
    (["-p", "3"], "-p/--parties cannot be combined with --topology"),
    (["--curve"], "--curve cannot be combined with --topology"),
    (["--env", "A=1"], "--env cannot be combined with --topology"),
])
def test_single_machine_flags_refused_with_a_topology(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main(["--topology", str(EXAMPLES / "minimal.toml"), *argv, "--site", "party0", "--", "x"])
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.unit
def test_site_mode_needs_keys_for_curve_across_hosts(tmp_path, capsys):
    path = tmp_path / "m.toml"
    path.write_text(MINIMAL)
    assert main(["--topology", str(path), "--site", "party0", "--", "x"]) == 2
    assert "the launcher generates only when it starts every site over SSH: for --site, set keys_dir" in \
        capsys.readouterr().err


@pytest.mark.unit
def test_site_flags_need_a_topology(capsys):
    for flag in (["--site", "party0"], ["--print-firewall"]):
        with pytest.raises(SystemExit):
            main([*flag, "--", "x"])
        assert f"{flag[0]} needs --topology FILE" in capsys.readouterr().err


@pytest.mark.unit
def test_topology_form_chosen_by_the_topology_flag_as_argparse_reads_it(capsys):
    """Two command lines, one parser each: --topology (also --topology=FILE or abbreviated) picks the file's;
    each form's help points at the other; the file form's own flags need a file."""
    path = str(EXAMPLES / "minimal.toml")
    for argv in (["--topology", path], [f"--topology={path}"], ["--topo", path]):
        assert main([*argv, "--print-firewall"]) == 0
        assert capsys.readouterr().out.startswith("# central (10.1.0.1): 4 port(s)")
    with pytest.raises(SystemExit):
        main(["--ssh-config", "ssh.conf", "--", "x"])
    assert "--ssh-config needs --topology FILE" in capsys.readouterr().err
    for argv, usage, other in ((["--help"], "usage: geomx-launch [options] -- COMMAND",
                                "geomx-launch --topology FILE --help"),
                               (["--topology", path, "--help"], "usage: geomx-launch --topology FILE",
                                "geomx-launch --help")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        text = capsys.readouterr().out
        # (argparse may wrap the help at a hyphen)
        assert e.value.code == 0 and text.startswith(usage) and other.replace(" ", "") in "".join(text.split())


@pytest.mark.unit
def test_one_host_file_gives_the_single_machine_process_list(monkeypatch):
    """The single-machine form is a layout of one host: a topology file with every site on that host gives
    the same processes (names, argv, environments, roles, sites), one Layout deriving both. What the file
    adds is documented (Deployment.md, "One description, one process list"): every listener's port is
    fixed (GEOMX_SERVER_PORT, GEOMX_CENTRAL_PORT; the single-machine form gives only the schedulers' and
    the OS chooses the others), its bind address is declared (GEOMX_BIND_HOST) and its host is named."""
    monkeypatch.delenv("GEOMX_BIND_HOST", raising=False)
    text = ('[env]\nPS_VERBOSE = 1\n[central]\nhost = "127.0.0.1"\nglobal_servers = 2\ncentral_workers = 2\n'
            '[[party]]\nname = "party0"\nhost = "127.0.0.1"\nworkers = 2\n'
            '[[party]]\nname = "party1"\nhost = "127.0.0.1"\nworkers = 3\nlocal_servers = 2\n')
    topo = loads(text, "one.toml")
    assert topo.security == "none"  # one machine: in clear, as the single-machine form without --curve
    command = ["python", "train.py", "-ds", "{slice}", "--party={party}", "--rank={rank}"]
    from_file = topo.processes(command)
    by_name = {s.name: s.env for s in from_file}
    ports = Ports(global_root=int(by_name["global_scheduler"]["DMLC_PS_GLOBAL_ROOT_PORT"]),
                  central_root=int(by_name["central/scheduler"]["DMLC_PS_ROOT_PORT"]),
                  parties=[int(by_name[f"party{p}/scheduler"]["DMLC_PS_ROOT_PORT"]) for p in range(2)])
    single = Topology(parties=2, workers_per_party=[2, 3], global_servers=2, central_workers=2,
                      local_servers=[1, 2], env={"PS_VERBOSE": "1"}).processes(command, ports)
    assert [s.name for s in single] == [s.name for s in from_file] and len(single) == 16
    file_only = {"GEOMX_BIND_HOST", "GEOMX_SERVER_PORT", "GEOMX_CENTRAL_PORT"}
    for one, other in zip(single, from_file):
        assert one.argv == other.argv, one.name
        assert one.env == {k: v for k, v in other.env.items() if k not in file_only}, one.name
        assert other.env["GEOMX_BIND_HOST"] == "127.0.0.1"
        assert ("GEOMX_SERVER_PORT" in other.env) == (other.env.get("DMLC_ROLE") == "server"), one.name
        assert (one.is_worker, one.site, one.party, one.dc, one.cwd) == \
            (other.is_worker, other.site, other.party, other.dc, other.cwd), one.name
        assert (one.restart is None, one.rejoin is None) == (other.restart is None, other.rejoin is None)
        assert (one.host, other.host) == ("", "127.0.0.1")


# ----------------------------------------------------------------------------------------------
# Three sites, three launchers
# ----------------------------------------------------------------------------------------------


@pytest.mark.system
@pytest.mark.parametrize("security", ["none", "curve"])
def test_three_sites_started_separately_reach_the_exact_oracle(tmp_path, security):
    base = free_port_range(30)
    text = (EXAMPLES / "one-machine.toml").read_text()
    for i, old in enumerate(("9310-9319", "9320-9329", "9330-9339")):
        text = text.replace(old, f"{base + 10 * i}-{base + 10 * i + 9}")
    if security == "curve":
        # Each site's key pair and every site's public key, as geomx-keys makes them (keys_dir).
        from geomx import security as keys

        keys.generate_topology_keys(str(tmp_path / "keys"), ["central", "party0", "party1"])
        text = f'keys_dir = "{tmp_path / "keys"}"\n' + text
    path = tmp_path / "sites.toml"
    path.write_text(text)
    topo = load(str(path))
    assert topo.security == security
    declared = {(lst.host.address, lst.port) for lst in topo.listeners()}
    assert len(declared) == 8  # 4 central, 2 per party
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in [k for k in env if k.startswith("DMLC_")]:
        del env[k]
    worker = [sys.executable, str(REPO / "tests" / "workers" / "exact_worker.py"), "--slice", "{slice}",
              "--rounds", "3", "--mode", "push-pull"]
    procs = {}
    logs = {}
    # The parties first: their processes wait for the central site's schedulers (GEOMX_START_TIMEOUT).
    for site in ("party1", "party0", "central"):
        logs[site] = open(tmp_path / f"{site}.log", "w+")
        procs[site] = subprocess.Popen(
            [sys.executable, "-m", "geomx.launch", "--topology", str(path), "--site", site, "--timeout", "150",
             "--", *worker], cwd=REPO, env=env, stdout=logs[site], stderr=subprocess.STDOUT, start_new_session=True)
    seen: set = set()
    ports = {p for _, p in declared}

    def watch():
        # Which of the declared ports are listening, and where, while the sites run.
        while any(p.poll() is None for p in procs.values()):
            seen.update(listening(ports))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        codes = {site: p.wait(timeout=200) for site, p in procs.items()}
    finally:
        for p in procs.values():
            kill_group(p)
        watcher.join(5)
    out = {}
    for site, f in logs.items():
        f.seek(0)
        out[site] = f.read()
        f.close()
    assert codes == {"party1": 0, "party0": 0, "central": 0}, {s: o[-3000:] for s, o in out.items()}
    for site in ("party0", "party1"):
        assert len([line for line in out[site].splitlines() if "EXACT OK" in line]) == 1, out[site][-3000:]
        assert f"[{site}/worker0]" in out[site] and "[central/" not in out[site]
    assert "[global_server0]" in out["central"] and "[party0/" not in out["central"]
    assert not any("MISMATCH" in o for o in out.values())
    # With keys, every process runs with CURVE (a node without keys next to them would be refused).
    assert ("CURVE is off" in out["central"]) == (security == "none"), out["central"][-3000:]
    # Every listener bound its declared address and port, and nothing else listened on those ports.
    assert seen == declared, (sorted(seen), sorted(declared))
