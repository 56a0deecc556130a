#!/usr/bin/env bash
# Mixed-precision (MPQ) demo on one machine (port of GeoMX's scripts/cpu/run_mixed_precision.sh).
# MPQ: tensors below MXNET_KVSTORE_SIZE_LOWER_BOUND elements travel as float16 everywhere, larger
# ones float32 inside a party and BSC-sparse (ratio -bcr, default 0.01) across the WAN
# (examples/cnn_mpq.py). As in the original, MXNET_KVSTORE_SIZE_LOWER_BOUND (default 1000 here)
# goes on the global server, the master worker, both local servers and every worker: the workers
# choose each key's dtype with it, so it must be the same everywhere.
#
# 12 processes on 127.0.0.1, 3 parties, 4 training workers:
#   central party: global scheduler (9092), global server, master worker, scheduler (9093)
#   party A:       scheduler (9094), local server, workers -ds 0 / 1
#   party B:       scheduler (9095), local server, workers -ds 2 / 3
# Non-worker processes run `python -m geomx.node`; workers run examples/cnn_mpq.py.
# Extra arguments go to every cnn_mpq.py process, e.g. `run_mixed_precision.sh -ep 1`.
# See docs/Compression.md.
#
# Differences from the original: the schedulers start first (as the deployment docs advise),
# DMLC_INTERFACE is left to the caller (the original forced eth0), only the last worker's output
# is shown unless GEOMX_LOG_DIR names a folder for every process's log, every process started
# here is killed on exit, and the exit status is the first non-zero exit status of a worker.
# The topology and the process handling are in scripts/lib/hips.sh.

. "$(dirname "${BASH_SOURCE[0]}")/../lib/hips.sh"
EXAMPLE=cnn_mpq.py
SIZE_LOWER_BOUND="${MXNET_KVSTORE_SIZE_LOWER_BOUND:-1000}"
ALGO_ENV=("MXNET_KVSTORE_SIZE_LOWER_BOUND=$SIZE_LOWER_BOUND")  # every process except the schedulers
hips_run "$@"
