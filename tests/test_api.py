"""The store's user-facing API in a real 2-party topology (tests/workers/api_worker.py asserts)."""
import pytest

pytestmark = pytest.mark.system


def test_api_surface_and_optimizer_states(tmp_path, topology_run):
    result = topology_run("api_worker.py", ["--slice", "{slice}", "--states", str(tmp_path / "states")],
                          parties=2, workers_per_party=2)
    assert result.code == 0, result.output[-4000:]
    # (tests/workers/api_worker.py reports each check that failed, and ok at the end.)
    workers = [r for r in result.reports if not r["master"]]
    assert [(r["slice"], r.get("ok"), r.get("failure")) for r in workers] == [(s, True, None) for s in range(4)], \
        (result.reports, result.output[-4000:])
    assert (tmp_path / "states.a.npz").exists()


def test_pulls_into_mkldnn_layout_parameters(topology_run):
    result = topology_run("mkldnn_worker.py", ["--slice", "{slice}"], parties=1, workers_per_party=2)
    assert result.code == 0, result.output[-4000:]
    assert len(result.lines("MKLDNN OK")) == 2
