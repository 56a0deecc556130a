"""How a client hands its messages to its servers' sockets: senders chosen by name.

A :class:`~geomx.kvclient.KVClient` builds its requests (parts, headers, deadlines, replays) and gives
every message to one :class:`Sender`, which decides how it reaches the server's link:

* ``zmq`` (default): straight to the server's socket, in the order sent.
* ``p3``: P3's priority queues (:class:`geomx.p3.SendQueue`): data-path requests cut into slices of
  ``GEOMX_P3_SLICE_SIZE`` elements, at most ``GEOMX_P3_WINDOW`` messages handed to each socket, the
  rest waiting in a heap where higher priorities overtake (docs/Scheduling.md).
* ``dgt``: a local server's pushes to the global tier as DGT blocks (:class:`geomx.dgt.Sender`:
  important blocks on the reliable link, the others on low-priority channels; docs/DGT.md).

A new sender is one class here (or elsewhere) plus ``SENDERS[name] = cls``; :func:`for_node` picks the
name from a node's configuration, as ps-lite picks its van by name.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional, Tuple, Type

from .p3 import DATA, SendQueue
from .transport import EventLoop, Link
from .wire import Message

# Called with the wall-clock time (time.time()) just before the message was handed to its socket: taken
# before the hand-over, so that a thread preempted right after it cannot date the send after its answer.
OnSent = Optional[Callable[[float], None]]


class Sender:
    """``zmq``: every message straight to its server's socket."""

    name = "zmq"
    slice_size = 0  # data-path requests are cut into slices of this many elements (0: whole parts)

    def __init__(self, loop: EventLoop):
        self.loop = loop
        self.links: List[Optional[Link]] = []

    def link_options(self) -> Dict[str, int]:
        """Socket options for the client's links (``transport.connect_dealer`` keywords)."""
        return {}

    def attach(self, server: int, link: Link, address: Tuple[str, int]) -> None:
        """``link`` is (now) the link to server ``server`` at ``address``."""
        while len(self.links) <= server:
            self.links.append(None)
        self.links[server] = link

    def send(self, server: int, msg: Message, kind: int = DATA, on_sent: OnSent = None) -> None:
        """Send ``msg`` (``kind``: ``p3.DATA`` or ``p3.CONTROL``); ``on_sent`` once it is on the socket."""
        link = self.links[server]
        assert link is not None
        handed = time.time()
        link.send(msg)
        if on_sent is not None:
            on_sent(handed)

    def resend(self, server: int, msg: Message, kind: int = DATA) -> None:
        """Send ``msg`` again, whole, over server ``server``'s new link (after :meth:`discard`): a
        request that link's predecessor may have lost. P3 queues it (its links take only a window
        of messages: sent straight, it would block the loop while the link is down)."""
        link = self.links[server]
        assert link is not None
        link.send(msg)

    def discard(self, server: int) -> None:
        """Server ``server``'s link is being replaced: forget what is not on its socket yet (the client
        resends every unanswered request over the new one)."""

    def close(self) -> None:
        """The client failed or stopped: drop everything not sent yet."""


class P3Sender(Sender):
    """``p3``: one priority queue per server link (see the module docstring)."""

    name = "p3"

    def __init__(self, loop: EventLoop, slice_size: int, window: int):
        super().__init__(loop)
        self.slice_size = slice_size
        self.window = window
        self.queues: Dict[int, SendQueue] = {}

    def link_options(self) -> Dict[str, int]:
        # libzmq may hold `window` messages and the kernel about one slice of float32; everything else
        # waits in the queue, where priorities still decide.
        return {"send_window": self.window, "send_buffer": max(1 << 16, 4 * self.slice_size)}

    def attach(self, server: int, link: Link, address: Tuple[str, int]) -> None:
        super().attach(server, link, address)
        self.queues[server] = SendQueue(self.loop, link)

    def send(self, server: int, msg: Message, kind: int = DATA, on_sent: OnSent = None) -> None:
        self.queues[server].put(msg, kind, on_sent)

    def resend(self, server: int, msg: Message, kind: int = DATA) -> None:
        self.queues[server].put(msg, kind, None)

    def discard(self, server: int) -> None:
        queue = self.queues.pop(server, None)
        if queue is not None:
            queue.clear()

    def close(self) -> None:
        for queue in self.queues.values():
            queue.clear()


class DgtSender(Sender):
    """``dgt``: data-path messages through a local server's :class:`geomx.dgt.Sender` (which sends a
    dense push as blocks and anything else unchanged); control messages straight to the socket."""

    name = "dgt"

    def __init__(self, loop: EventLoop, dgt: Any):
        super().__init__(loop)
        self.dgt = dgt

    def attach(self, server: int, link: Link, address: Tuple[str, int]) -> None:
        super().attach(server, link, address)
        if server < len(self.dgt.peers):
            # The same server over a new connection (DGT is refused with checkpoints, so a server
            # never moves): its per-server state (key, UDP port) stays.
            self.dgt.relink(server, link, address[1])
            return
        if server != len(self.dgt.peers):
            raise RuntimeError(f"DGT: server {server} attached out of order")
        self.dgt.attach([link], [address])

    def send(self, server: int, msg: Message, kind: int = DATA, on_sent: OnSent = None) -> None:
        if kind != DATA:
            super().send(server, msg, kind, on_sent)
            return
        handed = time.time()
        self.dgt.send(server, msg)
        if on_sent is not None:
            on_sent(handed)


SENDERS: Dict[str, Type[Sender]] = {"zmq": Sender, "p3": P3Sender, "dgt": DgtSender}


def create(name: str, loop: EventLoop, **options: Any) -> Sender:
    try:
        cls = SENDERS[name]
    except KeyError:
        raise ValueError(f"unknown sender {name!r}; senders: {', '.join(sorted(SENDERS))}") from None
    return cls(loop, **options)


def for_node(cfg: Any, loop: EventLoop, dgt: Optional[Any] = None) -> Sender:
    """The sender a node's configuration asks for: ``dgt`` for a local server with DGT on (``dgt``: its
    :class:`geomx.dgt.Sender`), ``p3`` with ``ENABLE_P3=1``, else ``zmq``."""
    if dgt is not None:
        return create("dgt", loop, dgt=dgt)
    if cfg.p3.enabled:
        return create("p3", loop, slice_size=cfg.p3.slice_size, window=cfg.p3.window)
    return create("zmq", loop)
