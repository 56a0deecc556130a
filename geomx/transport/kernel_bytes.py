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
few seconds of a connection's traffic. Unix-domain
(ipc) connections, and everything off Linux or before kernel 4.1, are not measured: the link reports
no kernel figure then.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

from .. import connguard


class KernelBytes:
    """The TCP payload bytes sent and received over one link's connections, present and past."""

    def __init__(self) -> None:
        # descriptor -> [its (local, peer) addresses, sent, received at the last reading, the SYN's 1 or 0]
        self._live: Dict[int, list] = {}
        self._ended_sent = 0
        self._ended_received = 0
        self.measured = False  # a TCP connection was ever measured

    def connected(self, fd: int, opened: bool) -> None:
        """A connection on descriptor ``fd`` was accepted (``opened`` False) or made by this end."""
        fd = int(fd)  # pyzmq's monitor gives it as an Event
        self._end(fd)  # an earlier connection on the same number is over
        with connguard.borrowed(fd) as sock:
            addresses = connguard.tcp_addresses(sock)
            counters = connguard.tcp_bytes(sock) if addresses is not None else None
        if counters is not None:
            # The end that opened a connection has its SYN, one sequence number, counted as acknowledged.
            self._live[fd] = [addresses, 0, 0, 1 if opened else 0]
            self._read(self._live[fd], counters)
            self.measured = True

    @staticmethod
    def _read(entry: list, counters: Tuple[int, int]) -> None:
        entry[1], entry[2] = max(0, counters[0] - entry[3]), counters[1]

    def disconnected(self, fd: int) -> None:
        """The connection on ``fd`` ended: its last reading is what it carried."""
        self._end(int(fd))

    def _end(self, fd: int) -> None:
        entry = self._live.pop(fd, None)
        if entry is not None:
            self._ended_sent += entry[1]
            self._ended_received += entry[2]

    def totals(self) -> Optional[Tuple[int, int]]:
        """(bytes sent, bytes received) over every connection so far, reading the live ones now; None
        when no TCP connection was ever measured."""
        for fd, entry in list(self._live.items()):
            with connguard.borrowed(fd) as sock:
                if connguard.tcp_addresses(sock) != entry[0]:
                    counters = None  # closed, or the number reused by another connection
                else:
                    counters = connguard.tcp_bytes(sock)
            if counters is None:
                self._end(fd)
            else:
                self._read(entry, counters)
        if not self.measured:
            return None
        return (self._ended_sent + sum(e[1] for e in self._live.values()),
                self._ended_received + sum(e[2] for e in self._live.values()))
