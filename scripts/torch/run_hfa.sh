#!/usr/bin/env bash
# PyTorch HFA demo: local Adam steps, party averages every K1 steps, global every K1 x K2.
#
# Same topology and process handling as scripts/cpu/run_vanilla_hips.sh (scripts/lib/hips.sh): 12 processes
# on 127.0.0.1, 3 parties, 4 training workers; the workers and the master worker run examples/pytorch/cnn.py
# (PyTorch, no MXNet: docs/PyTorch.md). Extra arguments go to every cnn.py process, e.g. `-ep 1`.

. "$(dirname "${BASH_SOURCE[0]}")/../lib/hips.sh"
EXAMPLE=pytorch/cnn.py
HFA_K1="${MXNET_KVSTORE_HFA_K1:-4}"
HFA_K2="${MXNET_KVSTORE_HFA_K2:-3}"
ALGO_ENV=(MXNET_KVSTORE_USE_HFA=1 "MXNET_KVSTORE_HFA_K1=$HFA_K1" "MXNET_KVSTORE_HFA_K2=$HFA_K2")
hips_run "$@"
