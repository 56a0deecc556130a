"""An emulated WAN on one machine: one network namespace per data center, rate-capped links.

Layout (needs root; building it takes well under a second)::

      DC namespace "<prefix>-central"          router namespace "<prefix>-r"
      wan0 10.77.0.1/24  <--- veth --->  dc0 --+
      DC namespace "<prefix>-party0"           |
      wan0 10.77.0.2/24  <--- veth --->  dc1 --+-- br0 (bridge)
      DC namespace "<prefix>-party1"           |
      wan0 10.77.0.3/24  <--- veth --->  dc2 --+

Each data center (DC) reaches every other one only through its own access link (the veth pair). A link
with a rate gets a ``tbf`` qdisc on *both* ends: on ``wan0`` inside the DC (caps what the DC uploads)
and on ``dcN`` inside the router (caps what the DC downloads). Traffic between processes of the same
DC stays on that namespace's loopback and never touches the WAN counters.

The kernel's byte counters of ``dcN`` (read with ``ip -j -s link`` in the router namespace) are exactly
the bytes that crossed the WAN on that link: ``rx`` there is the DC's upload, ``tx`` its download.

Link specification (``--wan SPEC``), comma-separated items:

* ``RATE``                 every party's link (e.g. ``20mbit``); the central DC's link stays uncapped
* ``partyN=RATE``          one party's link (heterogeneous links: ``party0=100mbit,party1=10mbit``)
* ``central=RATE``         the central DC's link (uncapped unless given)
* ``all=RATE``             every link, the central one included
* ``gsN=RATE``             global server N's own link, when each global server has its own data center
  (``geomx-launch --separate-global-servers``: as with one machine per global server); by default
  the central rate
* ``delay=MS``             added one-way latency between data centers (needs ``nft``, package nftables).
  The kernel here has no ``netem``, so latency comes from a user-space relay: in every DC namespace an
  nft ``redirect`` sends each outgoing TCP connection to another DC to a local relay
  (``python -m geomx.testing.wan relay``), which looks up the original destination (``SO_ORIGINAL_DST``),
  connects to it and forwards every chunk in both directions ``MS`` ms after it arrived (connection
  set-up is delayed by ``MS`` too). A connection thus sees ``MS`` one way and ``2*MS`` round trip.
  This models message latency; it does not model TCP window dynamics over a long path (the relay
  acknowledges locally and buffers up to 8 MB per direction).

``RATE`` is a number with a unit as ``tc`` writes them: ``bit``, ``kbit``, ``mbit``, ``gbit`` (decimal,
bits per second), ``bps``/``kbps``/``mbps``/``gbps`` (bytes per second), or ``none``/``inf`` (uncapped).

Usage::

    with Wan.create(["central", "party0", "party1"], parse_spec("20mbit", parties=2)) as wan:
        subprocess.run(wan.exec_argv("party0") + ["python", "train.py"],
                       env=dict(os.environ, DMLC_NODE_HOST=wan.address("party0")))
        print(wan.counters())

Teardown (``Wan.close``: kill every process left in the namespaces, delete them; the veth pairs and
qdiscs go with them) runs when the ``with`` block ends, on an exception, on SIGTERM/SIGINT while the
WAN exists, and at interpreter exit (``atexit``). ``cleanup_stale()`` removes leftovers of a
killed (SIGKILL) run by prefix.

The specification and the byte accounting are in :mod:`geomx.testing.links` (re-exported here),
the processes run inside the namespaces in :mod:`geomx.testing.relay`. This module must stay free of
MXNet imports (the launcher imports it for ``--wan``).
"""
from __future__ import annotations

import atexit
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from typing import Dict, Iterable, List, Optional, Sequence

from . import relay
from .links import (
    LinkCounters,
    WanError,
    WanSpec,
    busy_fractions,
    counter_delta,
    dc_names,
    format_rate,
    format_report,
    link_times,
    lower_bound,
    parse_link_counters,
    parse_proc_net_dev,
    parse_rate,
    parse_spec,
    timeline,
)

__all__ = [
    "WanError",
    "WanSpec",
    "LinkCounters",
    "Wan",
    "parse_rate",
    "format_rate",
    "parse_spec",
    "parse_link_counters",
    "counter_delta",
    "link_times",
    "lower_bound",
    "format_report",
    "cleanup_stale",
    "require_root",
    "NAME_PREFIX",
    "busy_fractions",
    "dc_names",
    "parse_proc_net_dev",
    "timeline",
]

#: Every namespace this module creates starts with this (plus the creating process's id).
NAME_PREFIX = "gmxwan"
#: Default address block; namespaces are private, so it never clashes with the host's networks.
DEFAULT_SUBNET = "10.77.0.0/24"
#: Interface name of the access link inside every DC namespace.
DC_IFACE = "wan0"
BRIDGE = "br0"
#: Port of the delaying relay inside every DC namespace, and the socket mark of its own connections.
RELAY_PORT = 7077
RELAY_MARK = 0x4757


# --------------------------------------------------------------------------------------------------
# Building and tearing down
# --------------------------------------------------------------------------------------------------

def require_root() -> None:
    """Raise :class:`WanError` with a clear message unless running as root with ``ip`` and ``tc``."""
    if os.geteuid() != 0:
        raise WanError(
            "the emulated WAN needs root (it creates network namespaces, veth links and tc qdiscs); "
            "run as root (e.g. sudo) or leave out --wan")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise WanError(f"the emulated WAN needs the `{tool}` command (package iproute2)")


def _run(argv: Sequence[str], check: bool = True, timeout: float = 20.0) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise WanError(f"`{' '.join(argv)}` failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return proc


def _tbf_args(rate_bits: float) -> List[str]:
    # burst must hold at least one timer tick of traffic; 64 KiB is plenty below ~100 Mbit/s.
    burst = max(64 * 1024, int(rate_bits / 8 / 100))
    return ["tbf", "rate", f"{int(rate_bits)}bit", "burst", str(burst), "latency", "200ms"]


def _netns_list() -> List[str]:
    proc = _run(["ip", "-j", "netns", "list"], check=False)
    try:
        return [e["name"] for e in json.loads(proc.stdout or "[]")]
    except (json.JSONDecodeError, KeyError, TypeError):
        return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def _kill_netns_processes(ns: str, timeout: float = 3.0) -> None:
    """SIGTERM, then SIGKILL, every process living in namespace ``ns``."""
    def pids() -> List[int]:
        proc = _run(["ip", "netns", "pids", ns], check=False)
        return [int(x) for x in proc.stdout.split() if x.strip().isdigit() and int(x) != os.getpid()]

    def send(signum: int, targets: List[int]) -> None:
        for pid in targets:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    found = pids()
    send(signal.SIGTERM, found)
    end = time.monotonic() + timeout
    while found and time.monotonic() < end:
        time.sleep(0.05)
        found = pids()
    send(signal.SIGKILL, found)


def _delete_netns(ns: str) -> None:
    _kill_netns_processes(ns)
    _run(["ip", "netns", "delete", ns], check=False)


def cleanup_stale(prefix: str = NAME_PREFIX) -> List[str]:
    """Delete every namespace whose name starts with ``prefix`` (leftovers of a SIGKILLed run)."""
    removed = []
    for ns in _netns_list():
        if ns.startswith(prefix):
            _delete_netns(ns)
            removed.append(ns)
    return removed


_SERIAL = 0  # WANs created by this process (distinct names for several in one process)
_ACTIVE: "set[Wan]" = set()
_ACTIVE_LOCK = threading.Lock()


def _atexit_teardown() -> None:
    with _ACTIVE_LOCK:
        wans = list(_ACTIVE)
    for w in wans:
        w.close()


atexit.register(_atexit_teardown)


class Wan:
    """A built emulated WAN. Create with :meth:`create`; use as a context manager."""

    def __init__(self, dcs: Sequence[str], spec: WanSpec, prefix: str, subnet: str):
        self.dcs = list(dcs)
        self.spec = spec
        self.prefix = prefix
        net = ipaddress.ip_network(subnet)
        hosts = list(net.hosts())
        if len(hosts) < len(self.dcs):
            raise WanError(f"subnet {subnet} too small for {len(self.dcs)} data centers")
        self.prefixlen = net.prefixlen
        self.addresses = {dc: str(hosts[i]) for i, dc in enumerate(self.dcs)}
        self.router = f"{prefix}-r"
        self.namespaces = {dc: f"{prefix}-{dc}"[:64] for dc in self.dcs}
        self.router_ifaces = {f"dc{i}": dc for i, dc in enumerate(self.dcs)}
        self._iface_of = {dc: f"dc{i}" for i, dc in enumerate(self.dcs)}
        self.closed = False
        self._created: List[str] = []
        self._prev_handlers: Dict[int, object] = {}
        self._baseline: Optional[Dict[str, LinkCounters]] = None
        self._relays: List[subprocess.Popen] = []
        self._sampler: Optional[tuple] = None  # (process, samples file) while sampling

    # ---- construction
    @classmethod
    def create(cls, dcs: Sequence[str], spec: WanSpec, prefix: Optional[str] = None,
               subnet: str = DEFAULT_SUBNET, handle_signals: bool = True) -> "Wan":
        """Build the namespaces, links and qdiscs. Raises :class:`WanError` (and leaves nothing
        behind) on failure."""
        require_root()
        if len(set(dcs)) != len(dcs) or not dcs:
            raise WanError(f"data center names must be distinct and non-empty: {list(dcs)}")
        unknown = set(spec.rates) - set(dcs)
        if unknown:
            raise WanError(f"rates given for unknown data centers: {', '.join(sorted(unknown))}")
        if spec.delay_ms and shutil.which("nft") is None:
            raise WanError("delay=...: added latency needs the `nft` command (apt-get install nftables)")
        global _SERIAL
        if prefix is None:
            _SERIAL += 1
            prefix = f"{NAME_PREFIX}{os.getpid()}" + (f"n{_SERIAL}" if _SERIAL > 1 else "")
        wan = cls(dcs, spec, prefix, subnet)
        with _ACTIVE_LOCK:
            _ACTIVE.add(wan)
        if handle_signals:
            wan._install_signal_handlers()
        try:
            wan._build()
        except BaseException:
            wan.close()
            raise
        wan._baseline = wan.counters(raw=True)
        return wan

    def _build(self) -> None:
        existing = set(_netns_list())
        clash = [ns for ns in [self.router, *self.namespaces.values()] if ns in existing]
        if clash:
            raise WanError(f"network namespace(s) already exist: {', '.join(clash)} "
                           "(leftovers? geomx.testing.wan.cleanup_stale() removes them)")
        r = self.router
        _run(["ip", "netns", "add", r])
        self._created.append(r)
        _run(["ip", "-n", r, "link", "set", "lo", "up"])
        _run(["ip", "-n", r, "link", "add", BRIDGE, "type", "bridge"])
        _run(["ip", "-n", r, "link", "set", BRIDGE, "up"])
        for dc in self.dcs:
            ns = self.namespaces[dc]
            _run(["ip", "netns", "add", ns])
            self._created.append(ns)
            riface = self._iface_of[dc]
            _run(["ip", "-n", r, "link", "add", riface, "type", "veth", "peer", "name", DC_IFACE, "netns", ns])
            _run(["ip", "-n", r, "link", "set", riface, "master", BRIDGE])
            _run(["ip", "-n", r, "link", "set", riface, "up"])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            _run(["ip", "-n", ns, "addr", "add", f"{self.addresses[dc]}/{self.prefixlen}", "dev", DC_IFACE])
            _run(["ip", "-n", ns, "link", "set", DC_IFACE, "up"])
            rate = self.spec.rate(dc)
            if rate is not None:
                tbf = _tbf_args(rate)
                _run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", DC_IFACE, "root", *tbf])
                _run(["ip", "netns", "exec", r, "tc", "qdisc", "add", "dev", riface, "root", *tbf])
        if self.spec.delay_ms > 0:
            for dc in self.dcs:
                self._start_relay(dc)

    def _start_relay(self, dc: str) -> None:
        ns = self.namespaces[dc]
        net = f"{ipaddress.ip_network(self.addresses[dc] + '/' + str(self.prefixlen), strict=False)}"
        rules = (
            "table ip gmxwan {\n"
            "  chain output {\n"
            "    type nat hook output priority -100; policy accept;\n"
            f"    meta mark {RELAY_MARK} return\n"
            f"    ip daddr {net} ip daddr != {self.addresses[dc]} meta l4proto tcp redirect to :{RELAY_PORT}\n"
            "  }\n"
            "}\n")
        nft = subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=rules, capture_output=True,
                             text=True, timeout=20)
        if nft.returncode != 0:
            raise WanError(f"nft in {ns} failed: {nft.stderr.strip()}")
        import sys

        proc = subprocess.Popen(
            self.exec_argv(dc) + [sys.executable, "-m", "geomx.testing.wan", "relay", "--port", str(RELAY_PORT),
                                  "--delay-ms", str(self.spec.delay_ms), "--mark", str(RELAY_MARK)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True, close_fds=True)
        self._relays.append(proc)
        line = proc.stdout.readline().strip()
        if line != "ready":
            raise WanError(f"delay relay in {ns} did not start: {line or proc.poll()}")

    # ---- signals
    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def on_term(signum, frame):
            # Unwind like an exception: `finally` blocks stop children, `with` tears the WAN down.
            raise SystemExit(128 + signum)

        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            self._prev_handlers[signal.SIGTERM] = signal.signal(signal.SIGTERM, on_term)
        if signal.getsignal(signal.SIGHUP) in (signal.SIG_DFL, None):
            self._prev_handlers[signal.SIGHUP] = signal.signal(signal.SIGHUP, on_term)
        # SIGINT already raises KeyboardInterrupt by default.

    def _restore_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, handler in self._prev_handlers.items():
            try:
                signal.signal(signum, handler)
            except (ValueError, TypeError):
                pass
        self._prev_handlers.clear()

    # ---- use
    @property
    def relay_pids(self) -> List[int]:
        """Process ids of the delaying relays (one per data center with ``delay=``; else none)."""
        return [r.pid for r in self._relays]

    def namespace(self, dc: str) -> str:
        return self.namespaces[dc]

    def address(self, dc: str) -> str:
        return self.addresses[dc]

    def exec_argv(self, dc: str) -> List[str]:
        """Prefix that runs a command inside ``dc``'s namespace (``ip netns exec NS``)."""
        return ["ip", "netns", "exec", self.namespaces[dc]]

    def rates(self) -> Dict[str, Optional[float]]:
        return {dc: self.spec.rate(dc) for dc in self.dcs}

    def set_link(self, dc: str, up: bool) -> None:
        """Take ``dc``'s link down (an outage: its packets are dropped, its connections stay open and
        retransmit) or bring it back up."""
        _run(["ip", "-n", self.router, "link", "set", self._iface_of[dc], "up" if up else "down"])

    def reset_connections(self, dc: str, peer: str, keep_port: Optional[int] = None) -> None:
        """Abort every TCP connection in ``dc``'s namespace to or from ``peer``'s address, as a
        firewall reload or a NAT's lost state would (``ss -K``); connections on ``keep_port`` (either
        end) are left alone."""
        expr = ["dst", self.addresses[peer]]
        if keep_port is not None:
            expr += ["and", "not", "sport", "=", f":{keep_port}", "and", "not", "dport", "=", f":{keep_port}"]
        _run(self.exec_argv(dc) + ["ss", "-K", "-t", *expr])

    def counters(self, raw: bool = False) -> Dict[str, LinkCounters]:
        """Bytes per link since the WAN was built (``raw``: the kernel's absolute counters)."""
        if self.closed:
            raise WanError("the WAN has been torn down")
        proc = _run(["ip", "-n", self.router, "-j", "-s", "link", "show"])
        now = parse_link_counters(proc.stdout, self.router_ifaces)
        now = {dc: now[dc] for dc in self.dcs}
        if raw or self._baseline is None:
            return now
        return counter_delta(now, self._baseline)

    def start_sampling(self, interval: float = 0.01) -> None:
        """Sample every link's byte counters each ``interval`` seconds (a process in the router
        namespace reading ``/proc/net/dev``) until :meth:`stop_sampling`."""
        import sys
        import tempfile

        self.stop_sampling()
        fd, path = tempfile.mkstemp(prefix="geomx-wan-samples-", suffix=".json")
        os.close(fd)
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.router, sys.executable, "-m", "geomx.testing.wan", "sample", "--interval",
             str(interval), "--out", path, *self.router_ifaces],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True, close_fds=True)
        line = proc.stdout.readline().strip() if proc.stdout else ""
        if line != "ready":
            proc.kill()
            os.unlink(path)
            raise WanError(f"link sampler did not start: {line or proc.poll()}")
        self._sampler = (proc, path)

    def stop_sampling(self) -> List[tuple]:
        """The samples since :meth:`start_sampling`: ``(monotonic time, {dc: (up, down)})`` (empty if
        none was running)."""
        sampler, self._sampler = self._sampler, None
        if sampler is None:
            return []
        proc, path = sampler
        try:
            proc.terminate()
            proc.wait(timeout=10)
            with open(path) as f:
                raw = json.load(f)
        except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
            proc.kill()
            raise WanError(f"link sampler failed: {exc}") from None
        finally:
            if os.path.exists(path):
                os.unlink(path)
        return [(t, {self.router_ifaces[i]: tuple(v) for i, v in row.items()}) for t, row in raw]

    def report(self, seconds: Optional[float] = None) -> str:
        return format_report(self.counters(), self.rates(), seconds)

    def describe(self) -> str:
        links = ", ".join(f"{dc} ({self.addresses[dc]}, {format_rate(self.spec.rate(dc))})" for dc in self.dcs)
        return links + (f"; {self.spec.delay_ms:g} ms one way between data centers" if self.spec.delay_ms else "")

    # ---- teardown
    def close(self) -> None:
        """Kill the processes left in the namespaces and delete them (links and qdiscs go too).
        Idempotent; safe from atexit and signal handlers."""
        if self.closed:
            return
        self.closed = True
        try:
            if self._sampler is not None:
                proc, path = self._sampler
                self._sampler = None
                proc.kill()
                if os.path.exists(path):
                    os.unlink(path)
            for proc in self._relays:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=5)
                except (ProcessLookupError, PermissionError, subprocess.TimeoutExpired):
                    pass
            for ns in reversed(self._created):
                try:
                    _delete_netns(ns)
                except Exception:  # noqa: BLE001 - best effort, keep deleting the others
                    pass
            self._created.clear()
        finally:
            with _ACTIVE_LOCK:
                _ACTIVE.discard(self)
            self._restore_signal_handlers()

    def __enter__(self) -> "Wan":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def all_namespaces(self) -> Iterable[str]:
        return [self.router, *self.namespaces.values()]


def _main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m geomx.testing.wan")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("relay", help="delaying TCP relay (run inside a DC namespace by Wan.create)")
    r.add_argument("--port", type=int, default=RELAY_PORT)
    r.add_argument("--delay-ms", type=float, required=True)
    r.add_argument("--mark", type=int, default=RELAY_MARK)
    m = sub.add_parser("sample", help="sample interface byte counters (run in the router namespace by "
                                      "Wan.start_sampling)")
    m.add_argument("--interval", type=float, default=0.01)
    m.add_argument("--out", required=True)
    m.add_argument("ifaces", nargs="+")
    c = sub.add_parser("cleanup", help="delete leftover namespaces of killed runs")
    c.add_argument("--prefix", default=NAME_PREFIX)
    args = p.parse_args(argv)
    if args.cmd == "relay":
        return relay.relay_main(args.port, args.delay_ms, args.mark)
    if args.cmd == "sample":
        return relay.sample_main(args.ifaces, args.interval, args.out)
    for ns in cleanup_stale(args.prefix):
        print(f"deleted {ns}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(_main())
