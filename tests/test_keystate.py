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


def test_answering_parked_requests_keeps_the_others_and_those_parked_meanwhile():
    """A refused or served request leaves the parked list; the ones not due stay, a failing reply does not
    stop the others being answered, and a request parked by a reply (as the reply of a retried pull may)
    is kept for later."""
    ks = _key()
    answers = []

    def failing(value):
        answers.append(("a", value))
        raise RuntimeError("the connection is gone")

    ks.park_pull("a", failing)
    ks.park_pull("b", lambda v: (answers.append(("b", v)), ks.park_pull("b", lambda v: None)))
    ks.park_pull("c", lambda v: answers.append(("c", v)))
    error = RuntimeError("leaving")
    assert ks.answer_parked(error, lambda client: client != "c") == 2
    assert answers == [("a", error), ("b", error)]
    assert sorted(client for client, _ in ks.parked) == ["b", "c"]
    assert ks.answer_parked(error) == 2 and ks.parked == []


def test_a_client_that_joins_later_starts_after_every_opened_round_whole_or_sliced():
    """A rejoining party's local server (GEOMX_LOST_PARTY=continue): its first push goes into the round
    after the last one any client opened, in the key and in each P3 slice (also in a slice created
    later); its first pull waits for the round before that; other clients keep their own rounds."""
    ks = _key()
    for r in range(3):
        ks.add_push("a", np.ones(4, np.float32), lambda v: None, want_value=False)
        ks.finish_round(r, np.full(4, r, np.float32))
    ks.add_push("a", np.ones(4, np.float32), lambda v: None, want_value=False)  # round 3 open
    assert ks.start_client("new") == 4
    assert ks.pushes_of("new") == ks.next_round("new") == 4 and ks.pushes_of("a") == 4
    assert not ks.pull_ready("new")  # round 3 is not complete yet
    ks.finish_round(3, np.zeros(4, np.float32))
    assert ks.pull_ready("new")
    r, _ = ks.add_push("new", np.ones(4, np.float32), lambda v: None, want_value=False)
    assert r == 4 and ks.pushes_of("new") == 5

    sliced = _key(6)
    child = sliced.slices[0] = KeyState(7, 3, np.dtype(np.float32))
    for _ in range(2):
        child.add_push("a", np.ones(3, np.float32), lambda v: None, want_value=False)
    assert sliced.start_client("new") == 2  # the slice's rounds count, not the part's (never pushed whole)
    assert child.next_round("new") == 2 and child.next_round("a") == 2
    later = KeyState(7, 3, np.dtype(np.float32), offset=3, total=6)
    later.starts = dict(sliced.starts)  # as P3Slices.state_for makes a slice's state
    assert later.next_round("new") == 2 and later.next_round("a") == 0
