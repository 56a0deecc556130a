"""TSEngine's part in a tier's scheduler (a :class:`geomx.membership.scheduler.TierPlugin`): once
the tier is complete, checks that every node taking part agrees, starts the coordinator, answers the
nodes' questions, and hands each node taking part the keys of its own TSEngine links (keys.py)."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, List, Optional

from ..errors import ProtocolError
from ..wire import Message
from .coordinator import QUESTIONS, Coordinator
from .keys import keys_meta, tier_secret
from .policy import ROOT

if TYPE_CHECKING:  # membership does not import TSEngine; only the names, for the annotations
    from ..membership.scheduler import Member, Scheduler

log = logging.getLogger("geomx.tsengine")


class TSEngineTier:
    """``variable``: the variable that switches TSEngine on in this tier (named in errors);
    ``max_greed_rate``: the coordinator's greedy probability."""

    messages = QUESTIONS

    def __init__(self, variable: str, max_greed_rate: float):
        self.variable = variable
        self.max_greed_rate = max_greed_rate
        self.coordinator: Optional[Coordinator] = None
        # What each TSEngine link's key is derived from (geomx/tsengine/keys.py), so that nobody else
        # can send partial sums or results into the aggregation tree, nor one node as another.
        self.secret = tier_secret()
        self.nodes: list = []  # the tree's nodes: ROOT and the training workers' ranks

    def tier_complete(self, scheduler: "Scheduler", servers: List["Member"], workers: List["Member"]) -> bool:
        """Start the coordinator if the tier's nodes asked for it. Every node that takes part (servers,
        training workers; not the master worker) must agree, else the tier fails now with the variable
        named, rather than half of it waiting for messages the other half never sends."""
        taking_part = servers + [m for m in workers if not m.master]
        on = [m for m in taking_part if m.ts]
        if not on:
            return True
        off = [m for m in taking_part if not m.ts]
        if off:
            scheduler.fail(f"{scheduler.tier}: {self.variable}=1 is set on {', '.join(m.name for m in on)} but "
                           f"not on {', '.join(m.name for m in off)}; set it on every server and worker of the "
                           "tier", None)
            return False
        if len(servers) != 1:
            scheduler.fail(f"{scheduler.tier}: {self.variable}=1 needs exactly one server in the tier (the "
                           f"aggregation root), there are {len(servers)}", None)
            return False
        addresses = {ROOT: (servers[0].host, servers[0].port)}
        addresses.update({m.rank: (m.host, m.port) for m in workers if not m.master})
        by_node = {ROOT: servers[0], **{m.rank: m for m in workers if not m.master}}
        self.nodes = sorted(by_node)
        self.coordinator = Coordinator(scheduler.tier, addresses,
                                       lambda node, msg: scheduler.send(by_node[node], msg), self.max_greed_rate)
        log.info("%s: TSEngine on (%s), %d node(s) below the root, greedy rate %.2f", scheduler.tier,
                 self.variable, len(addresses) - 1, self.max_greed_rate)
        return True

    def handle(self, msg: Message, member: "Member") -> None:
        if self.coordinator is None:
            raise ProtocolError(f"{msg.type.name} from {member.name}, but TSEngine is off in this tier")
        self.coordinator.handle(msg, ROOT if member.role == "server" else member.rank)

    def ack_meta(self, member: "Member") -> dict:
        if self.coordinator is None or not member.ts or member.master:
            return {}
        node = ROOT if member.role == "server" else member.rank
        return {"ts_keys": keys_meta(self.secret, node, self.nodes)}
