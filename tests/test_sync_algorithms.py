"""Synchronisation algorithms over real topologies: MixedSync (dist_async) with SGD and DC-ASGD
against a single-process model of asynchronous application, and HFA against a numpy model of two-level
averaging (both in tests/workers/matrix_worker.py, which the combination matrix uses too)."""
import json

import pytest

pytestmark = pytest.mark.system


@pytest.mark.parametrize("optimizer,codec", [("sgd", "none"), ("dcasgd", "none"), ("sgd", "bsc")])
def test_mixedsync_serialized_arrivals_match_oracle(tmp_path, topology_run, optimizer, codec):
    """3 parties take turns (a token file orders their pushes), so each must receive exactly what one MXNet
    updater applying the arrivals in that order gives (DC-ASGD: against each party's own backup; BSC: the
    sparsified change from what the party holds). tests/workers/matrix_worker.py is the model."""
    turn = tmp_path / "turn"
    turn.write_text("0")
    case = json.dumps({"sync": "mixedsync", "codec": codec, "optimizer": optimizer, "global_servers": "1"})
    result = topology_run("matrix_worker.py", ["--slice", "{slice}", "--rounds", "3", "--case", case,
                                               "--turn", str(turn)], parties=3, workers_per_party=1)
    assert result.code == 0, result.output[-4000:]
    assert not result.lines("MISMATCH")
    assert len(result.lines("MATRIX OK")) == 3


@pytest.mark.parametrize("k1,k2", [(1, 1), (2, 3)])
def test_hfa_two_level_averaging_matches_oracle(topology_run, k1, k2):
    env = {"MXNET_KVSTORE_USE_HFA": "1", "MXNET_KVSTORE_HFA_K1": str(k1), "MXNET_KVSTORE_HFA_K2": str(k2)}
    case = json.dumps({"sync": "hfa", "codec": "none", "optimizer": "none", "global_servers": "1"})
    result = topology_run("matrix_worker.py", ["--slice", "{slice}", "--case", case, "--steps", "12"], parties=2,
                          workers_per_party=2, env=env)
    assert result.code == 0, result.output[-4000:]
    assert not result.lines("MISMATCH")
    assert len(result.lines("MATRIX OK")) == 4


def test_esync_gives_fast_party_more_steps_and_one_model(topology_run):
    result = topology_run("esync_worker.py", ["--slice", "{slice}", "--rounds", "6"], parties=2,
                          workers_per_party=2, env={"GEOMX_USE_ESYNC": "1"})
    assert result.code == 0, result.output[-4000:]
    rounds = {}
    for line in result.lines("ESYNC round"):
        words = line.split("ESYNC ")[1].split()
        rnd, party, steps, model = int(words[1]), int(words[3]), int(words[5]), words[7]
        rounds.setdefault(rnd, []).append((party, steps, model))
    assert sorted(rounds) == list(range(6))
    for rnd, entries in rounds.items():
        assert len(entries) == 4
        assert len({m for _, _, m in entries}) == 1, f"round {rnd}: workers hold different models"
    late = rounds[5]
    fast = [s for p, s, _ in late if p == 0]
    slow = [s for p, s, _ in late if p == 1]
    print("ESync steps in the last round: fast party", fast, "slow party", slow)
    assert min(slow) == 1 and min(fast) >= 3


def test_hfa_with_dist_async_is_refused_clearly(topology_run):
    result = topology_run("hfa_async_worker.py", [], parties=1, workers_per_party=1, timeout=60,
                          env={"MXNET_KVSTORE_USE_HFA": "1"})
    assert result.code != 0
    assert "works with dist_sync only, not dist_async" in result.output
    assert not result.lines("NOT REFUSED")
