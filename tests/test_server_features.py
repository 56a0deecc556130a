"""Server features as plug-ins (geomx/servers/features): which features a server's configuration attaches,
what a server says of a feature's messages and commands while it is off, and that a feature is one class
and one row of FEATURES: the round engine calls its hooks (refusal, reply meta, round completion, stop)
and the global server its command, with no other change."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import TOKEN, InProcessServer, initialised

from geomx import wire
from geomx.errors import ProtocolError
from geomx.servers import features
from geomx.servers.features import FeatureRow, ServerFeature
from geomx.transport import Origin
from geomx.wire import Message, MsgType

MASTER = f"master_worker0#{TOKEN}>0".encode()
PARTIES = [f"local_server{i}#{TOKEN}>0".encode() for i in range(2)]


def _send(sock, msg: Message) -> None:
    sock.send_multipart([bytes(f) for f in wire.encode(msg)])


@pytest.mark.unit
@pytest.mark.parametrize("kind, env, want", [
    ("global server", {}, ["replay", "p3_slices"]),
    ("global server", {"GEOMX_CHECKPOINT_DIR": "{tmp}"}, ["replay", "checkpointing", "p3_slices"]),
    ("global server", {"ENABLE_DGT": "2"}, ["replay", "p3_slices", "dgt"]),
    ("global server", {"ENABLE_INTER_TS": "1"}, ["replay", "p3_slices", "ts_root"]),
    ("local server", {}, ["replay"]),
    ("local server", {"ENABLE_INTRA_TS": "1"}, ["replay", "ts_root"]),
])
def test_a_server_attaches_the_features_its_configuration_switches_on(tmp_path, kind, env, want):
    srv = InProcessServer(kind, **{k: v.format(tmp=tmp_path) for k, v in env.items()})
    try:
        assert [f.name for f in srv.server.features.attached] == want
        # Every feature attached is in FEATURES, for this kind of server.
        rows = {(row.feature, s) for row in features.FEATURES for s in row.servers}
        assert all((type(f), srv.server.kind) in rows for f in srv.server.features.attached)
    finally:
        srv.close()


@pytest.mark.unit
def test_a_feature_that_is_off_refuses_its_messages_and_commands_as_before():
    srv = InProcessServer("global server", master=True)
    try:
        # A DGT block is no request (nothing answers it): the event loop logs the refusal.
        with pytest.raises(ProtocolError, match=r"DGT block, but DGT is off here \(ENABLE_DGT\)"):
            srv.server.dispatch(Message(MsgType.DGT_BLOCK, key=0), Origin(srv.server.wan_link, PARTIES[0]))
        master = srv.client(MASTER, "lan")
        _send(master, Message(MsgType.COMMAND, req_id=2, meta={"cmd": "save_checkpoint"}))
        (command,) = srv.replies(master, 1)
        assert command.type == MsgType.ERROR
        assert command.meta["error"].endswith("global server 0: checkpoints are off (set GEOMX_CHECKPOINT_DIR)")
    finally:
        srv.close()


class Frozen(ServerFeature):
    """A feature written for this test: key 1 takes no pushes, replies say how many rounds completed,
    and the command "rounds" answers that count."""

    name = "frozen"

    def __init__(self, server):
        super().__init__(server)
        self.rounds = 0
        self.stopped = []

    def refuse(self, msg, ks):
        return "frozen" if ks.key == 1 and msg.type != MsgType.PULL else None

    def reply_meta(self, req, client, meta):
        meta["rounds_seen"] = self.rounds

    def on_round_complete(self, ks, r, value):
        self.rounds += 1

    def on_client_stop(self, client):
        self.stopped.append(client)

    def _cmd_rounds(self, msg, link, identity, master):
        self.server.reply(link, identity, msg, meta={"rounds": self.rounds})

    commands = {"rounds": _cmd_rounds}


@pytest.mark.unit
def test_a_new_feature_is_one_class_and_one_row(monkeypatch):
    monkeypatch.setattr(features, "FEATURES", features.FEATURES + (FeatureRow(Frozen, ("global",), lambda c, k: True),))
    srv = InProcessServer("global server", master=True)
    try:
        initialised(srv.server, keys=(0, 1))
        frozen = srv.server.features.require(Frozen)
        parties = [srv.client(identity, "wan") for identity in PARTIES]
        for i, party in enumerate(parties):
            _send(party, Message(MsgType.PUSHPULL, req_id=10 + i, key=0, numel=12, total=12,
                                 data=np.full(12, i + 1, np.float32)))
        replies = [srv.replies(party, 1)[0] for party in parties]
        assert all(r.type == MsgType.RESPONSE for r in replies), [r.meta for r in replies]
        assert all(np.array_equal(r.data, np.full(12, 3, np.float32)) for r in replies)
        # The round's own replies go out as it completes, before the completion hooks run.
        assert [r.meta["rounds_seen"] for r in replies] == [0, 0] and frozen.rounds == 1

        _send(parties[0], Message(MsgType.PUSH, req_id=20, key=1, numel=6, total=6, data=np.ones(6, np.float32)))
        (refused,) = srv.replies(parties[0], 1)
        assert refused.type == MsgType.ERROR and refused.meta["error"].endswith("key 1: frozen")

        master = srv.client(MASTER, "lan")
        _send(master, Message(MsgType.COMMAND, req_id=30, meta={"cmd": "rounds"}))
        (answer,) = srv.replies(master, 1)
        assert answer.type == MsgType.RESPONSE and answer.meta == {"rounds": 1}

        _send(parties[1], Message(MsgType.STOP, req_id=40))
        assert srv.replies(parties[1], 1)[0].type == MsgType.RESPONSE
        assert frozen.stopped == [(srv.server.wan_link.name, PARTIES[1])]
    finally:
        srv.close()
