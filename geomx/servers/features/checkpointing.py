"""Checkpoints of a global server (GEOMX_CHECKPOINT_DIR; docs/System Design.md, section 10b): when to
save (every GEOMX_CHECKPOINT_EVERY rounds, on SAVE_CHECKPOINT, when a client stops, and a last one when
the run fails), what each client is told of the saved rounds (its cue to drop the pushes it keeps for
a replay), and what a checkpointing server refuses (P3 slices: replay numbers whole pushes). The server
owns what a checkpoint holds (``GlobalServer.snapshot``, ``GlobalServer.restore``); the file is written
off the loop by :class:`~.checkpoint_writer.CheckpointWriter`."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Dict, Optional

from ... import checkpoint
from ...commands import SAVE_CHECKPOINT
from ...errors import GeoMXError
from ...wire import Message, MsgType
from .base import ServerFeature
from .checkpoint_writer import CheckpointWriter, Done

if TYPE_CHECKING:
    import numpy as np

    from ...transport import Link
    from ..base import Client
    from ..global_server import GlobalServer
    from ..keystate import KeyState

log = logging.getLogger("geomx.server")


class Checkpointing(ServerFeature):
    name = "checkpointing"
    off = "global server {server.rank}: checkpoints are off (set GEOMX_CHECKPOINT_DIR)"
    # Replay after a restart numbers whole pushes per key; cut-through slices would be counted as rounds.
    whole_keys = True

    server: "GlobalServer"

    def __init__(self, server: "GlobalServer"):
        super().__init__(server)
        cfg = server.cfg
        self.writer = CheckpointWriter(server.loop, server.name, cfg.checkpoint.dir, cfg.checkpoint.every,
                                       cfg.heartbeat_timeout, lambda: server.rank, server.snapshot, self._durable)
        # The rounds of each key in the last saved checkpoint, and what each client was told of them.
        self.checkpointed: Dict[int, int] = {}
        self.told: Dict[tuple, int] = {}

    def _durable(self, ckpt: checkpoint.Checkpoint) -> None:
        # From now on the clients may forget their pushes of rounds this checkpoint holds.
        self.checkpointed = {rec.key: rec.completed for rec in ckpt.keys}

    def restored(self, ckpt: checkpoint.Checkpoint) -> None:
        """The server took over ``ckpt``'s state: the clients keep their pushes of later rounds, and the
        next periodic checkpoint is counted from its rounds."""
        self.checkpointed = {rec.key: rec.completed for rec in ckpt.keys}
        self.writer.schedule_after(min([rec.completed for rec in ckpt.keys] or [0]))

    def save(self, why: str, done: Optional[Done] = None, wait: bool = False) -> Optional[Dict[str, Any]]:
        """A checkpoint now (:meth:`CheckpointWriter.save`)."""
        return self.writer.save(why, done, wait)

    # -- hooks ---------------------------------------------------------------------------------
    def refuse(self, msg: Message, ks: "KeyState") -> Optional[str]:
        if msg.type != MsgType.PULL and (msg.offset != ks.offset or msg.numel != ks.numel):
            return ("P3 slices cannot be checkpointed (GEOMX_CHECKPOINT_DIR is set on this server): unset "
                    "ENABLE_P3 on the local servers or the checkpoint directory")
        return None

    def reply_meta(self, req: Message, client: "Client", meta: Dict[str, Any]) -> None:
        saved = self.checkpointed.get(req.key)
        if saved is not None and req.type != MsgType.INIT and self.told.get((client, req.key)) != saved:
            # The client may forget its pushes of this key's rounds before ``saved``.
            self.told[(client, req.key)] = saved
            meta["checkpointed"] = saved

    def on_round_complete(self, ks: "KeyState", r: Optional[int], value: "np.ndarray") -> None:
        """Every GEOMX_CHECKPOINT_EVERY rounds: save once every key has completed the target round."""
        progress = self.server.policy.progress
        if progress(ks) >= self.writer.next_round:
            self.writer.periodic(min((progress(k) for k in self.server.keys.values() if k.initialized), default=0))

    def on_client_stop(self, client: "Client") -> None:
        # A client that stopped is not coming back to say so again: record it, so that a server
        # restored later still knows how many STOPs it has to wait for.
        server = self.server
        if len(server.stopped_clients) < server.expected_stops():
            # Durable before the STOP is answered: the client will not say it again.
            try:
                self.save("a client stopped", wait=True)
            except GeoMXError:
                pass  # logged; the previous checkpoint stays

    def on_leave(self, reason: str, failed: bool) -> None:
        if failed and any(ks.initialized for ks in self.server.keys.values()):
            # The run stops (a party lost with GEOMX_LOST_PARTY=stop, any other failure): what the tier
            # completed so far is saved, so that a new run can start from it (GEOMX_CHECKPOINT_RESTORE).
            try:
                self.save(f"final, the run stops: {reason[:200]}", wait=True)
            except GeoMXError:
                pass  # logged by the writer

    # -- commands ------------------------------------------------------------------------------
    def _cmd_save_checkpoint(self, msg: Message, link: "Link", identity: bytes, master: bool) -> None:
        server = self.server

        def answer(result: object) -> None:
            if isinstance(result, Exception):
                server.reply_error(link, identity, msg, str(result))
            else:
                server.reply(link, identity, msg, meta=result)  # type: ignore[arg-type]

        self.writer.request(answer)

    commands = {SAVE_CHECKPOINT: _cmd_save_checkpoint}
