"""The synchronization algorithms as parts (geomx/servers/sync): each has both halves, the switches
choose it, the master worker's dist_async switches a running global server to MixedSync (and its
progress survives a switch back), and the algorithms refuse what they cannot serve, with a reply
that says why. The algorithms' results are checked end to end by test_sync_algorithms.py and
test_convergence.py; here the servers run in the test's process."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import TOKEN, InProcessServer, initialised, server_config

from geomx import wire
from geomx.servers.sync import GLOBAL_POLICIES, PARTY_POLICIES, chosen
from geomx.wire import Message, MsgType

MASTER = f"master_worker0#{TOKEN}>0".encode()
PARTY = f"local_server0#{TOKEN}>0".encode()


@pytest.fixture(scope="module")
def mxnet_module():
    return pytest.importorskip("mxnet")


@pytest.mark.unit
@pytest.mark.parametrize("env, synchronous, name", [
    ({}, True, "fsa"),
    ({}, False, "mixedsync"),
    ({"MXNET_KVSTORE_USE_HFA": "1"}, True, "hfa"),
    ({"GEOMX_USE_ESYNC": "1"}, True, "esync"),
])
def test_the_switches_choose_an_algorithm_that_has_both_halves(env, synchronous, name):
    cfg = server_config("local server", **env)
    assert chosen(cfg, synchronous) == name
    assert GLOBAL_POLICIES[name].name == name
    assert name in PARTY_POLICIES
    assert sorted(GLOBAL_POLICIES) == sorted(PARTY_POLICIES)


def command(srv: InProcessServer, sock, req_id: int, **meta) -> Message:
    sock.send_multipart([bytes(f) for f in wire.encode(Message(MsgType.COMMAND, req_id=req_id, meta=meta))])
    (reply,) = srv.replies(sock, 1)
    return reply


@pytest.mark.unit
def test_dist_async_makes_the_global_server_mixedsync_and_its_updates_count_after_a_switch_back(mxnet_module):
    """The master worker's dist_async turns FSA into MixedSync: a party's push is applied on arrival
    (SGD, learning rate 0.5, integer values: the new weights are exact) and counted as the key's
    progress, which a later dist_sync keeps (periodic checkpoints count it)."""
    from geomx.optimizer_spec import optimizer_to_spec

    srv = InProcessServer("global server", master=True)
    try:
        initialised(srv.server, keys=(0,))
        master = srv.client(MASTER, "lan")
        party = srv.client(PARTY, "wan")
        assert srv.server.policy.name == "fsa"
        assert command(srv, master, 1, cmd="sync_mode", sync=False).type == MsgType.RESPONSE
        assert srv.server.policy.name == "mixedsync" and not srv.server.global_sync
        spec = optimizer_to_spec(mxnet_module.optimizer.SGD(learning_rate=0.5, rescale_grad=1.0))
        assert command(srv, master, 2, cmd="set_optimizer", spec=spec).type == MsgType.RESPONSE
        grad = np.full(12, 2.0, np.float32)
        party.send_multipart([bytes(f) for f in wire.encode(Message(MsgType.PUSHPULL, req_id=3, key=0, offset=0,
                                                                  numel=12, total=12, data=grad))])
        (reply,) = srv.replies(party, 1)
        assert reply.type == MsgType.RESPONSE
        np.testing.assert_array_equal(reply.data, np.arange(12, dtype=np.float32) - 1.0)
        ks = srv.server.keys[0]
        assert srv.server.policy.progress(ks) == 1 and ks.completed == 0
        assert command(srv, master, 4, cmd="sync_mode", sync=True).type == MsgType.RESPONSE
        assert srv.server.policy.name == "fsa" and srv.server.policy.progress(ks) == 1
    finally:
        srv.close()


@pytest.mark.unit
@pytest.mark.parametrize("env, cmd, meta, needle", [
    ({"MXNET_KVSTORE_USE_HFA": "1"}, "sync_mode", {"sync": False},
     "HFA (MXNET_KVSTORE_USE_HFA=1) works with dist_sync only, not dist_async"),
    ({"GEOMX_USE_ESYNC": "1"}, "sync_mode", {"sync": False},
     "ESync (GEOMX_USE_ESYNC=1) works with dist_sync only, not dist_async"),
    ({"ENABLE_P3": "1"}, "sync_mode", {"sync": False}, "P3 (ENABLE_P3=1) works with dist_sync only"),
    ({"MXNET_KVSTORE_USE_HFA": "1"}, "set_optimizer", {"spec": {"name": "sgd", "params": {}}},
     "the global servers average the parties' models and run no optimizer"),
    ({}, "get_states", {}, "no optimizer is set on the global server"),
    ({}, "set_states", {}, "no optimizer is set on the global server"),
    ({}, "save_checkpoint", {}, "global server 0: checkpoints are off (set GEOMX_CHECKPOINT_DIR)"),
])
def test_what_an_algorithm_or_server_cannot_do_is_refused_with_a_reply_that_says_why(env, cmd, meta, needle):
    srv = InProcessServer("global server", master=True, **env)
    try:
        initialised(srv.server, keys=(0,))
        before = srv.server.policy.name
        reply = command(srv, srv.client(MASTER, "lan"), 1, cmd=cmd, **meta)
        assert reply.type == MsgType.ERROR and needle in reply.meta["error"], reply.meta
        assert srv.server.policy.name == before and srv.server.updater is None
    finally:
        srv.close()
