#!/usr/bin/env bash
# MixedSync + DC-ASGD demo on one machine (cpu variant of the MixedSync script, DC-ASGD optimizer).
# DC-ASGD: as run_mixed_sync.sh, with mx.optimizer.DCASGD on the global server, which compensates
# each party's delay against the weights that party last pulled. Only the master worker gets
# --mixed-sync --dcasgd. DC-ASGD is plain SGD plus the compensation term: its learning rate is
# DCASGD_LR (default 0.05; Adam's default of 0.01 learns slowly with SGD on this model, and at 0.1, the
# default until 2026-12-06, 2 of 21 fifteen-epoch runs diverged to chance: tests/test_bundled_scripts.py).
#
# 12 processes on 127.0.0.1, 3 parties, 4 training workers:
#   central party: global scheduler (9092), global server, master worker, scheduler (9093)
#   party A:       scheduler (9094), local server, workers -ds 0 / 1
#   party B:       scheduler (9095), local server, workers -ds 2 / 3
# Non-worker processes run `python -m geomx.node`; workers run examples/cnn.py.
# Extra arguments go to every cnn.py process, e.g. `run_dcasgd.sh -ep 1 --eval-every 10`.
# See docs/Synchronization.md.
#
# Same process handling as run_vanilla_hips.sh: the schedulers start first, DMLC_INTERFACE is left
# to the caller, only the last worker's output is shown unless GEOMX_LOG_DIR names a folder for every
# process's log, every process started here is killed on exit, and the exit status is the first
# non-zero exit status of a process.
# The topology and the process handling are in scripts/lib/hips.sh.

. "$(dirname "${BASH_SOURCE[0]}")/../lib/hips.sh"
EXAMPLE=cnn.py
DCASGD_LR="${DCASGD_LR:-0.05}"
TRAIN_ARGS=(-lr "$DCASGD_LR")
MASTER_ARGS=(--mixed-sync --dcasgd)  # no extra variables: the master worker's flags choose the mode
hips_run "$@"
