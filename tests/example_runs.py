"""Running the example scripts on real 2-party topologies, several at once, and reading their accuracy.

Shared by the convergence tests (test_convergence.py, test_compression_convergence.py). Training on
load_digits is chaotic: one run's final accuracy on the 300 test images moves by 1-3 points with the
seed or with the last bit of a kernel's rounding, so those tests compare means over ``SEEDS`` (the
examples' ``--seed``: initial weights and data order), not single runs.
"""
import io
import re
import sys
import threading
import time
from pathlib import Path

from geomx.launch import Topology, run

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SEEDS = (0, 1, 2)
DIGITS_TRAIN_IMAGES = 1497  # load_digits' training split (the examples' default data set)


def iterations_per_epoch(workers, batch):
    """Iterations per epoch of each of ``workers`` workers at ``batch``: each gets an equal slice of
    load_digits' training images, the last batch partial."""
    return -(-(DIGITS_TRAIN_IMAGES // workers) // batch)

_ACC = re.compile(r"^\[(?P<name>[^\]]+)\] \[Time [0-9.]+\]\[Epoch \d+\]\[Iteration (?P<it>\d+)\] "
                  r"Test Acc (?P<acc>[0-9.]+)")


def run_example(script, args, parties, workers, env=None, timeout=300):
    """Run ``examples/<script>`` on every worker of a topology; return (code, output, seconds)."""
    topo = Topology(parties=parties, workers_per_party=workers, env=dict(env or {}))
    stream = io.StringIO()
    start = time.monotonic()
    code = run(topo, [sys.executable, str(EXAMPLES / script), *args], timeout=timeout, stream=stream)
    return code, stream.getvalue(), time.monotonic() - start


def run_concurrently(jobs, **topology):
    """{label: (code, output, seconds)} for ``jobs`` = {label: (script, args, env)}, all started at once."""
    results = {}

    def target(label, script, args, env):
        try:
            results[label] = run_example(script, args, env=env, **topology)
        except Exception as exc:  # reported by the caller's assertions
            results[label] = (-1, f"{type(exc).__name__}: {exc}", 0.0)

    threads = [threading.Thread(target=target, args=(label, *job)) for label, job in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def curves(output):
    """{worker name: [(iterations, accuracy), ...]} from the ``Test Acc`` lines."""
    out = {}
    for line in output.splitlines():
        m = _ACC.match(line)
        if m:
            out.setdefault(m.group("name"), []).append((int(m.group("it")), float(m.group("acc"))))
    return out


def checked_curves(label, result, expected_workers):
    """The run's curves, after checking that it exited 0 and every worker reported."""
    code, output, _ = result
    assert code == 0, f"{label}: exit status {code}\n{output[-4000:]}"
    accs = curves(output)
    assert len(accs) == expected_workers, f"{label}: no Test Acc line from every worker\n{output[-4000:]}"
    return accs

