"""The bytes a link's TCP connections carried, as the kernel counts them.

A :class:`~geomx.transport.Link` counts the geomx messages it hands to ZeroMQ and takes from it. What
crosses the network is more: ZMTP's frame headers, the handshakes, heartbeats, CURVE's boxes and
nonces. The kernel counts that for each TCP connection (``tcpi_bytes_acked``: sent and acknowledged
by the peer; ``tcpi_bytes_received``), so a link learns its connections' descriptors from its socket
monitor (a listener's accepted connections, a client's connected ones) and reads their counters when
its metrics are read.

A connection that ended keeps the counts of the last reading before its end: what it carried after
that reading is not counted (the descriptor is closed by the time its end is reported). The event
loop reads every link's connections every few seconds (``KERNEL_READ_INTERVAL``), so that is at most a
few seconds of a connection's traffic. Unix-domain (ipc) connections, and everything off Linux or
before kernel 4.1, are not measured: the link reports no kernel figure then.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from .. import connguard


@dataclass
class _Connection:
    addresses: Tuple[Any, Any]  # (ours, the peer's): the descriptor is checked to be this one before each reading
    syn: int  # 1 where this end opened it: the kernel counts the SYN, one sequence number, as acknowledged
    sent: int = 0  # at the last reading
    received: int = 0

    def update(self, counters: Tuple[int, int]) -> None:
        self.sent, self.received = max(0, counters[0] - self.syn), counters[1]


def _reading(fd: int) -> Tuple[Optional[Tuple[Any, Any]], Optional[Tuple[int, int]]]:
    """(addresses, kernel counters) of the TCP connection on descriptor ``fd`` now; None for either
    where there is none (not TCP, closed, not measurable here)."""
    with connguard.borrowed(fd) as sock:
        addresses = connguard.tcp_addresses(sock)
        return addresses, connguard.tcp_bytes(sock) if addresses is not None else None


class KernelBytes:
    """The TCP payload bytes sent and received over one link's connections, present and past."""

    def __init__(self) -> None:
        self._live: Dict[int, _Connection] = {}  # by descriptor
        self._ended_sent = 0
        self._ended_received = 0
        self.measured = False  # a TCP connection was ever measured

    def connected(self, fd: int, opened: bool) -> None:
        """A connection on descriptor ``fd`` was accepted (``opened`` False) or made by this end."""
        fd = int(fd)  # pyzmq's monitor gives it as an Event
        self._end(fd)  # an earlier connection on the same number is over
        addresses, counters = _reading(fd)
        if addresses is not None and counters is not None:
            conn = self._live[fd] = _Connection(addresses, 1 if opened else 0)
            conn.update(counters)
            self.measured = True

    def disconnected(self, fd: int) -> None:
        """The connection on ``fd`` ended: its last reading is what it carried."""
        self._end(int(fd))

    def _end(self, fd: int) -> None:
        conn = self._live.pop(fd, None)
        if conn is not None:
            self._ended_sent += conn.sent
            self._ended_received += conn.received

    def totals(self) -> Optional[Tuple[int, int]]:
        """(bytes sent, bytes received) over every connection so far, reading the live ones now; None
        when no TCP connection was ever measured."""
        for fd, conn in list(self._live.items()):
            addresses, counters = _reading(fd)
            if addresses != conn.addresses or counters is None:
                self._end(fd)  # closed, or the number reused by another connection
            else:
                conn.update(counters)
        if not self.measured:
            return None
        return (self._ended_sent + sum(c.sent for c in self._live.values()),
                self._ended_received + sum(c.received for c in self._live.values()))
