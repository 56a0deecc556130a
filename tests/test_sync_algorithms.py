"""Synchronisation algorithms over real topologies: MixedSync (dist_async) with SGD and DC-ASGD
against numpy models of asynchronous application, and HFA against a numpy model of two-level
averaging."""
import pytest


@pytest.mark.parametrize("optimizer", ["sgd", "dcasgd"])
def test_mixedsync_serialized_arrivals_match_oracle(tmp_path, topology_run, optimizer):
    turn = tmp_path / "turn"
    turn.write_text("0")
    result = topology_run("async_worker.py", ["--slice", "{slice}", "--rounds", "3", "--optimizer", optimizer,
                                              "--turn", str(turn)], parties=3, workers_per_party=1)
    assert result.code == 0, result.output[-4000:]
    assert not result.lines("MISMATCH")
    assert len(result.lines("ASYNC OK")) == 3
