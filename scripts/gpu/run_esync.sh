#!/usr/bin/env bash
# ESync demo on one machine (gpu; GeoMX lists ESync as "to be integrated" and has no script).
# The same run as ../cpu/run_esync.sh (whose header documents the variables and the arguments)
# without --cpu: the example uses gpu(0) when MXNet sees one, the CPU otherwise (with a note).
GEOMX_DEVICE=gpu exec bash "$(dirname "${BASH_SOURCE[0]}")/../cpu/run_esync.sh" "$@"
