"""What libzmq holds for each TCP connection of a listener, and cutting a connection that holds too much.

libzmq bounds each frame (MAXMSGSIZE) and the number of *complete* messages it queues per peer
(RCVHWM), but not the frames of a message that is never finished: a peer that keeps sending frames
flagged "more" makes libzmq buffer them, below our code, for as long as it stays connected. Nothing in
libzmq's API shows that memory, so it is measured from outside. For every accepted TCP connection:

    held = bytes TCP received (the kernel's tcpi_bytes_received)
           - bytes still in the kernel's receive queue (SIOCINQ)
           - the wire size of every complete message the event loop took from that connection
             (each message's frames carry the descriptor they came from: ZMQ_SRCFD)

Measured right after the listener was drained (no complete message waiting), ``held`` is what libzmq
has read but not delivered: the handshake, the part of a message in progress, and the frames of a
message never finished. A genuine message in progress holds at most one message, which is at most
``GEOMX_MAX_MESSAGE_BYTES`` plus its 1 MiB of metadata (a geomx message has at most one data frame);
a connection that holds more than that at :data:`STRIKES` checks in a row (every
:data:`CHECK_INTERVAL` seconds) is cut (shutdown of its socket: libzmq sees the connection end, drops
the unfinished message and frees what it held) and the cut is logged. So a connection holds at most
one largest message plus what it can send in the time to three checks (under a second).

Unix-domain (ipc) connections are not measured: only this user's processes can open them (the socket
lives in a 0700 directory), and those can read the user's keys anyway.
"""
from __future__ import annotations

import fcntl
import logging
import socket
import struct
import termios
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import zmq

from . import wire

log = logging.getLogger("geomx.connguard")

CHECK_INTERVAL = 0.25
"""Seconds between two measurements of a listener's connections (a few system calls each)."""

STRIKES = 3
"""Consecutive checks a connection must hold too much at before it is cut. A genuine message never
holds more than the limit; a check can still count as held a message that completed between the drain
and the measurement, but not three checks running."""

SLACK = 1 << 20
"""Held bytes allowed beyond one largest message: the handshake (a few hundred bytes) and libzmq's
read buffer (8 KiB), with room to spare."""

_TCPI_BYTES_RECEIVED = 128  # offset of tcpi_bytes_received (u64) in Linux's struct tcp_info (4.1 and later)
_TCP_INFO_LEN = _TCPI_BYTES_RECEIVED + 8

_SRCFD = int(zmq.SRCFD)
# Linux's byte counter: elsewhere nothing is measured (and nothing cut).
_MEASURABLE = hasattr(socket, "TCP_INFO") and hasattr(termios, "FIONREAD")


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
    strikes: int = 0


def _tcp_addresses(fd: int) -> Optional[Tuple[Any, Any]]:
    """(local, peer) address of TCP socket ``fd``; None for any other kind of descriptor."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return None
    try:
        if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
            return None
        return sock.getsockname(), sock.getpeername()
    except OSError:
        return None
    finally:
        sock.detach()  # the descriptor is libzmq's: never close it


def _received_and_queued(fd: int) -> Optional[Tuple[int, int]]:
    """(bytes TCP received on ``fd``, bytes of them still in the kernel's receive queue)."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
        if len(info) < _TCP_INFO_LEN:
            return None  # a kernel older than 4.1: no byte counter
        queued = bytearray(4)
        fcntl.ioctl(fd, termios.FIONREAD, queued)
        return struct.unpack_from("Q", info, _TCPI_BYTES_RECEIVED)[0], struct.unpack("i", queued)[0]
    except OSError:
        return None
    finally:
        sock.detach()


class ConnectionGuard:
    """The held bytes of one listener's TCP connections (see the module's text).

    ``limit``: the most a connection may hold; ``drain``: reads every complete message waiting on the
    listener (through the event loop's handler, so each is counted by :meth:`delivered`) and returns
    False if it could not finish; ``report``: logs a cut (rate-limited by the caller)."""

    def __init__(self, name: str, curve: bool, limit: int, drain: Callable[[], bool],
                 report: Callable[[str, object], None]):
        self.name = name
        self.curve = curve
        self.limit = limit
        self._drain = drain
        self._report = report
        self.connections: Dict[int, _Connection] = {}
        self.cut = 0  # connections cut so far

    def accepted(self, fd: int) -> None:
        addresses = _tcp_addresses(fd) if _MEASURABLE else None
        if addresses is None:
            self.connections.pop(fd, None)  # ipc: not measured
        else:
            self.connections[fd] = _Connection(addresses)

    def closed(self, fd: int) -> None:
        self.connections.pop(fd, None)

    def delivered(self, frames: Sequence[Any], skip: int) -> None:
        """A complete message taken from the listener; its first ``skip`` frames (a ROUTER's routing
        identity) never crossed the wire."""
        conn = self.connections.get(frames[0].get(_SRCFD))
        if conn is not None:
            curve = self.curve
            conn.delivered += sum(frame_wire_bytes(len(f), curve) for f in frames[skip:])

    def held(self, fd: int) -> Optional[int]:
        """Bytes libzmq has read from connection ``fd`` and not delivered; None if it is no longer the
        connection that was accepted there (gone, or the descriptor reused)."""
        conn = self.connections.get(fd)
        counters = _received_and_queued(fd) if conn is not None else None
        if conn is None or counters is None or _tcp_addresses(fd) != conn.addresses:
            return None
        received, queued = counters
        return received - queued - conn.delivered

    def check(self) -> None:
        """Every CHECK_INTERVAL: strike each connection holding more than ``limit``; cut it at STRIKES."""
        if not self.connections or not self._drain():
            return  # a flood of complete messages is still being read: measure next time
        for fd in list(self.connections):
            held = self.held(fd)
            if held is None:
                self.connections.pop(fd, None)
                continue
            conn = self.connections[fd]
            conn.strikes = conn.strikes + 1 if held > self.limit else 0
            if conn.strikes >= STRIKES:
                self._cut(fd, conn, held)

    def _cut(self, fd: int, conn: _Connection, held: int) -> None:
        peer = conn.addresses[1]
        where = f"{peer[0]}:{peer[1]}"
        self._report(f"{self.name}: CUT the connection from {where}: it keeps {held} bytes of a message it "
                     f"does not finish (more than one largest message, {self.limit} bytes: "
                     f"GEOMX_MAX_MESSAGE_BYTES plus headers)", (where, self.name, "unfinished message"))
        del self.connections[fd]
        self.cut += 1
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            return
        try:
            sock.shutdown(socket.SHUT_RDWR)  # libzmq sees the end and closes it; the descriptor stays its own
        except OSError:
            pass
        finally:
            sock.detach()


def limit_for(max_message_bytes: int) -> int:
    """What a connection may hold: one largest message (data and its metadata) and SLACK."""
    return max_message_bytes + wire.MAX_META_BYTES + wire.HEADER_SIZE + SLACK


__all__ = ["ConnectionGuard", "frame_wire_bytes", "limit_for", "CHECK_INTERVAL", "STRIKES"]
