#!/usr/bin/env bash
# TSEngine demo on one machine (port of GeoMX's scripts/cpu/run_tsengine.sh).
# TSEngine: the parties' local servers sum their pushes up an aggregation tree (pairs chosen by the
# global scheduler from measured throughput) and relay each new model party to party instead of all
# talking to the global server (ENABLE_INTER_TS); inside each party the workers do the same towards
# their local server (ENABLE_INTRA_TS). Each next receiver of a relay is the fastest measured one with
# probability up to MAX_GREED_RATE_TS, a random one otherwise. The variables go to every process
# except the schedulers, as in the original (the schedulers use MAX_GREED_RATE_TS's default, 0.9):
#   ENABLE_INTER_TS=1 ENABLE_INTRA_TS=1 MAX_GREED_RATE_TS=0.9
# Workers run examples/cnn.py (FSA, Adam on the global server); the pulled weights are exactly those
# of run_vanilla_hips.sh's topology.
#
# 12 processes on 127.0.0.1, 3 parties, 4 training workers:
#   central party: global scheduler (9092), global server, master worker, scheduler (9093)
#   party A:       scheduler (9094), local server, workers -ds 0 / 1
#   party B:       scheduler (9095), local server, workers -ds 2 / 3
# Non-worker processes run `python -m geomx.node`. Extra arguments go to every cnn.py process.
# See docs/Scheduling.md.
#
# Same process handling as run_vanilla_hips.sh: the schedulers start first, DMLC_INTERFACE is left
# to the caller, only the last worker's output is shown unless GEOMX_LOG_DIR names a folder for every
# process's log, every process started here is killed on exit, and the exit status is the first
# non-zero exit status of a process.
# The topology and the process handling are in scripts/lib/hips.sh.

. "$(dirname "${BASH_SOURCE[0]}")/../lib/hips.sh"
EXAMPLE=cnn.py
# Variables for every process except the schedulers.
ALGO_ENV=(ENABLE_INTER_TS=1 ENABLE_INTRA_TS=1 "MAX_GREED_RATE_TS=${MAX_GREED_RATE_TS:-0.9}")
hips_run "$@"
