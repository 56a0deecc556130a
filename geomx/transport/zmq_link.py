"""The ZeroMQ link: a ROUTER (listener: servers, schedulers) or DEALER (client) socket with its byte
counters, socket options and handshake state, and the factories that bind and connect them
(:func:`bind_router`, :func:`connect_dealer`), offering a Unix-domain socket next to a listener's TCP
port for peers in the same network namespace.

This is the transport's one ZeroMQ-specific link module: what a second transport's module would
offer in its place is described in :mod:`geomx.transport`.
"""
from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

import zmq

from .. import connguard, security, wire
from .identity import peer_label
from .kernel_bytes import KernelBytes
from .loop import log_limited

if TYPE_CHECKING:
    from .loop import EventLoop

log = logging.getLogger("geomx.transport")


# Plain ints on the per-message paths: arithmetic on pyzmq's enum flags costs microseconds each.
_NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE = int(zmq.SNDMORE)
# Most peers a listener counts received bytes for one by one (Link.bytes_by_peer).
MAX_PEERS = 1000


def _send_frames(sock: zmq.Socket, frames: List[Any], flags: int) -> None:
    """One multipart message. Array frames go to libzmq without a Python-side copy (pyzmq still copies
    those under its copy threshold). Atomic: if the first frame is accepted, so are the others."""
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        sock.send(frame, flags | _SNDMORE if i < last else flags, copy=not isinstance(frame, memoryview))


class Link:
    """A ZeroMQ socket plus the bytes sent and received through it (``wan`` marks cross-party links)."""

    def __init__(self, sock: zmq.Socket, name: str, wan: bool = False):
        self.sock = sock
        self.name = name
        self.wan = wan
        self.bytes_sent = 0
        self.bytes_received = 0
        self.messages_sent = 0
        self.messages_received = 0
        self.bytes_by_peer: Dict[bytes, int] = {}  # a listener's received bytes by peer identity
        self.kernel = KernelBytes()  # what its TCP connections carried, as the kernel counts it
        self.curve = False
        self.peer = name  # what log lines call the other end
        # Called with the reason when the peer refused this (client) link's CURVE handshake; the
        # owner fails with it (retrying cannot help). Unset: the reason is only logged.
        self.on_refused: Optional[Callable[[str], None]] = None
        # A client link: called when its connection ended (reset, or closed by the peer). Whatever
        # was on the wire is lost; the owner replaces the link (see reconnected_identity) and sends
        # its unanswered requests again. Unset: libzmq reconnects and nothing is resent.
        self.on_disconnected: Optional[Callable[[], None]] = None
        self.monitor: Optional[zmq.Socket] = None
        # A listener's measure of what libzmq holds per TCP connection (geomx/connguard.py).
        self.guard: Optional[connguard.ConnectionGuard] = None
        self._handshake_failures = 0
        self._first_failure = 0.0  # time.monotonic() of the first of the current run of failures
        self.refused = False
        # A client link: its current connection completed its handshake (it may have carried messages),
        # and whether the peer ever took this node's key (over this link or the one it replaced): then
        # handshakes that break off without detail are the network's doing (a link down behind a relay
        # or proxy), not a refused key.
        self.established = False
        self.proven = False

    def send(self, msg: wire.Message, identity: Optional[bytes] = None, block: bool = True) -> None:
        """Send ``msg``; with ``block=False`` raise ``zmq.Again`` (nothing sent) when the socket's
        send high-water mark is reached (P3's bounded window, see :class:`geomx.p3.SendQueue`)."""
        frames = wire.encode(msg)
        if identity is None:
            _send_frames(self.sock, frames, 0 if block else _NOBLOCK)
        else:
            try:
                # A listener never blocks on one peer: a full queue (a peer that does not read its
                # replies) or a peer that is gone costs that peer its reply, nobody else anything.
                _send_frames(self.sock, [identity, *frames], _NOBLOCK)
            except zmq.Again:
                log_limited(logging.ERROR, f"{self.name}: dropped replies to {peer_label(identity)}: it leaves "
                                           f"{self.sock.sndhwm} replies unread (GEOMX_MAX_QUEUED_REPLIES)",
                            key=(identity, self.name, "unread replies"))
                return
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EHOSTUNREACH:
                    raise
                log.debug("%s: %s is gone; %s dropped", self.name, peer_label(identity), msg.type.name)
                return
        self.bytes_sent += sum(len(f) if not isinstance(f, memoryview) else f.nbytes for f in frames)
        self.messages_sent += 1

    def receive(self, routed: bool) -> Optional[Tuple[List[Any], Optional[bytes], Optional[str]]]:
        """The next message waiting on this link without blocking, or None: its frames (for
        ``wire.decode``) and, on a listener (``routed``), the peer's identity (ZeroMQ's first frame) and,
        over CURVE, the name of the key that our ZAP handler admitted its connection with (the User-Id
        libzmq attaches to every message of that connection); on a client link both are None."""
        try:
            frames = self.sock.recv_multipart(copy=False, flags=_NOBLOCK)
        except zmq.Again:
            return None
        size = sum(len(f) for f in frames)
        self.bytes_received += size
        self.messages_received += 1
        if self.guard is not None:
            self.guard.delivered(frames, 1 if routed else 0)
        if not routed:
            return frames, None, None
        envelope = frames[0]
        identity = bytes(envelope.buffer)
        # Per peer (a global server's WAN listener: per party), the message as its sender sent it (without
        # the identity frame ZeroMQ adds). Identities come from the network: past MAX_PEERS of them, new
        # ones are counted together, so no peer can grow this table.
        size -= len(envelope)
        by_peer = self.bytes_by_peer
        if identity in by_peer:
            by_peer[identity] += size
        elif len(by_peer) < MAX_PEERS:
            by_peer[identity] = size
        else:
            by_peer[b"other"] = by_peer.get(b"other", 0) + size
        return frames[1:], identity, envelope.get("User-Id") if self.curve else None

    def close(self) -> None:
        if self.sock.closed:
            return  # closed already (e.g. a restarted server's old link, then the loop's close)
        if self.monitor is not None:
            self.sock.disable_monitor()
            self.monitor.close(linger=0)
        self.sock.close(linger=0)

    def on_monitor_event(self, server: bool) -> bool:
        """A handshake event of this link's socket: log a refusal, or fail a refused client link.
        True when a connection of this link ended."""
        assert self.monitor is not None
        disconnected = False
        while True:
            try:
                frames = self.monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return disconnected
            parsed = security.parse_monitor_message(frames)
            event = parsed["event"]
            if event in (zmq.EVENT_ACCEPTED, zmq.EVENT_CONNECTED):  # the value: the connection's descriptor
                self.kernel.connected(parsed["value"], opened=event == zmq.EVENT_CONNECTED)
                if self.guard is not None:
                    self.guard.accepted(parsed["value"])
                continue
            if event == zmq.EVENT_DISCONNECTED:
                self.kernel.disconnected(parsed["value"])
                if self.guard is not None:
                    self.guard.closed(parsed["value"])
                # A client counts only the end of a connection that was established: one refused in its
                # handshake carried nothing (libzmq retries it, and the refusal is counted below).
                disconnected = server or self.established
                self.established = False
                continue
            reason = security.handshake_failure(frames, server=server, curve=self.curve, link_name=self.name,
                                                peer=self.peer)
            if reason is None:
                if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    self._handshake_failures = 0
                    self.established = self.proven = True
                continue
            if server:
                log_limited(logging.ERROR, reason)
                continue
            if self._handshake_failures == 0:
                self._first_failure = time.monotonic()
            self._handshake_failures += 1
            # A definite refusal fails at once. A handshake that broke off without detail may be a
            # peer that went away mid-handshake, or one not listening yet behind a TCP proxy or relay
            # (which accepts, then closes when it cannot reach it): only failures that go on for
            # HANDSHAKE_GRACE_S count.
            definite = event != zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
            persistent = (self._handshake_failures >= 3 and time.monotonic() - self._first_failure >= HANDSHAKE_GRACE_S
                          and not self.proven)
            if (definite or persistent) and not self.refused:
                self.refused = True  # reported once; the owner fails with it
                log.error("%s", reason)
                if self.on_refused is not None:
                    self.on_refused(reason)


HANDSHAKE_GRACE_S = 5.0
"""How long handshakes that break off without detail must go on failing before a client link
reports them as a key mismatch (a peer starting behind a proxy fails the same way for a while)."""


# Complete messages libzmq queues from one peer before it stops reading that peer's connection.
RECEIVE_HWM = 1000


def configure(sock: zmq.Socket, max_message_bytes: int) -> None:
    # MAXMSGSIZE makes libzmq drop a peer that sends an oversized message before we allocate it.
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes + (1 << 20))
    sock.setsockopt(zmq.LINGER, 2000)
    sock.setsockopt(zmq.SNDHWM, 0)
    # Finite: a peer that sends faster than this node reads is slowed down by TCP once this many of its
    # messages wait here, instead of growing this process. (libzmq bounds only complete messages: the
    # frames of one never finished are bounded by nothing but MAXMSGSIZE each; see docs/Deployment.md.)
    sock.setsockopt(zmq.RCVHWM, RECEIVE_HWM)
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)


def _ipc_path(port: int) -> Optional[str]:
    """Where a listener on TCP ``port`` also listens over a Unix-domain socket. The name holds the
    network namespace (the emulated WAN runs data centres in namespaces that share /tmp) and the port,
    which only one listener in a namespace can hold; the directory is the user's own (mode 0700), so
    other local users cannot connect (they can reach the TCP port, where CURVE still applies)."""
    try:
        netns = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return None  # not Linux: TCP only
    directory = os.path.join(tempfile.gettempdir(), f"geomx-ipc-{os.getuid()}")
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        info = os.stat(directory)
    except OSError:
        return None
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        return None  # somebody else's directory, or opened up: do not trust it
    path = os.path.join(directory, f"{netns}-{port}.sock")
    return path if len(path) < 100 else None  # sun_path holds 108 bytes


_local_hosts: Dict[str, bool] = {}


def _is_local(host: str) -> bool:
    """True when ``host`` is an address of this network namespace (binding to it succeeds)."""
    known = _local_hosts.get(host)
    if known is None:
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.bind((host, 0))
            known = True
        except OSError:
            known = False
        _local_hosts[host] = known
    return known


def bind_router(loop: "EventLoop", port: int, name: str, *, wan: bool = False,
                cross_party: bool = False, host: str = "127.0.0.1", fd: Optional[int] = None) -> Tuple[Link, int]:
    """A ROUTER socket bound at ``host:port`` (``*``: every interface, only when a configuration says so;
    port 0: any free port).
    ``cross_party``: clients from other parties connect to it (they must be CURVE clients whenever keys
    are configured). ``fd``: a TCP socket already bound and listening at ``port`` (handed down by the
    launcher, which bound it first so that nobody can take the port in between); it is adopted."""
    sock = loop.ctx.socket(zmq.ROUTER)
    configure(sock, loop.max_message_bytes)
    # No ROUTER_HANDOVER: a second connection that presents an identity in use is ignored by libzmq
    # rather than handed the first one's replies (identities carry secret tokens, but a client's
    # identity must not be taken over even by one who learnt its token).
    # Bounded replies per peer; a send beyond the bound, or to a peer that is gone, fails at once
    # (see Link.send) instead of being queued without limit or dropped without a word.
    sock.setsockopt(zmq.SNDHWM, loop.max_queued_replies)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    link = Link(sock, name, wan)
    loop.secure(link, server=True, cross_party=cross_party)
    try:
        if fd is not None:
            # ZMQ_USE_FD: the next bind takes this listening socket instead of making its own; reset at
            # once so that the Unix-domain bind below makes its own.
            sock.setsockopt(zmq.USE_FD, fd)
            try:
                sock.bind(f"tcp://{host}:{port}")
            finally:
                sock.setsockopt(zmq.USE_FD, -1)
        elif port:
            sock.bind(f"tcp://{host}:{port}")
        else:
            port = sock.bind_to_random_port(f"tcp://{host}")
    except zmq.ZMQError:
        # Its sockets (and the monitor secure() attached) would block the context's termination.
        loop.remove(link)
        link.close()
        raise
    path = _ipc_path(port)
    if path is not None and loop.local_ipc:
        try:
            sock.bind(f"ipc://{path}")  # libzmq removes a file a dead listener left behind
        except zmq.ZMQError as exc:
            log.debug("%s: no Unix-domain socket at %s (%s); TCP only", name, path, exc)
    elif path is not None:
        # TCP only (GEOMX_LOCAL_IPC=0): a file a dead listener of this port left must not lure clients.
        try:
            os.unlink(path)
        except OSError:
            pass
    return link, port


WAN_CONNECT_TIMEOUT_MS = 2000


def connect_dealer(loop: "EventLoop", host: str, port: int, identity: bytes, name: str, *,
                   peer: str, wan: bool = False, cross_party: bool = False, send_window: int = 0,
                   send_buffer: int = 0) -> Link:
    """A DEALER connected to ``host:port``; ``peer`` names that listener in error messages;
    ``cross_party``: it belongs to another party (the central one). ``send_window`` > 0 bounds the
    messages libzmq queues for sending (SNDHWM) and ``send_buffer`` the kernel's send buffer
    (SO_SNDBUF), so that a sender keeping its own priority queue (P3) decides the order of everything
    not yet on the wire."""
    sock = loop.ctx.socket(zmq.DEALER)
    configure(sock, loop.max_message_bytes)
    if send_window:
        sock.setsockopt(zmq.SNDHWM, send_window)
    if send_buffer:
        sock.setsockopt(zmq.SNDBUF, send_buffer)
    sock.setsockopt(zmq.IDENTITY, identity)
    if cross_party:
        # Across the WAN a connection attempt made while a link is down would wait out the kernel's
        # SYN retries (about two minutes, backing off); abandoned after 2 s and retried at most 1 s
        # later, a new connection is up within seconds of the link's return.
        sock.setsockopt(zmq.CONNECT_TIMEOUT, WAN_CONNECT_TIMEOUT_MS)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
    link = Link(sock, name, wan)
    link.peer = f"{peer} at {host}:{port}"
    loop.secure(link, server=False, cross_party=cross_party)
    # Same namespace and the listener offers a Unix-domain socket: ~10% less loopback time per
    # iteration (docs/Benchmarks.md). Only where the listener is ours: that file is in our 0700 directory.
    path = _ipc_path(port) if loop.local_ipc and _is_local(host) else None
    if path is not None and os.path.exists(path):
        sock.connect(f"ipc://{path}")
    else:
        sock.connect(f"tcp://{host}:{port}")
    return link
