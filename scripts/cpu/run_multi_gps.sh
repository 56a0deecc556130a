#!/usr/bin/env bash
# MultiGPS on one machine (port of GeoMX's scripts/cpu/run_multi_gps.sh): the vanilla HiPS topology
# with two global servers, which share the keys (small keys whole by a hash, large keys split into
# near-equal parts; see docs/Scheduling.md). Set NUM_LOCAL_SERVERS=2 in the environment to give each
# party two local servers as well (the original refuses more than one).
# Extra arguments go to every cnn.py process, e.g. `run_multi_gps.sh -ep 1 --max-iters 50`.
# The topology and the process handling are in scripts/lib/hips.sh.

LOCAL_SERVERS="${NUM_LOCAL_SERVERS:-1}"
. "$(dirname "${BASH_SOURCE[0]}")/../lib/hips.sh"
EXAMPLE=cnn.py
NUM_GLOBAL_SERVERS=2
NUM_LOCAL_SERVERS=$LOCAL_SERVERS
hips_run "$@"
