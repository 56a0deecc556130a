"""Convergence of the synchronisation algorithms on load_digits with the examples' CNN.

Every algorithm runs the real example script (``examples/cnn.py``, ``cnn_hfa.py``, ``cnn_esync.py``)
on a real topology of 2 parties x 1 worker for the same number of epochs, i.e. the same number of
training samples (for ESync: the same number on average per worker, fast parties taking more). Its
accuracy is the test accuracy of the last epoch: the mean over that epoch's evaluations (every
``EVAL_EVERY`` iterations, and after the last one) and over the workers, then the median over
``SEEDS``. It must be within ``TOLERANCE`` of fully-synchronous training's (FSA, measured the same
way), which itself must reach ``FSA_FLOOR``.

Why not simply the final accuracy of one run: training on 300 test images is chaotic. With one
seed, CI once measured ESync 3.7 points under FSA, while another machine's run of the same code had
it 1 point above; the asynchronous algorithms vary further with arrival order; and plain SGD's
iterate (DC-ASGD) moves by 3-6 points between evaluations 20 iterations apart (0.96, 0.90, 0.96),
so CI once had DC-ASGD's final accuracy 0.93 and 0.88 in two of three seeds, and in another run one
party ended at 0.86 and the other at 0.95. The mean over the last epoch removes most of that noise
and the median over the seeds the outliers left, while an algorithm that is broken is off in every
evaluation of most runs. The five flows of one seed run at the same time (about 6 minutes in all on
2 cores).

Learning rates: the Adam-based algorithms (FSA, MixedSync, HFA, ESync) all use ``ADAM_LR``;
DC-ASGD is SGD plus a delay-compensation term and gets its own SGD learning rate ``DCASGD_LR``:
0.05 at batch size 16 (the demo's 0.1 at batch size 32, scaled with the batch; at 0.1 it was
noisier still). Batch size 16 and 5 epochs give plain SGD enough iterations on this small data set
(47 per epoch and worker, 235 in all). All numbers are printed (``pytest -s`` shows them).
"""
import statistics

import pytest
from helpers import SEEDS, checked_curves, iterations_per_epoch, run_concurrently

# The module's runs all happen in the first test's fixture: 3 seeds x ~2 minutes on 2 cores.
pytestmark = [pytest.mark.system, pytest.mark.timeout(1200)]

PARTIES, WORKERS = 2, 1
EPOCHS = 5
BATCH = 16
ITERS_PER_EPOCH = iterations_per_epoch(PARTIES * WORKERS, BATCH)  # 47
EVAL_EVERY = 12  # iterations: evaluations at 192, 204, 216, 228 and 235 make up the last epoch's
HFA_K = (2, 2)   # K1, K2: cnn_hfa.py evaluates every K1 * K2 * --eval-every iterations
ESYNC_EVAL_ROUNDS = 1  # cnn_esync.py evaluates every --eval-every rounds (see ALGORITHMS)
ESYNC_MAX_STEPS = 15  # local steps a round at most: a last epoch of 47 iterations holds 3 rounds or more
ADAM_LR = 0.003
DCASGD_LR = 0.05
TOLERANCE = 0.03
FSA_FLOOR = 0.85
COMMON = ["--cpu", "-ds", "{slice}", "-ep", str(EPOCHS), "-bs", str(BATCH)]
EVAL = ["--eval-every", str(EVAL_EVERY)]

FSA = ("cnn.py", ["-lr", str(ADAM_LR), *EVAL], {})
ALGORITHMS = {
    "MixedSync": ("cnn.py", ["-lr", str(ADAM_LR), "--mixed-sync", *EVAL], {}),
    "MixedSync+DC-ASGD": ("cnn.py", ["-lr", str(DCASGD_LR), "--mixed-sync", "--dcasgd", *EVAL], {}),
    "HFA": ("cnn_hfa.py", ["-lr", str(ADAM_LR), "--eval-every", str(EVAL_EVERY // (HFA_K[0] * HFA_K[1]))],
            {"MXNET_KVSTORE_USE_HFA": "1", "MXNET_KVSTORE_HFA_K1": str(HFA_K[0]),
             "MXNET_KVSTORE_HFA_K2": str(HFA_K[1])}),
    # ESync evaluates every --eval-every global rounds (right after an average), each one or more local
    # steps: the faster party takes several per round, as many more as it is faster. Every 12 rounds
    # was too seldom for it: once, on a loaded machine, a party ran 2.5 steps a round and had only two
    # evaluations in its last epoch; every 3 rounds too, once a party ran 10-15 steps a round (CI, the
    # machine loaded by the suite). So: every round, and at most ESYNC_MAX_STEPS steps a round, which
    # leaves at least 3 evaluations in any last epoch however uneven the machine makes the parties.
    "ESync": ("cnn_esync.py", ["-lr", str(ADAM_LR), "--eval-every", str(ESYNC_EVAL_ROUNDS)],
              {"GEOMX_USE_ESYNC": "1", "GEOMX_ESYNC_MAX_STEPS": str(ESYNC_MAX_STEPS)}),
}


def last_epoch_accuracy(label, result):
    """The mean over the workers of their mean test accuracy over the last epoch's evaluations;
    checks the run and prints its numbers."""
    accs = checked_curves(label, result, PARTIES * WORKERS)
    per_worker = {}
    for name, points in sorted(accs.items()):
        last = [a for it, a in points if it > points[-1][0] - ITERS_PER_EPOCH]
        assert len(last) >= 3, f"{label}: {name} has too few evaluations in its last epoch: {points}"
        per_worker[name] = (statistics.mean(last), last, points[-1][0])
    acc = statistics.mean(mean for mean, _, _ in per_worker.values())
    detail = ", ".join(f"{name}: {mean:.4f} (" + " ".join(f"{a:.4f}" for a in last) + f"; {it} iterations)"
                       for name, (mean, last, it) in per_worker.items())
    print(f"[convergence] {label}: last-epoch test accuracy {acc:.4f} ({detail}) in {result[2]:.1f} s", flush=True)
    if label.startswith("ESync"):
        for line in result[1].splitlines():
            if "per worker on average" in line:
                print(f"[convergence] {line}", flush=True)
    return acc


@pytest.fixture(scope="module")
def accuracies():
    """{label: [last-epoch accuracy per seed]} for FSA and every algorithm (the runs happen once, here)."""
    finals = {label: [] for label in ["FSA", *ALGORITHMS]}
    for seed in SEEDS:
        jobs = {label: (script, [*COMMON, *args, "--seed", str(seed)], env)
                for label, (script, args, env) in {"FSA": FSA, **ALGORITHMS}.items()}
        results = run_concurrently(jobs, parties=PARTIES, workers=WORKERS)
        for label in finals:
            finals[label].append(last_epoch_accuracy(f"{label} (seed {seed})", results[label]))
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
        f"{name}: last-epoch test accuracies {accuracies[name]}, FSA {accuracies['FSA']}: "
        f"medians more than {TOLERANCE} apart")
