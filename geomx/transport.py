"""ZeroMQ transport: sockets with byte counters, and the single-threaded event loop every node runs.

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
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple

import zmq

from . import wire
from .errors import ProtocolError

log = logging.getLogger("geomx.transport")


class Link:
    """A ZeroMQ socket plus the bytes sent and received through it (``wan`` marks cross-party links)."""

    def __init__(self, sock: zmq.Socket, name: str, wan: bool = False):
        self.sock = sock
        self.name = name
        self.wan = wan
        self.bytes_sent = 0
        self.bytes_received = 0

    def send(self, msg: wire.Message, identity: Optional[bytes] = None, block: bool = True) -> None:
        """Send ``msg``; with ``block=False`` raise ``zmq.Again`` (nothing sent) when the socket's
        send high-water mark is reached (P3's bounded window, see :class:`geomx.p3.SendQueue`)."""
        frames = wire.encode(msg)
        if identity is not None:
            frames = [identity, *frames]
        # copy=False: large arrays go to libzmq without a Python-side copy. A multipart message is
        # atomic: if its first frame is accepted, so are the others.
        self.sock.send_multipart(frames, copy=False, flags=0 if block else zmq.NOBLOCK)
        self.bytes_sent += sum(len(f) if not isinstance(f, memoryview) else f.nbytes
                               for f in frames[0 if identity is None else 1:])

    def recv_frames(self) -> List[Any]:
        frames = self.sock.recv_multipart(copy=False, flags=zmq.NOBLOCK)
        self.bytes_received += sum(len(f.buffer) for f in frames)
        return frames

    def close(self) -> None:
        self.sock.close(linger=0)


def configure(sock: zmq.Socket, max_message_bytes: int) -> None:
    # MAXMSGSIZE makes libzmq drop a peer that sends an oversized message before we allocate it.
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes + (1 << 20))
    sock.setsockopt(zmq.LINGER, 2000)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)


def bind_router(ctx: zmq.Context, host: str, port: int, max_message_bytes: int, name: str,
                wan: bool = False) -> Tuple[Link, int]:
    """A ROUTER socket bound on all interfaces at ``port`` (0 = any free port)."""
    sock = ctx.socket(zmq.ROUTER)
    configure(sock, max_message_bytes)
    sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
    if port:
        sock.bind(f"tcp://*:{port}")
    else:
        port = sock.bind_to_random_port("tcp://*")
    return Link(sock, name, wan), port


def connect_dealer(ctx: zmq.Context, host: str, port: int, identity: bytes, max_message_bytes: int,
                   name: str, wan: bool = False, send_window: int = 0, send_buffer: int = 0) -> Link:
    """A DEALER connected to ``host:port``. ``send_window`` > 0 bounds the messages libzmq queues
    for sending (SNDHWM) and ``send_buffer`` the kernel's send buffer (SO_SNDBUF), so that a sender
    keeping its own priority queue (P3) decides the order of everything not yet on the wire."""
    sock = ctx.socket(zmq.DEALER)
    configure(sock, max_message_bytes)
    if send_window:
        sock.setsockopt(zmq.SNDHWM, send_window)
    if send_buffer:
        sock.setsockopt(zmq.SNDBUF, send_buffer)
    sock.setsockopt(zmq.IDENTITY, identity)
    sock.connect(f"tcp://{host}:{port}")
    return Link(sock, name, wan)


_REQUESTS = (wire.MsgType.INIT, wire.MsgType.PUSH, wire.MsgType.PULL, wire.MsgType.PUSHPULL,
             wire.MsgType.COMMAND, wire.MsgType.STOP)

Handler = Callable[[wire.Message, Optional[bytes], Link], None]


class EventLoop:
    """Polls a set of links and runs timers and cross-thread callbacks, all in one thread."""

    def __init__(self, ctx: zmq.Context, max_message_bytes: int = 1 << 31, name: str = "node"):
        self.ctx = ctx
        self.name = name
        self.max_message_bytes = max_message_bytes
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

    # -- registration -------------------------------------------------------------------------
    def add(self, link: Link, handler: Handler, routed: bool) -> None:
        """Dispatch decoded messages from ``link`` to ``handler(msg, identity, link)``."""
        self.handlers[link.sock] = (link, handler, routed)
        self.poller.register(link.sock, zmq.POLLIN)
        self.links.append(link)

    def remove(self, link: Link) -> None:
        if link.sock in self.handlers:
            self.poller.unregister(link.sock)
            del self.handlers[link.sock]
            self._writers.pop(link.sock, None)

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
        tx.send(b"", zmq.NOBLOCK)

    # -- running ------------------------------------------------------------------------------
    def run_once(self, timeout: float) -> None:
        now = time.monotonic()
        if self._timers:
            timeout = max(0.0, min(timeout, self._timers[0][0] - now))
        events = dict(self.poller.poll(int(timeout * 1000)))
        if self._wake_rx in events:
            while True:
                try:
                    self._wake_rx.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
        while self._calls:
            self._calls.popleft()()
        for sock, mask in events.items():
            if mask & zmq.POLLOUT and sock in self._writers:
                self.poller.modify(sock, zmq.POLLIN)
                self._writers.pop(sock)()
            entry = self.handlers.get(sock)
            if entry is not None and mask & zmq.POLLIN:
                self._drain(*entry)
            elif sock in self.fd_handlers:
                self.fd_handlers[sock]()
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, fn = heapq.heappop(self._timers)
            fn()

    def _drain(self, link: Link, handler: Handler, routed: bool) -> None:
        for _ in range(256):  # bounded so one busy peer cannot starve the others
            try:
                frames = link.recv_frames()
            except zmq.Again:
                return
            identity = None
            if routed:
                identity = bytes(frames[0].buffer)
                frames = frames[1:]
            try:
                msg = wire.decode(frames, self.max_message_bytes)
            except ProtocolError as exc:
                log.warning("%s: dropped a malformed message on %s from %r: %s",
                            self.name, link.name, identity, exc)
                continue
            try:
                handler(msg, identity, link)
            except ProtocolError as exc:
                log.warning("%s: rejected %s from %s on %s: %s",
                            self.name, msg.type.name, peer_label(identity), link.name, exc)
                self._refuse(link, identity, msg, str(exc))
            except Exception as exc:  # noqa: BLE001 - one bad request must not take the node down
                log.exception("%s: error while handling %s from %s on %s",
                              self.name, msg.type.name, peer_label(identity), link.name)
                self._refuse(link, identity, msg, f"internal error: {exc}")

    def _refuse(self, link: Link, identity: Optional[bytes], msg: wire.Message, reason: str) -> None:
        """Answer a refused request with ERROR so that its sender fails clearly instead of waiting."""
        if identity is None or msg.type not in _REQUESTS:
            return
        link.send(wire.Message(wire.MsgType.ERROR, req_id=msg.req_id, key=msg.key, offset=msg.offset,
                               total=msg.total, meta={"error": f"{self.name}: {reason}"}), identity)

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
        self._wake_rx.close(linger=0)


def peer_label(identity: Optional[bytes]) -> str:
    if identity is None:
        return "?"
    try:
        return identity.decode("ascii")
    except UnicodeDecodeError:
        return identity.hex()


__all__: Sequence[str] = ["Link", "EventLoop", "bind_router", "connect_dealer", "peer_label"]
