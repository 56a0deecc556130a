"""A tier's TSEngine coordinator, run by the tier's scheduler: answers nodes' "whom do I send to?"
questions with :mod:`geomx.tsengine.policy` and keeps the throughput table up to date."""
from __future__ import annotations

import logging
import random
from typing import Callable, Dict, Optional, Tuple

from ..errors import ProtocolError
from ..wire import Message, MsgType, meta_field
from .policy import ROOT, Session, ThroughputTable

log = logging.getLogger("geomx.tsengine")

QUESTIONS = (MsgType.TS_ASK_PUSH, MsgType.TS_ASK_RELAY, MsgType.TS_REPORT)

Send = Callable[[int, Message], None]  # (node, message)


class Coordinator:
    """``addresses`` maps every node (``ROOT`` and the workers' ranks) to the (host, port) where it
    takes TSEngine data; ``send(node, msg)`` delivers an answer."""

    def __init__(self, tier: str, addresses: Dict[int, Tuple[str, int]], send: Send, max_greed_rate: float,
                 rng: Optional[random.Random] = None):
        self.tier = tier
        self.addresses = dict(addresses)
        self.workers = sorted(n for n in self.addresses if n != ROOT)
        self.send = send
        self.max_greed_rate = max_greed_rate
        self.rng = rng or random.Random()
        self.table = ThroughputTable()
        self.sessions: Dict[Tuple[int, int], Session] = {}

    def _session(self, key: int, rnd: int) -> Session:
        s = self.sessions.get((key, rnd))
        if s is None:
            s = self.sessions[(key, rnd)] = Session(self.workers)
        return s

    def _target(self, node: Optional[int]) -> Optional[dict]:
        if node is None:
            return None  # nobody: the asker is done with this round
        host, port = self.addresses[node]
        return {"rank": node, "host": host, "port": port}

    def _report(self, msg: Message, node: int) -> None:
        to = meta_field(msg, "to", int, None)
        rate = meta_field(msg, "bytes_per_s", float, None)
        if to is None or rate is None:
            return
        if to not in self.addresses or to == node:
            raise ProtocolError(f"{msg.type.name}: throughput to unknown node {to}")
        self.table.record(node, to, rate)

    def handle(self, msg: Message, node: int) -> None:
        """A question from ``node`` (``ROOT`` or a worker rank); raises ProtocolError if malformed."""
        if node not in self.addresses:
            raise ProtocolError(f"{msg.type.name} from a node that takes no part in TSEngine")
        key, rnd = msg.key, msg.version
        if msg.type == MsgType.TS_REPORT:
            self._report(msg, node)
        elif msg.type == MsgType.TS_ASK_PUSH:
            session = self._session(key, rnd)
            if session.started:
                raise ProtocolError(f"TS_ASK_PUSH for key {key} round {rnd} after its result is out")
            try:
                pairs = session.ask_push(node, self.table)
            except ValueError as exc:
                raise ProtocolError(str(exc)) from None
            for sender, receiver in pairs:
                log.debug("%s: key %d round %d: %d sends its partial sum to %d", self.tier, key, rnd,
                          sender, receiver)
                self.send(sender, Message(MsgType.TS_PUSH_TO, key=key, version=rnd, meta=self._target(receiver)))
        elif msg.type == MsgType.TS_ASK_RELAY:
            self._report(msg, node)
            session = self._session(key, rnd)
            if node != ROOT and node not in session.served:
                raise ProtocolError(f"TS_ASK_RELAY from {node}, which was not sent key {key} round {rnd}")
            if node == ROOT and session.started and meta_field(msg, "to", int, None) is None:
                raise ProtocolError(f"the root started the relay of key {key} round {rnd} twice")
            target = session.next_receiver(node, self.table, self.max_greed_rate, self.rng)
            log.debug("%s: key %d round %d: %d relays the result to %s", self.tier, key, rnd, node,
                      "nobody" if target is None else target)
            self.send(node, Message(MsgType.TS_RELAY_TO, key=key, version=rnd, meta=self._target(target)))
            if session.finished:
                del self.sessions[(key, rnd)]
        else:
            raise ProtocolError(f"unexpected {msg.type.name} at a TSEngine coordinator")
