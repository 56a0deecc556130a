"""Synchronisation algorithms over real topologies: MixedSync (dist_async) with SGD and DC-ASGD
against a single-process model of asynchronous application, and HFA against a numpy model of two-level
averaging (both in tests/workers/matrix_worker.py, which the combination matrix uses too)."""
import json

import pytest

from geomx import metrics

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
                                               "--turn", str(turn)], parties=3, workers_per_party=1,
                          env={"GEOMX_METRICS_DIR": str(tmp_path / "metrics")})
    assert result.code == 0, result.output[-4000:]
    assert not result.lines("MISMATCH")
    assert len(result.lines("MATRIX OK")) == 3
    # The global server's staleness figures, against the turns: of each key, party p's first update came
    # after p others, each later one after the 2 other parties' (it got the weights back with its own).
    dumps = metrics.load_dumps(str(tmp_path / "metrics"))
    glob = dumps["central/global_server0"]
    # (A local server's rank in the global tier is its registration's order, not its party's number.)
    server_of = {int(name[5]): name.split("/")[1] for name in dumps
                 if name.startswith("party") and "local_server" in name}
    updates = {p: metrics.value(glob, "geomx_mixedsync_updates_total", peer=server_of[p]) for p in range(3)}
    keys = updates[0] / 3
    assert keys >= 1 and updates == {p: 3 * keys for p in range(3)}
    assert {p: metrics.value(glob, "geomx_mixedsync_staleness_total", peer=server_of[p]) for p in range(3)} \
        == {p: keys * (p + 2 * 2) for p in range(3)}


@pytest.mark.parametrize("k1,k2", [(1, 1), (2, 3)])
def test_hfa_two_level_averaging_matches_oracle(tmp_path, topology_run, k1, k2):
    env = {"MXNET_KVSTORE_USE_HFA": "1", "MXNET_KVSTORE_HFA_K1": str(k1), "MXNET_KVSTORE_HFA_K2": str(k2),
           "GEOMX_METRICS_DIR": str(tmp_path)}
    case = json.dumps({"sync": "hfa", "codec": "none", "optimizer": "none", "global_servers": "1"})
    result = topology_run("matrix_worker.py", ["--slice", "{slice}", "--case", case, "--steps", "12"], parties=2,
                          workers_per_party=2, env=env)
    assert result.code == 0, result.output[-4000:]
    assert not result.lines("MISMATCH")
    assert len(result.lines("MATRIX OK")) == 4
    # Each party averaged every K1 steps and went global every K2-th average.
    dumps = metrics.load_dumps(str(tmp_path))
    for p in range(2):
        local = next(r for name, r in dumps.items() if name.startswith(f"party{p}/local_server"))
        assert metrics.value(local, "geomx_hfa_party_rounds_total") == 12 // k1
        assert metrics.value(local, "geomx_hfa_global_rounds_total") == 12 // k1 // k2


def test_esync_gives_fast_party_more_steps_and_one_model(tmp_path, topology_run):
    result = topology_run("esync_worker.py", ["--slice", "{slice}", "--rounds", "6"], parties=2,
                          workers_per_party=2, env={"GEOMX_USE_ESYNC": "1", "GEOMX_METRICS_DIR": str(tmp_path)})
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
    # The global server's figure is the steps it assigns next: as in the last round, by party.
    glob = metrics.load_dumps(str(tmp_path))["central/global_server0"]
    assigned = {s[1]["peer"]: s[2] for s in glob["samples"] if s[0] == "geomx_esync_local_steps"}
    assert sorted(assigned.values()) == [1, min(fast)], assigned


def test_hfa_with_dist_async_is_refused_clearly(topology_run):
    result = topology_run("hfa_async_worker.py", [], parties=1, workers_per_party=1, timeout=60,
                          env={"MXNET_KVSTORE_USE_HFA": "1"})
    assert result.code != 0
    assert "works with dist_sync only, not dist_async" in result.output
    assert not result.lines("NOT REFUSED")
