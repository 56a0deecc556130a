"""The single-threaded event loop every node runs: it polls the node's links, decodes what arrives and
hands each message with its :class:`~geomx.transport.identity.Origin` to the link's handler; it also
runs timers and callbacks from other threads, the ZAP handler and the sockets' monitors.

A node owns its sockets from one thread only (ZeroMQ sockets are not thread-safe). Other threads hand
work to that thread with :meth:`EventLoop.call_soon_threadsafe`, which wakes the loop through an
inproc socket.
"""
from __future__ import annotations

import collections
import heapq
import itertools
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, List, Optional, Tuple

import zmq

from .. import connguard, metrics, security, wire
from ..errors import ProtocolError, internal_error
from .identity import Origin
from .memory import keep_large_buffers, release_free_memory

if TYPE_CHECKING:
    from .zmq_link import Link

log = logging.getLogger("geomx.transport")

# Plain ints on the per-message paths: arithmetic on pyzmq's enum flags costs microseconds each.
_NOBLOCK = int(zmq.NOBLOCK)
_POLLIN = int(zmq.POLLIN)
_POLLOUT = int(zmq.POLLOUT)

# Refusals and drops caused by what peers send: a flood of one kind from one peer is logged once
# every 5 s (see security.RateLimitedLog).
log_limited = security.RateLimitedLog()

KERNEL_READ_INTERVAL = 5.0
"""Seconds between two readings of every connection's kernel byte counters (a few system calls each)."""

# Unique inproc names for the sockets a loop makes itself. Not id(): a closed loop's inproc endpoint
# stays bound until ZeroMQ's reaper has closed the socket, and a new loop may get the same id() first.
_inproc_names = itertools.count()

# Requests whose sender waits for an answer: refused, they are answered with ERROR.
_REQUESTS = (wire.MsgType.INIT, wire.MsgType.PUSH, wire.MsgType.PULL, wire.MsgType.PUSHPULL,
             wire.MsgType.COMMAND, wire.MsgType.STOP)

Handler = Callable[[wire.Message, Origin], None]
"""What :meth:`EventLoop.add` calls with each message decoded from a link, and where it came from."""


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
        self._wake_addr = f"inproc://geomx-wake-{next(_inproc_names)}"
        self._wake_rx = ctx.socket(zmq.PULL)
        self._wake_rx.bind(self._wake_addr)
        self._wake_tx_local = threading.local()
        self.poller.register(self._wake_rx, zmq.POLLIN)
        self.stopped = False
        self.links: List[Link] = []
        self._at_close: List[Callable[[], None]] = []
        self._guarded: List[Link] = []  # listeners whose connections are measured (connguard)
        self._trim_due = False
        # What this node counts (geomx/metrics.py): read by collectors in this thread.
        self.metrics = metrics.Metrics(role=name, node=name)
        self.metrics.add_collector(lambda: metrics.link_samples(self.links))

    # -- registration -------------------------------------------------------------------------
    def add(self, link: Link, handler: Handler, routed: bool) -> None:
        """Dispatch decoded messages from ``link`` to ``handler(msg, origin)``. ``routed``: a listener,
        whose messages come from many peers (each with its identity in the origin)."""
        self.handlers[link.sock] = (link, handler, routed)
        self.poller.register(link.sock, zmq.POLLIN)
        self.links.append(link)
        if len(self.links) == 1:
            # What a connection carried is counted up to its last reading before it ends: read them
            # every few seconds, whether or not anybody reads the metrics (transport/kernel_bytes.py).
            self.call_every(KERNEL_READ_INTERVAL, self._read_kernel_bytes)

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
        # The descriptor of each connection (accepted, or connected): what the kernel counts of it.
        events = security.MONITORED | zmq.EVENT_DISCONNECTED | (zmq.EVENT_ACCEPTED if server else zmq.EVENT_CONNECTED)
        if server:
            self._guard(link)
        link.monitor = link.sock.get_monitor_socket(events, f"inproc://geomx-monitor-{next(_inproc_names)}")

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
                                               lambda text, key: log_limited(logging.ERROR, text, key=key))
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
        unrouted = None if routed else Origin(link)  # a client link: its one peer, its server
        for _ in range(256):  # bounded so one busy peer cannot starve the others
            received = link.receive(routed)
            if received is None:
                return True
            frames, identity, curve_key = received
            origin = unrouted if unrouted is not None else Origin(link, identity, curve_key)
            try:
                msg = wire.decode(frames, self.max_message_bytes)
            except ProtocolError as exc:
                log_limited(logging.WARNING, f"{self.name}: dropped a malformed message on {link.name} from "
                                             f"{origin.label}: {exc}",
                            key=(identity, link.name, security.template(str(exc))))
                self._count_refusal(origin, "malformed")
                if isinstance(exc, wire.MetaError):
                    self._refuse(origin, exc.request, str(exc))  # its sender learns why
                continue
            try:
                handler(msg, origin)
            except ProtocolError as exc:
                log_limited(logging.WARNING, f"{self.name}: rejected {msg.type.name} from {origin.label} "
                                             f"on {link.name}: {exc}",
                            key=(identity, link.name, msg.type, security.template(str(exc))))
                self._count_refusal(origin, "refused")
                self._refuse(origin, msg, str(exc))
            except Exception as exc:  # noqa: BLE001 - one bad request must not take the node down
                log.exception("%s: error while handling %s from %s on %s",
                              self.name, msg.type.name, origin.label, link.name)
                self._count_refusal(origin, "failed")
                self._refuse(origin, msg, internal_error(exc))
        return False

    def _count_refusal(self, origin: Origin, reason: str) -> None:
        """geomx_refused_messages_total: malformed (not a message), refused (out of protocol or not
        allowed), failed (an error of this node while handling it)."""
        self.metrics.inc("geomx_refused_messages_total", link=origin.link.name,
                         peer=metrics.peer_name(origin.identity), reason=reason)

    def _refuse(self, origin: Origin, msg: wire.Message, reason: str) -> None:
        """Answer a refused request with ERROR so that its sender fails clearly instead of waiting."""
        if origin.identity is None or msg.type not in _REQUESTS:
            return
        origin.reply(wire.error_reply(msg, f"{self.name}: {reason}"))

    def run_until(self, done: Callable[[], bool], timeout: Optional[float] = None,
                  what: str = "condition") -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not done() and not self.stopped:
            remaining = 0.2 if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.name}: timed out after {timeout:.0f}s waiting for {what}")
            self.run_once(min(0.2, remaining))

    def _read_kernel_bytes(self) -> None:
        for link in self.links:
            link.kernel.totals()

    def at_close(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` when the loop closes, before its links do (what serves the loop's figures)."""
        self._at_close.append(fn)

    def close(self) -> None:
        self.stopped = True
        for fn in self._at_close:
            try:
                fn()
            except Exception:  # noqa: BLE001 - the links must close whatever a hook does
                log.exception("%s: closing", self.name)
        self._at_close.clear()
        for link in self.links:
            link.close()
        if self._zap is not None:
            self._zap.close()
        self._wake_rx.close(linger=0)


