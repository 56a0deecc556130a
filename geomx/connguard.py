"""What libzmq holds for each TCP connection of a listener, and cutting a connection that holds too much.

libzmq bounds each frame (MAXMSGSIZE) and the number of *complete* messages it queues per peer
(RCVHWM), but not the frames of a message that is never finished: a peer that keeps sending frames
flagged "more" makes libzmq buffer them, below our code, for as long as it stays connected. Nothing in
libzmq's API shows that memory, so it is measured from outside. For every accepted TCP connection:

    held = bytes TCP received (the kernel's tcpi_bytes_received)
           - bytes still in the kernel's receive queue (FIONREAD)
           - the wire size of every complete message the event loop took from that connection
             (each message's frames carry the descriptor they came from: ZMQ_SRCFD)

Measured after the listener was drained, ``held`` is what libzmq has read but not delivered: the
handshake, the part of a message in progress, and the frames of a message never finished. A genuine
message in progress holds at most one message, which is at most ``GEOMX_MAX_MESSAGE_BYTES`` plus its
1 MiB of metadata (a geomx message has at most one data frame). A connection that holds more than
that and delivers nothing, at :data:`STRIKES` checks in a row (every :data:`CHECK_INTERVAL` seconds),
is cut (shutdown of its socket: libzmq sees the connection end, drops the unfinished message and frees
what it held) and the cut is logged. So a connection holds at most one largest message plus what it
can send in the time to three checks (under a second while the event loop is responsive).

Unix-domain (ipc) connections are not measured: only this user's processes can open them (the socket
lives in a 0700 directory), and those can read the user's keys anyway. Nor is anything measured off
Linux (or before kernel 4.1), where struct tcp_info differs or lacks the byte counter.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import struct
import sys
import termios
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Set, Tuple

import zmq

from . import wire

CHECK_INTERVAL = 0.25
"""Seconds between two measurements of a listener's connections (a few system calls each)."""

STRIKES = 3
"""Consecutive checks a connection must hold too much at, delivering nothing, before it is cut."""

SLACK = 1 << 20
"""Held bytes allowed beyond one largest message: the handshake (a few hundred bytes) and libzmq's
read buffer (8 KiB), with room to spare."""

_TCPI_BYTES_ACKED = 120  # offset of tcpi_bytes_acked (u64) in Linux's struct tcp_info (4.1 and later)
_TCPI_BYTES_RECEIVED = 128  # offset of tcpi_bytes_received (u64)
_TCP_INFO_LEN = _TCPI_BYTES_RECEIVED + 8

_SRCFD = int(zmq.SRCFD)
# Linux's struct tcp_info: elsewhere (other layouts, or none) nothing is measured and nothing cut.
_MEASURABLE = sys.platform.startswith("linux") and hasattr(socket, "TCP_INFO")


def frame_wire_bytes(size: int, curve: bool) -> int:
    """The bytes a data frame of ``size`` bytes takes on a ZMTP 3 connection: a flags byte and a 1- or
    8-byte length; with CURVE the frame travels as a MESSAGE command (its 8-byte name, an 8-byte nonce,
    the box's 16-byte tag and the frame's flags byte, then the frame), framed the same way."""
    if curve:
        size += 33
    return size + (2 if size < 256 else 9)


@dataclass
class _Connection:
    addresses: Tuple[Any, Any]  # (ours, the peer's): the descriptor is checked to be this one before use
    delivered: int = 0  # wire bytes of the complete messages the event loop took from it
    delivered_at_check: int = 0  # ``delivered`` at the previous check
    strikes: int = 0


@contextlib.contextmanager
def borrowed(fd: int) -> Iterator[Optional[socket.socket]]:
    """A socket object for libzmq's descriptor ``fd``, through a duplicate of it: whatever libzmq does
    with ``fd`` meanwhile (closing it, reusing the number), the duplicate still stands for the
    connection it was made from, and closing it leaves libzmq's own open. None if ``fd`` is closed."""
    try:
        dup = os.dup(fd)
    except OSError:
        yield None
        return
    try:
        sock = socket.socket(fileno=dup)
    except OSError:  # the number now stands for something else than a socket
        os.close(dup)
        yield None
        return
    with sock:
        yield sock


def tcp_addresses(sock: Optional[socket.socket]) -> Optional[Tuple[Any, Any]]:
    """(local, peer) address of a TCP socket; None for any other kind (ipc) or a closed one."""
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
        return None
    try:
        return sock.getsockname(), sock.getpeername()
    except OSError:
        return None


def tcp_bytes(sock: Optional[socket.socket]) -> Optional[Tuple[int, int]]:
    """(bytes the peer acknowledged, bytes received) on TCP socket ``sock``, as the kernel counts its
    payload (not IP or TCP headers); None where it cannot tell (a closed socket, an older kernel)."""
    if sock is None or not _MEASURABLE:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    except OSError:
        return None
    if len(info) < _TCP_INFO_LEN:
        return None
    return struct.unpack_from("QQ", info, _TCPI_BYTES_ACKED)


def _received_and_queued(sock: socket.socket) -> Optional[Tuple[int, int]]:
    """(bytes TCP received on ``sock``, bytes of them still in the kernel's receive queue)."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
        if len(info) < _TCP_INFO_LEN:
            return None  # a kernel older than 4.1: no byte counter
        queued = bytearray(4)
        fcntl.ioctl(sock.fileno(), termios.FIONREAD, queued)
    except OSError:
        return None
    return struct.unpack_from("Q", info, _TCPI_BYTES_RECEIVED)[0], struct.unpack("i", queued)[0]


class ConnectionGuard:
    """The held bytes of one listener's TCP connections (see the module's text).

    ``limit``: the most a connection may hold. ``drain``: reads the complete messages waiting on the
    listener (one bounded batch, through the event loop's handler, so that each is counted by
    :meth:`delivered`). ``refresh``: handles the listener's pending connection events (so that a
    message from a connection just accepted finds it). ``report``: logs a cut (rate-limited by the
    caller)."""

    def __init__(self, name: str, curve: bool, limit: int, drain: Callable[[], Any],
                 refresh: Callable[[], Any], report: Callable[[str, object], None]):
        self.name = name
        self.curve = curve
        self.limit = limit
        self._drain = drain
        self.refresh = refresh
        self._report = report
        self.connections: Dict[int, _Connection] = {}
        self._unmeasured: Set[int] = set()  # descriptors of accepted Unix-domain connections
        self.cut = 0  # connections cut so far

    def accepted(self, fd: int) -> None:
        with borrowed(fd) as sock:
            addresses = tcp_addresses(sock) if _MEASURABLE else None
        if addresses is None:
            self.connections.pop(fd, None)
            self._unmeasured.add(fd)
        else:
            self._unmeasured.discard(fd)
            self.connections[fd] = _Connection(addresses)

    def closed(self, fd: int) -> None:
        self.connections.pop(fd, None)
        self._unmeasured.discard(fd)

    def delivered(self, frames: Sequence[Any], skip: int) -> None:
        """A complete message taken from the listener; its first ``skip`` frames (a ROUTER's routing
        identity) never crossed the wire."""
        try:
            fd = frames[0].get(_SRCFD)
        except zmq.ZMQError:
            return  # a ZMTP 1/2 peer's messages carry no descriptor: its connection is cut as holding
        conn = self.connections.get(fd)
        if conn is None and fd not in self._unmeasured:
            self.refresh()  # accepted while the listener was being drained
            conn = self.connections.get(fd)
        if conn is not None:
            curve = self.curve
            conn.delivered += sum(frame_wire_bytes(len(f), curve) for f in frames[skip:])

    def held(self, fd: int) -> Optional[int]:
        """Bytes libzmq has read from connection ``fd`` and not delivered; None if it is no longer the
        connection that was accepted there (gone, or the descriptor reused)."""
        with borrowed(fd) as sock:
            return self._held(fd, sock)

    def _held(self, fd: int, sock: Optional[socket.socket]) -> Optional[int]:
        conn = self.connections.get(fd)
        if conn is None or tcp_addresses(sock) != conn.addresses:
            return None
        assert sock is not None
        counters = _received_and_queued(sock)
        if counters is None:
            return None
        received, queued = counters
        held = received - queued - conn.delivered
        if held < 0:
            # Messages of an earlier connection on the same descriptor, taken after this one was
            # accepted, were counted to it: no credit for a connection that did not send them.
            conn.delivered += held
            return 0
        return held

    def check(self) -> None:
        """Every CHECK_INTERVAL: strike each connection that holds more than ``limit`` and delivered
        nothing since the previous check; cut it at STRIKES. A message never finished keeps every
        later message of its connection back, so such a connection delivers nothing; a genuine one
        that held more for a moment (messages completed between the drain and the measurement)
        delivers them by the next check."""
        if not self.connections:
            return
        self._drain()
        for fd in list(self.connections):
            with borrowed(fd) as sock:
                held = self._held(fd, sock)
                if held is None:
                    self.connections.pop(fd, None)
                    continue
                conn = self.connections[fd]
                idle = conn.delivered == conn.delivered_at_check
                conn.delivered_at_check = conn.delivered
                conn.strikes = conn.strikes + 1 if held > self.limit and idle else 0
                if conn.strikes >= STRIKES:
                    assert sock is not None
                    self._cut(fd, conn, held, sock)

    def _cut(self, fd: int, conn: _Connection, held: int, sock: socket.socket) -> None:
        peer = conn.addresses[1]
        where = f"{peer[0]}:{peer[1]}"
        self._report(f"{self.name}: CUT the connection from {where}: it keeps {held} bytes of a message it "
                     f"does not finish (more than one largest message, {self.limit} bytes: "
                     f"GEOMX_MAX_MESSAGE_BYTES plus headers)", (where, self.name, "unfinished message"))
        del self.connections[fd]
        self.cut += 1
        try:
            sock.shutdown(socket.SHUT_RDWR)  # libzmq sees the connection end and closes its descriptor
        except OSError:
            pass


def limit_for(max_message_bytes: int) -> int:
    """What a connection may hold: one largest message (data and its metadata) and SLACK."""
    return max_message_bytes + wire.MAX_META_BYTES + wire.HEADER_SIZE + SLACK


__all__ = ["ConnectionGuard", "frame_wire_bytes", "limit_for", "CHECK_INTERVAL", "STRIKES"]
