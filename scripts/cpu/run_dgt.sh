#!/usr/bin/env bash
# DGT demo on one machine (port of GeoMX's scripts/cpu/run_dgt.sh).
# DGT: each local server cuts its push to the global server into blocks, sends the top K fraction
# (by a moving average of their mean magnitude) on the reliable TCP link and the rest on
# lower-priority channels; see docs/DGT.md. The variables, as in the original (which sets them on
# the global server and the local servers only; here they go to every non-scheduler process, and
# workers do not read them):
#   ENABLE_DGT=2 DMLC_UDP_CHANNEL_NUM=3 DMLC_K=0.8 ADAPTIVE_K_FLAG=1
# ENABLE_DGT may be overridden from the environment (1: real UDP channels, 3: 4-bit low-priority
# blocks). With ADAPTIVE_K_FLAG=1, K follows the training loss the workers report every 10
# iterations (cnn.py --report-loss 10, through kv.report_loss).
#
# 12 processes on 127.0.0.1, 3 parties, 4 training workers:
#   central party: global scheduler (9092), global server, master worker, scheduler (9093)
#   party A:       scheduler (9094), local server, workers -ds 0 / 1
#   party B:       scheduler (9095), local server, workers -ds 2 / 3
# Non-worker processes run `python -m geomx.node`; workers run examples/cnn.py.
# Extra arguments go to every cnn.py process, e.g. `run_dgt.sh -ep 1`.
#
# Same process handling as run_vanilla_hips.sh: the schedulers start first, DMLC_INTERFACE is left
# to the caller, only the last worker's output is shown unless GEOMX_LOG_DIR names a folder for every
# process's log, every process started here is killed on exit, and the exit status is the first
# non-zero exit status of a process.
# The topology and the process handling are in scripts/lib/hips.sh.

. "$(dirname "${BASH_SOURCE[0]}")/../lib/hips.sh"
EXAMPLE=cnn.py
# Variables for every process except the schedulers.
ALGO_ENV=("ENABLE_DGT=${ENABLE_DGT:-2}" DMLC_UDP_CHANNEL_NUM=3 DMLC_K=0.8 ADAPTIVE_K_FLAG=1)
TRAIN_ARGS=(--report-loss 10)
hips_run "$@"
