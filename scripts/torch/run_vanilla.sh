#!/usr/bin/env bash
# PyTorch FSA demo: the global server runs torch.optim.Adam's rule (mode server).
#
# Same topology and process handling as scripts/cpu/run_vanilla_hips.sh (scripts/lib/hips.sh): 12 processes
# on 127.0.0.1, 3 parties, 4 training workers; the workers and the master worker run examples/pytorch/cnn.py
# (PyTorch, no MXNet: docs/PyTorch.md). Extra arguments go to every cnn.py process, e.g. `-ep 1`.

. "$(dirname "${BASH_SOURCE[0]}")/../lib/hips.sh"
EXAMPLE=pytorch/cnn.py
hips_run "$@"
