"""ZeroMQ transport: sockets with byte counters, and the single-threaded event loop every node runs.

A node owns its sockets from one thread only (ZeroMQ sockets are not thread-safe). Other threads hand
work to that thread with :meth:`EventLoop.call_soon_threadsafe`, which wakes the loop through an
inproc socket.
"""
from __future__ import annotations

import collections
import ctypes
import ctypes.util
import heapq
import itertools
import logging
import os
import re
import socket
import tempfile
import threading
import time
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple

# pyzmq's sender of zero-copy frames (its "gc" thread) registers, when zmq.utils.garbage is first
# imported, an atexit handler that shuts it down for good. Imported lazily (at a process's first
# zero-copy send), that handler runs before geomx's own (kvstore closes at exit, LIFO): a worker whose
# script had just ended could then not pass on a TSEngine result to its party peers (RuntimeError
# "zmq gc socket requested during shutdown"), and they waited for it forever. Imported here, it
# outlives geomx's close.
import zmq
import zmq.utils.garbage  # noqa: F401

from . import connguard, metrics, security, wire
from .errors import ProtocolError, internal_error

log = logging.getLogger("geomx.transport")


# Plain ints on the per-message paths: arithmetic on pyzmq's enum flags costs microseconds each.
_NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE = int(zmq.SNDMORE)
_POLLIN = int(zmq.POLLIN)
_POLLOUT = int(zmq.POLLOUT)


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
        self.curve = False
        self.peer = name  # what log lines call the other end
        # A CURVE listener: the name of the key (ZAP User-Id) that the message being handled came
        # with, set by the event loop before each handler call (one thread: no race); None otherwise.
        self.sender_key: Optional[str] = None
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
                _refusals(logging.ERROR, f"{self.name}: dropped replies to {peer_label(identity)}: it leaves "
                                         f"{self.sock.sndhwm} replies unread (GEOMX_MAX_QUEUED_REPLIES)",
                          key=(identity, self.name, "unread replies"))
                return
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EHOSTUNREACH:
                    raise
                log.debug("%s: %s is gone; %s dropped", self.name, peer_label(identity), msg.type.name)
                return
        self.bytes_sent += sum(len(f) if not isinstance(f, memoryview) else f.nbytes for f in frames)

    def recv_frames(self, routed: bool) -> List[Any]:
        frames = self.sock.recv_multipart(copy=False, flags=_NOBLOCK)
        self.bytes_received += sum(len(f) for f in frames)
        if self.guard is not None:
            self.guard.delivered(frames, 1 if routed else 0)
        return frames

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
            if event == zmq.EVENT_ACCEPTED:
                if self.guard is not None:
                    self.guard.accepted(parsed["value"])
                continue
            if event == zmq.EVENT_DISCONNECTED:
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
                _refusals(logging.ERROR, reason)
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


_monitors = itertools.count()

HANDSHAKE_GRACE_S = 5.0
"""How long handshakes that break off without detail must go on failing before a client link
reports them as a key mismatch (a peer starting behind a proxy fails the same way for a while)."""

# Refusals and drops caused by what peers send: a flood of one kind from one peer is logged once
# every 5 s (see security.RateLimitedLog).
log_limited = _refusals = security.RateLimitedLog()


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


_REQUESTS = (wire.MsgType.INIT, wire.MsgType.PUSH, wire.MsgType.PULL, wire.MsgType.PUSHPULL,
             wire.MsgType.COMMAND, wire.MsgType.STOP)

Handler = Callable[[wire.Message, Optional[bytes], Link], None]


_M_TRIM_THRESHOLD = -1  # mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
_malloc_tuned = False


def keep_large_buffers() -> None:
    """Make glibc keep freed large blocks for reuse instead of unmapping them.

    Every message of a tensor is a fresh multi-megabyte buffer (libzmq's receive buffer, the arrays
    made from it). By default glibc serves each with mmap and returns it with munmap on free, so every
    message pays a page fault per 4 KiB and the kernel's zeroing: on loopback that cost as much CPU as
    moving the bytes. With blocks up to 32 MiB (glibc's ceiling) served from the heap and the heap not
    trimmed below 1 GiB of free space, the buffers of one round are reused by the next. Once per process."""
    global _malloc_tuned
    if _malloc_tuned:
        return
    _malloc_tuned = True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is None or not hasattr(libc, "mallopt"):
            return  # not glibc: nothing to tune
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    except OSError:
        return


def release_free_memory() -> None:
    """Return the heap's free memory to the OS (glibc ``malloc_trim``; a no-op elsewhere)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except OSError:
        return


class EventLoop:
    """Polls a set of links and runs timers and cross-thread callbacks, all in one thread."""

    def __init__(self, ctx: zmq.Context, max_message_bytes: int = 1 << 31, name: str = "node",
                 keys: Optional[security.CurveKeys] = None, max_queued_replies: int = 100_000,
                 local_ipc: bool = True):
        keep_large_buffers()
        self.ctx = ctx
        self.local_ipc = local_ipc  # GEOMX_LOCAL_IPC
        self.name = name
        self.max_message_bytes = max_message_bytes
        self.max_queued_replies = max_queued_replies
        self.keys = keys  # CURVE keys of this node's party; None: links in clear
        self._zap: Optional[security.ZapHandler] = None
        self._raw: Dict[zmq.Socket, Callable[[], None]] = {}  # monitor and ZAP sockets
        self.poller = zmq.Poller()
        self.handlers: Dict[zmq.Socket, Tuple[Link, Handler, bool]] = {}
        self._writers: Dict[zmq.Socket, Callable[[], None]] = {}  # waiting for POLLOUT
        self.fd_handlers: Dict[int, Callable[[], None]] = {}  # plain sockets by fd (DGT's UDP channels)
        self._timers: List[Tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._calls: Deque[Callable[[], None]] = collections.deque()
        self._wake_addr = f"inproc://wake-{id(self)}"
        self._wake_rx = ctx.socket(zmq.PULL)
        self._wake_rx.bind(self._wake_addr)
        self._wake_tx_local = threading.local()
        self.poller.register(self._wake_rx, zmq.POLLIN)
        self.stopped = False
        self.links: List[Link] = []
        self._guarded: List[Link] = []  # listeners whose connections are measured (connguard)
        self._trim_due = False
        # What this node counts (geomx/metrics.py): read by collectors in this thread.
        self.metrics = metrics.Metrics(role=name, node=name)
        self.metrics.add_collector(lambda: metrics.link_samples(self.links))

    # -- registration -------------------------------------------------------------------------
    def add(self, link: Link, handler: Handler, routed: bool) -> None:
        """Dispatch decoded messages from ``link`` to ``handler(msg, identity, link)``."""
        self.handlers[link.sock] = (link, handler, routed)
        self.poller.register(link.sock, zmq.POLLIN)
        self.links.append(link)

    def secure(self, link: Link, server: bool, cross_party: bool) -> None:
        """The one place a socket gets its security settings: CURVE when this node has keys and the
        link crosses parties (or GEOMX_CURVE_INSIDE_PARTY, on by default, covers it too); a monitor
        that reports refused handshakes on both ends."""
        if security.uses_curve(self.keys, cross_party):
            assert self.keys is not None
            if server:
                if self._zap is None:
                    self._zap = security.ZapHandler(self.ctx, self.keys, self.name)
                    self._add_raw(self._zap.sock, self._zap.handle)
                self._zap.serve(link.name, cross_party)
                security.secure_server(link.sock, self.keys, link.name)
            else:
                security.secure_client(link.sock, self.keys, cross_party)
            link.curve = True
        elif cross_party:
            security.warn_insecure(link.name)
        # A unique address: pyzmq's default is derived from the socket's fd, which the OS reuses.
        events = security.MONITORED | zmq.EVENT_DISCONNECTED | (zmq.EVENT_ACCEPTED if server else 0)
        if server:
            self._guard(link)
        link.monitor = link.sock.get_monitor_socket(events, f"inproc://geomx-monitor-{next(_monitors)}")

        def on_event() -> None:
            if link.on_monitor_event(server):
                if server:
                    self._release_memory_soon()
                elif link.on_disconnected is not None and not link.sock.closed:
                    # What the peer sent before its connection ended is handled first (its last replies,
                    # a dead-peer notice): the owner's new link replaces this one and drops what it holds,
                    # and a request answered there would be sent again to a peer that may be gone.
                    entry = self.handlers.get(link.sock)
                    while entry is not None and not link.sock.closed and not self._drain(*entry):
                        pass
                    if not link.sock.closed:
                        link.on_disconnected()
        self._add_raw(link.monitor, on_event)

    def _guard(self, link: Link) -> None:
        """Measure what libzmq holds per connection of listener ``link``; cut a connection that holds
        more than one largest message (geomx/connguard.py)."""
        def drain() -> None:
            entry = self.handlers.get(link.sock)
            if entry is not None:  # not served by this loop (yet): nothing of it is read or measured
                self._drain(*entry)

        def refresh() -> None:
            events = self._raw.get(link.monitor)
            if events is not None:
                events()

        link.guard = connguard.ConnectionGuard(link.name, link.curve, connguard.limit_for(self.max_message_bytes),
                                               drain, refresh,
                                               lambda text, key: _refusals(logging.ERROR, text, key=key))
        if not self._guarded:
            self.call_every(connguard.CHECK_INTERVAL, self._check_guards)
        self._guarded.append(link)

    def _check_guards(self) -> None:
        self._guarded = [link for link in self._guarded if not link.sock.closed]
        for link in self._guarded:
            assert link.guard is not None
            link.guard.check()

    def _release_memory_soon(self) -> None:
        """A peer of a listener left: what libzmq held for it (e.g. the frames of a message it never
        finished) is freed, but glibc keeps freed heap (keep_large_buffers): give it back to the OS,
        at most once a second however many peers come and go."""
        if not self._trim_due:
            self._trim_due = True

            def trim() -> None:
                self._trim_due = False
                release_free_memory()
            self.call_later(1.0, trim)

    def _add_raw(self, sock: zmq.Socket, fn: Callable[[], None]) -> None:
        self._raw[sock] = fn
        self.poller.register(sock, zmq.POLLIN)

    def remove(self, link: Link) -> None:
        """Stop serving ``link`` (its owner closes it: a link made anew after a reconnection)."""
        if link in self.links:
            self.links.remove(link)
        if link.sock in self.handlers:
            self.poller.unregister(link.sock)
            del self.handlers[link.sock]
            self._writers.pop(link.sock, None)
        if link.monitor is not None and self._raw.pop(link.monitor, None) is not None:
            self.poller.unregister(link.monitor)

    def when_writable(self, link: Link, fn: Callable[[], None]) -> None:
        """Call ``fn`` once ``link`` (a registered link) can take a message without blocking."""
        if link.sock not in self._writers:
            self._writers[link.sock] = fn
            self.poller.modify(link.sock, zmq.POLLIN | zmq.POLLOUT)

    def add_fd(self, sock: Any, on_readable: Callable[[], None]) -> None:
        """Call ``on_readable()`` when a plain (non-ZeroMQ) socket has data; it must not block.
        (zmq.Poller reports plain sockets by file descriptor, so they are registered as one.)"""
        fd = sock.fileno()
        self.fd_handlers[fd] = on_readable
        self.poller.register(fd, zmq.POLLIN)

    def remove_fd(self, sock: Any) -> None:
        fd = sock.fileno()
        if self.fd_handlers.pop(fd, None) is not None:
            self.poller.unregister(fd)

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._seq), fn))

    def call_every(self, interval: float, fn: Callable[[], None]) -> None:
        def tick() -> None:
            if not self.stopped:
                fn()
                self.call_later(interval, tick)
        self.call_later(interval, tick)

    def call_soon_threadsafe(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` in the loop's thread (callable from any thread)."""
        self._calls.append(fn)
        tx = getattr(self._wake_tx_local, "sock", None)
        if tx is None:
            tx = self.ctx.socket(zmq.PUSH)
            tx.connect(self._wake_addr)
            self._wake_tx_local.sock = tx
        tx.send(b"", _NOBLOCK)

    # -- running ------------------------------------------------------------------------------
    def run_once(self, timeout: float) -> None:
        now = time.monotonic()
        if self._timers:
            timeout = max(0.0, min(timeout, self._timers[0][0] - now))
        events = dict(self.poller.poll(int(timeout * 1000)))
        if self._wake_rx in events:
            while True:
                try:
                    self._wake_rx.recv(_NOBLOCK)
                except zmq.Again:
                    break
        while self._calls:
            self._calls.popleft()()
        for sock, mask in events.items():
            if mask & _POLLOUT and sock in self._writers:
                self.poller.modify(sock, zmq.POLLIN)
                self._writers.pop(sock)()
            entry = self.handlers.get(sock)
            if entry is not None and mask & _POLLIN:
                self._drain(*entry)
            elif sock in self.fd_handlers:
                self.fd_handlers[sock]()
            elif sock in self._raw and not getattr(sock, "closed", False):
                self._raw[sock]()  # (a socket closed by an earlier handler of this turn is skipped)
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, fn = heapq.heappop(self._timers)
            fn()

    def _drain(self, link: Link, handler: Handler, routed: bool) -> bool:
        """Handle the messages waiting on ``link``; True when none is left."""
        if link.guard is not None:
            # Its connection events first: a message is counted to the connection it came from, and
            # a new connection's descriptor may be the number of one just closed.
            link.guard.refresh()
        for _ in range(256):  # bounded so one busy peer cannot starve the others
            try:
                frames = link.recv_frames(routed)
            except zmq.Again:
                return True
            identity = None
            if routed:
                identity = bytes(frames[0].buffer)
                if link.curve:
                    link.sender_key = frames[0].get("User-Id")  # the key name our ZAP handler admitted
                frames = frames[1:]
            try:
                msg = wire.decode(frames, self.max_message_bytes)
            except ProtocolError as exc:
                log_limited(logging.WARNING, f"{self.name}: dropped a malformed message on {link.name} from "
                                             f"{peer_label(identity)}: {exc}",
                            key=(identity, link.name, security.template(str(exc))))
                if isinstance(exc, wire.MetaError):
                    self._refuse(link, identity, exc.request, str(exc))  # its sender learns why
                continue
            try:
                handler(msg, identity, link)
            except ProtocolError as exc:
                log_limited(logging.WARNING, f"{self.name}: rejected {msg.type.name} from {peer_label(identity)} "
                                             f"on {link.name}: {exc}",
                            key=(identity, link.name, msg.type, security.template(str(exc))))
                self._refuse(link, identity, msg, str(exc))
            except Exception as exc:  # noqa: BLE001 - one bad request must not take the node down
                log.exception("%s: error while handling %s from %s on %s",
                              self.name, msg.type.name, peer_label(identity), link.name)
                self._refuse(link, identity, msg, internal_error(exc))
        return False

    def _refuse(self, link: Link, identity: Optional[bytes], msg: wire.Message, reason: str) -> None:
        """Answer a refused request with ERROR so that its sender fails clearly instead of waiting."""
        if identity is None or msg.type not in _REQUESTS:
            return
        link.send(wire.error_reply(msg, f"{self.name}: {reason}"), identity)

    def run_until(self, done: Callable[[], bool], timeout: Optional[float] = None,
                  what: str = "condition") -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not done() and not self.stopped:
            remaining = 0.2 if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.name}: timed out after {timeout:.0f}s waiting for {what}")
            self.run_once(min(0.2, remaining))

    def close(self) -> None:
        self.stopped = True
        for link in self.links:
            link.close()
        if self._zap is not None:
            self._zap.close()
        self._wake_rx.close(linger=0)


WAN_CONNECT_TIMEOUT_MS = 2000

# A client that lost its connection reconnects under a new identity, its own plus ``~N`` (the N-th
# connection): a listener may still hold the old connection (the peer's TCP has not noticed that it
# is dead), and libzmq ignores a second connection presenting an identity in use (no
# ROUTER_HANDOVER, see bind_router). Listeners know a client by its identity without the suffix.
_GENERATION = b"~"


def reconnected_identity(identity: bytes, generation: int) -> bytes:
    """The identity of a client's ``generation``-th connection (0: the identity itself)."""
    return identity if generation == 0 else identity + _GENERATION + str(generation).encode()


def split_identity(identity: bytes) -> Tuple[bytes, int]:
    """(the client's identity, its connection's generation): see :func:`reconnected_identity`."""
    head, sep, tail = identity.rpartition(_GENERATION)
    if sep and head and tail.isdigit() and len(tail) < 10:
        return head, int(tail)
    return identity, 0


def base_identity(identity: bytes) -> bytes:
    """A client's identity without its connection's generation (see :func:`reconnected_identity`)."""
    return split_identity(identity)[0]


def identity_token(identity: bytes) -> str:
    """The secret a registered node's link carries in its identity (``NAME#TOKEN>WHERE``): a client's
    registration token, or a TSEngine link's key; "" if there is none."""
    return base_identity(identity).rpartition(b">")[0].rpartition(b"#")[2].decode("ascii", "replace")


_TOKEN_IN_IDENTITY = re.compile(r"#([0-9a-f]{6})[0-9a-f]{26}")


def peer_label(identity: Optional[bytes]) -> str:
    """A peer's identity for log lines, without the secret part of a registered client's (its token
    is cut to 6 digits: enough to tell clients apart, not to pose as one)."""
    if identity is None:
        return "?"
    try:
        text = identity.decode("ascii")
    except UnicodeDecodeError:
        return identity.hex()
    return _TOKEN_IN_IDENTITY.sub(r"#\1...", text)


__all__: Sequence[str] = ["Link", "EventLoop", "bind_router", "connect_dealer", "peer_label", "identity_token",
                          "base_identity", "reconnected_identity", "split_identity"]
