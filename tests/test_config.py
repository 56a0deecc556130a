"""geomx.config: the environment contract of every role, parsed from plain dicts (and once through
``python -m geomx.node`` in a real subprocess)."""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from geomx import config
from geomx.config import ConfigError
from geomx.launch import Topology

REPO = Path(__file__).resolve().parents[1]

_GLOBAL_TIER = {
    "DMLC_PS_GLOBAL_ROOT_URI": "10.0.0.1",
    "DMLC_PS_GLOBAL_ROOT_PORT": "9092",
    "DMLC_NUM_GLOBAL_SERVER": "2",
    "DMLC_NUM_GLOBAL_WORKER": "3",
}
_PARTY_TIER = {
    "DMLC_PS_ROOT_URI": "10.0.1.1",
    "DMLC_PS_ROOT_PORT": "9093",
    "DMLC_NUM_SERVER": "1",
    "DMLC_NUM_WORKER": "4",
}

# role name -> (minimal valid environment, variables that must be present)
ENVS = {
    "global_scheduler": (
        {"DMLC_ROLE_GLOBAL": "global_scheduler", **_GLOBAL_TIER},
        list(_GLOBAL_TIER),
    ),
    "global_server": (
        {"DMLC_ROLE_GLOBAL": "global_server", "DMLC_ROLE": "server", **_GLOBAL_TIER, **_PARTY_TIER,
         "DMLC_NUM_SERVER": "2", "DMLC_NUM_ALL_WORKER": "9"},
        list(_GLOBAL_TIER) + list(_PARTY_TIER) + ["DMLC_NUM_ALL_WORKER"],
    ),
    "scheduler": (
        {"DMLC_ROLE": "scheduler", **_PARTY_TIER},
        list(_PARTY_TIER),
    ),
    "server": (
        {"DMLC_ROLE": "server", **_GLOBAL_TIER, **_PARTY_TIER},
        list(_GLOBAL_TIER) + list(_PARTY_TIER),
    ),
    "worker": (
        {"DMLC_ROLE": "worker", **_PARTY_TIER, "DMLC_NUM_ALL_WORKER": "9"},
        list(_PARTY_TIER) + ["DMLC_NUM_ALL_WORKER"],
    ),
    "master_worker": (
        {"DMLC_ROLE": "worker", "DMLC_ROLE_MASTER_WORKER": "1", **_PARTY_TIER, "DMLC_NUM_ALL_WORKER": "9"},
        list(_PARTY_TIER) + ["DMLC_NUM_ALL_WORKER"],
    ),
}
ROLE_OF = {"master_worker": "worker"}


def env_for(name: str, **changes) -> dict:
    env = dict(ENVS[name][0])
    for k, v in changes.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def refused(env: dict) -> str:
    with pytest.raises(ConfigError) as info:
        config.load(env)
    return str(info.value)


# -- valid environments ---------------------------------------------------------------------------

@pytest.mark.unit
def test_global_scheduler_fields():
    cfg = config.load(env_for("global_scheduler"))
    assert cfg.role == config.GLOBAL_SCHEDULER
    assert cfg.is_scheduler and not cfg.is_server and not cfg.is_worker
    assert cfg.global_root_uri == "10.0.0.1" and cfg.global_root_port == 9092
    assert cfg.num_global_server == 2 and cfg.num_global_worker == 3
    # The party tier is not read for the global scheduler.
    assert cfg.root_uri is None and cfg.root_port is None and cfg.num_server == 0 and cfg.num_worker == 0
    assert cfg.needs_global_tier and not cfg.needs_local_tier
    assert not cfg.is_master_worker


@pytest.mark.unit
def test_global_server_fields():
    cfg = config.load(env_for("global_server", DMLC_ENABLE_CENTRAL_WORKER="1"))
    assert cfg.role == config.GLOBAL_SERVER
    assert cfg.is_server and not cfg.is_scheduler
    assert (cfg.global_root_uri, cfg.global_root_port) == ("10.0.0.1", 9092)
    assert (cfg.root_uri, cfg.root_port) == ("10.0.1.1", 9093)
    assert cfg.num_server == cfg.num_global_server == 2
    assert cfg.num_worker == 4 and cfg.num_global_worker == 3 and cfg.num_all_worker == 9
    assert cfg.enable_central_worker
    assert cfg.needs_global_tier and cfg.needs_local_tier


@pytest.mark.unit
def test_checkpoint_fields(tmp_path):
    cfg = config.load(env_for("global_server"))
    assert (cfg.checkpoint.dir, cfg.checkpoint.every, cfg.checkpoint.restore, cfg.checkpoint.restart_timeout) == \
        (None, 10, None, 60.0)
    ckpt = tmp_path / "global_server1.npz"
    ckpt.write_bytes(b"x")
    cfg = config.load(env_for("global_server", GEOMX_CHECKPOINT_RESTORE=str(ckpt), GEOMX_CHECKPOINT_EVERY="3",
                              GEOMX_RESTART_TIMEOUT="7.5"))
    # Restored without GEOMX_CHECKPOINT_DIR: it goes on checkpointing next to the file it came from.
    assert (cfg.checkpoint.dir, cfg.checkpoint.every, cfg.checkpoint.restart_timeout) == (str(tmp_path), 3, 7.5)
    msg = refused(env_for("global_server", GEOMX_CHECKPOINT_DIR=str(ckpt)))
    assert "GEOMX_CHECKPOINT_DIR" in msg and "is not a directory" in msg and "role: global_server" in msg


@pytest.mark.unit
def test_party_scheduler_fields():
    cfg = config.load(env_for("scheduler"))
    assert cfg.role == config.SCHEDULER
    assert cfg.is_scheduler
    assert (cfg.root_uri, cfg.root_port, cfg.num_server, cfg.num_worker) == ("10.0.1.1", 9093, 1, 4)
    assert cfg.global_root_uri is None and cfg.global_root_port is None and cfg.num_global_server == 0
    assert not cfg.needs_global_tier and cfg.needs_local_tier


@pytest.mark.unit
def test_local_server_fields():
    cfg = config.load(env_for("server"))
    assert cfg.role == config.LOCAL_SERVER
    assert cfg.is_server
    assert (cfg.root_uri, cfg.root_port, cfg.num_server, cfg.num_worker) == ("10.0.1.1", 9093, 1, 4)
    assert (cfg.global_root_uri, cfg.global_root_port) == ("10.0.0.1", 9092)
    assert (cfg.num_global_server, cfg.num_global_worker) == (2, 3)
    assert cfg.num_all_worker == 0  # not read for a local server
    assert cfg.needs_global_tier and cfg.needs_local_tier


@pytest.mark.unit
def test_worker_fields_and_defaults():
    cfg = config.load(env_for("worker"))
    assert cfg.role == config.WORKER
    assert cfg.is_worker and not cfg.is_master_worker
    assert (cfg.root_uri, cfg.root_port, cfg.num_server, cfg.num_worker, cfg.num_all_worker) == \
        ("10.0.1.1", 9093, 1, 4, 9)
    assert cfg.global_root_uri is None and cfg.num_global_server == 0
    assert not cfg.enable_central_worker
    # Defaults of the optional variables.
    assert cfg.heartbeat_interval == 1.0 and cfg.heartbeat_timeout == 20.0
    assert cfg.start_timeout == 120.0
    assert cfg.max_message_bytes == 1 << 31
    assert cfg.verbose == 0
    assert cfg.bigarray_bound == 1_000_000 and cfg.size_lower_bound is None
    assert cfg.node_host is None and cfg.interface is None
    assert config.is_worker_process(env_for("worker"))


@pytest.mark.unit
def test_master_worker_fields():
    cfg = config.load(env_for("master_worker"))
    assert cfg.role == config.WORKER and cfg.is_master_worker
    for spelling in ("true", "YES", "on", " 1 "):
        assert config.load(env_for("master_worker", DMLC_ROLE_MASTER_WORKER=spelling)).is_master_worker
    for spelling in ("0", "false", "No", "off", ""):
        assert not config.load(env_for("master_worker", DMLC_ROLE_MASTER_WORKER=spelling)).is_master_worker


@pytest.mark.unit
def test_optional_variables_parsed():
    cfg = config.load(env_for(
        "server", PS_HEARTBEAT_INTERVAL="0.5", PS_HEARTBEAT_TIMEOUT="3", GEOMX_START_TIMEOUT="7.5",
        GEOMX_MAX_MESSAGE_BYTES="4096", PS_VERBOSE="2", MXNET_KVSTORE_BIGARRAY_BOUND="1000",
        MXNET_KVSTORE_SIZE_LOWER_BOUND="10", DMLC_NODE_HOST="192.168.3.4", DMLC_INTERFACE="lo"))
    assert cfg.heartbeat_interval == 0.5 and cfg.heartbeat_timeout == 3.0
    assert cfg.start_timeout == 7.5 and cfg.max_message_bytes == 4096 and cfg.verbose == 2
    assert cfg.bigarray_bound == 1000 and cfg.size_lower_bound == 10
    assert cfg.node_host == "192.168.3.4" and cfg.interface == "lo"
    # DMLC_NODE_HOST wins over the interface and the routing probe.
    assert cfg.advertised_host("127.0.0.1", 9) == "192.168.3.4"


@pytest.mark.unit
def test_advertised_host_without_node_host():
    assert config.load(env_for("worker", DMLC_INTERFACE="lo")).advertised_host("127.0.0.1", 9) == "127.0.0.1"
    # The routing probe: the local address used to reach a loopback peer is a loopback address.
    assert config.load(env_for("worker")).advertised_host("127.0.0.1", 9).startswith("127.")


@pytest.mark.unit
def test_values_are_stripped():
    env = {k: f"  {v} " for k, v in env_for("server").items()}
    cfg = config.load(env)
    assert cfg.role == config.LOCAL_SERVER
    assert cfg.root_uri == "10.0.1.1" and cfg.root_port == 9093 and cfg.num_worker == 4


@pytest.mark.unit
def test_every_launcher_environment_parses():
    """The launcher's environments and the config contract agree for every process it starts."""
    topo = Topology(parties=2, workers_per_party=2, global_servers=2, central_workers=2)
    expected = {
        "global_scheduler": config.GLOBAL_SCHEDULER, "central/scheduler": config.SCHEDULER,
        "global_server0": config.GLOBAL_SERVER, "global_server1": config.GLOBAL_SERVER,
        "central/master_worker": config.WORKER, "central/worker1": config.WORKER,
        "party0/scheduler": config.SCHEDULER, "party0/server": config.LOCAL_SERVER,
        "party0/worker0": config.WORKER, "party1/worker1": config.WORKER,
    }
    seen = set()
    for spec in topo.processes(["train"]):
        cfg = config.load(spec.env)
        seen.add(spec.name)
        if spec.name in expected:
            assert cfg.role == expected[spec.name], spec.name
        assert cfg.is_master_worker == (spec.name == "central/master_worker")
        assert cfg.node_host == "127.0.0.1"
        if cfg.role == config.WORKER:
            assert cfg.num_all_worker == 6
    assert set(expected) <= seen


# -- missing variables ----------------------------------------------------------------------------

MISSING = [(name, var) for name, (_, required) in ENVS.items() for var in required]


@pytest.mark.unit
@pytest.mark.parametrize("name,var", MISSING, ids=[f"{n}-{v}" for n, v in MISSING])
@pytest.mark.parametrize("how", ["absent", "empty"])
def test_missing_variable_named_with_role(name, var, how):
    msg = refused(env_for(name, **{var: None if how == "absent" else "   "}))
    role = ROLE_OF.get(name, name)
    assert var in msg
    assert "required" in msg
    assert f"role: {role}" in msg


@pytest.mark.unit
def test_missing_role():
    msg = refused(env_for("worker", DMLC_ROLE=None))
    assert "DMLC_ROLE" in msg and "DMLC_ROLE_GLOBAL" in msg


@pytest.mark.unit
@pytest.mark.parametrize("var,value", [("DMLC_ROLE", "trainer"), ("DMLC_ROLE_GLOBAL", "global_worker")])
def test_unknown_role(var, value):
    msg = refused(env_for("worker", **{var: value}))
    assert var in msg and repr(value) in msg


# -- bad values -----------------------------------------------------------------------------------

@pytest.mark.unit
@pytest.mark.parametrize("name,var,value,why", [
    ("worker", "DMLC_NUM_WORKER", "four", "must be an integer"),
    ("worker", "DMLC_NUM_WORKER", "0", "must be >= 1"),
    ("worker", "DMLC_NUM_WORKER", "2.5", "must be an integer"),
    ("worker", "DMLC_NUM_ALL_WORKER", "-3", "must be >= 1"),
    ("scheduler", "DMLC_NUM_SERVER", "x1", "must be an integer"),
    ("global_scheduler", "DMLC_NUM_GLOBAL_SERVER", "0", "must be >= 1"),
    ("global_scheduler", "DMLC_NUM_GLOBAL_WORKER", "many", "must be an integer"),
    ("server", "PS_VERBOSE", "loud", "must be an integer"),
    ("server", "GEOMX_MAX_MESSAGE_BYTES", "100", "must be >= 1024"),
    ("server", "MXNET_KVSTORE_BIGARRAY_BOUND", "0", "must be >= 1"),
    ("worker", "DMLC_PS_ROOT_PORT", "http", "must be an integer"),
    ("worker", "DMLC_PS_ROOT_PORT", "0", "must be >= 1"),
    ("worker", "DMLC_PS_ROOT_PORT", "65536", "must be a TCP port"),
    ("server", "DMLC_PS_GLOBAL_ROOT_PORT", "99999", "must be a TCP port"),
    ("global_scheduler", "DMLC_PS_GLOBAL_ROOT_PORT", "-1", "must be >= 1"),
    ("master_worker", "DMLC_ROLE_MASTER_WORKER", "maybe", "must be 0 or 1"),
    ("global_server", "DMLC_ENABLE_CENTRAL_WORKER", "2", "must be 0 or 1"),
    ("worker", "PS_HEARTBEAT_INTERVAL", "often", "must be a number"),
    ("worker", "PS_HEARTBEAT_INTERVAL", "0", "must be > 0"),
    ("worker", "PS_HEARTBEAT_TIMEOUT", "-5", "must be > 0"),
    ("scheduler", "GEOMX_START_TIMEOUT", "soon", "must be a number"),
    ("global_server", "GEOMX_CHECKPOINT_EVERY", "0", "must be >= 1"),
    ("global_server", "GEOMX_CHECKPOINT_EVERY", "often", "must be an integer"),
    ("global_server", "GEOMX_RESTART_TIMEOUT", "0", "must be > 0"),
    ("global_server", "GEOMX_CHECKPOINT_RESTORE", "/nonexistent/global_server0.npz", "is not a file"),
    ("global_scheduler", "GEOMX_WAN_OUTAGE_WINDOW", "-1", "must be in [0, 604800]"),
    ("server", "GEOMX_WAN_OUTAGE_WINDOW", "long", "must be a number in [0, 604800]"),
    ("global_server", "GEOMX_GLOBAL_SERVER_RANK", "2", "must be < DMLC_NUM_GLOBAL_SERVER (2)"),
    ("global_server", "GEOMX_LOST_PARTY", "maybe", 'must be one of stop, continue, rejoin'),
])
def test_bad_value_named(name, var, value, why):
    msg = refused(env_for(name, **{var: value}))
    assert var in msg and why in msg
    assert f"role: {ROLE_OF.get(name, name)}" in msg
    assert repr(value) in msg or value in msg


@pytest.mark.unit
def test_port_bounds_accepted():
    assert config.load(env_for("worker", DMLC_PS_ROOT_PORT="1")).root_port == 1
    assert config.load(env_for("worker", DMLC_PS_ROOT_PORT="65535")).root_port == 65535


# -- inconsistent combinations --------------------------------------------------------------------

@pytest.mark.unit
@pytest.mark.parametrize("n", ["2", "3"])
def test_several_servers_per_party_are_accepted(n):
    # A party may have several local servers (the original refused it); its scheduler and workers
    # carry the same count.
    for role in ("server", "scheduler", "worker"):
        assert config.load(env_for(role, DMLC_NUM_SERVER=n)).num_server == int(n)


@pytest.mark.unit
def test_global_server_counts_must_agree():
    msg = refused(env_for("global_server", DMLC_NUM_SERVER="1"))
    assert "DMLC_NUM_SERVER" in msg and "DMLC_NUM_GLOBAL_SERVER" in msg


@pytest.mark.unit
@pytest.mark.parametrize("role", [None, "worker", "scheduler", "bogus"])
def test_global_server_requires_server_role(role):
    msg = refused(env_for("global_server", DMLC_ROLE=role))
    assert "DMLC_ROLE" in msg and "global_server" in msg


@pytest.mark.unit
@pytest.mark.parametrize("name", ["global_scheduler", "global_server", "scheduler", "server"])
def test_master_worker_flag_only_on_workers(name):
    msg = refused(env_for(name, DMLC_ROLE_MASTER_WORKER="1"))
    assert "DMLC_ROLE_MASTER_WORKER" in msg
    assert f"role: {name}" in msg
    # Set to 0 it is harmless.
    assert not config.load(env_for(name, DMLC_ROLE_MASTER_WORKER="0")).is_master_worker


@pytest.mark.unit
@pytest.mark.parametrize("interval,timeout,ok", [
    ("1", "2", False),        # equal to twice the interval
    ("1", "1.5", False),
    ("0.5", "1", False),
    ("10", None, False),      # the default timeout (20) is not more than 2 x 10
    ("1", "2.01", True),
    ("0.5", "3", True),
    (None, "2.5", True),      # default interval 1
    (None, "2", False),
])
def test_heartbeat_timeout_must_exceed_twice_interval(interval, timeout, ok):
    env = env_for("worker", PS_HEARTBEAT_INTERVAL=interval, PS_HEARTBEAT_TIMEOUT=timeout)
    if ok:
        cfg = config.load(env)
        assert cfg.heartbeat_timeout > 2 * cfg.heartbeat_interval
    else:
        msg = refused(env)
        assert "PS_HEARTBEAT_TIMEOUT" in msg and "PS_HEARTBEAT_INTERVAL" in msg and "role: worker" in msg


@pytest.mark.unit
def test_load_reads_os_environ(monkeypatch):
    # A nested context so that the role variables are gone again before the test ends.
    with monkeypatch.context() as m:
        for k in list(os.environ):
            if k.startswith(("DMLC_", "PS_", "GEOMX_")):
                m.delenv(k)
        for k, v in env_for("scheduler").items():
            m.setenv(k, v)
        assert config.load().role == config.SCHEDULER
        m.delenv("DMLC_NUM_WORKER")
        with pytest.raises(ConfigError, match="DMLC_NUM_WORKER"):
            config.load()


# -- through the real entry point -----------------------------------------------------------------

def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DMLC_", "PS_", "GEOMX_"))}
    env.update(extra)
    return env


@pytest.mark.system
@pytest.mark.parametrize("name,missing", [("scheduler", "DMLC_NUM_WORKER"), ("server", "DMLC_PS_GLOBAL_ROOT_PORT"),
                                          ("global_server", "DMLC_NUM_ALL_WORKER")])
def test_node_exits_2_naming_missing_variable(name, missing):
    env = _clean_env(**env_for(name, **{missing: None}))
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "geomx.node"], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 2, proc.stderr
    assert missing in proc.stderr
    assert "configuration error" in proc.stderr
    assert elapsed < 20, f"geomx.node took {elapsed:.1f}s to refuse a bad configuration"


@pytest.mark.system
def test_node_exits_2_on_bad_heartbeat_and_worker_role():
    env = _clean_env(**env_for("scheduler", PS_HEARTBEAT_INTERVAL="5", PS_HEARTBEAT_TIMEOUT="6"))
    proc = subprocess.run([sys.executable, "-m", "geomx.node"], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "PS_HEARTBEAT_TIMEOUT" in proc.stderr
    # A worker environment is valid, but workers run the training script, not geomx.node.
    proc = subprocess.run([sys.executable, "-m", "geomx.node"], env=_clean_env(**env_for("worker")), cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "DMLC_ROLE=worker" in proc.stderr


@pytest.mark.unit
def test_listen_fd(tmp_path):
    import socket

    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen(1)
    port = listening.getsockname()[1]
    bound_only = socket.socket()
    bound_only.bind(("127.0.0.1", 0))
    with listening, bound_only, open(tmp_path / "f", "w") as plain:
        cfg = config.load(env_for("scheduler", DMLC_PS_ROOT_PORT=str(port), GEOMX_LISTEN_FD=str(listening.fileno())))
        assert cfg.listen_fd == listening.fileno()
        cfg = config.load(env_for("global_scheduler", DMLC_PS_GLOBAL_ROOT_PORT=str(port),
                                  GEOMX_LISTEN_FD=str(listening.fileno())))
        assert cfg.listen_fd == listening.fileno()
        assert config.load(env_for("server", GEOMX_LISTEN_FD=str(listening.fileno()))).listen_fd is None
        msg = refused(env_for("scheduler", GEOMX_LISTEN_FD=str(listening.fileno())))
        assert f"GEOMX_LISTEN_FD ({listening.fileno()}) listens on port {port}, not on DMLC_PS_ROOT_PORT=9093" in msg
        assert "role: scheduler" in msg
        assert "is not a socket" in refused(env_for("scheduler", GEOMX_LISTEN_FD=str(plain.fileno())))
        assert "is not a listening TCP socket" in refused(
            env_for("scheduler", GEOMX_LISTEN_FD=str(bound_only.fileno())))
        assert "is not an open file descriptor" in refused(env_for("scheduler", GEOMX_LISTEN_FD="999"))
        assert "must be an integer" in refused(env_for("scheduler", GEOMX_LISTEN_FD="x"))


@pytest.mark.unit
def test_bind_host_and_fixed_ports():
    cfg = config.load(env_for("server"))
    assert (cfg.bind_host, cfg.server_port, cfg.central_port, cfg.ts_port, cfg.dgt_udp_port) == (None, 0, 0, 0, 0)
    cfg = config.load(env_for("global_server", GEOMX_BIND_HOST="0.0.0.0", GEOMX_SERVER_PORT="9100",
                              GEOMX_CENTRAL_PORT="9101", GEOMX_DGT_UDP_PORT="9100"))
    assert (cfg.bind_host, cfg.server_port, cfg.central_port, cfg.dgt_udp_port) == ("*", 9100, 9101, 9100)
    assert cfg.bind_address("10.0.0.1", 9092) == "*"
    assert config.load(env_for("server", GEOMX_BIND_HOST="10.1.0.2")).bind_address("10.0.0.1", 1) == "10.1.0.2"
    msg = refused(env_for("server", GEOMX_BIND_HOST="myhost"))
    assert "GEOMX_BIND_HOST must be an IPv4 address of this machine, or * / 0.0.0.0" in msg
    assert "role: server" in msg
    msg = refused(env_for("server", GEOMX_TS_PORT="70000"))
    assert "GEOMX_TS_PORT must be a TCP port (1-65535), got 70000" in msg
    msg = refused(env_for("global_server", GEOMX_SERVER_PORT="9100", GEOMX_CENTRAL_PORT="9100"))
    assert "GEOMX_CENTRAL_PORT and GEOMX_SERVER_PORT are both 9100" in msg


@pytest.mark.unit
def test_bind_address_is_the_advertised_one_and_must_be_local():
    cfg = config.load(env_for("server", DMLC_NODE_HOST="127.0.0.1"))
    assert cfg.bind_address("10.0.1.1", 9093) == "127.0.0.1"
    # Behind NAT the advertised address is not this machine's: binding it would fail, and binding every
    # interface is not done silently.
    cfg = config.load(env_for("server", DMLC_NODE_HOST="192.0.2.77"))
    with pytest.raises(ConfigError) as info:
        cfg.bind_address("10.0.1.1", 9093)
    assert "GEOMX_BIND_HOST is not set and DMLC_NODE_HOST=192.0.2.77 is not an address of this machine" in \
        str(info.value)
    assert config.load(env_for("scheduler", DMLC_PS_ROOT_URI="localhost")).scheduler_bind_address() == "127.0.0.1"
    with pytest.raises(ConfigError, match="DMLC_PS_GLOBAL_ROOT_URI=10.0.0.1 is not an address"):
        config.load(env_for("global_scheduler")).scheduler_bind_address()
    assert config.load(env_for("global_scheduler", GEOMX_BIND_HOST="*")).scheduler_bind_address() == "*"


@pytest.mark.unit
def test_refused_combinations_table_matches_the_docs_and_each_rule_refuses():
    """docs/Configurations.md lists exactly config.REFUSED_COMBINATIONS, and every row refuses a
    global server (the role that reads every switch) that has both on, naming both."""
    import re

    text = (Path(__file__).resolve().parents[1] / "docs" / "Configurations.md").read_text()
    section = text[text.index("### Combinations refused at start-up"):text.index("## 2. Not yet implemented")]
    documented = set(re.findall(r"^\| `(\w+)` \| `(\w+)` \|", section, re.M))
    assert documented == {(r.first, r.second) for r in config.REFUSED_COMBINATIONS}
    switches = config._switches
    off = {"hfa": config.HFAConfig(), "esync": config.ESyncConfig(), "p3": config.P3Config(),
           "tsengine": config.TSEngineConfig(), "dgt": config.DGTConfig(), "checkpoint": config.CheckpointConfig()}
    on = {"MXNET_KVSTORE_USE_HFA": ("hfa", {"enabled": True}), "GEOMX_USE_ESYNC": ("esync", {"enabled": True}),
          "ENABLE_P3": ("p3", {"enabled": True}), "ENABLE_INTER_TS": ("tsengine", {"inter": True}),
          "ENABLE_INTRA_TS": ("tsengine", {"intra": True}), "ENABLE_DGT": ("dgt", {"mode": 1}),
          "GEOMX_CHECKPOINT_DIR": ("checkpoint", {"dir": "/tmp"}),
          "GEOMX_CHECKPOINT_RESTORE": ("checkpoint", {"restore": "/tmp/x.npz"})}
    for rule in config.REFUSED_COMBINATIONS:
        kw = dict(off)
        curve = False
        for name in (rule.first, rule.second):
            if name == "GEOMX_CURVE_SECRET_KEY":
                curve = True
            else:
                part, values = on[name]
                kw[part] = dataclasses.replace(kw[part], **values)
        assert switches(kw, curve)[rule.first] and switches(kw, curve)[rule.second]
        with pytest.raises(ConfigError, match=f"{rule.first} cannot be combined with {rule.second}: "):
            config._refuse_combinations(kw, curve, "global server")


@pytest.mark.unit
@pytest.mark.parametrize("value, needle", [
    ("10.0.0.2:9094=1,10.0.0.3:9094", "must be HOST:PORT=N,..."),
    ("10.0.0.2=2", "must be HOST:PORT=N,..."),
    ("10.0.0.2:9094=0,10.0.0.3:9094=2", "must be HOST:PORT=N,..."),
    ("10.0.0.2:9094=1,10.0.0.2:9094=1", "names the party 10.0.0.2:9094 twice"),
    ("10.0.0.2:9094=1,10.0.0.3:9094=2", "adds up to 3 local servers, DMLC_NUM_GLOBAL_WORKER is 2"),
])
def test_party_servers_are_checked_naming_the_variable(value, needle):
    env = {"DMLC_ROLE_GLOBAL": "global_scheduler", "DMLC_PS_GLOBAL_ROOT_URI": "127.0.0.1",
           "DMLC_PS_GLOBAL_ROOT_PORT": "9092", "DMLC_NUM_GLOBAL_SERVER": "1", "DMLC_NUM_GLOBAL_WORKER": "2"}
    assert config.load(dict(env, GEOMX_PARTY_SERVERS="10.0.0.2:9094=1, 10.0.0.3:9094=1")).party_servers == (
        ("10.0.0.2:9094", 1), ("10.0.0.3:9094", 1))
    assert config.load(env).party_servers is None
    with pytest.raises(ConfigError, match=re.escape(needle)) as err:
        config.load(dict(env, GEOMX_PARTY_SERVERS=value))
    assert "GEOMX_PARTY_SERVERS" in str(err.value)


@pytest.mark.unit
@pytest.mark.parametrize("switch", ["MXNET_KVSTORE_USE_HFA", "GEOMX_USE_ESYNC"])
def test_continuing_without_a_lost_party_is_refused_where_averages_need_every_party(switch):
    msg = refused(env_for("global_server", GEOMX_LOST_PARTY="continue", **{switch: "1"}))
    assert f"GEOMX_LOST_PARTY=continue works with FSA and MixedSync only, not with {switch}" in msg
    config.load(env_for("global_server", GEOMX_LOST_PARTY="continue"))  # FSA: taken


@pytest.mark.unit
def test_worker_place_and_sync_mode_for_the_torch_front_end():
    cfg = config.load(env_for("worker", GEOMX_DATA_SLICE="3", GEOMX_PARTY="party1", GEOMX_SYNC_MODE="Async"))
    assert (cfg.data_slice, cfg.party, cfg.sync_mode) == (3, "party1", "async")
    cfg = config.load(env_for("worker"))
    assert (cfg.data_slice, cfg.party, cfg.sync_mode) == (None, None, "sync")
    assert "GEOMX_SYNC_MODE must be sync (FSA) or async (MixedSync)" in refused(env_for("worker", GEOMX_SYNC_MODE="x"))
