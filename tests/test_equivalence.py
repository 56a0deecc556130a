"""Distributed training equals single-process training: 2 parties x 2 workers, each on a quarter of
every global batch, against one process on the whole batches (gluon.Trainer, tolerance 1e-5)."""
import subprocess
import sys

import numpy as np
import pytest
from helpers import WORKERS

pytestmark = pytest.mark.system

WORKERS_TOTAL = 4


def oracle(tmp_path, optimizer):
    out = tmp_path / "oracle.npz"
    subprocess.run([sys.executable, str(WORKERS / "equiv_worker.py"), "--oracle", str(WORKERS_TOTAL),
                    "--optimizer", optimizer, "--out", str(out)], check=True, timeout=120)
    return np.load(out)


@pytest.mark.parametrize("optimizer,update_on_kvstore,extra", [
    ("sgd", "yes", []),
    ("sgd", "no", []),
    ("adam", "yes", ["--kvstore-string"]),
    # Trainer(compression_params=...) with a BSC ratio that keeps every entry: exact dense aggregation.
    ("sgd", "no", ["--bsc-keep-all"]),
])
def test_distributed_equals_single_process(tmp_path, topology_run, optimizer, update_on_kvstore, extra):
    args = ["--slice", "{slice}", "--optimizer", optimizer, "--update-on-kvstore", update_on_kvstore,
            "--out", str(tmp_path / "w{slice}.npz"), *extra]
    result = topology_run("equiv_worker.py", args, parties=2, workers_per_party=2)
    assert result.code == 0, result.output[-4000:]
    # Each training worker reported where it saved its final weights.
    outs = {r["slice"]: r["out"] for r in result.reports if not r["master"]}
    assert sorted(outs) == list(range(WORKERS_TOTAL)), result.reports
    expected = oracle(tmp_path, optimizer)
    for w in range(WORKERS_TOTAL):
        got = np.load(outs[w])
        assert sorted(got.files) == sorted(expected.files)
        for name in expected.files:
            np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=1e-5, err_msg=f"worker {w} {name}")
        # And the weights must actually have moved from the initial ones.
    first = np.load(outs[0])
    assert any(np.abs(first[n]).sum() > 0 for n in first.files)
