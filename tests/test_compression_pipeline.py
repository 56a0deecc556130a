"""Compression over a real topology: what every worker pulls equals a numpy model of the whole
pipeline (per-party WAN codec with residual state, global sum, exact sparse downlink), with zero
tolerance; fp16 keys are summed in float32 and rounded once."""
import pytest


@pytest.mark.parametrize("codec,global_servers", [("bsc", 1), ("bsc", 2), ("fp16", 1), ("mpq", 1)])
def test_pulled_values_match_pipeline_model(topology_run, codec, global_servers):
    result = topology_run("codec_worker.py", ["--slice", "{slice}", "--codec", codec], parties=2,
                          workers_per_party=2, global_servers=global_servers,
                          env={"MXNET_KVSTORE_BIGARRAY_BOUND": "2000"})
    assert result.code == 0, result.output[-4000:]
    assert not result.lines("MISMATCH")
    assert len(result.lines("CODEC OK")) == 4
