"""The global server: the central party's server. It sums the parties' aggregates (and central
workers' gradients when they train), runs the optimizer the master worker set, and serves the new
weights. It belongs to two tiers: the global tier (clients: local servers, across the WAN) and the
central party (clients: the master worker and central workers)."""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from .. import checkpoint, commands, compression
from ..config import NodeConfig
from ..errors import GeoMXError, ProtocolError
from ..transport import EventLoop, Link, Origin, bind_router, identity_token, log_limited, peer_label
from ..wire import Message, MsgType, meta_field
from . import codec_rules, features
from .base import Client, ServerBase
from .features import Checkpointing
from .keystate import KeyState
from .sync import GLOBAL_POLICIES, GlobalPolicy, chosen
from .updater import Updater

log = logging.getLogger("geomx.server")


class GlobalServer(ServerBase):
    kind = "global"

    def __init__(self, cfg: NodeConfig, loop: EventLoop):
        super().__init__(loop, "global server", cfg.max_rounds_ahead, cfg.max_keys_per_client)
        self.cfg = cfg
        # Each side binds the address it advertises to its tier, at its fixed port if one is set.
        self.wan_link, self.wan_port = bind_router(loop, cfg.server_port, "global-clients", wan=True, cross_party=True,
                                                   host=cfg.bind_address(cfg.global_root_uri, cfg.global_root_port))
        self.lan_link, self.lan_port = bind_router(loop, cfg.central_port, "central-clients",
                                                   host=cfg.bind_address(cfg.root_uri, cfg.root_port))
        loop.add(self.wan_link, self.handle_client, routed=True)
        loop.add(self.lan_link, self.handle_client, routed=True)
        self.central_workers = cfg.num_worker
        self.local_servers = cfg.num_global_worker  # each sends STOP
        self.parties = cfg.num_global_worker  # aggregates per round; set from registration (several
        # local servers of a party each send their own keys, so parties <= local servers)
        self.updater: Optional[Updater] = None  # the master worker's optimizer, once it set one
        # The synchronization algorithm (geomx/servers/sync): FSA, HFA or ESync as configured,
        # MixedSync once the master worker asks for dist_async.
        self.policy: GlobalPolicy = GLOBAL_POLICIES[chosen(cfg)](self)
        self.rank = 0  # global rank, set once the global scheduler assigned it
        self.party_rank: Dict[Client, int] = {}  # client -> its global rank (as sent in headers)
        self.lost_parties: set = set()  # global ranks of the local servers the tier carries on without
        # GEOMX_LOST_PARTY=continue under FSA: the parties lost (by the name their local servers
        # registered with) and those local servers as clients here (their earlier pushes still count).
        self.lost_party_names: set = set()
        self.lost_clients: set = set()
        # A lost party's local server that registered again (its site restarted): its token -> its
        # global rank, and those clients once they declared a key (each key's rounds take them from
        # KeyState.start_client on); the lost party's name stays in lost_party_names, so the rounds
        # count it only from there.
        self.joining: Dict[str, int] = {}
        self.joined_clients: set = set()
        self.left: Dict[int, tuple] = {}  # global rank -> (party, its CURVE key) of a party lost for now
        self.gone_tokens: set = set()  # the lost local servers' tokens: their requests are refused
        self.on_async: Optional[Callable[[], None]] = None  # set by the node: tell the global scheduler
        self.compression_params: Optional[Dict[str, Any]] = None  # set by the master worker
        self.restored_from: Optional[str] = None  # the checkpoint this server started from
        self.restored_clients: Optional[tuple] = None  # (stopped, pushing) of a checkpoint, until known
        # DGT reception, the TSEngine root, checkpoints, P3 slices, replay: as configured.
        self.features = features.build(self)

    @property
    def optimizer_spec(self) -> Optional[dict]:
        return None if self.updater is None else self.updater.spec

    @property
    def sparse_codec(self) -> Optional[str]:
        """The master worker's codec's name when it declares ``sparse`` (BSC, MPQ), else None."""
        params = self.compression_params
        return params["type"] if params is not None and compression.codec_class(params["type"]).sparse else None

    @property
    def party_optimizer(self) -> bool:
        """Whether the master worker's optimizer runs on the parties' local servers rather than here:
        under FSA with a sparse codec (BSC, MPQ), each party's local server steps it on the party's
        dense gradient and sends the step, sparsified with error feedback; this server sums the
        parties' steps into the weights (geomx/servers/sync/fsa.py, docs/Compression.md)."""
        return self.updater is not None and self.policy.synchronous and self.sparse_codec is not None

    @property
    def global_sync(self) -> bool:
        """Whether the parties' pushes form synchronous rounds (not MixedSync)."""
        return self.policy.synchronous

    def dispatch(self, msg: Message, origin: Origin, key_checked: bool = False) -> None:
        identity = origin.identity
        if self.gone_tokens and identity is not None and identity_token(identity) in self.gone_tokens:
            # A lost local server that still runs (its link came back after the window): the tier's
            # rounds no longer count it, under any sync algorithm; it must start again to rejoin.
            raise ProtocolError(f"{msg.type.name} from {peer_label(identity)}, whose party the tier went on without")
        super().dispatch(msg, origin, key_checked)

    # -- round bookkeeping --------------------------------------------------------------------
    def expected_pushes(self, link: Link) -> int:
        return self.policy.expected_pushes(link)

    def expected_stops(self) -> int:
        return self.local_servers + self.central_workers - len(self.lost_parties)

    def full_round_pushes(self) -> int:
        return self.parties + (self.central_workers if self.cfg.enable_central_worker else 0)

    def dispatch_round(self, ks: KeyState, r: int, acc: np.ndarray) -> None:
        value = self.policy.round_result(ks, acc)
        # With the optimizer on the parties' local servers (sparse codecs) the pushes are answered
        # with the round's change to the weights, which is sparse; the key keeps the weights.
        ks.finish_round(r, value, answer=acc if self.party_optimizer else None)
        # ENABLE_INTER_TS: the parties get it by relay (TSRoot); checkpoints count it (Checkpointing).
        self.features.round_complete(ks, r, value)

    # -- checkpoints (the feature: geomx/servers/features/checkpointing.py) ---------------------
    def snapshot(self) -> checkpoint.Checkpoint:
        """This server's state now. Every key is at a round boundary of its own (partial rounds are
        left out: their pushes are resent after a restart), and its round count is recorded."""
        counts: Dict[int, int] = {}
        num_update, states = 0, None
        if self.updater is not None:
            counts, num_update = self.updater.update_counts()
            states = self.updater.states_to_wire()
        keys = [checkpoint.KeyRecord(ks.key, ks.store, self.policy.progress(ks), int(counts.get(ks.key, 0)),
                                     ks.offset, ks.total)
                for ks in self.keys.values() if ks.initialized]

        def clients(group: set) -> List[List[str]]:
            return sorted([name, ident.hex()] for name, ident in group)

        return checkpoint.Checkpoint(
            rank=self.rank, num_global_server=self.cfg.num_global_server, keys=keys,
            global_sync=self.global_sync, compression=self.compression_params, optimizer=self.optimizer_spec,
            num_update=num_update, states=states, stopped=clients(self.stopped_clients),
            pushing=clients(self.pushing_clients))

    def save_checkpoint(self, why: str, done: Optional[Callable[[object], None]] = None,
                        wait: bool = False) -> Optional[Dict[str, Any]]:
        """A checkpoint now (:meth:`Checkpointing.save`); GeoMXError if checkpoints are off."""
        return self.features.require(Checkpointing).save(why, done, wait)

    def restore(self, ckpt: checkpoint.Checkpoint, path: str) -> None:
        """Take over the state of the checkpoint (before joining the tiers)."""
        if ckpt.num_global_server != self.cfg.num_global_server:
            raise checkpoint.CheckpointError(
                f"checkpoint {path} was taken with {ckpt.num_global_server} global server(s), "
                f"DMLC_NUM_GLOBAL_SERVER is {self.cfg.num_global_server}")
        self.rank = ckpt.rank
        self.policy = GLOBAL_POLICIES[chosen(self.cfg, ckpt.global_sync)](self)
        self.compression_params = ckpt.compression
        if ckpt.optimizer is not None:
            self._set_optimizer(ckpt.optimizer, from_master=True)
            assert self.updater is not None
            self.updater.restore_counts(((rec.key, rec.update_count) for rec in ckpt.keys), ckpt.num_update)
            if ckpt.states is not None:
                self.updater.load_states(*ckpt.states)
        for rec in ckpt.keys:
            ks = self.keys[rec.key] = KeyState(rec.key, rec.value.size, rec.value.dtype, rec.offset, rec.total)
            ks.store = rec.value
            ks.initialized = True
            self.policy.restore_key(ks, rec.completed)
        # Who had stopped or pushed: that matters only if this server rejoins the topology it came
        # from; known once the global tier answers (adopt_clients or forget_clients). Until then the
        # clients of a new topology, whose identities may be the same, are not refused.
        self.restored_clients = ({(name, bytes.fromhex(ident)) for name, ident in ckpt.stopped},
                                 {(name, bytes.fromhex(ident)) for name, ident in ckpt.pushing})
        checkpoints = self.features.get(Checkpointing)
        if checkpoints is not None:
            checkpoints.restored(ckpt)
        self.restored_from = path
        rounds = [rec.completed for rec in ckpt.keys] or [0]
        log.info("%s: restored from %s: rank %d, %d key(s) at rounds %d..%d, optimizer %s", self.name, path,
                 self.rank, len(ckpt.keys), min(rounds), max(rounds),
                 ckpt.optimizer["name"] if ckpt.optimizer else None)

    def forget_clients(self) -> None:
        """Restored into a newly started topology rather than a running one: the clients recorded
        in the checkpoint (who had stopped) are gone; new ones continue from the restored rounds."""
        log.info("%s: restored into a new topology: continuing from the checkpoint's rounds", self.name)
        self.restored_clients = None

    def adopt_clients(self) -> None:
        """Rejoined the running topology the checkpoint came from: its clients who had stopped will
        not say so again."""
        if self.restored_clients is not None:
            stopped, pushing = self.restored_clients
            self.stopped_clients |= stopped
            self.pushing_clients |= pushing
            self.restored_clients = None

    def on_push(self, msg: Message, client: Client, link: Link, identity: bytes) -> None:
        self.party_rank[client] = msg.sender
        if not self.policy.on_push(msg, client, link, identity):
            super().on_push(msg, client, link, identity)

    def reply_meta(self, req: Message, client: Client) -> Optional[dict]:
        # (Replay adds the round the client numbers its pushes from, P3Slices the slice size,
        # Checkpointing the rounds saved, DGTReception the party's DGT settings.)
        meta: Dict[str, Any] = {}
        if req.type == MsgType.INIT:
            if self.compression_params is not None:
                meta["compression"] = self.compression_params
            if self.party_optimizer and client[0] == self.wan_link.name:
                meta["party_optimizer"] = self.optimizer_spec
        elif req.type == MsgType.PUSHPULL and self.party_optimizer and client[0] == self.wan_link.name:
            meta["delta"] = True  # the answer is the round's change to the weights (dispatch_round)
        self.policy.reply_meta(req, client, meta)
        return meta or None

    def fail_rounds_without(self, client: Client) -> None:
        if not self.policy.rounds_need(client):
            return
        super().fail_rounds_without(client)

    def on_peer_left(self, rank: int, reason: str, party: Optional[str] = None, token: Optional[str] = None) -> None:
        """A party's local server is gone and the tier carries on without it: under MixedSync (its
        rounds never waited for a party), or under FSA with GEOMX_LOST_PARTY=continue, where the rounds
        it has not pushed into complete with the other parties' pushes, scaled to the full count."""
        lost = [c for c, r in self.party_rank.items() if r == rank and c[0] == self.wan_link.name]
        self.lost_parties.add(rank)
        self.gone_tokens.update(identity_token(c[1]) for c in lost)
        if token is not None:
            self.gone_tokens.add(token)
        for joiner in [t for t, r in self.joining.items() if r == rank]:
            del self.joining[joiner]  # a rejoining server lost again, perhaps before its INITs arrived
            self.gone_tokens.add(joiner)
        if party is not None:
            allowed = self.allowed.get(self.wan_link.name, {})
            keys = [allowed.get(identity_token(c[1])) for c in lost]
            self.left[rank] = (party, next((k for k in keys if k is not None), None))
        for client in lost:
            self.stopped_clients.discard(client)
        if self.policy.synchronous and party is not None:
            self.lost_clients.update(lost)
            if party not in self.lost_party_names:
                self.lost_party_names.add(party)
                left = self.parties - len(self.lost_party_names)
                log.warning("%s: party %s is gone (%s); its rounds go on with %d part%s, each round's sum scaled to "
                            "%d (GEOMX_LOST_PARTY=%s)", self.name, party, reason, left,
                            "y" if left == 1 else "ies", self.parties, self.cfg.lost_party)
            self.complete_rounds_now_full()
        else:
            log.warning("%s: party %d is gone (%s); MixedSync continues without it", self.name, rank, reason)
        if len(self.stopped_clients) >= self.expected_stops():
            self.on_all_stopped()

    def round_expects(self, ks: KeyState, r: int, expected: int) -> int:
        # A lost party's push into a round it reached before it was lost is part of that round, and a
        # party that joined again is part of every round from the one it started at.
        lost = sum(1 for c in self.lost_clients if ks.starts.get(c, ks.first_round) <= r < ks.pushes_of(c))
        joined = sum(1 for c in self.joined_clients if c not in self.lost_clients and ks.starts.get(c, r + 1) <= r)
        return expected + lost + joined

    def on_client_joined(self, tokens, keys, joined: dict) -> None:
        """The global scheduler took a lost party's local server back (it registered again): admit its
        token; its rounds begin, per key, at its INIT (on_init)."""
        self.allow(self.wan_link.name, tokens, keys)
        rank, party = joined["rank"], joined.get("party")
        self.joining[joined["token"]] = rank
        self.lost_parties.discard(rank)  # its STOP is expected again
        self.left.pop(rank, None)
        if self.policy.synchronous:
            log.warning("%s: party %s (rank %d) rejoins; each key's rounds count it from the first round it can "
                        "take part in", self.name, party, rank)
        else:
            log.warning("%s: party %s (rank %d) rejoins; MixedSync applies its pushes as they come", self.name,
                        party, rank)

    def round_scale(self, ks: KeyState, pushes: int) -> float:
        full = self.full_round_pushes()
        return full / pushes if self.lost_party_names and 0 < pushes < full else 1.0

    def complete_rounds_now_full(self) -> None:
        """After a party is lost: complete, in order, the open rounds that waited only for it."""
        expected = self.expected_pushes(self.wan_link)
        for ks in list(self.keys.values()):
            for state in [ks, *ks.slices.values()]:
                for r in sorted(state.rounds):
                    rnd = state.rounds.get(r)
                    if rnd is None or rnd.acc is None:
                        continue
                    if rnd.elements != self.round_expects(state, r, expected) * state.numel:
                        break
                    self.complete_round(state, r, rnd)

    # -- init ---------------------------------------------------------------------------------
    def on_init(self, msg: Message, client: Client, link: Link, identity: bytes) -> None:
        if msg.data is not None and link is not self.lan_link:
            raise ProtocolError("only central-party workers may initialise a key with a value")
        ks = self.declare_key(msg, link, identity)
        if ks is None:
            return
        rank = self.joining.get(identity_token(identity)) if link is self.wan_link else None
        if rank is not None and self.policy.synchronous and client not in ks.starts:
            self.party_rank[client] = rank
            self.joined_clients.add(client)
            start = ks.start_client(client)
            log.info("%s: key %d: the rejoined party (rank %d) takes part from round %d", self.name, ks.key, rank,
                     start)
        if msg.data is not None and not ks.initialized:
            ks.store = np.array(msg.data, copy=True)
            ks.initialized = True
            ks.serve_parked()
        reply = self.replier(link, identity, msg)
        if link is self.wan_link:
            send = reply

            def reply(value: object) -> None:
                if isinstance(value, np.ndarray):
                    self.policy.party_received(client, ks.key, value)
                send(value)

        if ks.initialized:
            reply(ks.value())
        else:
            self.park(ks, client, link, identity, msg, reply)

    # -- commands -----------------------------------------------------------------------------
    def on_command(self, msg: Message, client: Client, link: Link, identity: bytes) -> None:
        cmd = meta_field(msg, "cmd", str)
        try:
            master = link is self.lan_link and self.from_master(link, identity)
            if cmd in commands.MASTER_ONLY and not master:
                # What the master worker decides for everyone: no party (nor its relaying local server)
                # may change it, whatever its message says of itself.
                raise GeoMXError(f"{cmd} is the master worker's to send (DMLC_ROLE_MASTER_WORKER=1 in the "
                                 "central party); refused from this client")
            handler = self.COMMANDS.get(cmd)
            if handler is not None:
                handler(self, msg, link, identity, master)
                return
            feature_handler = self.features.commands.get(cmd)  # (SAVE_CHECKPOINT: Checkpointing)
            if feature_handler is None:
                raise ProtocolError(f"unknown command {cmd!r}")
            feature_handler(msg, link, identity, master)
        except GeoMXError as exc:
            self.reply_error(link, identity, msg, str(exc))

    # -- the commands, one handler each (COMMANDS): (message, link, identity, from the master worker) --
    def _cmd_set_optimizer(self, msg: Message, link: Link, identity: bytes, master: bool) -> None:
        self.policy.check_optimizer()
        self._set_optimizer(meta_field(msg, "spec", dict), master)
        self.reply(link, identity, msg)

    def _cmd_sync_mode(self, msg: Message, link: Link, identity: bytes, master: bool) -> None:
        sync = meta_field(msg, "sync", bool)
        if sync != self.policy.synchronous:
            self.policy.leave(sync)
            self.policy = GLOBAL_POLICIES[chosen(self.cfg, sync)](self, self.policy.outside_rounds)
        if not sync and self.on_async is not None:
            self.on_async()
        mode = "synchronous (FSA)" if sync else "asynchronous (MixedSync)"
        log.info("%s: global tier is %s", self.name, mode)
        self.reply(link, identity, msg)

    def _cmd_get_states(self, msg: Message, link: Link, identity: bytes, master: bool) -> None:
        desc, blob = self._require_optimizer().states_to_wire()
        desc["optimizer"] = self.optimizer_spec
        self.reply(link, identity, msg, blob, meta=desc)

    def _cmd_set_states(self, msg: Message, link: Link, identity: bytes, master: bool) -> None:
        updater = self._require_optimizer()
        parts = commands.split_merged(msg.meta or {}, msg.data)
        if len(parts) != self.cfg.num_global_server:
            raise GeoMXError(f"states for {len(parts)} global servers, there are {self.cfg.num_global_server}")
        updater.load_states(*parts[self.rank])
        self.reply(link, identity, msg)

    def _cmd_set_compression(self, msg: Message, link: Link, identity: bytes, master: bool) -> None:
        self._set_compression(meta_field(msg, "params", dict))
        self.reply(link, identity, msg)

    COMMANDS: Dict[str, Callable[..., None]] = {
        commands.SET_OPTIMIZER: _cmd_set_optimizer,
        commands.SYNC_MODE: _cmd_sync_mode,
        commands.GET_STATES: _cmd_get_states,
        commands.SET_STATES: _cmd_set_states,
        commands.SET_COMPRESSION: _cmd_set_compression,
    }
    """The commands a global server answers (geomx/commands.py), each by its handler; a new command is
    one handler and one entry here (or in a feature's ``commands``: SAVE_CHECKPOINT is Checkpointing's)."""

    def _set_compression(self, params: Dict[str, Any]) -> None:
        """Accept the master worker's codec; the parties' local servers learn it from INIT replies."""
        params = dict(params)
        if self.cfg.size_lower_bound is not None:  # the master worker's own value, if it sent one, wins
            params.setdefault("size_lower_bound", self.cfg.size_lower_bound)
        try:
            codec = compression.create(params)
        except ValueError as exc:
            raise GeoMXError(str(exc)) from None
        codec_rules.check(self, codec)  # what the features switched on here can carry
        if any(ks.initialized for ks in self.keys.values()):
            raise GeoMXError("set_gradient_compression must come before kv.init (the parties learn the "
                             "codec when they initialise their keys)")
        self.policy.check_codec(codec)
        self.compression_params = codec.params()
        log.info("%s: gradient compression %s", self.name, self.compression_params)

    def _set_optimizer(self, spec: Dict[str, Any], from_master: bool) -> None:
        if self.restored_from is not None and self.optimizer_spec is not None \
                and _without_progress(spec) == _without_progress(self.optimizer_spec):
            # A restarted topology's master sends its fresh optimizer again: keep the checkpoint's
            # (same hyper-parameters, plus the update counts and states it has reached).
            return
        if not from_master:
            # Party workers' trainers send theirs too (gluon does when it updates on the kvstore); only
            # the master worker's counts, whatever the message says of its sender.
            if spec != self.optimizer_spec:
                log_limited(logging.INFO, f"{self.name}: a SET_OPTIMIZER from another client than the master "
                                          "worker changes nothing (the master worker sets the optimizer)")
            return
        if spec == self.optimizer_spec:
            return
        updater = Updater(spec)
        if self.sparse_codec is not None and self.policy.synchronous:
            self.policy.check_party_optimizer(self.sparse_codec, updater)
        self.updater = updater
        log.info("%s: optimizer %s %s, %s engine (%s)", self.name, spec.get("name"), spec.get("params"),
                 self.updater.engine, self.updater.engine_reason)

    def _require_optimizer(self) -> Updater:
        if self.updater is None:
            raise GeoMXError("no optimizer is set on the global server")
        return self.updater

    def on_all_stopped(self) -> None:
        log.info("%s: every client stopped", self.name)
        self.features.all_stopped()
        self.exit_code = 0


def _without_progress(spec: Dict[str, Any]) -> Dict[str, Any]:
    """An optimizer spec without the update counter (which only says how far training got)."""
    return {k: v for k, v in spec.items() if k != "num_update"}
