#!/usr/bin/env bash
# ESync demo on one machine (cpu; GeoMX lists ESync as "to be integrated" and has no script).
# ESync: GEOMX_USE_ESYNC=1 on every process except the schedulers. The global server measures each
# party's local steps per second and assigns it round(speed / slowest speed) local steps per round
# (at most GEOMX_ESYNC_MAX_STEPS, default 64), so that both parties reach the global average at about
# the same time (examples/cnn_esync.py). To show it on one machine, party B's workers sleep
# ESYNC_SLOW_DELAY seconds (default 0.1) after every local step: party A is then assigned more steps
# per round. ESYNC_SLOW_DELAY=0 gives two equal parties.
#
# 12 processes on 127.0.0.1, 3 parties, 4 training workers:
#   central party: global scheduler (9092), global server, master worker, scheduler (9093)
#   party A:       scheduler (9094), local server, workers -ds 0 / 1
#   party B:       scheduler (9095), local server, workers -ds 2 / 3
# Non-worker processes run `python -m geomx.node`; workers run examples/cnn_esync.py.
# Extra arguments go to every cnn_esync.py process, e.g. `run_esync.sh -ep 1 --eval-every 10`.
# See docs/Synchronization.md.
#
# Same process handling as run_vanilla_hips.sh: the schedulers start first, DMLC_INTERFACE is left
# to the caller, only the last worker's output is shown unless GEOMX_LOG_DIR names a folder for every
# process's log, every process started here is killed on exit, and the exit status is the first
# non-zero exit status of a process.
# The topology and the process handling are in scripts/lib/hips.sh.

. "$(dirname "${BASH_SOURCE[0]}")/../lib/hips.sh"
EXAMPLE=cnn_esync.py
ESYNC_SLOW_DELAY="${ESYNC_SLOW_DELAY:-0.1}"
# Variables for every process except the schedulers.
ALGO_ENV=(GEOMX_USE_ESYNC=1)
PARTY_B_ARGS=(--step-delay "$ESYNC_SLOW_DELAY")  # party B is the slow one
hips_run "$@"
