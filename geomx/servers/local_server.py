"""A party's local server: sums its workers' pushes and sends one aggregate per key across the WAN,
then hands the global result back to its workers. It is a server in its party's tier and a client
("global worker") in the global tier."""
from __future__ import annotations

import logging
from typing import Callable, List, Optional

import numpy as np

from .. import commands, compression, dgt, metrics
from ..config import NodeConfig
from ..errors import GeoMXError
from ..kvclient import KVClient
from ..transport import EventLoop, Link, bind_router
from ..tsengine.peer import TSPeer
from ..wire import Message, MsgType, meta_field
from . import features
from .base import Client, ServerBase
from .features import TSRoot
from .keystate import KeyState
from .sync import PARTY_POLICIES, PartyPolicy, chosen
from .updater import Updater

log = logging.getLogger("geomx.server")


class LocalServer(ServerBase):
    kind = "local"

    def __init__(self, cfg: NodeConfig, loop: EventLoop):
        super().__init__(loop, "local server", cfg.max_rounds_ahead, cfg.max_keys_per_client)
        self.cfg = cfg
        self.link, self.port = bind_router(loop, cfg.server_port, "party-clients",
                                           host=cfg.bind_address(cfg.root_uri, cfg.root_port))
        self.upstream: Optional[KVClient] = None  # set once the global tier is known
        self._stopping = False
        self.codec: Optional[compression.Codec] = None  # WAN codec, as the master worker chose
        self.codec_bytes = [0, 0]  # dense bytes it encoded, encoded bytes sent (geomx_codec_*_bytes_total)
        # Under FSA with a sparse codec the master worker's optimizer runs here, on the party's dense
        # gradient, and the WAN carries its steps (party_step); the global servers send it with INIT.
        self.updater: Optional[Updater] = None
        self.updater_error: Optional[str] = None
        # What a complete party round becomes (geomx/servers/sync): the party's aggregate across the
        # WAN (FSA, MixedSync), or its model averaged with the other parties' (HFA, ESync).
        self.policy: PartyPolicy = PARTY_POLICIES[chosen(cfg)](self)
        self.parties = cfg.num_global_worker  # set from the global tier's registration
        # ENABLE_INTER_TS: round sums go up an aggregation tree of parties and results come back by
        # relay, through TSEngine links that other parties' local servers open to this port.
        self.on_fatal: Optional[Callable[[Exception], None]] = None  # ends the node (set by geomx.node)
        self.inter_ts: Optional[TSPeer] = None
        self.ts_waiting: set = set()  # (key, round) contributed, result not yet relayed here
        self.ts_link: Optional[Link] = None
        self.ts_port = 0
        if cfg.tsengine.inter:
            self.ts_link, self.ts_port = bind_router(loop, cfg.ts_port, "ts-peers", wan=True, cross_party=True,
                                                     host=cfg.bind_address(cfg.global_root_uri, cfg.global_root_port))
        self.dgt: Optional[dgt.Sender] = dgt.Sender(cfg, loop) if cfg.dgt.mode else None
        # Seconds from a key's push to the global servers' answer (its metrics; logged at stop).
        self.round_trips = metrics.Durations()
        # Replay; with ENABLE_INTRA_TS, the root of the party's TSEngine tree.
        self.features = features.build(self)

    def connect_inter_ts(self, peer: TSPeer) -> None:
        assert self.ts_link is not None
        self.inter_ts = peer
        self.loop.add(self.ts_link, peer.handle, routed=True)

    def connect_upstream(self, client: KVClient) -> None:
        """Start serving workers; until now their requests wait in the socket, since every one of
        them may need the global tier."""
        self.upstream = client
        client.on_meta = self._on_upstream_meta
        if self.dgt is not None:  # the client sends through it (geomx.senders.DgtSender)
            client.on_server_meta = self.dgt.on_server_meta
        self.loop.add(self.link, self.handle_client, routed=True)

    def _on_upstream_meta(self, key: int, meta: dict) -> None:
        params = meta.get("compression")
        if isinstance(params, dict) and (self.codec is None or params != self.codec.params()):
            try:
                self.codec = compression.create(params, link="wan")
                log.info("%s: gradient compression on the WAN: %s", self.name, self.codec.params())
            except ValueError as exc:
                log.error("%s: the global server sent an unusable codec %s: %s", self.name, params, exc)
        spec = meta.get("party_optimizer")
        if isinstance(spec, dict) and (self.updater is None or spec != self.updater.spec):
            try:
                self.updater, self.updater_error = Updater(spec), None
                log.info("%s: runs the optimizer %s %s on the party's gradient (%s engine); the WAN carries "
                         "its steps", self.name, spec.get("name"), spec.get("params"), self.updater.engine)
            except GeoMXError as exc:  # every round fails with it: a raw gradient must not go up instead
                self.updater_error = f"the global servers' optimizer cannot run on this local server: {exc}"
                log.error("%s: %s", self.name, self.updater_error)
        self.policy.on_upstream_meta(key, meta)

    def party_step(self, ks: KeyState, grad: np.ndarray) -> np.ndarray:
        """This party's share of the global step of ``ks`` from its workers' summed gradient ``grad``.

        The optimizer steps on ``grad * parties`` (the party's estimate of the sum over every worker,
        which is what the global servers' optimizer sees under FSA, parties being equal), with this
        party's own optimizer state; the share is the change it makes to the weights, divided by the
        number of parties, so the global servers' sum of the shares is the parties' mean step. For SGD
        without momentum and a dense codec that is FSA's step exactly. Sparsified with error feedback
        (the codec's residual), the steps keep what dense Adam or momentum SGD would do, delayed,
        where the sparsified gradient under a worker's own Adam lost most of each entry's movement
        (docs/Compression.md, "The optimizer before the codec")."""
        assert self.updater is not None and ks.store is not None
        parties = np.float32(self.parties)
        # The numpy engine's float32 rules, whatever the key's dtype; apply() writes neither array, so a
        # float32 store is used as it is.
        weights = np.asarray(ks.store, dtype=np.float32)
        stepped = self.updater.apply(ks.key, ks.update_index, weights, np.asarray(grad, dtype=np.float32) * parties)
        return ((stepped - weights) / parties).astype(ks.dtype, copy=False)

    def reply_meta(self, req: Message, client: Client) -> Optional[dict]:
        return self.policy.reply_meta(req)

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
        if not self.park(ks, client, link, identity, msg, reply):
            return
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
                self.policy.on_initialized(ks, value)
                ks.initialized = True
                ks.serve_parked()

            # Every worker starts from the master worker's values, held by the global servers.
            self.upstream.request(MsgType.INIT, ks.key, ks.numel, ks.dtype, on_global_value, span=(ks.offset, ks.total))

    def _fail_parked(self, ks: KeyState, error: str) -> None:
        log.error("%s: key %d: %s", self.name, ks.key, error)
        ks.answer_parked(GeoMXError(error))

    def dispatch_round(self, ks: KeyState, r: int, acc: np.ndarray) -> None:
        self.policy.round_done(ks, r, acc)

    def finish_round(self, ks: KeyState, r: int, value: np.ndarray) -> None:
        ks.finish_round(r, value)
        self.features.round_complete(ks, r, value)  # ENABLE_INTRA_TS: the workers get it by relay

    def full_round_pushes(self) -> int:
        return self.cfg.num_worker

    def forward_inter_ts(self, ks: KeyState, r: int, acc: np.ndarray) -> None:
        """ENABLE_INTER_TS: the round's sum goes up the parties' aggregation tree; the result comes
        back by relay (ts_model)."""
        assert self.inter_ts is not None
        if self.encodes(ks):
            self._fail_round(ks, r, GeoMXError(
                f"key {ks.key} is {ks.dtype}: with ENABLE_INTER_TS=1 the WAN carries keys in their own dtype, "
                f"so the {self.codec.name if self.codec else ''} codec needs float16 keys (as examples/cnn_fp16.py "
                "initialises them)"))
            return
        self.ts_waiting.add((ks.key, r))
        self.inter_ts.contribute(ks.key, r, acc, ks.dtype)

    # -- TSEngine, a node below the global server (see geomx.tsengine.peer.Owner) ---------------
    # (ENABLE_INTRA_TS, this server as its party's root: geomx/servers/features/ts_root.py)
    def ts_check(self, kind: MsgType, key: int, rnd: int, data: np.ndarray) -> Optional[str]:
        ks = self.keys.get(key)
        if ks is None or (key, rnd) not in self.ts_waiting:
            return f"this party is not waiting for key {key} round {rnd}"
        if data.size != ks.numel or data.dtype != ks.dtype:
            return f"key {key}: {data.size} x {data.dtype} sent, key is {ks.numel} x {ks.dtype}"
        return None

    def ts_model(self, key: int, rnd: int, data: np.ndarray) -> None:
        self.ts_waiting.discard((key, rnd))
        self.finish_round(self.keys[key], rnd, data)

    def fail_upstream(self, ks: KeyState, r: int, error: Exception) -> None:
        log.error("%s: key %d round %d failed upstream: %s", self.name, ks.key, r, error)
        self._fail_round(ks, r, GeoMXError(f"global tier refused key {ks.key}: {error}"))

    def _fail_round(self, ks: KeyState, r: int, error: GeoMXError) -> None:
        root = self.features.get(TSRoot)
        if root is not None and root.relays and self.on_fatal is not None:
            # ENABLE_INTRA_TS: the workers wait for a relay, not for a reply that could carry the
            # error; end this server so that the party scheduler tells them why.
            self.on_fatal(GeoMXError(f"{self.name}: key {ks.key} round {r}: {error}"))
            return
        if r in ks.rounds:  # not when its waiters were answered already (the server is leaving)
            ks.fail_round(r, error)

    def encodes(self, ks: KeyState) -> bool:
        """Whether ``ks`` crosses the WAN through the codec (float32 keys it does not leave dense)."""
        return self.codec is not None and ks.dtype == np.float32 and self.codec.for_tensor(ks.numel) != "dense"

    def encode(self, ks: KeyState, acc: np.ndarray) -> Optional[compression.Payload]:
        """``acc`` through the WAN codec, its residual updated (None: ``ks`` travels dense)."""
        if not self.encodes(ks):
            return None
        assert self.codec is not None
        self.codec_bytes[0] += acc.nbytes
        return self.codec.encode(ks.key, acc)

    def held_back(self, step: np.ndarray, payload: Optional[compression.Payload]) -> Optional[np.ndarray]:
        """The part of this round's ``step`` (this party's optimizer step, or its workers' gradient sum
        when no optimizer runs on the servers) that its codec kept back (None: the key is not sparse on
        the WAN), which the party adds to the global servers' answer.

        With a sparse codec an entry waits about ``1 / threshold`` rounds in the residual. Were its
        workers to compute every gradient at the global weights meanwhile, the party's optimizer would
        keep stepping from the same stale point: momentum SGD overshoots (1.7x FSA's rounds to 90 %) and
        Adam learns later (1.3x on real topologies). So a party's weights are the global weights plus its
        own residual, and its workers' gradients are taken where its own steps have gone. Without an
        optimizer on the servers (the workers step their own on the pulled sum, examples/cnn_bsc.py) the
        workers pull the global sum plus what their party held back this round: their own party's
        gradient every round, the other parties' when their codecs send it, where the sum alone reached
        them as rare, large accumulations that the workers' Adam turns into one step each. Rounds within
        a few percent of FSA's in both flows (docs/Compression.md, "Each party sees its own residual")."""
        if payload is None or payload.kind != "sparse":
            return None
        return step - compression.decode_payload(payload, step.size)

    def encoder(self, payload: Optional[compression.Payload]):
        """How a key crosses the WAN: None for dense, else a per-part encoder of its one payload (the
        codec keeps one residual per key, so the key is encoded once and sliced per global server)."""
        if payload is None:
            return None

        def part(offset: int, numel: int):
            meta, data = compression.to_frames(compression.slice_payload(payload, offset, numel))
            self.codec_bytes[1] += data.nbytes
            return meta, data

        return part

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
        self.features.all_stopped()
        if self.inter_ts is not None and not self.inter_ts.idle:
            # Other parties may still be waiting for results this server relays to them.
            log.info("%s: all workers stopped; finishing TSEngine relays first", self.name)
            self.inter_ts.when_idle(self._stop_upstream)
            return
        self._stop_upstream()

    def _stop_upstream(self) -> None:
        assert self.upstream is not None
        log.info("%s: all workers stopped; stopping the global tier link", self.name)
        if self.dgt is not None:
            log.info("%s: DGT blocks sent %s, final K %.3f", self.name, self.dgt.sent, self.dgt.k.k)
        q = self.round_trips.quantiles()
        if q is not None:
            # For people (programs read geomx_wan_round_trip_p50_seconds and _p90_ from the metrics): p50
            # and p90 of the last 10,000 round trips (metrics.Durations).
            log.info("%s: global round trips per key: n=%d p50=%.4f p90=%.4f s", self.name,
                     self.round_trips.count, q[0], q[1])

        def done(replies: List[Message], error: Optional[Exception]) -> None:
            if error is not None:
                log.warning("%s: stop not acknowledged by the global tier: %s", self.name, error)
            self.exit_code = 0

        self.upstream.broadcast(MsgType.STOP, done)
