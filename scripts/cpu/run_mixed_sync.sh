#!/usr/bin/env bash
# MixedSync demo on one machine (port of GeoMX's scripts/cpu/run_mixed_sync.sh).
# MixedSync: each party stays synchronous inside, the global tier is asynchronous (dist_async):
# the global server applies each party's aggregate (Adam) as it arrives. Only the master worker gets
# --mixed-sync, as in the original: it is the one that creates the dist_async store and sets the mode.
#
# 12 processes on 127.0.0.1, 3 parties, 4 training workers:
#   central party: global scheduler (9092), global server, master worker, scheduler (9093)
#   party A:       scheduler (9094), local server, workers -ds 0 / 1
#   party B:       scheduler (9095), local server, workers -ds 2 / 3
# Non-worker processes run `python -m geomx.node`; workers run examples/cnn.py.
# Extra arguments go to every cnn.py process, e.g. `run_mixed_sync.sh -ep 1 --eval-every 10`.
# See docs/Synchronization.md.
#
# Same process handling as run_vanilla_hips.sh: the schedulers start first, DMLC_INTERFACE is left
# to the caller, only the last worker's output is shown unless GEOMX_LOG_DIR names a folder for every
# process's log, every process started here is killed on exit, and the exit status is the first
# non-zero exit status of a process.
# The topology and the process handling are in scripts/lib/hips.sh.

. "$(dirname "${BASH_SOURCE[0]}")/../lib/hips.sh"
EXAMPLE=cnn.py
MASTER_ARGS=(--mixed-sync)  # no extra variables: the master worker's flags choose the mode
hips_run "$@"
