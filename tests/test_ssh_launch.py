"""``geomx-launch --topology FILE -- COMMAND`` over SSH: three network namespaces of the emulated WAN
(tc rate caps and, with nft, 10 ms of added one-way delay) as hosts, each running Debian's OpenSSH
server (``openssh-server``) with a throwaway host key and authorized key; the launcher runs inside the
central namespace and reaches every host by its address. One set of namespaces and sshd processes
serves the whole module."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import INIT_BYTES, PUSH_BYTES, REPO, kill_group

from geomx.testing import wan

SSHD = "/usr/sbin/sshd"

pytestmark = [pytest.mark.system, pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists(SSHD) or shutil.which("ssh") is None or shutil.which("tc") is None,
    reason="needs root, ip/tc, the OpenSSH client and Debian's openssh-server (/usr/sbin/sshd)")]


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class Hosts:
    def __init__(self, w: wan.Wan, directory: Path, sshd: dict):
        self.wan = w
        self.dir = directory
        self.sshd = sshd  # dc -> Popen

    def netns_inodes(self):
        return {os.stat(f"/run/netns/{self.wan.namespace(dc)}").st_ino for dc in self.wan.dcs}

    def leftovers(self):
        """Processes inside the hosts' namespaces other than their sshd listeners and the WAN's
        delaying relays."""
        inodes = self.netns_inodes()
        keep = {p.pid for p in self.sshd.values()} | set(self.wan.relay_pids)
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) in keep:
                continue
            try:
                ns = os.readlink(f"/proc/{entry}/ns/net")
                with open(f"/proc/{entry}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            except (OSError, IndexError):  # gone, or not ours to look at
                continue
            # sshd's own processes (listeners, sessions closing) are the hosts', not the topology's.
            if state != "Z" and int(re.search(r"\d+", ns).group()) in inodes and not cmd.startswith(("sshd", SSHD)):
                found.append((int(entry), cmd))
        # A process whose command line reads empty is in its exit (its memory is gone already; seen once
        # right after an SSH session closed): it gets a few seconds to end before it counts.
        deadline = time.monotonic() + 10
        while any(not cmd for _, cmd in found) and time.monotonic() < deadline:
            time.sleep(0.05)
            found = [(pid, cmd) for pid, cmd in found if cmd or _running(pid)]
        return found

    def topology(self, name: str, workers: int = 1, security: str = "", top: str = "") -> Path:
        a = {dc: self.wan.address(dc) for dc in self.wan.dcs}
        text = top + (f'security = "{security}"\n' if security else "")
        text += (f'python = "{sys.executable}"\nworkdir = "{REPO}"\n[env]\nPS_HEARTBEAT_TIMEOUT = 6\n'
                 f'PS_HEARTBEAT_INTERVAL = 1\n[central]\nhost = "root@{a["central"]}"\n')
        for p in ("party0", "party1"):
            text += f'[[party]]\nname = "{p}"\nhost = "root@{a[p]}"\nworkers = {workers}\n'
        path = self.dir / name
        path.write_text(text)
        return path

    def launch(self, topology: Path, *worker_args: str, timeout: float = 150) -> subprocess.Popen:
        argv = self.wan.exec_argv("central") + [
            sys.executable, "-m", "geomx.launch", "--topology", str(topology), "--ssh-config",
            str(self.dir / "ssh_config"), "--timeout", str(timeout), "--",
            "{python}", "tests/workers/exact_worker.py", "--slice", "{slice}", "--mode", "push-pull", *worker_args]
        return subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ssh")
    # A rate cap on every site's link and, where nft exists for the delaying relay (.ci/run installs
    # nftables), 10 ms one way between sites: SSH, the launcher's control traffic and training all
    # cross a WAN with latency.
    spec = "100mbit" + (",delay=10" if shutil.which("nft") else "")
    w = wan.Wan.create(["central", "party0", "party1"], wan.parse_spec(spec, parties=2))
    sshd = {}
    try:
        for key in ("hostkey", "id"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(directory / key)], check=True)
        (directory / "authorized_keys").write_text((directory / "id.pub").read_text())
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege-separation directory
        host_key = " ".join((directory / "hostkey.pub").read_text().split()[:2])
        known = []
        for dc in w.dcs:
            addr = w.address(dc)
            cfg = directory / f"sshd-{dc}.conf"
            cfg.write_text(f"ListenAddress {addr}\nHostKey {directory}/hostkey\n"
                           f"AuthorizedKeysFile {directory}/authorized_keys\nPermitRootLogin prohibit-password\n"
                           f"StrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                           f"PidFile {directory}/sshd-{dc}.pid\nLogLevel ERROR\nMaxSessions 50\nMaxStartups 50\n")
            sshd[dc] = subprocess.Popen(w.exec_argv(dc) + [SSHD, "-D", "-e", "-f", str(cfg)])
            known.append(f"{addr} {host_key}")
        (directory / "known_hosts").write_text("\n".join(known) + "\n")
        (directory / "ssh_config").write_text(
            f"Host *\n  IdentityFile {directory}/id\n  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {directory}/known_hosts\n"
            "  StrictHostKeyChecking yes\n  ConnectTimeout 10\n")
        # Each sshd is up once a client gets through (it listens after reading its keys).
        for dc in w.dcs:
            deadline = time.monotonic() + 20
            while subprocess.run(w.exec_argv("central") + ["ssh", "-F", str(directory / "ssh_config"), "-o",
                                 "BatchMode=yes", f"root@{w.address(dc)}", "true"], capture_output=True).returncode:
                assert time.monotonic() < deadline, f"sshd in {dc} does not answer"
                time.sleep(0.2)
        yield Hosts(w, directory, sshd)
    finally:
        for p in sshd.values():
            p.terminate()
            p.wait(timeout=10)
        w.close()


def _collect(proc: subprocess.Popen, lines: list) -> threading.Thread:
    t = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    t.start()
    return t


# INIT_BYTES and PUSH_BYTES (helpers.py) cross the WAN in clear (as in tests/test_security.py): the
# initial value of key 2 of tests/workers/exact_worker.py (global server -> parties) and a party's
# round-0 push of it.


@pytest.mark.parametrize("security", ["", "none"], ids=["default-curve", "clear"])
def test_fsa_over_ssh_reaches_the_exact_oracle(hosts, tmp_path, security):
    # Everything the central data center sends and receives is captured on its side of the WAN.
    capture = subprocess.Popen(hosts.wan.exec_argv("central") + [
        sys.executable, str(REPO / "tests" / "workers" / "wan_capture.py"), str(tmp_path / "capture.json"),
        INIT_BYTES.hex(), PUSH_BYTES.hex()], stdout=subprocess.PIPE, text=True)
    try:
        assert capture.stdout.readline() == "READY\n"
        proc = hosts.launch(hosts.topology(f"fsa-{security}.toml", security=security), "--rounds", "3")
        lines: list = []
        reader = _collect(proc, lines)
        try:
            rc = proc.wait(timeout=240)
        finally:
            kill_group(proc)
        reader.join(5)
    finally:
        capture.terminate()
        capture.wait(timeout=15)
    captured = json.loads((tmp_path / "capture.json").read_text())
    text = "".join(lines)
    assert rc == 0, text[-5000:]
    ok = [line for line in lines if "EXACT OK" in line]
    assert sorted(line.split("]")[0] + "]" for line in ok) == ["[party0/worker0]", "[party1/worker0]"], text[-5000:]
    assert "MISMATCH" not in text
    # One connection per host; the processes ran on their hosts (each advertises its namespace's address).
    assert "over SSH on root@10.77." in text
    assert "[party1/server]" in text
    assert hosts.leftovers() == []
    # Both parties' initial values and pushes crossed the WAN (1.2 MB each of key 2): in clear they are
    # there to read; by default (several hosts) the links run CURVE with keys made on each host.
    assert captured["bytes"] > 4 * 1_200_000, captured
    if security == "none":
        assert captured["found"] == [True, True]
        assert "INSECURE" in text and "CURVE is off" in text
    else:
        assert captured["found"] == [False, False]
        assert "CURVE (keys generated on each site's host)" in text and "CURVE is off" not in text
        keys = re.search(r"CURVE keys of this run: (/tmp/geomx-keys-[0-9a-f]+) on every host", text).group(1)
        assert not os.path.exists(keys), "the run's key directory was not removed"


def test_a_remote_worker_killed_mid_run_stops_every_host(hosts):
    proc = hosts.launch(hosts.topology("kill.toml"), "--rounds", "200", "--sleep", "0.2")
    lines: list = []
    reader = _collect(proc, lines)
    try:
        deadline = time.monotonic() + 180
        pid = None
        while time.monotonic() < deadline and proc.poll() is None:
            text = "".join(lines)
            m = re.search(r"^\[party1/worker0\] PID (\d+)$", text, flags=re.M)
            if m and "[party1/worker0] ROUND 1 OK" in text:
                pid = int(m.group(1))
                break
            time.sleep(0.05)
        assert pid is not None, "".join(lines)[-5000:]
        os.kill(pid, signal.SIGKILL)  # the namespaces share the PID namespace with the test
        rc = proc.wait(timeout=60)
    finally:
        kill_group(proc)
    reader.join(5)
    text = "".join(lines)
    assert rc == 128 + signal.SIGKILL, text[-5000:]
    assert "party1/worker0 exited with code 137 (killed by SIGKILL)" in text or \
        "party1/worker0 exited with code 137; stopping the topology" in text, text[-5000:]
    # Nothing is left on any host (the stop waits for the hosts to stop their process groups).
    assert hosts.leftovers() == []


# (seconds down, connections reset during it): one topology rides out all three in turn.
OUTAGES = ((10.0, False), (60.0, True), (300.0, False))


def test_a_party_rides_out_wan_outages_of_10s_60s_and_5min_with_the_exact_result(hosts):
    """party1's only link goes down three times mid-run, each time for longer than PS_HEARTBEAT_TIMEOUT
    (6 s) but inside the topology's outage window (420 s): 10 s, then 60 s with every TCP connection
    between party1 and the central site aborted on both ends during it (``ss -K``; neither end's reset
    reaches the other, so what was in flight is lost and both ends hold dead ones), then 5 minutes.
    Every process waits and says so, training resumes within seconds of each return (new connections,
    however far TCP's own retransmissions have backed off), and the run finishes with the exact sums
    after every round: no push lost or counted twice."""
    proc = hosts.launch(hosts.topology("outages.toml", top="outage_window = 420\n"),
                        "--rounds", "40", "--sleep", "0.1", timeout=900)
    lines: list = []
    reader = _collect(proc, lines)

    def rounds() -> int:
        return len([x for x in lines if "[party1/worker0] ROUND" in x])

    resumed = []
    try:
        for outage, reset in OUTAGES:
            deadline, wanted = time.monotonic() + 180, rounds() + 3
            while rounds() < wanted:  # training is under way
                assert time.monotonic() < deadline and proc.poll() is None, "".join(lines)[-5000:]
                time.sleep(0.05)
            hosts.wan.set_link("party1", up=False)
            down_at = time.monotonic()
            try:
                if reset:
                    time.sleep(outage / 3)  # the outage is under way: requests are in flight, unanswered
                    hosts.wan.reset_connections("party1", "central", keep_port=22)  # 22: the launcher's SSH
                    hosts.wan.reset_connections("central", "party1", keep_port=22)
                time.sleep(max(0.0, outage - (time.monotonic() - down_at)))
            finally:
                hosts.wan.set_link("party1", up=True)
            up_at, before = time.monotonic(), rounds()
            while rounds() == before:
                assert time.monotonic() < up_at + 60 and proc.poll() is None, "".join(lines)[-6000:]
                time.sleep(0.05)
            resumed.append(time.monotonic() - up_at)
        rc = proc.wait(timeout=300)
    finally:
        hosts.wan.set_link("party1", up=True)
        kill_group(proc)
    reader.join(5)
    text = "".join(lines)
    assert rc == 0, text[-6000:]
    assert "MISMATCH" not in text and "presumed dead" not in text, text[-6000:]
    ok = sorted(line.split("]")[0] + "]" for line in lines if "EXACT OK" in line)
    assert ok == ["[party0/worker0]", "[party1/worker0]"], text[-6000:]
    # Both ends said what they waited for, and the party's links were made anew after each outage.
    assert re.search(r"\[global_scheduler\].*silent for \d+s: taken for a WAN outage", text), text[-6000:]
    assert re.search(r"\[party1/server\].*taken for a WAN outage", text), text[-6000:]
    assert len(re.findall(r"\[party1/server\].*the WAN link was out for \d+s; reconnected", text)) == len(OUTAGES)
    # The longest outage was waited out and said so again every 30 s.
    assert re.search(r"\[global_scheduler\].*silent for (2[4-9]\d|3\d\d)s: taken for a WAN outage", text)
    # Training resumed by itself within seconds of each return.
    assert all(r < 15 for r in resumed), (resumed, text[-6000:])
    # The reset connections were noticed at once and made anew, with what they had not answered.
    resent = r"\[party1/server\].*: its connection ended; reconnected and sent [1-9]\d* unanswered"
    assert re.search(resent, text), text[-6000:]
    print("resumed " + ", ".join(f"{r:.1f}s after {o:g}s" for r, (o, _) in zip(resumed, OUTAGES)))
    # The launcher's SSH connection to party1 crossed the outages too: TCP still backs off on it, so its
    # end may reach party1's sshd only at the next retransmission (TCP_RTO_MAX is 120 s).
    deadline = time.monotonic() + 130
    while hosts.leftovers() and time.monotonic() < deadline:
        time.sleep(1)  # the kernel's timer, not an event this test can wait on
    assert hosts.leftovers() == []


def test_an_unreachable_host_starts_nothing(hosts, tmp_path):
    path = hosts.topology("bad.toml")
    path.write_text(path.read_text().replace(f'root@{hosts.wan.address("party1")}', "root@10.77.0.250"))
    proc = hosts.launch(path, "--rounds", "1", timeout=60)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 255, out
    assert "cannot reach host root@10.77.0.250 over SSH" in out and "nothing was started" in out
    assert hosts.leftovers() == []


def test_ctrl_c_stops_every_host(hosts):
    proc = hosts.launch(hosts.topology("ctrl-c.toml"), "--rounds", "200", "--sleep", "0.2")
    lines: list = []
    reader = _collect(proc, lines)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None and \
                not all(f"[party{p}/worker0] ROUND 1 OK" in "".join(lines) for p in (0, 1)):
            time.sleep(0.05)
        assert proc.poll() is None, "".join(lines)[-5000:]
        proc.send_signal(signal.SIGINT)  # `ip netns exec` execs the launcher: this is its pid
        rc = proc.wait(timeout=60)
    finally:
        kill_group(proc)
    reader.join(5)
    text = "".join(lines)
    assert rc == 130, text[-5000:]
    assert "launcher received SIGINT; stopping the topology" in text
    assert hosts.leftovers() == []


def test_three_sites_started_separately_on_their_hosts(hosts, tmp_path):
    # The --site mode: each data center's operator starts its own site on its own host, with CURVE
    # keys made beforehand (keys_dir: every host here shares one file system).
    from geomx import security as keys

    keys.generate_topology_keys(str(tmp_path / "keys"), ["central", "party0", "party1"])
    path = hosts.topology("sites.toml")
    path.write_text(f'keys_dir = "{tmp_path / "keys"}"\n' + path.read_text())
    procs = {}
    for site in ("party0", "party1", "central"):
        procs[site] = subprocess.Popen(
            hosts.wan.exec_argv(site) + [sys.executable, "-m", "geomx.launch", "--topology", str(path), "--site", site,
                                         "--timeout", "150", "--", "{python}", "tests/workers/exact_worker.py",
                                         "--slice", "{slice}", "--rounds", "3", "--mode", "push-pull"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    out = {}
    try:
        for site, p in procs.items():
            out[site] = p.communicate(timeout=240)[0]
    finally:
        for p in procs.values():
            kill_group(p)
    assert {s: p.returncode for s, p in procs.items()} == {"party0": 0, "party1": 0, "central": 0}, \
        {s: o[-3000:] for s, o in out.items()}
    for site in ("party0", "party1"):
        assert len(re.findall(rf"^\[{site}/worker0\] .*EXACT OK", out[site], re.M)) == 1, out[site][-3000:]
    assert not any("MISMATCH" in o or "CURVE is off" in o for o in out.values())
    assert hosts.leftovers() == []


def test_a_launcher_killed_outright_leaves_nothing_behind(hosts):
    # SIGKILL gives the launcher no chance to stop anything: its pipes close with it, which ends every SSH
    # session's input (each host stops its process group) and the master connections' sessions.
    proc = hosts.launch(hosts.topology("sigkill.toml"), "--rounds", "200", "--sleep", "0.2")
    lines: list = []
    reader = _collect(proc, lines)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None and \
                "[party1/worker0] ROUND 1 OK" not in "".join(lines):
            time.sleep(0.05)
        assert proc.poll() is None, "".join(lines)[-5000:]
        assert any("ssh" in cmd for _, cmd in hosts.leftovers())  # the launcher's SSH clients, before
        proc.kill()
        proc.wait(timeout=30)
    finally:
        kill_group(proc)
    reader.join(5)
    # Within the hosts' SIGTERM-to-SIGKILL delay (geomx/launch/remote.py) and a heartbeat or two.
    deadline = time.monotonic() + 30
    while hosts.leftovers() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert hosts.leftovers() == []
    # The run's key directory is what a killed launcher cannot remove (docs/Deployment.md): the test does.
    keys = re.search(r"CURVE keys of this run: (/tmp/geomx-keys-[0-9a-f]+)", "".join(lines))
    if keys:
        shutil.rmtree(keys.group(1), ignore_errors=True)
