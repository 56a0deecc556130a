#!/usr/bin/env bash
# P3 demo on one machine (port of GeoMX's scripts/cpu/run_p3.sh): examples/cnn.py with
# ENABLE_P3=1. Data-path requests are cut into slices of GEOMX_P3_SLICE_SIZE elements (default
# 40000) and sent through a priority queue, on the worker -> local server links and on the local
# server -> global server (WAN) links; cnn.py passes priority=-idx, so the first layers go first.
# ENABLE_P3=1 goes to every process except the schedulers (the original also leaves the master
# worker out; here it is harmless: the master worker only initialises keys, which travel whole).
# GEOMX_P3_SLICE_SIZE, GEOMX_P3_WINDOW and GEOMX_P3_TRACE (a folder for the per-slice timelines, see
# docs/Scheduling.md) are taken from the caller's environment.
#
# 12 processes on 127.0.0.1, 3 parties, 4 training workers:
#   central party: global scheduler (9092), global server, master worker, scheduler (9093)
#   party A:       scheduler (9094), local server, workers -ds 0 / 1
#   party B:       scheduler (9095), local server, workers -ds 2 / 3
# Non-worker processes run `python -m geomx.node`; workers run examples/cnn.py.
# Extra arguments go to every cnn.py process, e.g. `run_p3.sh -ep 2`.
#
# Same process handling as run_vanilla_hips.sh: the schedulers start first, DMLC_INTERFACE is left
# to the caller, only the last worker's output is shown unless GEOMX_LOG_DIR names a folder for every
# process's log, every process started here is killed on exit, and the exit status is the first
# non-zero exit status of a process.
# The topology and the process handling are in scripts/lib/hips.sh.

. "$(dirname "${BASH_SOURCE[0]}")/../lib/hips.sh"
EXAMPLE=cnn.py
# Variables for every process except the schedulers.
ALGO_ENV=(ENABLE_P3=1)
hips_run "$@"
