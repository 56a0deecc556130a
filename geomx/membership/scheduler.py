"""A tier's scheduler: registers servers and workers, hands out ranks and addresses, runs barriers,
watches heartbeats, and announces a dead node to everyone else in the tier."""
from __future__ import annotations

import dataclasses
import logging
import re
import time
from typing import Dict, List, Mapping, Optional, Protocol, Sequence, Tuple

import zmq

from ..errors import ProtocolError
from ..security import CurveKeys
from ..transport import EventLoop, Origin, base_identity, bind_router, peer_label, split_identity
from ..wire import Message, MsgType, meta_field

log = logging.getLogger("geomx.scheduler")

GROUPS = ("worker", "server", "all")


_TOKEN = re.compile(r"[0-9a-f]{32}")


@dataclasses.dataclass
class Member:
    identity: bytes
    role: str  # "server" or "worker"
    host: str
    port: int
    name: str
    master: bool
    rank_hint: Optional[int]
    arrival: int
    last_seen: float
    # Servers: how many global servers their keys are divided for, and whether they relay to a
    # global tier (local servers) or are the global servers. Workers of the global tier (local
    # servers): which party they serve.
    global_servers: Optional[int] = None
    relay: bool = False
    party: Optional[str] = None
    rank: int = -1
    done: bool = False
    # A global server that checkpoints may be restarted: the tier waits this long for it.
    restart_timeout: float = 0.0
    lost_at: Optional[float] = None  # when it was presumed dead (while waiting for its restart)
    ts: bool = False  # takes part in this tier's TSEngine (ENABLE_INTER_TS / ENABLE_INTRA_TS)
    # A worker's secret part of the identity its data links use: the tier's servers take requests
    # only from identities that carry a token registered here (see ServerBase.allow).
    token: str = ""
    # With CURVE: the name of the key its REGISTER came with (the listener's ZAP handler admitted it).
    key: Optional[str] = None
    # Seconds of silence taken for a WAN outage rather than a death (a party's local server at the
    # global scheduler: GEOMX_WAN_OUTAGE_WINDOW); 0: the heartbeat timeout decides.
    outage_window: float = 0.0
    silent_since: Optional[float] = None  # when it went silent beyond the heartbeat timeout
    said_silent: float = 0.0  # when the tier was last told of that silence
    # Barriers this member has been let through (its BARRIERs are numbered, so one sent again over a
    # new connection is answered again rather than taken for the next).
    barriers_passed: int = 0
    # Lost while the tier carried on (MixedSync, GEOMX_LOST_PARTY=continue): its slot (rank) waits for
    # its party to register again (a rejoin); the lost process itself is told it is out.
    left: bool = False
    # A rejoining member: the servers that have not yet admitted its token (ADMITTED); it is
    # acknowledged once none is left, so that none of its first requests can meet a server that
    # does not know it.
    admitting: Optional[set] = None

    @property
    def base(self) -> bytes:
        return base_identity(self.identity)


class TierPlugin(Protocol):
    """A feature that takes part in a tier's membership (TSEngine's coordinator, geomx/tsengine/tier.py):
    the scheduler hands it the message types it answers and a say once the tier is complete, and adds
    what it gives to each member's REGISTER_ACK. Features plug in here; membership imports none."""

    messages: Tuple[MsgType, ...]

    def tier_complete(self, scheduler: "Scheduler", servers: List[Member], workers: List[Member]) -> bool:
        """Every node registered and has its rank; False if the plug-in failed the tier."""

    def handle(self, msg: Message, member: Member) -> None:
        """One of :attr:`messages` from a registered member."""

    def ack_meta(self, member: Member) -> dict:
        """What ``member``'s REGISTER_ACK carries for this plug-in."""


class Scheduler:
    """Runs until every registered node said goodbye (exit code 0) or one of them died (exit code 1)."""

    def __init__(self, tier: str, port: int, num_servers: int, num_workers: int, *,
                 heartbeat_interval: float, heartbeat_timeout: float, start_timeout: float,
                 max_message_bytes: int, ctx: Optional[zmq.Context] = None,
                 keys: Optional[CurveKeys] = None, cross_party: bool = False,
                 max_queued_replies: int = 100_000, local_ipc: bool = True, listen_fd: Optional[int] = None,
                 host: str = "127.0.0.1", plugins: Sequence[TierPlugin] = (),
                 party_servers: Optional[Mapping[str, int]] = None, outage_window: float = 0.0,
                 lost_party: str = "stop", resume: bool = False):
        self.tier = tier
        # Started again in place of a scheduler that died (GEOMX_SCHEDULER_RESUME): the tier's nodes
        # come back with their ranks (REGISTER with "resume"), and it goes on once all of them have.
        self.resuming = resume
        self.restarted = resume
        # The global tier: how long a party's local server may be silent (its WAN link down) before
        # it counts as dead (GEOMX_WAN_OUTAGE_WINDOW; 0: the heartbeat timeout decides).
        self.outage_window = outage_window
        # GEOMX_LOST_PARTY: "continue": a party's local server lost (beyond the outage window, or failed)
        # leaves the tier, which goes on with the other parties; "stop": the tier stops.
        self.lost_party = lost_party
        self.lost_party_names: set = set()
        # Global tier (GEOMX_PARTY_SERVERS): each party's local-server slots, so that no party can take
        # another's before the tier is complete (with CURVE a party name is bound to one key).
        self.party_servers = dict(party_servers) if party_servers is not None else None
        self.plugins = list(plugins)
        self._plugin_of: Dict[MsgType, TierPlugin] = {t: p for p in self.plugins for t in p.messages}
        self.num_servers = num_servers
        self.num_workers = num_workers
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.start_timeout = start_timeout
        self.ctx = ctx or zmq.Context.instance()
        self.loop = EventLoop(self.ctx, max_message_bytes, name=f"{tier} scheduler", keys=keys,
                              max_queued_replies=max_queued_replies, local_ipc=local_ipc)
        self.link, self.port = bind_router(self.loop, port, f"{tier}-scheduler", cross_party=cross_party,
                                             fd=listen_fd, host=host)
        self.loop.add(self.link, self._handle, routed=True)
        self.members: Dict[bytes, Member] = {}
        self.registered = False
        self.barriers: Dict[str, set] = {g: set() for g in GROUPS}
        self.exit_code: Optional[int] = None
        self.tolerate_worker_loss = False
        self.layout: dict = {}  # how keys are divided in this tier (sent with every REGISTER_ACK)
        self.clients_version = 0  # REGISTER_ACKs that changed the servers' client lists (rejoins)
        # Restarts of a server heard from too recently to tell whether it died: (the old member, the
        # replacement's registration), decided by whether the old one speaks again (see _on_restart).
        self._restarts_waiting: List[Tuple[Member, tuple, float]] = []  # (old, registration, since)
        # REGISTERs that wait for a decision: (the message, its identity, its CURVE key, since when). A
        # plain one while this scheduler resumes (replayed once the tier is back), and one of a party
        # whose old local server is still in the tier (its site was started again: taken once the old
        # one has been silent two heartbeat intervals, refused if it speaks).
        self._held: List[Tuple[Message, bytes, Optional[str], float]] = []
        self.started = time.monotonic()

    # -- main loop ----------------------------------------------------------------------------
    def run(self) -> int:
        log.info("%s scheduler listening on port %d for %d server(s) and %d worker(s)",
                 self.tier, self.port, self.num_servers, self.num_workers)
        self.loop.call_every(self.heartbeat_interval, self._check_liveness)
        while self.exit_code is None:
            self.loop.run_once(0.5)
        if self.exit_code:
            # Let the dead-peer notices leave before the socket closes (it drops what it still holds):
            # without one, a party's nodes would take the scheduler's silence for a WAN outage and wait
            # out GEOMX_WAN_OUTAGE_WINDOW.
            until = time.monotonic() + 1.0
            while time.monotonic() < until:
                self.loop.run_once(0.1)
        self.loop.close()
        return self.exit_code

    def send(self, member: Member, msg: Message) -> None:
        self.link.send(msg, member.identity)

    def _handle(self, msg: Message, origin: Origin) -> None:
        identity = origin.identity
        assert identity is not None
        member = self.members.get(base_identity(identity))
        if member is not None and member.left:
            # Lost beyond the outage window (or failed) while the tier carried on: it may not take part
            # again over its old registration, which the tier's rounds no longer count on.
            if msg.type != MsgType.BYE:
                self.link.send(Message(MsgType.PEER_DEAD, meta={"reason": (
                    f"{self.tier}: the tier went on without {member.name} (rank {member.rank}, party {member.party}): "
                    "restart the party's site to rejoin")}), identity)
            return
        if member is not None:
            if identity != member.identity:
                self._reconnected(member, origin)
            member.last_seen = time.monotonic()
            if member.silent_since is not None:
                log.warning("%s: %s %s (rank %d) is back after %.1fs of silence (a WAN outage); the tier goes on",
                            self.tier, member.role, member.name, member.rank, member.last_seen - member.silent_since)
                member.silent_since = None
            if member.lost_at is not None:
                # Presumed dead, but it was only stalled: it is still the server of its rank.
                log.warning("%s: %s %s (rank %d) is back after %.1fs", self.tier, member.role, member.name,
                            member.rank, member.last_seen - member.lost_at)
                member.lost_at = None
        if msg.type == MsgType.REGISTER:
            try:
                self._on_register(msg, identity, origin.curve_key)
            except ProtocolError as exc:
                # Said to the node too: it would otherwise wait out GEOMX_START_TIMEOUT for an answer.
                self.link.send(Message(MsgType.PEER_DEAD, meta={"reason": f"{self.tier}: {exc}"}), identity)
                raise
        elif member is None:
            raise ProtocolError(f"{msg.type.name} from unregistered peer {peer_label(identity)}")
        elif msg.type == MsgType.ADMITTED:
            self._on_admitted(msg, member)
        elif msg.type == MsgType.HEARTBEAT:
            self.send(member, Message(MsgType.HEARTBEAT_ACK, req_id=msg.req_id))
        elif msg.type == MsgType.POLICY:
            # MixedSync: parties are independent, so the global tier survives losing one.
            self.tolerate_worker_loss = meta_field(msg, "tolerate_worker_loss", bool)
            log.info("%s: %s lost workers", self.tier, "tolerating" if self.tolerate_worker_loss else "failing on")
        elif msg.type == MsgType.BARRIER:
            self._on_barrier(msg, member)
        elif msg.type in self._plugin_of:
            self._plugin_of[msg.type].handle(msg, member)
        elif msg.type == MsgType.BYE:
            failure = meta_field(msg, "failure", str, None)
            if failure is not None:
                self._lost(member, f"{self.tier}: {member.role} {member.name} (rank {member.rank}) failed: "
                                   f"{failure[:500]}")
            else:
                self._on_bye(member)
        else:
            raise ProtocolError(f"unexpected {msg.type.name} at a scheduler")

    def _reconnected(self, member: Member, origin: Origin) -> None:
        """A member's message over a new connection (it reconnected after its old one broke): answer
        it there from now on. A late message over an older connection changes nothing; with CURVE the
        new connection must carry the key the member registered with."""
        identity = origin.identity
        assert identity is not None
        if split_identity(identity)[1] < split_identity(member.identity)[1]:
            return
        if self.link.curve and origin.curve_key != member.key:
            raise ProtocolError(f"{member.name}'s identity over a connection with the key {origin.curve_key}, "
                                f"not the key {member.key} it registered with")
        log.info("%s: %s %s (rank %d) reconnected", self.tier, member.role, member.name, member.rank)
        member.identity = identity

    def _on_register(self, msg: Message, identity: bytes, key: Optional[str]) -> None:
        role = meta_field(msg, "role", str)
        host = meta_field(msg, "host", str)
        port = meta_field(msg, "port", int)
        name = meta_field(msg, "name", str, "")[:80]
        master = meta_field(msg, "master", bool, False)
        rank_hint = meta_field(msg, "rank", int, -1)
        global_servers = meta_field(msg, "global_servers", int, None)
        relay = meta_field(msg, "relay", bool, False)
        party = meta_field(msg, "party", str, None)
        if global_servers is not None and not 1 <= global_servers <= 1 << 16:
            raise ProtocolError(f"REGISTER with bad global_servers {global_servers}")
        ts = meta_field(msg, "ts", bool, False)
        if role not in ("server", "worker"):
            raise ProtocolError(f"REGISTER with unknown role {role!r}")
        if not 0 <= port <= 65535 or not 0 < len(host) <= 255:
            raise ProtocolError(f"REGISTER with bad address {host!r}:{port}")
        restart_timeout = meta_field(msg, "restart_timeout", float, 0.0)
        token = meta_field(msg, "token", str, "")
        if token and not _TOKEN.fullmatch(token):
            raise ProtocolError("REGISTER with a malformed token")
        resume = meta_field(msg, "resume", dict, None)
        known = self.members.get(base_identity(identity))
        if known is not None:
            if resume is not None or identity != known.identity:
                return  # a member's new connection to this same scheduler (handled as a reconnection)
            raise ProtocolError(f"{peer_label(identity)} registered twice")
        if self.resuming and resume is None:
            # A node new to the tier (a lost party's site started again) while the tier comes back.
            self._held.append((msg, identity, key, time.monotonic()))
            return
        if key is not None:
            self._check_key(key, role, party, name or peer_label(identity))
        if resume is not None:
            if not self.resuming:
                why = "its whole tier is back already" if self.restarted else \
                    "did not restart (GEOMX_SCHEDULER_RESUME)"
                raise ProtocolError(f"{name or peer_label(identity)} resumes its registration, but this "
                                    f"scheduler {why}")
            self._on_resume(identity, role, host, port, name or peer_label(identity), master, global_servers,
                            relay, party, restart_timeout, ts, token, key, resume)
            return
        if meta_field(msg, "restart", bool, False) and self.registered:
            self._on_restart(identity, role, host, port, name, rank_hint, restart_timeout)
            return
        if self.registered and role == "worker" and party is not None:
            slot = next((m for m in self.members.values() if m.left and m.party == party[:200]), None)
            if slot is not None:
                self._on_rejoin(slot, identity, host, port, name or peer_label(identity), token, key)
                return
            old = next((m for m in self.members.values() if m.role == "worker" and m.party == party[:200]
                        and not m.done), None)
            if old is not None and self.lost_party != "stop":
                # Its site was started again while the tier still counts the old local server (it died
                # without a goodbye): decided by whether the old one speaks again (_decide_held).
                if not any(h[1] == identity for h in self._held):
                    self._held.append((msg, identity, key, time.monotonic()))
                return
        if self.registered:
            raise ProtocolError(f"late REGISTER from {name or peer_label(identity)}: the tier is complete")
        if role == "worker" and self.party_servers is not None:
            self._check_party_slot(party, name or peer_label(identity))
        count = sum(1 for m in self.members.values() if m.role == role)
        if count >= (self.num_servers if role == "server" else self.num_workers):
            raise ProtocolError(f"REGISTER from {name or peer_label(identity)}: more {role}s than the "
                                f"{self.num_servers if role == 'server' else self.num_workers} expected")
        self.members[base_identity(identity)] = Member(
            identity, role, host, port, name or peer_label(identity), master, rank_hint if rank_hint >= 0 else None,
            len(self.members), time.monotonic(), global_servers, relay, None if party is None else party[:200],
            restart_timeout=restart_timeout, ts=ts, token=token, key=key,
            # A party's local server reaches the global scheduler over its WAN link.
            outage_window=self.outage_window if party is not None else 0.0)
        log.debug("%s: registered %s %s at %s:%d", self.tier, role, name, host, port)
        if len(self.members) == self.num_servers + self.num_workers:
            self._assign_ranks()

    def _on_resume(self, identity: bytes, role: str, host: str, port: int, name: str, master: bool,
                   global_servers: Optional[int], relay: bool, party: Optional[str], restart_timeout: float,
                   ts: bool, token: str, key: Optional[str], resume: dict) -> None:
        """A node of the tier registered with the scheduler that died: it comes back with its rank (and
        its barriers passed); global servers also name the parties the tier had gone on without, whose
        slots stay free for them to rejoin."""
        rank, passed, left = resume.get("rank"), resume.get("barriers", 0), resume.get("left", [])
        limit = self.num_servers if role == "server" else self.num_workers
        if not isinstance(rank, int) or not 0 <= rank < limit or not isinstance(passed, int) or passed < 0:
            raise ProtocolError(f"{name} resumes with a bad rank {rank!r} (or barrier count)")
        if any(m.role == role and m.rank == rank for m in self.members.values()):
            raise ProtocolError(f"{name} resumes as {role} rank {rank}, which another node holds")
        if ts:
            raise ProtocolError(f"{name} takes part in TSEngine, whose trees a restarted scheduler cannot rebuild")
        # Only the tier's servers (with CURVE: the scheduler's own key) say which parties were lost.
        if left and role != "server":
            raise ProtocolError(f"{name} names lost parties in its resume, but only the tier's servers may")
        if not isinstance(left, list) or not all(self._left_entry_ok(e) for e in left):
            raise ProtocolError(f"{name} resumes with a malformed list of lost parties")
        self.members[base_identity(identity)] = Member(
            identity, role, host, port, name, master, None, len(self.members), time.monotonic(), global_servers,
            relay, None if party is None else party[:200], rank=rank, restart_timeout=restart_timeout, token=token,
            key=key, outage_window=self.outage_window if party is not None else 0.0, barriers_passed=passed)
        for entry in left:
            self._left_slot(entry)
        log.info("%s: %s %s is back as rank %d (%d of %d)", self.tier, role, name, rank,
                 sum(not m.left for m in self.members.values()), self.num_servers + self.num_workers)
        if len(self.members) == self.num_servers + self.num_workers:
            self._resumed()

    def _left_entry_ok(self, entry: object) -> bool:
        return (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], int)
                and 0 <= entry[0] < self.num_workers and isinstance(entry[1], str)
                and (entry[2] is None or isinstance(entry[2], str)))

    def _left_slot(self, entry: list) -> None:
        """A party the tier had gone on without (from a global server's resume): its slot, kept free."""
        rank, party, key = entry
        held = next((m for m in self.members.values() if m.role == "worker" and m.rank == rank), None)
        if held is not None:
            if held.left and held.key is None and key is not None:
                held.key = key  # another global server knew the party's key
            elif not held.left:
                # The lost local server itself came back first: the tier went on without it.
                self._lost(held, f"{self.tier}: worker {held.name} (rank {rank}, party {party}) resumed, but the "
                                 "tier had gone on without its party")
            return
        identity = f"left:{party}#{rank}".encode()
        self.members[identity] = Member(identity, "worker", "", 0, f"local_server of party {party}", False, None,
                                        len(self.members), time.monotonic(), party=party[:200], rank=rank,
                                        done=True, left=True, key=key, outage_window=self.outage_window)
        self.lost_party_names.add(party)

    def _resumed(self) -> None:
        servers = [m for m in self.members.values() if m.role == "server"]
        workers = [m for m in self.members.values() if m.role == "worker"]
        counts = sorted({m.global_servers or 1 for m in servers})
        parties = {m.party if m.party is not None else m.name for m in workers}
        self.layout = {"global_servers": counts[0] if counts else 1, "relay": any(m.relay for m in servers),
                       "num_parties": len(parties)}
        self.resuming = False
        self.registered = True
        self._announce_servers()
        log.warning("%s: the scheduler restarted and all %d nodes are back; the tier goes on", self.tier,
                    len(self.members))
        if self._held:
            self._decide_held(time.monotonic())  # a lost party's site that came meanwhile

    def _check_party_slot(self, party: Optional[str], name: str) -> None:
        """GEOMX_PARTY_SERVERS: a local server takes one of its own party's slots, never another's."""
        assert self.party_servers is not None
        slots = self.party_servers.get(party or "")
        if slots is None:
            raise ProtocolError(f"REGISTER of {name} for party {party!r}: GEOMX_PARTY_SERVERS on the global "
                                f"scheduler names no such party ({', '.join(sorted(self.party_servers))})")
        taken = sum(1 for m in self.members.values() if m.party == party)
        if taken >= slots:
            raise ProtocolError(f"REGISTER of {name} for party {party!r}: that party's {slots} local server(s) "
                                "registered already (GEOMX_PARTY_SERVERS)")

    def _check_key(self, key: str, role: str, party: Optional[str], name: str) -> None:
        """With CURVE, a registration is bound to the key it came with: the tier's servers are of the
        scheduler's own party (only the global scheduler admits other parties' keys, whose processes
        register as its workers: the local servers), and every party name is held by one key alone,
        so that no party can register as another."""
        own = self.loop.keys.name_of(self.loop.keys.public) if self.loop.keys is not None else None
        if role == "server" and key != own:
            raise ProtocolError(f"REGISTER of {name} as a server of the {self.tier} tier with the key {key}: only "
                                f"{own}'s own key may register this tier's servers")
        if party is None:
            return
        for m in self.members.values():
            if m.party == party and m.key is not None and m.key != key:
                raise ProtocolError(f"REGISTER of {name} for party {party!r} with the key {key}: that party "
                                    f"registered with the key {m.key}")
            if m.key == key and m.party is not None and m.party != party:
                raise ProtocolError(f"REGISTER of {name} for party {party!r} with the key {key}, which "
                                    f"registered party {m.party!r} already")

    def _on_restart(self, identity: bytes, role: str, host: str, port: int, name: str, rank: int,
                    restart_timeout: float) -> None:
        """A server restarted from its checkpoint takes the place (and rank) of the one that died; every
        node of the tier gets the new server list (a REGISTER_ACK again) and reconnects."""
        old = next((m for m in self.members.values() if m.role == "server" and m.rank == rank and not m.done
                    and role == "server"), None)
        if old is None or old.restart_timeout <= 0:
            raise ProtocolError(f"restart of {role} {name or peer_label(identity)} with rank {rank} refused: no "
                                "restartable server of that rank in the tier")
        silent = time.monotonic() - old.last_seen
        if old.lost_at is None and silent < 2 * self.heartbeat_interval:
            # Heard from a moment ago: dead since, or alive (the wrong checkpoint, or a second copy)?
            # A live server heartbeats within one interval; decided then (_restart_decided).
            self._restarts_waiting.append((old, (identity, role, host, port, name, rank, restart_timeout),
                                           time.monotonic()))
            return
        del self.members[old.base]
        self.members[base_identity(identity)] = dataclasses.replace(
            old, identity=identity, host=host, port=port, name=name or peer_label(identity),
            last_seen=time.monotonic(), restart_timeout=restart_timeout, lost_at=None)
        down = "" if old.lost_at is None else f" after {time.monotonic() - old.lost_at:.1f}s"
        log.warning("%s: %s %s (rank %d) restarted%s, now at %s:%d", self.tier, role, name, rank, down, host, port)
        self._announce_servers(rejoined=identity)

    def _on_rejoin(self, slot: Member, identity: bytes, host: str, port: int, name: str, token: str,
                   key: Optional[str]) -> None:
        """A lost party's local server registers again (its site restarted): it takes the lost one's
        slot (rank; with CURVE the party's key was checked already), the servers admit its token, and
        then it is acknowledged like any member. The servers decide where its rounds begin."""
        if not token:
            raise ProtocolError(f"REGISTER of {name} to rejoin party {slot.party!r} without a token")
        del self.members[slot.base]
        member = self.members[base_identity(identity)] = dataclasses.replace(
            slot, identity=identity, host=host, port=port, name=name, last_seen=time.monotonic(), done=False,
            left=False, token=token, key=key, silent_since=None, said_silent=0.0, barriers_passed=0,
            lost_at=None, outage_window=self.outage_window)
        if not any(m.left and m.party == slot.party for m in self.members.values()):
            self.lost_party_names.discard(slot.party)
        servers = [m for m in self.members.values() if m.role == "server" and not m.done]
        member.admitting = {m.base for m in servers}
        log.warning("%s: party %s rejoins: %s takes rank %d again; it is acknowledged once the %d server(s) admit it",
                    self.tier, slot.party, name, member.rank, len(servers))
        self.clients_version += 1
        self._announce_servers(servers, joined=member)
        self._admitted(member)

    def _on_admitted(self, msg: Message, server: Member) -> None:
        token = meta_field(msg, "token", str)
        if server.role != "server":
            raise ProtocolError(f"ADMITTED from {server.name}, which is not a server of the tier")
        joiner = next((m for m in self.members.values() if m.token == token and m.admitting is not None), None)
        if joiner is None:
            return  # a joiner acknowledged already (a server's answer over a new connection)
        joiner.admitting.discard(server.base)
        self._admitted(joiner)

    def _admitted(self, joiner: Member) -> None:
        assert joiner.admitting is not None
        if not joiner.admitting - {m.base for m in self.members.values() if m.done}:
            joiner.admitting = None
            self._announce_servers([joiner])
            log.warning("%s: party %s rejoined as rank %d; it joins each key's rounds at the next one it can "
                        "take part in", self.tier, joiner.party, joiner.rank)

    def _decide_held(self, now: float) -> None:
        """The REGISTERs that waited: of a party whose old local server is still counted, the old one
        is lost once silent for two heartbeat intervals (its site was started again) and the new one
        takes its slot; if the old one speaks, the new one is refused. Any other is handled now."""
        held, self._held = self._held, []
        for msg, identity, key, since in held:
            party = meta_field(msg, "party", str, None)
            old = next((m for m in self.members.values() if m.role == "worker" and party is not None
                        and m.party == party[:200] and not m.done), None)
            if old is not None:
                if old.last_seen > since:
                    reason = (f"{self.tier}: REGISTER for party {party} refused: its local server {old.name} (rank "
                              f"{old.rank}) is alive; a second copy of a party cannot join")
                    log.error("%s", reason)
                    self.link.send(Message(MsgType.PEER_DEAD, meta={"reason": reason}), identity)
                    continue
                if now - old.last_seen < 2 * self.heartbeat_interval:
                    self._held.append((msg, identity, key, since))
                    continue
                self._lost(old, f"{self.tier}: worker {old.name} (rank {old.rank}, party {party}) was replaced: "
                                f"its party's site started again (silent for {now - old.last_seen:.1f}s)")
                if self.exit_code is not None:
                    return
            try:
                self._on_register(msg, identity, key)
            except ProtocolError as exc:
                log.warning("%s: REGISTER from %s refused: %s", self.tier, peer_label(identity), exc)
                self.link.send(Message(MsgType.PEER_DEAD, meta={"reason": f"{self.tier}: {exc}"}), identity)

    def _restart_decided(self, now: float) -> None:
        """The restarts that waited for their old server to speak or stay silent: refused if it spoke
        after the restart asked (it is alive), taken once it was silent for two heartbeat intervals."""
        waiting, self._restarts_waiting = self._restarts_waiting, []
        for old, (identity, role, host, port, name, rank, restart_timeout), since in waiting:
            if self.members.get(old.base) is not old:
                continue  # replaced meanwhile (by another restart)
            silent = now - old.last_seen
            if old.last_seen > since:
                reason = (f"{self.tier}: restart of {role} {name} as rank {rank} refused: the server of that rank "
                          f"({old.host}:{old.port}) is alive (heard from {silent:.1f}s ago); use the checkpoint of "
                          "the server that died")
                log.error("%s", reason)
                self.link.send(Message(MsgType.PEER_DEAD, meta={"reason": reason}), identity)
            elif silent >= 2 * self.heartbeat_interval:
                self._on_restart(identity, role, host, port, name, rank, restart_timeout)
            else:
                self._restarts_waiting.append((old, (identity, role, host, port, name, rank, restart_timeout), since))

    def _announce_servers(self, members: Optional[List[Member]] = None, rejoined: Optional[bytes] = None,
                          joined: Optional[Member] = None) -> None:
        """Send every member (or ``members``) its rank and the tier's server list; the server that
        ``rejoined`` (took a dead one's place) is told so, and the servers who must admit a party's
        local server that ``joined`` again learn which it is."""
        servers = sorted((m for m in self.members.values() if m.role == "server"), key=lambda m: m.rank)
        addresses = [[m.host, m.port] for m in servers]
        # Servers learn which identities their clients (this tier's workers) use, with CURVE the key each
        # must come with, and which of them is the master worker; nobody else does.
        workers = [m for m in self.members.values() if m.role == "worker" and m.token and not m.left]
        clients = sorted(m.token for m in workers)
        client_keys = {m.token: m.key for m in workers if m.key is not None}
        master = next((m.token for m in workers if m.master), None)
        for m in members if members is not None else [m for m in self.members.values()
                                                      if not m.done and m.admitting is None]:
            meta = {"rank": m.rank, "servers": addresses, "num_workers": self.num_workers,
                    "num_servers": self.num_servers, "tier": self.tier, **self.layout,
                    "rejoined": m.identity == rejoined}
            for plugin in self.plugins:
                meta.update(plugin.ack_meta(m))
            if m.role == "server":
                meta["clients"] = clients
                if client_keys:
                    meta["client_keys"] = client_keys
                if master is not None:
                    meta["master_client"] = master
                if joined is not None:
                    meta["joined"] = {"token": joined.token, "rank": joined.rank, "party": joined.party,
                                      "n": self.clients_version}
            self.send(m, Message(MsgType.REGISTER_ACK, meta=meta))

    def _assign_ranks(self) -> None:
        servers = [m for m in self.members.values() if m.role == "server"]
        workers = [m for m in self.members.values() if m.role == "worker"]
        hints = sorted(m.rank_hint for m in servers if m.rank_hint is not None)
        if hints == list(range(len(servers))):
            # Global servers bring their global rank so that both tiers agree by construction.
            servers.sort(key=lambda m: m.rank_hint)
        else:
            servers.sort(key=lambda m: (m.host, m.port))
        workers.sort(key=lambda m: (not m.master, m.arrival))
        if sum(m.master for m in workers) > 1:
            log.error("%s: more than one worker has DMLC_ROLE_MASTER_WORKER=1", self.tier)
        for rank, m in enumerate(servers):
            m.rank = rank
        for rank, m in enumerate(workers):
            m.rank = rank
        for plugin in self.plugins:
            if not plugin.tier_complete(self, servers, workers):
                return
        # Workers divide keys over this tier's servers along the global servers' parts, so every
        # server of the tier must divide for the same number of global servers.
        counts = sorted({m.global_servers or 1 for m in servers})
        if len(counts) > 1:
            self.fail(f"{self.tier}: the servers disagree on DMLC_NUM_GLOBAL_SERVER ({counts}); it must be "
                       "the same on every local server", None)
            return
        # Parties are told apart by the party each local server names (its party's scheduler).
        parties = {m.party if m.party is not None else m.name for m in workers}
        self.layout = {"global_servers": counts[0] if counts else 1, "relay": any(m.relay for m in servers),
                       "num_parties": len(parties)}
        self._announce_servers(list(self.members.values()))
        self.registered = True
        log.info("%s: all %d nodes registered", self.tier, len(self.members))

    def _group(self, group: str) -> List[Member]:
        return [m for m in self.members.values() if group == "all" or m.role == group]

    def _on_barrier(self, msg: Message, member: Member) -> None:
        group = meta_field(msg, "group", str)
        if group not in GROUPS:
            raise ProtocolError(f"BARRIER for unknown group {group!r}")
        if group != "all" and member.role != group:
            raise ProtocolError(f"{member.name} ({member.role}) entered the {group} barrier")
        seq = meta_field(msg, "n", int, member.barriers_passed)
        if seq < member.barriers_passed:
            # Sent again over a new connection: the acknowledgement was lost with the old one.
            self.send(member, Message(MsgType.BARRIER_ACK, meta={"group": group, "n": seq}))
            return
        waiting = self.barriers[group]
        waiting.add(member.base)
        if len(waiting) == len(self._group(group)):
            for m in self._group(group):
                self.send(m, Message(MsgType.BARRIER_ACK, meta={"group": group, "n": m.barriers_passed}))
                m.barriers_passed += 1
            waiting.clear()

    def _on_bye(self, member: Member) -> None:
        member.done = True
        log.debug("%s: %s said goodbye", self.tier, member.name)
        if self.registered and all(m.done for m in self.members.values()):
            log.info("%s: every node finished; scheduler exits", self.tier)
            self.exit_code = 0

    def _check_liveness(self) -> None:
        now = time.monotonic()
        if self._restarts_waiting:
            self._restart_decided(now)
        if self._held and not self.resuming:
            self._decide_held(now)
        if self.resuming and now - self.started > self.start_timeout:
            back = sum(not m.left for m in self.members.values())
            self.fail(f"{self.tier}: the restarted scheduler heard from {back} of the "
                      f"{self.num_servers + self.num_workers} nodes within {self.start_timeout:.0f}s "
                      "(GEOMX_START_TIMEOUT); the others did not come back", None)
            return
        if not self.registered and now - self.started > self.start_timeout:
            missing_s = self.num_servers - sum(m.role == "server" for m in self.members.values())
            missing_w = self.num_workers - sum(m.role == "worker" for m in self.members.values())
            self.fail(f"{self.tier}: start-up timed out after {self.start_timeout:.0f}s: "
                       f"{missing_s} server(s) and {missing_w} worker(s) never registered "
                       "(check DMLC_NUM_SERVER / DMLC_NUM_WORKER and the scheduler address)", None)
            return
        for m in self.members.values():
            if m.done:
                continue
            if m.lost_at is not None:
                if now - m.lost_at > m.restart_timeout:
                    self.fail(f"{self.tier}: {m.role} {m.name} (rank {m.rank}, {m.host}:{m.port}) died and was "
                               f"not restarted within {m.restart_timeout:.0f}s (GEOMX_RESTART_TIMEOUT); restart "
                               "it with GEOMX_CHECKPOINT_RESTORE=<its checkpoint file>", m)
                    return
                continue
            silent = now - m.last_seen
            if silent > self.heartbeat_timeout:
                if silent <= m.outage_window:
                    self._outage(m, now)
                    continue
                reason = (f"{self.tier}: {m.role} {m.name} (rank {m.rank}, {m.host}:{m.port}) sent no "
                          f"heartbeat for {silent:.1f}s; presumed dead")
                if m.outage_window:
                    reason += f" (beyond GEOMX_WAN_OUTAGE_WINDOW={m.outage_window:g}s)"
                if m.role == "server" and m.restart_timeout > 0:
                    # It checkpoints: the tier waits for it to come back from its checkpoint.
                    m.lost_at = now
                    log.warning("%s; waiting up to %.0fs for it to be restarted from its checkpoint", reason,
                                m.restart_timeout)
                    continue
                self._lost(m, reason)
                return

    def _outage(self, m: Member, now: float) -> None:
        """A party's local server silent beyond the heartbeat timeout but inside the outage window: its
        WAN link is taken to be down; the tier waits (and says so every 30 s)."""
        silent = now - m.last_seen
        if m.silent_since is None:
            m.silent_since = m.last_seen
        elif now - m.said_silent < 30:
            return
        m.said_silent = now
        log.warning("%s: %s %s (rank %d, party %s) silent for %.0fs: taken for a WAN outage; the tier waits "
                    "%.0fs more for it (GEOMX_WAN_OUTAGE_WINDOW=%gs)", self.tier, m.role, m.name, m.rank, m.party,
                    silent, m.outage_window - silent, m.outage_window)

    def _lost(self, member: Member, reason: str) -> None:
        member.done = True
        member.admitting = None
        party_goes = self.lost_party != "stop" and member.party is not None and self.registered
        if not ((self.tolerate_worker_loss and member.role == "worker") or party_goes):
            self.fail(reason, member)
            return
        member.left = member.party is not None  # its party may register again and take its place
        if party_goes:
            self.lost_party_names.add(member.party)
            left = {m.party for m in self.members.values() if m.party is not None} - self.lost_party_names
            if not left:
                self.fail(f"{reason}; it was the last party (GEOMX_LOST_PARTY={self.lost_party})", member)
                return
            log.warning("%s; the tier carries on without party %s, with %d part%s left (GEOMX_LOST_PARTY=%s)",
                        reason, member.party, len(left), "y" if len(left) == 1 else "ies", self.lost_party)
        else:
            log.warning("%s (the tier carries on)", reason)
        for m in self.members.values():
            if not m.done:
                meta = {"reason": reason, "rank": member.rank, "role": member.role, "party": member.party}
                if m.role == "server" and member.token:
                    meta["token"] = member.token  # the servers refuse its requests from now on
                self.send(m, Message(MsgType.PEER_LEFT, meta=meta))
        if all(m.done for m in self.members.values()):
            self.exit_code = 0

    def fail(self, reason: str, dead: Optional[Member]) -> None:
        log.error("%s", reason)
        for m in self.members.values():
            if m is not dead and not m.done:
                self.send(m, Message(MsgType.PEER_DEAD, meta={"reason": reason}))
        self.exit_code = 1


