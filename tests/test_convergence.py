"""Convergence of the synchronisation algorithms on load_digits with the examples' CNN.

Every algorithm runs the real example script (``examples/cnn.py``, ``cnn_hfa.py``, ``cnn_esync.py``)
on a real topology of 2 parties x 1 worker for the same number of epochs, i.e. the same number of
training samples (for ESync: the same number on average per worker, fast parties taking more), and
its final test accuracy (the mean over the workers' last ``Test Acc`` lines, then the median over
``SEEDS``) must be within ``TOLERANCE`` of fully-synchronous training (FSA, the same median), which
itself must reach ``FSA_FLOOR``.

One run's final accuracy on the 300 test images says little: with one seed, CI once measured ESync
3.7 points under FSA, while another machine's run of the same code had it 1 point above. The
asynchronous algorithms vary further with arrival order. So every algorithm runs with the seeds of
``SEEDS`` (initial weights and data order) and the medians are compared: a median, not a mean,
because the asynchronous runs have outliers (one MixedSync + DC-ASGD run in three measured ended at
0.88 with the other two at 0.98 and FSA at 0.97), while an algorithm that is broken fails in most
runs. The five flows of one seed run at the same time (about 6 minutes in all on 2 cores).

Learning rates: the Adam-based algorithms (FSA, MixedSync, HFA, ESync) all use ``ADAM_LR``;
DC-ASGD is SGD plus a delay-compensation term and gets its own SGD learning rate ``DCASGD_LR``.
Batch size 16 and 5 epochs give plain SGD enough iterations on this small data set (about 235 per
worker); evaluation happens only at the end. All numbers are printed (``pytest -s`` shows them).
"""
import statistics

import pytest
from example_runs import SEEDS, checked_curves, run_concurrently

# The module's runs all happen in the first test's fixture: 3 seeds x ~2 minutes on 2 cores.
pytestmark = pytest.mark.timeout(1200)

PARTIES, WORKERS = 2, 1
EPOCHS = 5
BATCH = 16
ADAM_LR = 0.003
DCASGD_LR = 0.1
TOLERANCE = 0.03
FSA_FLOOR = 0.85
COMMON = ["--cpu", "-ds", "{slice}", "-ep", str(EPOCHS), "-bs", str(BATCH), "--eval-every", "100000"]

FSA = ("cnn.py", ["-lr", str(ADAM_LR)], {})
ALGORITHMS = {
    "MixedSync": ("cnn.py", ["-lr", str(ADAM_LR), "--mixed-sync"], {}),
    "MixedSync+DC-ASGD": ("cnn.py", ["-lr", str(DCASGD_LR), "--mixed-sync", "--dcasgd"], {}),
    "HFA": ("cnn_hfa.py", ["-lr", str(ADAM_LR)],
            {"MXNET_KVSTORE_USE_HFA": "1", "MXNET_KVSTORE_HFA_K1": "2", "MXNET_KVSTORE_HFA_K2": "2"}),
    "ESync": ("cnn_esync.py", ["-lr", str(ADAM_LR)], {"GEOMX_USE_ESYNC": "1"}),
}


def final_accuracy(label, result):
    """The mean of the workers' last ``Test Acc``; checks the run and prints its numbers."""
    accs = checked_curves(label, result, PARTIES * WORKERS)
    acc = statistics.mean([points[-1][1] for points in accs.values()])
    detail = ", ".join(f"{name}: {points[-1][1]:.4f} after {points[-1][0]} iterations"
                       for name, points in sorted(accs.items()))
    print(f"[convergence] {label}: mean test accuracy {acc:.4f} ({detail}) in {result[2]:.1f} s", flush=True)
    if label.startswith("ESync"):
        for line in result[1].splitlines():
            if "per worker on average" in line:
                print(f"[convergence] {line}", flush=True)
    return acc


@pytest.fixture(scope="module")
def accuracies():
    """{label: [final accuracy per seed]} for FSA and every algorithm (the runs happen once, here)."""
    finals = {label: [] for label in ["FSA", *ALGORITHMS]}
    for seed in SEEDS:
        jobs = {label: (script, [*COMMON, *args, "--seed", str(seed)], env)
                for label, (script, args, env) in {"FSA": FSA, **ALGORITHMS}.items()}
        results = run_concurrently(jobs, parties=PARTIES, workers=WORKERS)
        for label in finals:
            finals[label].append(final_accuracy(f"{label} (seed {seed})", results[label]))
    print("[convergence] medians over seeds " + str(SEEDS) + ": "
          + " | ".join(f"{label} {statistics.median(values):.4f}" for label, values in finals.items()), flush=True)
    return finals


def test_fsa_reaches_floor(accuracies):
    assert statistics.median(accuracies["FSA"]) >= FSA_FLOOR, (
        f"FSA reached only {accuracies['FSA']}: the comparisons would mean nothing")


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_accuracy_within_tolerance_of_fsa(accuracies, name):
    acc, fsa = statistics.median(accuracies[name]), statistics.median(accuracies["FSA"])
    print(f"[convergence] {name} {acc:.4f} vs FSA {fsa:.4f} (medians over seeds {SEEDS}): difference "
          f"{acc - fsa:+.4f} (tolerance {TOLERANCE})", flush=True)
    assert abs(acc - fsa) <= TOLERANCE, (
        f"{name}: test accuracies {accuracies[name]}, FSA {accuracies['FSA']}: medians more than {TOLERANCE} apart")
