#!/usr/bin/env bash
# DGT demo on one machine (port of GeoMX's scripts/gpu/run_dgt.sh).
# The same run as ../cpu/run_dgt.sh (whose header documents the variables and the arguments)
# without --cpu: the example uses gpu(0) when MXNet sees one, the CPU otherwise (with a note).
GEOMX_DEVICE=gpu exec bash "$(dirname "${BASH_SOURCE[0]}")/../cpu/run_dgt.sh" "$@"
