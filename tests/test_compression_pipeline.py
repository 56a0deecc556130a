"""Compression over a real topology: what every worker pulls equals a numpy model of the whole
pipeline (per-party WAN codec with residual state, global sum, exact sparse downlink), with zero
tolerance; fp16 keys are summed in float32 and rounded once.

With P3 the local server still encodes each key once (one residual per key) and sends each
700-element slice its part of the payload; the pulled values must be the same."""
import pytest

P3 = {"ENABLE_P3": "1", "GEOMX_P3_SLICE_SIZE": "700"}


@pytest.mark.parametrize("codec,global_servers,p3", [("bsc", 1, False), ("bsc", 2, False), ("fp16", 1, False),
                                                     ("mpq", 1, False), ("bsc", 2, True), ("mpq", 1, True)])
def test_pulled_values_match_pipeline_model(topology_run, codec, global_servers, p3):
    result = topology_run("codec_worker.py", ["--slice", "{slice}", "--codec", codec], parties=2,
                          workers_per_party=2, global_servers=global_servers,
                          env={"MXNET_KVSTORE_BIGARRAY_BOUND": "2000", **(P3 if p3 else {})})
    assert result.code == 0, result.output[-4000:]
    assert not result.lines("MISMATCH")
    assert len(result.lines("CODEC OK")) == 4
