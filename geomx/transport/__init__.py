"""The transport: links between nodes, and the single-threaded event loop every node runs on them.

One module per concern:

* :mod:`.loop`: :class:`EventLoop` (polling, decoding, dispatch to handlers, timers,
  ``call_soon_threadsafe``, the ZAP handler and socket monitors; ``secure`` gives every socket its
  security settings), and ``log_limited``, the rate-limited log of what peers get refused;
* :mod:`.zmq_link`: the ZeroMQ link (:class:`Link`: send and receive, socket options, handshake
  state) and its factories :func:`bind_router` and :func:`connect_dealer`, with the Unix-domain socket
  next to a listener's TCP port;
* :mod:`.identity`: :class:`Origin`, where a received message came from, and what a listener reads
  in a client's identity (:func:`reconnected_identity`, :func:`split_identity`, :func:`base_identity`,
  :func:`identity_token`, :func:`peer_label`);
* :mod:`.memory`: glibc's heap tuned for tensors (:func:`keep_large_buffers`,
  :func:`release_free_memory`).

The interface
-------------
Nodes see a transport through a link, two factories and the loop's handlers:

* a **link** offers ``send(msg, identity=None, block=True)`` (a listener sends to the peer
  ``identity`` names, and never blocks on one peer: it drops that peer's reply and logs why;
  ``block=False`` raises ``zmq.Again`` with nothing sent when the link cannot take more, which P3's
  window relies on), ``receive(routed)`` (the next waiting message without blocking as ``(frames,
  identity, curve_key)``, frames being what :func:`geomx.wire.decode` takes, or None when nothing
  waits), ``close()``, the attributes ``name``, ``peer`` (the other end, for log lines), ``wan`` (a
  cross-party link), ``bytes_sent`` and ``bytes_received`` (counted by the link, read by the byte
  reports), and ``sock``: what the loop polls and keys its handlers by (``zmq.Poller`` takes a ZeroMQ
  socket or any object with ``fileno()``), with ``closed``. A client link may call
  ``on_disconnected()`` when its connection ended and ``on_refused(reason)`` when the peer refused its
  key; ``curve``, ``monitor`` and ``guard`` are ZeroMQ's (a link without a monitor or a guard is
  served without them).
* **factories**: ``bind_router(loop, port, name, *, wan, cross_party, host, fd) -> (link, port)``
  for a listener (many peers, each known by its identity) and ``connect_dealer(loop, host, port,
  identity, name, *, peer, wan, cross_party, send_window, send_buffer) -> link`` for a client (one
  peer, the listener, which knows it by ``identity``).
* the **loop**: ``loop.add(link, handler, routed)`` decodes every message that arrives on ``link``
  and calls ``handler(msg, origin)`` with an :class:`Origin` built per message: the link, the peer's
  identity (on a listener) and the key it was admitted with (over CURVE). ``origin.reply(msg)``
  answers it over the connection it came by; ``origin.label`` names it in log lines. A handler may
  raise :class:`~geomx.errors.ProtocolError`: the loop logs it (rate-limited) and answers a request
  with ERROR. Nothing about the message's sender is kept on the link.

A second transport is one new module beside :mod:`.zmq_link`: a link class and the two factories
(which leave out ``loop.secure``: it sets ZeroMQ socket options and monitors). The loop stays as it
is: it polls with ``zmq.Poller``, which takes the new link's ``sock`` by its ``fileno()``. Choosing it
is the one change elsewhere (which module's factories this package exports as ``bind_router`` and
``connect_dealer``, or a choice by name as :mod:`geomx.senders` makes for client senders); handlers,
servers and clients do not change.
"""
from __future__ import annotations

from typing import Sequence

# pyzmq's sender of zero-copy frames (its "gc" thread) registers, when zmq.utils.garbage is first
# imported, an atexit handler that shuts it down for good. Imported lazily (at a process's first
# zero-copy send), that handler runs before geomx's own (kvstore closes at exit, LIFO): a worker whose
# script had just ended could then not pass on a TSEngine result to its party peers (RuntimeError
# "zmq gc socket requested during shutdown"), and they waited for it forever. Imported here (before
# any link exists), it outlives geomx's close.
import zmq.utils.garbage  # noqa: F401

from .identity import Origin, base_identity, identity_token, peer_label, reconnected_identity, split_identity
from .loop import EventLoop, Handler, log_limited
from .memory import keep_large_buffers, release_free_memory
from .zmq_link import (
    HANDSHAKE_GRACE_S,
    RECEIVE_HWM,
    WAN_CONNECT_TIMEOUT_MS,
    Link,
    bind_router,
    configure,
    connect_dealer,
)

__all__: Sequence[str] = ["Link", "EventLoop", "Handler", "Origin", "bind_router", "connect_dealer", "configure",
                          "peer_label", "identity_token", "base_identity", "reconnected_identity",
                          "split_identity", "log_limited", "keep_large_buffers", "release_free_memory",
                          "HANDSHAKE_GRACE_S", "RECEIVE_HWM", "WAN_CONNECT_TIMEOUT_MS"]
