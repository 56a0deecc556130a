"""The framework-neutral core alone (geomx.store on numpy; no MXNet, no torch in the workers) on real
topologies: the exact sums and SGD updates of tests/workers/core_exact_worker.py, with one global server
and with a key above the big-array bound split over two. CI runs these on Python 3.13 with numpy 2,
where no framework is installed (.ci/run, third job)."""
import pytest
from helpers import exact_slices, run_topology

CASES = {
    "sum": (["--optimizer", "none"], {}),
    "sgd-on-the-server": (["--optimizer", "sgd"], {}),
    "sgd-two-global-servers-split": (["--optimizer", "sgd"], dict(global_servers=2, env={
        "MXNET_KVSTORE_BIGARRAY_BOUND": "100000"})),
}


@pytest.mark.system
@pytest.mark.parametrize("case", sorted(CASES))
def test_exact_oracle_on_the_core_alone(case):
    args, topology = CASES[case]
    topology = dict(topology)
    result = run_topology("core_exact_worker.py", ["--slice", "{slice}", *args], timeout=180, parties=2,
                          workers_per_party=2, env=topology.pop("env", {}), **topology)
    assert result.code == 0, result.output[-4000:]
    exact_slices(result)  # no worker reported a mismatch
    # Every worker reported its oracle held: the four training ones after 4 rounds, the master worker (slice
    # 0, which it does not train on) after the INITs.
    assert sorted((r["master"], r["slice"], r.get("exact"), r.get("rounds")) for r in result.reports) == \
        [(False, s, True, 4) for s in range(4)] + [(True, 0, True, 0)], result.reports
