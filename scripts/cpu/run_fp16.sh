#!/usr/bin/env bash
# FP16 demo on one machine (port of GeoMX's scripts/cpu/run_fp16.sh).
# FP16: every key is initialised, pushed and pulled as float16 (examples/cnn_fp16.py); the servers
# sum float16 pushes in float32 and round once. No extra variables, as in the original.
#
# 12 processes on 127.0.0.1, 3 parties, 4 training workers:
#   central party: global scheduler (9092), global server, master worker, scheduler (9093)
#   party A:       scheduler (9094), local server, workers -ds 0 / 1
#   party B:       scheduler (9095), local server, workers -ds 2 / 3
# Non-worker processes run `python -m geomx.node`; workers run examples/cnn_fp16.py.
# Extra arguments go to every cnn_fp16.py process, e.g. `run_fp16.sh -ep 1`.
# See docs/Compression.md.
#
# Differences from the original: the schedulers start first (as the deployment docs advise),
# DMLC_INTERFACE is left to the caller (the original forced eth0), only the last worker's output
# is shown unless GEOMX_LOG_DIR names a folder for every process's log, every process started
# here is killed on exit, and the exit status is the first non-zero exit status of a worker.
# The topology and the process handling are in scripts/lib/hips.sh.

. "$(dirname "${BASH_SOURCE[0]}")/../lib/hips.sh"
EXAMPLE=cnn_fp16.py
hips_run "$@"
