#!/usr/bin/env bash
# PyTorch MPQ demo: mixed precision on the WAN (the large tensors sparse at threshold 0.01, as BSC; the
# small ones float16) with the servers' Adam (mode server: each party's local server steps it and the
# WAN carries its steps).
#
# Same topology and process handling as scripts/cpu/run_vanilla_hips.sh (scripts/lib/hips.sh): 12 processes
# on 127.0.0.1, 3 parties, 4 training workers; the workers and the master worker run examples/pytorch/cnn.py
# (PyTorch, no MXNet: docs/PyTorch.md). Extra arguments go to every cnn.py process, e.g. `-ep 1`.

. "$(dirname "${BASH_SOURCE[0]}")/../lib/hips.sh"
EXAMPLE=pytorch/cnn.py
SIZE_LOWER_BOUND="${MXNET_KVSTORE_SIZE_LOWER_BOUND:-1000}"
ALGO_ENV=("MXNET_KVSTORE_SIZE_LOWER_BOUND=$SIZE_LOWER_BOUND")  # every process except the schedulers
TRAIN_ARGS=(--compression mpq)
hips_run "$@"
