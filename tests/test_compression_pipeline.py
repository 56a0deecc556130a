"""Compression over a real topology: what every worker pulls equals a numpy model of the whole
pipeline (per-party WAN codec with residual state, global sum, exact sparse downlink), with zero
tolerance; fp16 keys are summed in float32 and rounded once.

With P3 the local server still encodes each key once (one residual per key) and sends each
700-element slice its part of the payload; the pulled values must be the same."""
import json

import pytest

pytestmark = pytest.mark.system

P3 = {"ENABLE_P3": "1", "GEOMX_P3_SLICE_SIZE": "700"}


def _fsa(codec, global_servers=1):
    """tests/workers/matrix_worker.py's case: FSA, no optimizer on the global servers (the combination
    matrix runs the same worker)."""
    return json.dumps({"sync": "fsa", "codec": codec, "optimizer": "none", "global_servers": str(global_servers)})


@pytest.mark.parametrize("codec,global_servers,p3", [("bsc", 1, False), ("bsc", 2, False), ("fp16", 1, False),
                                                     ("mpq", 1, False), ("bsc", 2, True), ("mpq", 1, True)])
def test_pulled_values_match_pipeline_model(topology_run, codec, global_servers, p3):
    result = topology_run("matrix_worker.py", ["--slice", "{slice}", "--case", _fsa(codec, global_servers)],
                          parties=2, workers_per_party=2, global_servers=global_servers,
                          env={"MXNET_KVSTORE_BIGARRAY_BOUND": "2000", **(P3 if p3 else {})})
    assert result.code == 0, result.output[-4000:]
    assert not result.lines("MISMATCH")
    assert len(result.lines("MATRIX OK")) == 4


@pytest.mark.parametrize("servers_have_bound", [True, False])
def test_servers_bound_applies_when_master_sets_none(topology_run, servers_have_bound):
    """GeoMX's scripts set MXNET_KVSTORE_SIZE_LOWER_BOUND on the servers only: the master worker,
    without the variable, sends no bound and the global server's value applies. The workers'
    oracle sparsifies keys of >= 1000 elements; had the default 200000 applied, they would travel
    dense and the pulled values would differ (the servers_have_bound=False case shows that)."""
    servers = {"global_server*": {"MXNET_KVSTORE_SIZE_LOWER_BOUND": "1000"},
               "party*/server": {"MXNET_KVSTORE_SIZE_LOWER_BOUND": "1000"}}
    result = topology_run("matrix_worker.py", ["--slice", "{slice}", "--case", _fsa("bsc"), "--bound-from-servers"],
                          parties=2, workers_per_party=1, node_env=servers if servers_have_bound else {})
    if servers_have_bound:
        assert result.code == 0, result.output[-4000:]
        assert len(result.lines("MATRIX OK")) == 2
    else:
        assert result.code != 0 and result.lines("MISMATCH"), result.output[-4000:]


@pytest.mark.parametrize("what, message", [
    ("late", "with bsc, set the optimizer before kv.init"),
    ("central", "central workers (DMLC_ENABLE_CENTRAL_WORKER=1) cannot push gradients"),
    ("dcasgd", "needs MXNet's engine"),
])
def test_servers_optimizer_with_bsc_refused_where_parties_cannot_run_it(topology_run, what, message):
    """The master worker's set_optimizer is refused, naming why, where the parties' local servers could
    not run the optimizer in front of the codec (docs/Compression.md, "The optimizer before the codec")."""
    topo = {"central_workers": 1, "env": {"DMLC_ENABLE_CENTRAL_WORKER": "1"}} if what == "central" else {}
    result = topology_run("party_optimizer_refusal_worker.py", [what], parties=1, workers_per_party=1,
                          timeout=60, **topo)
    assert result.lines("REFUSED"), result.output[-3000:]
    assert result.lines(message), result.output[-3000:]
    assert not result.lines("NOT REFUSED")
