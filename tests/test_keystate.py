"""Round bookkeeping of a server's key (geomx.servers.keystate): what happens to waiting requests when
a round can never complete."""
import numpy as np
import pytest

from geomx.servers.keystate import KeyState

pytestmark = pytest.mark.unit


def _key(numel=4):
    ks = KeyState(7, numel, np.dtype(np.float32))
    ks.store = np.zeros(numel, np.float32)
    ks.initialized = True
    return ks


def test_failed_round_refuses_its_pushes_and_the_pulls_waiting_for_it():
    ks = _key()
    answers = {}
    ks.add_push("a", np.ones(4, np.float32), lambda v: answers.setdefault("push a", v), want_value=False)
    assert not ks.pull_ready("a")
    ks.park_pull("a", lambda v: answers.setdefault("pull a", v))  # waits for round 0
    ks.park_pull("b", lambda v: answers.setdefault("pull b", v))  # pushed nothing: round 0 is not its
    error = RuntimeError("global tier refused key 7")
    ks.fail_round(0, error)
    assert answers == {"push a": error, "pull a": error}
    assert [client for client, _ in ks.parked] == ["b"]  # still served by the next completed round


def test_failed_round_leaves_pulls_of_earlier_rounds_alone():
    ks = _key()
    for r in range(2):
        ks.add_push("a", np.full(4, r, np.float32), lambda v: None, want_value=False)
        ks.add_push("b", np.full(4, r, np.float32), lambda v: None, want_value=False)
    ks.finish_round(0, np.ones(4, np.float32))
    answers = {}
    ks.park_pull("a", lambda v: answers.setdefault("a", v))  # waits for round 1
    ks.park_pull("c", lambda v: answers.setdefault("c", v))  # pushed nothing: round 1 is not its
    error = RuntimeError("refused")
    ks.fail_round(1, error)
    assert answers == {"a": error}
    assert [client for client, _ in ks.parked] == ["c"]
