"""ESync (GEOMX_USE_ESYNC=1): HFA's model averaging in every global round, with each party's number
of local steps set by the global server (the state server) so that fast and slow parties arrive
together: a party reports how long its assigned steps took, and is told round(its speed / the
slowest party's speed) steps for the next round. The measurement and the assignment travel with
one key's pushes and replies (ESYNC_KEY)."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Dict, Optional

from ... import metrics
from ...errors import ProtocolError
from ...wire import Message, MsgType, meta_field
from .hfa import HFAParty, ModelAveraging

if TYPE_CHECKING:
    from ...transport import Link
    from ..base import Client
    from ..keystate import KeyState

# The key whose pushes carry a party's timing and whose replies carry its next step count.
ESYNC_KEY = 0

# The time a party reports for its local steps: from a microsecond to a year. Beyond these a speed is
# not a measurement, and 0 or infinity would break the steps' ratio.
ESYNC_MIN_SECONDS = 1e-6
ESYNC_MAX_SECONDS = 365 * 86400.0


class ESync(ModelAveraging):
    name = "esync"
    switch_name = "ESync (GEOMX_USE_ESYNC=1)"

    def __init__(self, server, outside_rounds=None) -> None:
        super().__init__(server, outside_rounds)
        self.speed: Dict["Client", float] = {}  # each party's measured local steps per second

    def on_push(self, msg: Message, client: "Client", link: "Link", identity: bytes) -> bool:
        if msg.key == ESYNC_KEY and msg.meta:
            max_steps = self.server.cfg.esync.max_steps
            steps = meta_field(msg, "esync_steps", int)
            seconds = meta_field(msg, "esync_seconds", float)
            # Refused (ERROR reply, nothing summed) rather than skipped: a zero or unbounded speed
            # would make steps_for divide by zero or overflow inside the round's replies.
            if not 1 <= steps <= max_steps:
                raise ProtocolError(f"meta field 'esync_steps' is {steps}, must be in "
                                    f"[1, {max_steps}] (GEOMX_ESYNC_MAX_STEPS)")
            if not ESYNC_MIN_SECONDS <= seconds <= ESYNC_MAX_SECONDS:
                raise ProtocolError(f"meta field 'esync_seconds' is {seconds}, must be in "
                                    f"[{ESYNC_MIN_SECONDS:g}, {ESYNC_MAX_SECONDS:g}]")
            self.speed[client] = steps / seconds
        return False

    def reply_meta(self, req: Message, client: "Client", meta: dict) -> None:
        super().reply_meta(req, client, meta)
        if req.key == ESYNC_KEY and req.type == MsgType.PUSHPULL:
            meta["esync_steps"] = self.steps_for(client)

    def samples(self) -> list:
        return [metrics.sample("geomx_esync_local_steps", self.steps_for(client), peer=metrics.peer_name(client))
                for client in list(self.speed)]

    def steps_for(self, client: "Client") -> int:
        """Local steps for ``client``'s next round, so that every party takes about as long as the
        slowest one does for a single step: round(speed / slowest speed), within [1, max]."""
        speed = self.speed.get(client)
        if speed is None or len(self.speed) < self.server.parties:
            return 1
        slowest = min(self.speed.values())
        return max(1, min(self.server.cfg.esync.max_steps, round(speed / slowest)))


class ESyncParty(HFAParty):
    """The local server under ESync: every party round goes global, its push of ESYNC_KEY reports
    how long the party's assigned steps took, and the reply's step count goes to its workers."""

    name = "esync"

    def __init__(self, server) -> None:
        super().__init__(server)
        self.steps = 1  # local steps per round, as the global server last assigned
        self.since = time.monotonic()

    def goes_global(self, ks: "KeyState") -> bool:
        return True

    def push_meta(self, ks: "KeyState") -> Optional[dict]:
        if ks.key != ESYNC_KEY:
            return None
        return {"esync_steps": self.steps, "esync_seconds": time.monotonic() - self.since}

    def on_upstream_meta(self, key: int, meta: dict) -> None:
        steps = meta.get("esync_steps")
        if key == ESYNC_KEY and isinstance(steps, int) and 1 <= steps <= self.server.cfg.esync.max_steps:
            self.steps = steps
            self.since = time.monotonic()

    def reply_meta(self, req: Message) -> Optional[dict]:
        if req.key == ESYNC_KEY and req.type == MsgType.PUSHPULL:
            return {"esync_steps": self.steps}
        return None
