"""A party's local server: sums its workers' pushes and sends one aggregate per key across the WAN,
then hands the global result back to its workers. It is a server in its party's tier and a client
("global worker") in the global tier."""
from __future__ import annotations

import logging
import statistics
import time
from typing import List, Optional

import numpy as np

from .. import commands, compression, dgt
from ..config import NodeConfig
from ..errors import GeoMXError
from ..kvclient import KVClient
from ..transport import EventLoop, Link, bind_router
from ..wire import Message, MsgType, meta_field
from .base import Client, ServerBase
from .keystate import ESYNC_KEY, KeyState

log = logging.getLogger("geomx.server")


class LocalServer(ServerBase):
    def __init__(self, cfg: NodeConfig, loop: EventLoop):
        super().__init__(loop, "local server")
        self.cfg = cfg
        self.link, self.port = bind_router(loop.ctx, "*", 0, cfg.max_message_bytes, "party-clients")
        self.upstream: Optional[KVClient] = None  # set once the global tier is known
        self._stopping = False
        self.codec: Optional[compression.Codec] = None  # WAN codec, as the master worker chose
        self.delta_replies: set = set()  # keys whose pending global reply is a weight change
        self.esync_steps = 1  # ESync: local steps per round assigned to this party by the state server
        self.esync_since = time.monotonic()
        self.parties = cfg.num_global_worker  # set from the global tier's registration
        self.dgt: Optional[dgt.Sender] = dgt.Sender(cfg, loop) if cfg.dgt_mode else None
        self.round_trips: List[float] = []  # seconds from a key's push to the global reply (logged at stop)

    def connect_upstream(self, client: KVClient) -> None:
        """Start serving workers; until now their requests wait in the socket, since every one of
        them may need the global tier."""
        self.upstream = client
        client.on_meta = self._on_upstream_meta
        if self.dgt is not None:
            self.dgt.attach(client.links, client.addresses)
            client.on_server_meta = self.dgt.on_server_meta
        self.loop.add(self.link, self.handle_client, routed=True)

    def _on_upstream_meta(self, key: int, meta: dict) -> None:
        if meta.get("delta") is True:
            self.delta_replies.add(key)
        params = meta.get("compression")
        if isinstance(params, dict) and (self.codec is None or params != self.codec.params()):
            try:
                self.codec = compression.create(params, link="wan")
                log.info("%s: gradient compression on the WAN: %s", self.name, self.codec.params())
            except ValueError as exc:
                log.error("%s: the global server sent an unusable codec %s: %s", self.name, params, exc)
        steps = meta.get("esync_steps")
        valid = isinstance(steps, int) and 1 <= steps <= self.cfg.esync_max_steps
        if self.cfg.use_esync and key == ESYNC_KEY and valid:
            self.esync_steps = steps
            self.esync_since = time.monotonic()

    def reply_meta(self, req: Message, client: Client) -> Optional[dict]:
        if self.cfg.use_esync and req.key == ESYNC_KEY and req.type == MsgType.PUSHPULL:
            return {"esync_steps": self.esync_steps}
        return None

    def expected_pushes(self, link: Link) -> int:
        return self.cfg.num_worker

    def expected_stops(self) -> int:
        return self.cfg.num_worker

    # -- data path ----------------------------------------------------------------------------
    def on_init(self, msg: Message, client: Client, link: Link, identity: bytes) -> None:
        ks = self.declare_key(msg, link, identity)
        if ks is None:
            return
        reply = self.replier(link, identity, msg)
        if ks.initialized:
            reply(ks.store)
            return
        ks.park_pull(client, reply)
        if not ks.init_requested:
            ks.init_requested = True
            assert self.upstream is not None

            def on_global_value(value: Optional[np.ndarray], error: Optional[Exception]) -> None:
                if error is None and self.dgt is not None:
                    # The global servers announce their DGT settings in the INIT replies.
                    parts = self.upstream.span_parts(ks.key, ks.offset, ks.numel, ks.total)
                    refused = self.dgt.not_ready([s for s, _, _ in parts])
                    error = None if refused is None else GeoMXError(refused)
                if error is not None:
                    self._fail_parked(ks, str(error))
                    return
                ks.store = value
                ks.milestone = value  # HFA starts from the global model, as every party does
                ks.initialized = True
                ks.serve_parked()

            # Every worker starts from the master worker's values, held by the global servers.
            self.upstream.request(MsgType.INIT, ks.key, ks.numel, ks.dtype, on_global_value, span=(ks.offset, ks.total))

    def _fail_parked(self, ks: KeyState, error: str) -> None:
        log.error("%s: key %d: %s", self.name, ks.key, error)
        parked, ks.parked = ks.parked, []
        for _client, reply in parked:
            reply(GeoMXError(error))

    def dispatch_round(self, ks: KeyState, r: int, acc: np.ndarray) -> None:
        assert self.upstream is not None
        if self.cfg.use_hfa or self.cfg.use_esync:
            self._hfa_round(ks, r, acc)
            return
        sent = time.monotonic()

        def on_global_result(value: Optional[np.ndarray], error: Optional[Exception]) -> None:
            self.round_trips.append(time.monotonic() - sent)
            if error is not None:
                self._fail_upstream(ks, r, error)
                return
            if ks.key in self.delta_replies:
                # MixedSync + BSC: the global server sent the change to the weights this party holds.
                self.delta_replies.discard(ks.key)
                value = ks.store + value
            ks.finish_round(r, value)

        self.upstream.request(MsgType.PUSHPULL, ks.key, ks.numel, ks.dtype, on_global_result, data=acc,
                              encoder=self._encoder(ks, acc), span=(ks.offset, ks.total),
                              send=None if self.dgt is None else self.dgt.send)

    def _fail_upstream(self, ks: KeyState, r: int, error: Exception) -> None:
        log.error("%s: key %d round %d failed upstream: %s", self.name, ks.key, r, error)
        ks.fail_round(r, GeoMXError(f"global tier refused key {ks.key}: {error}"))

    def _encoder(self, ks: KeyState, acc: np.ndarray):
        """How ``acc`` crosses the WAN: None for dense, else a per-part encoder of one payload (the
        codec keeps one residual per key, so the key is encoded once and sliced per global server)."""
        if self.codec is None or ks.dtype != np.float32 or self.codec.for_tensor(ks.numel) == "dense":
            return None
        payload = self.codec.encode(ks.key, acc)
        return lambda offset, numel: compression.to_frames(compression.slice_payload(payload, offset, numel))

    def _hfa_round(self, ks: KeyState, r: int, party_model: np.ndarray) -> None:
        """HFA: workers pushed ``weights / num_workers``, so ``party_model`` is the party's average.
        Every K2-th average goes global as ``(average - milestone) / parties``; the global servers sum
        those deltas (parties weighted equally, as in GeoMX) and the new milestone is
        ``milestone + sum``. Other rounds stay inside the party."""
        ks.local_rounds += 1
        if self.cfg.use_hfa and ks.local_rounds % self.cfg.hfa_k2:
            ks.finish_round(r, party_model)
            return
        meta = None
        if self.cfg.use_esync and ks.key == ESYNC_KEY:
            # ESync: tell the state server how long this party took for the steps it was assigned.
            meta = {"esync_steps": self.esync_steps, "esync_seconds": time.monotonic() - self.esync_since}
        assert ks.milestone is not None and self.upstream is not None
        delta = (party_model - ks.milestone) / np.asarray(self.parties, dtype=party_model.dtype)

        def on_global_delta(total: Optional[np.ndarray], error: Optional[Exception]) -> None:
            if error is not None:
                self._fail_upstream(ks, r, error)
                return
            ks.milestone = ks.milestone + total
            ks.finish_round(r, ks.milestone)

        self.upstream.request(MsgType.PUSHPULL, ks.key, ks.numel, ks.dtype, on_global_delta, data=delta, meta=meta,
                              span=(ks.offset, ks.total))

    # -- commands -----------------------------------------------------------------------------
    def on_command(self, msg: Message, client: Client, link: Link, identity: bytes) -> None:
        cmd = meta_field(msg, "cmd", str)
        if cmd == commands.REPORT_LOSS:
            loss = meta_field(msg, "loss", float)
            if self.dgt is not None:
                self.dgt.report_loss(client, loss)
            self.reply(link, identity, msg)
            return
        if cmd not in commands.RELAYED:
            self.reply_error(link, identity, msg, f"command {cmd!r} cannot be relayed by a local server")
            return
        assert self.upstream is not None
        meta = dict(msg.meta or {})
        meta["master"] = False
        # The same message goes to every global server; SET_STATES carries every server's part and
        # each global server takes its own.
        datas = None if msg.data is None else [msg.data] * self.upstream.num_servers

        def on_replies(replies: List[Message], error: Optional[Exception]) -> None:
            if error is not None:
                self.reply_error(link, identity, msg, str(error))
                return
            merged_meta, data = commands.merge_replies(replies)
            self.reply(link, identity, msg, data if data.size else None, meta=merged_meta)

        self.upstream.broadcast(MsgType.COMMAND, on_replies, meta=meta, datas=datas)

    # -- shutdown -----------------------------------------------------------------------------
    def on_all_stopped(self) -> None:
        if self._stopping or self.upstream is None:
            return
        self._stopping = True
        log.info("%s: all workers stopped; stopping the global tier link", self.name)
        if self.dgt is not None:
            log.info("%s: DGT blocks sent %s, final K %.3f", self.name, self.dgt.sent, self.dgt.k.k)
        if len(self.round_trips) >= 2:
            # The benchmarks read this line (benchmarks/suite.py, ROUND_TRIP_TAG).
            q = statistics.quantiles(self.round_trips, n=10)
            log.info("%s: global round trips per key: n=%d p50=%.4f p90=%.4f s", self.name,
                     len(self.round_trips), statistics.median(self.round_trips), q[-1])

        def done(replies: List[Message], error: Optional[Exception]) -> None:
            if error is not None:
                log.warning("%s: stop not acknowledged by the global tier: %s", self.name, error)
            self.exit_code = 0

        self.upstream.broadcast(MsgType.STOP, done)
