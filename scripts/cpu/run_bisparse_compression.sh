#!/usr/bin/env bash
# Bidirectional sparse compression (BSC) demo on one machine (port of GeoMX's scripts/cpu/run_bisparse_compression.sh).
# BSC: the master worker switches on bidirectional sparse compression (examples/cnn_bsc.py, ratio
# -bcr, default 0.01): the local servers send their party's large gradients (at least
# MXNET_KVSTORE_SIZE_LOWER_BOUND elements) to the global server as top-r sparse updates with
# momentum correction and residual, and get the exact sparse sum back; workers update locally (Adam).
# MXNET_KVSTORE_SIZE_LOWER_BOUND (default 1000 here, as in the original scripts; 200000 when unset
# elsewhere) goes on the global server and both local servers, as in the original, and also on the
# master worker: in geomx the master worker sends its value with the codec parameters, so it is the
# one that decides (the servers' value is a fallback); and on the workers, which only use it to
# report how many tensors are compressed.
#
# 12 processes on 127.0.0.1, 3 parties, 4 training workers:
#   central party: global scheduler (9092), global server, master worker, scheduler (9093)
#   party A:       scheduler (9094), local server, workers -ds 0 / 1
#   party B:       scheduler (9095), local server, workers -ds 2 / 3
# Non-worker processes run `python -m geomx.node`; workers run examples/cnn_bsc.py.
# Extra arguments go to every cnn_bsc.py process, e.g. `run_bisparse_compression.sh -ep 1 -bcr 0.05`.
# See docs/Compression.md.
#
# Differences from the original: the schedulers start first (as the deployment docs advise),
# DMLC_INTERFACE is left to the caller (the original forced eth0), only the last worker's output
# is shown unless GEOMX_LOG_DIR names a folder for every process's log, every process started
# here is killed on exit, and the exit status is the first non-zero exit status of a worker.
# The topology and the process handling are in scripts/lib/hips.sh.

. "$(dirname "${BASH_SOURCE[0]}")/../lib/hips.sh"
EXAMPLE=cnn_bsc.py
SIZE_LOWER_BOUND="${MXNET_KVSTORE_SIZE_LOWER_BOUND:-1000}"
ALGO_ENV=("MXNET_KVSTORE_SIZE_LOWER_BOUND=$SIZE_LOWER_BOUND")  # every process except the schedulers
hips_run "$@"
