"""Convergence of the synchronisation algorithms on load_digits with the examples' CNN.

Every algorithm runs the real example script (``examples/cnn.py``, ``cnn_hfa.py``, ``cnn_esync.py``)
on a real topology of 2 parties x 1 worker for the same number of epochs, i.e. the same number of
training samples (for ESync: the same number on average per worker, fast parties taking more), and
its final test accuracy (the mean over the workers' last ``Test Acc`` lines) must be within
``TOLERANCE`` of fully-synchronous training (FSA), which itself must reach ``FSA_FLOOR``.

Learning rates: the Adam-based algorithms (FSA, MixedSync, HFA, ESync) all use ``ADAM_LR``;
DC-ASGD is SGD plus a delay-compensation term and gets its own SGD learning rate ``DCASGD_LR``.
Batch size 16 and 5 epochs give plain SGD enough iterations on this small data set (about 235 per
worker); evaluation happens only at the end. All numbers are printed (``pytest -s`` shows them).
About 2.5 minutes on an idle 2-core machine (five topologies of 8 processes each).
"""
import io
import re
import sys
import time
from pathlib import Path

import pytest

from geomx.launch import Topology, run

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

PARTIES, WORKERS = 2, 1
EPOCHS = 5
BATCH = 16
ADAM_LR = 0.003
DCASGD_LR = 0.1
TOLERANCE = 0.03
FSA_FLOOR = 0.85
COMMON = ["--cpu", "-ds", "{slice}", "-ep", str(EPOCHS), "-bs", str(BATCH), "--eval-every", "100000"]

_ACC = re.compile(r"^\[(?P<name>[^\]]+)\] \[Time [0-9.]+\]\[Epoch \d+\]\[Iteration (?P<it>\d+)\] "
                  r"Test Acc (?P<acc>[0-9.]+)")


def run_example(script, args=(), env=None, timeout=150):
    """Run ``examples/<script>`` on every worker of a 2 x 1 topology; return (code, output, seconds)."""
    topo = Topology(parties=PARTIES, workers_per_party=WORKERS, env=dict(env or {}))
    stream = io.StringIO()
    start = time.monotonic()
    code = run(topo, [sys.executable, str(EXAMPLES / script), *args], timeout=timeout, stream=stream)
    return code, stream.getvalue(), time.monotonic() - start


def final_accuracies(output):
    """{worker name: (iterations, accuracy)} from each worker's last ``Test Acc`` line."""
    last = {}
    for line in output.splitlines():
        m = _ACC.match(line)
        if m:
            last[m.group("name")] = (int(m.group("it")), float(m.group("acc")))
    return last


def train(label, script, args=(), env=None):
    code, output, seconds = run_example(script, [*COMMON, *args], env=env)
    assert code == 0, f"{label}: exit status {code}\n{output[-4000:]}"
    accs = final_accuracies(output)
    assert len(accs) == PARTIES * WORKERS, f"{label}: no Test Acc line from every worker\n{output[-4000:]}"
    mean = sum(a for _, a in accs.values()) / len(accs)
    detail = ", ".join(f"{name}: {acc:.4f} after {it} iterations" for name, (it, acc) in sorted(accs.items()))
    print(f"[convergence] {label}: mean test accuracy {mean:.4f} ({detail}) in {seconds:.1f} s", flush=True)
    return mean, output


@pytest.fixture(scope="module")
def fsa_accuracy():
    acc, _ = train("FSA", "cnn.py", ["-lr", str(ADAM_LR)])
    assert acc >= FSA_FLOOR, f"FSA reached only {acc:.4f}: the comparison would mean nothing"
    return acc


ALGORITHMS = {
    "MixedSync": ("cnn.py", ["-lr", str(ADAM_LR), "--mixed-sync"], {}),
    "MixedSync+DC-ASGD": ("cnn.py", ["-lr", str(DCASGD_LR), "--mixed-sync", "--dcasgd"], {}),
    "HFA": ("cnn_hfa.py", ["-lr", str(ADAM_LR)],
            {"MXNET_KVSTORE_USE_HFA": "1", "MXNET_KVSTORE_HFA_K1": "2", "MXNET_KVSTORE_HFA_K2": "2"}),
    "ESync": ("cnn_esync.py", ["-lr", str(ADAM_LR)], {"GEOMX_USE_ESYNC": "1"}),
}


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_accuracy_within_tolerance_of_fsa(fsa_accuracy, name):
    script, args, env = ALGORITHMS[name]
    acc, output = train(name, script, args, env)
    if name == "ESync":
        for line in output.splitlines():
            if "per worker on average" in line:
                print(f"[convergence] {line}", flush=True)
    print(f"[convergence] {name} {acc:.4f} vs FSA {fsa_accuracy:.4f}: difference {acc - fsa_accuracy:+.4f} "
          f"(tolerance {TOLERANCE})", flush=True)
    assert abs(acc - fsa_accuracy) <= TOLERANCE, (
        f"{name}: test accuracy {acc:.4f}, FSA {fsa_accuracy:.4f}: more than {TOLERANCE} apart")
