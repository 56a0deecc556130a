#!/usr/bin/env bash
# PyTorch MPQ demo: mixed precision on the WAN (the large tensors sparse at threshold 0.01, as BSC; the
# small ones float16) with the servers' Adam (mode server: each party's local server steps it and the
# WAN carries its steps). The BSC demo's topology and settings, with --compression mpq after its own
# (cnn.py takes the last one). Extra arguments go to every cnn.py process, e.g. `-ep 1`.
exec bash "$(dirname "${BASH_SOURCE[0]}")/run_bsc.sh" --compression mpq "$@"
