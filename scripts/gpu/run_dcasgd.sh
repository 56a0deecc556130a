#!/usr/bin/env bash
# MixedSync + DC-ASGD demo on one machine (gpu variant of the MixedSync script, DC-ASGD optimizer).
# The same run as ../cpu/run_dcasgd.sh (whose header documents the variables and the arguments)
# without --cpu: the example uses gpu(0) when MXNet sees one, the CPU otherwise (with a note).
GEOMX_DEVICE=gpu exec bash "$(dirname "${BASH_SOURCE[0]}")/../cpu/run_dcasgd.sh" "$@"
