"""TSEngine's scheduling policy, free of sockets and clocks: the throughput table, the pairing of
ready senders into an aggregation tree, and the choice of the next receiver of a relayed model.

A tier's coordinator (its scheduler) owns one :class:`ThroughputTable` and one :class:`Session` per
(key, round). Nodes are integers: :data:`ROOT` is the tier's server (the aggregation root and the
first holder of a new model); the other nodes are the tier's workers by rank (parties' local servers
in the global tier, a party's workers inside a party).

Everything random goes through the ``rng`` given to :func:`choose_receiver` (a seeded
:class:`random.Random` in the tests), so a run of the policy is reproducible.
"""
from __future__ import annotations

import collections
import random
from typing import Deque, Dict, Iterable, List, Optional, Sequence, Set, Tuple

ROOT = -1  # the tier's server

#: Weight of a new measurement in the moving average of a link's throughput.
DEFAULT_ALPHA = 0.5


class ThroughputTable:
    """Measured throughput (bytes per second, wall clock) from node i to node j, as an exponential
    moving average; a pair never measured is unknown (``None``)."""

    def __init__(self, alpha: float = DEFAULT_ALPHA):
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self._rate: Dict[Tuple[int, int], float] = {}

    def record(self, src: int, dst: int, bytes_per_s: float) -> None:
        if not bytes_per_s > 0.0 or bytes_per_s == float("inf"):
            return  # a zero-time or broken measurement says nothing about the link
        old = self._rate.get((src, dst))
        self._rate[(src, dst)] = bytes_per_s if old is None else (
            self.alpha * bytes_per_s + (1.0 - self.alpha) * old)

    def get(self, src: int, dst: int) -> Optional[float]:
        return self._rate.get((src, dst))

    def uplink(self, node: int) -> Optional[float]:
        """How fast ``node`` sends, as far as measured: the mean of its known outgoing rates."""
        rates = [r for (s, _), r in self._rate.items() if s == node]
        return sum(rates) / len(rates) if rates else None

    def snapshot(self) -> Dict[Tuple[int, int], float]:
        return dict(self._rate)


def orient(a: int, b: int, table: ThroughputTable) -> Tuple[int, int]:
    """Which of two ready nodes sends its partial sum to the other: ``(sender, receiver)``.

    The root always receives (every contribution ends there). Between two workers the receiver
    forwards the merged sum later, so it should be the one that sends faster: the higher measured
    uplink wins. Without that, the faster direction between the two wins (as in the original:
    ``a -> b`` when ``A[a][b] > A[b][a]``); with nothing known, ``a`` (the earlier asker) sends.
    """
    if a == ROOT:
        return b, a
    if b == ROOT:
        return a, b
    ua, ub = table.uplink(a), table.uplink(b)
    if ua is not None and ub is not None and ua != ub:
        return (b, a) if ua > ub else (a, b)
    ab, ba = table.get(a, b), table.get(b, a)
    if ab is not None and ba is not None and ba > ab:
        return b, a
    return a, b


def choose_receiver(sender: int, candidates: Sequence[int], table: ThroughputTable, max_greed_rate: float,
                    rng: random.Random) -> int:
    """The next node to receive a model from ``sender``, among ``candidates`` (not yet served).

    Greedy (the candidate with the highest measured throughput from ``sender``) with probability
    ``min(known / candidates, max_greed_rate)``, where ``known`` counts candidates whose link from
    ``sender`` was measured; otherwise a uniformly random candidate (exploration, which is also how
    unknown links get measured). ``max_greed_rate=0`` always explores.
    """
    if not candidates:
        raise ValueError("no candidate receivers")
    known = [(table.get(sender, c), c) for c in candidates if table.get(sender, c) is not None]
    p_greedy = min(len(known) / len(candidates), max_greed_rate)
    if known and rng.random() < p_greedy:
        best = max(rate for rate, _ in known)
        return min(c for rate, c in known if rate == best)  # ties: the lowest rank, deterministically
    return candidates[rng.randrange(len(candidates))]


class Session:
    """The coordinator's state for one (key, round): the queue of nodes ready to push (the root is
    in it from the start) and, once the root has the result, who has been served by the relay."""

    def __init__(self, nodes: Iterable[int]):
        self.nodes: List[int] = sorted(nodes)
        self.ready: Deque[int] = collections.deque([ROOT])
        self.served: Set[int] = set()
        self.relaying = 0  # nodes holding the model that have not yet been told "nobody left"
        self.started = False  # the root has the result and began relaying it

    # -- push: aggregation tree ---------------------------------------------------------------
    def ask_push(self, node: int, table: ThroughputTable) -> List[Tuple[int, int]]:
        """``node`` holds a partial sum (the root: has just received one). Returns the (sender,
        receiver) pairs decided now; each sender is told its receiver, the receiver waits."""
        if node in self.ready:
            raise ValueError(f"node {node} asked to push twice in one round")
        self.ready.append(node)
        pairs = []
        while len(self.ready) >= 2:
            a, b = self.ready.popleft(), self.ready.popleft()
            pairs.append(orient(a, b, table))
        return pairs

    # -- pull: relay broadcast ----------------------------------------------------------------
    def next_receiver(self, sender: int, table: ThroughputTable, max_greed_rate: float,
                      rng: random.Random) -> Optional[int]:
        """The node ``sender`` should send the model to next, or None when everyone has it (then
        ``sender`` is done)."""
        if sender == ROOT and not self.started:
            self.started = True
            self.relaying += 1  # the root is the first holder
        candidates = [n for n in self.nodes if n not in self.served]
        if not candidates:
            self.relaying -= 1
            return None
        target = choose_receiver(sender, candidates, table, max_greed_rate, rng)
        self.served.add(target)
        self.relaying += 1  # the receiver relays in turn once it has the model
        return target

    @property
    def finished(self) -> bool:
        """Everyone was served and every holder was told to stop: no message of this round is due."""
        return len(self.served) == len(self.nodes) and self.relaying == 0
