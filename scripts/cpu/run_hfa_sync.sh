#!/usr/bin/env bash
# HFA demo on one machine (port of GeoMX's scripts/cpu/run_hfa_sync.sh).
# HFA: every worker takes a local Adam step per iteration and averages its model inside its party
# every K1 iterations; every K2-th party average goes global (examples/cnn_hfa.py). The variables go
# to every process except the schedulers, as in the original:
#   MXNET_KVSTORE_USE_HFA=1 MXNET_KVSTORE_HFA_K1=$K1 MXNET_KVSTORE_HFA_K2=$K2
# K1 and K2 default to 4 and 3 here (a global model every 12 iterations, one epoch of load_digits
# with 4 workers); the original's 20 and 10 suit MNIST: MXNET_KVSTORE_HFA_K1=20 MXNET_KVSTORE_HFA_K2=10
# run_hfa_sync.sh --dataset mnist --data-dir DIR.
#
# 12 processes on 127.0.0.1, 3 parties, 4 training workers:
#   central party: global scheduler (9092), global server, master worker, scheduler (9093)
#   party A:       scheduler (9094), local server, workers -ds 0 / 1
#   party B:       scheduler (9095), local server, workers -ds 2 / 3
# Non-worker processes run `python -m geomx.node`; workers run examples/cnn_hfa.py.
# Extra arguments go to every cnn_hfa.py process, e.g. `run_hfa_sync.sh -ep 2`.
# See docs/Synchronization.md.
#
# Same process handling as run_vanilla_hips.sh: the schedulers start first, DMLC_INTERFACE is left
# to the caller, only the last worker's output is shown unless GEOMX_LOG_DIR names a folder for every
# process's log, every process started here is killed on exit, and the exit status is the first
# non-zero exit status of a process.
# The topology and the process handling are in scripts/lib/hips.sh.

. "$(dirname "${BASH_SOURCE[0]}")/../lib/hips.sh"
EXAMPLE=cnn_hfa.py
HFA_K1="${MXNET_KVSTORE_HFA_K1:-4}"
HFA_K2="${MXNET_KVSTORE_HFA_K2:-3}"
# Variables for every process except the schedulers.
ALGO_ENV=(MXNET_KVSTORE_USE_HFA=1 "MXNET_KVSTORE_HFA_K1=$HFA_K1" "MXNET_KVSTORE_HFA_K2=$HFA_K2")
hips_run "$@"
