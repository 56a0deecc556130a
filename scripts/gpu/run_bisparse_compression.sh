#!/usr/bin/env bash
# Bidirectional sparse compression (BSC) demo on one machine, GPU variant (port of GeoMX's scripts/gpu/run_bisparse_compression.sh).
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
set -u

PY="${PYTHON:-python3}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CNN="$ROOT/examples/cnn_bsc.py"
DEVICE_FLAGS=()  # GPU variant: cnn_bsc.py uses gpu(0) when MXNet sees one
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PS_VERBOSE="${PS_VERBOSE:-1}"
HOST=127.0.0.1
LOG_DIR="${GEOMX_LOG_DIR:-}"
SIZE_LOWER_BOUND="${MXNET_KVSTORE_SIZE_LOWER_BOUND:-1000}"
BOUND_ENV=("MXNET_KVSTORE_SIZE_LOWER_BOUND=$SIZE_LOWER_BOUND")
[ -n "$LOG_DIR" ] && mkdir -p "$LOG_DIR"

PIDS=()          # every process started here
WORKER_PIDS=()   # the master worker and the training workers
NAMES=()         # name of each process, by position in PIDS

cleanup() {
    trap - EXIT INT TERM
    local pid alive=()
    for pid in "${PIDS[@]}"; do
        kill -0 "$pid" 2>/dev/null && alive+=("$pid")
    done
    if [ "${#alive[@]}" -gt 0 ]; then
        kill -TERM "${alive[@]}" 2>/dev/null
        for _ in $(seq 50); do  # up to 5 s to exit, then SIGKILL
            local still=()
            for pid in "${alive[@]}"; do kill -0 "$pid" 2>/dev/null && still+=("$pid"); done
            [ "${#still[@]}" -eq 0 ] && break
            sleep 0.1
        done
        for pid in "${alive[@]}"; do kill -KILL "$pid" 2>/dev/null; done
    fi
    wait 2>/dev/null
}
on_signal() {
    echo "run_bisparse_compression.sh: interrupted, stopping all processes" >&2
    cleanup
    exit "$1"
}
trap cleanup EXIT
trap 'on_signal 130' INT
trap 'on_signal 143' TERM

# start NAME SHOW(0/1) ENV... -- COMMAND...
start() {
    local name="$1" show="$2"; shift 2
    local envs=()
    while [ "$1" != "--" ]; do envs+=("$1"); shift; done
    shift
    if [ "$show" = 1 ] && [ -z "$LOG_DIR" ]; then
        env "${envs[@]}" "$@" &
    elif [ -n "$LOG_DIR" ]; then
        env "${envs[@]}" "$@" >"$LOG_DIR/$name.log" 2>&1 &
    else
        env "${envs[@]}" "$@" >/dev/null 2>&1 &
    fi
    PIDS+=("$!")
    NAMES+=("$name")
}

GLOBAL_ROOT=(DMLC_PS_GLOBAL_ROOT_URI=$HOST DMLC_PS_GLOBAL_ROOT_PORT=9092)
NODE=("$PY" -m geomx.node)
TRAIN=("$PY" -u "$CNN" "${DEVICE_FLAGS[@]}")

# ---- central party ----
start global_scheduler 0 DMLC_ROLE_GLOBAL=global_scheduler "${GLOBAL_ROOT[@]}" \
    DMLC_NUM_GLOBAL_SERVER=1 DMLC_NUM_GLOBAL_WORKER=2 -- "${NODE[@]}"
start central_scheduler 0 DMLC_ROLE=scheduler DMLC_PS_ROOT_URI=$HOST DMLC_PS_ROOT_PORT=9093 \
    DMLC_NUM_SERVER=1 DMLC_NUM_WORKER=1 -- "${NODE[@]}"
start global_server 0 "${BOUND_ENV[@]}" DMLC_ROLE_GLOBAL=global_server DMLC_ROLE=server "${GLOBAL_ROOT[@]}" \
    DMLC_PS_ROOT_URI=$HOST DMLC_PS_ROOT_PORT=9093 DMLC_NUM_SERVER=1 DMLC_NUM_WORKER=1 \
    DMLC_NUM_GLOBAL_SERVER=1 DMLC_NUM_GLOBAL_WORKER=2 DMLC_ENABLE_CENTRAL_WORKER=0 DMLC_NUM_ALL_WORKER=4 \
    -- "${NODE[@]}"
start master_worker 0 "${BOUND_ENV[@]}" DMLC_ROLE=worker DMLC_ROLE_MASTER_WORKER=1 DMLC_PS_ROOT_URI=$HOST DMLC_PS_ROOT_PORT=9093 \
    DMLC_NUM_SERVER=1 DMLC_NUM_WORKER=1 DMLC_NUM_ALL_WORKER=4 -- "${TRAIN[@]}" "$@"
WORKER_PIDS+=("${PIDS[-1]}")

# ---- parties A (port 9094, shards 0 and 1) and B (port 9095, shards 2 and 3) ----
for party in A B; do
    if [ "$party" = A ]; then port=9094; first=0; else port=9095; first=2; fi
    start "scheduler_$party" 0 DMLC_ROLE=scheduler DMLC_PS_ROOT_URI=$HOST DMLC_PS_ROOT_PORT=$port \
        DMLC_NUM_SERVER=1 DMLC_NUM_WORKER=2 -- "${NODE[@]}"
    start "server_$party" 0 "${BOUND_ENV[@]}" DMLC_ROLE=server "${GLOBAL_ROOT[@]}" DMLC_NUM_GLOBAL_SERVER=1 DMLC_NUM_GLOBAL_WORKER=2 \
        DMLC_PS_ROOT_URI=$HOST DMLC_PS_ROOT_PORT=$port DMLC_NUM_SERVER=1 DMLC_NUM_WORKER=2 -- "${NODE[@]}"
    for ds in $first $((first + 1)); do
        show=0; [ "$ds" = 3 ] && show=1  # like the original, only the last worker's output is shown
        start "worker_$ds" $show "${BOUND_ENV[@]}" DMLC_ROLE=worker DMLC_PS_ROOT_URI=$HOST DMLC_PS_ROOT_PORT=$port \
            DMLC_NUM_SERVER=1 DMLC_NUM_WORKER=2 DMLC_NUM_ALL_WORKER=4 \
            -- "${TRAIN[@]}" --data-slice-idx "$ds" "$@"
        WORKER_PIDS+=("${PIDS[-1]}")
    done
done

name_of() {
    local i
    for i in "${!PIDS[@]}"; do [ "${PIDS[$i]}" = "$1" ] && { echo "${NAMES[$i]}"; return; }; done
    echo "$1"
}

# Wait for the workers. A failed worker would leave the others blocked in a synchronous step, so the
# first failure (of a worker, or of a server/scheduler exiting non-zero) ends the run at once.
status=0
remaining=("${WORKER_PIDS[@]}")
while [ "${#remaining[@]}" -gt 0 ] && [ "$status" -eq 0 ]; do
    next=()
    for pid in "${remaining[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then
            next+=("$pid")
        else
            wait "$pid"; rc=$?
            if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then
                echo "run_bisparse_compression.sh: $(name_of "$pid") exited with status $rc" >&2
                status=$rc
            fi
        fi
    done
    remaining=("${next[@]}")
    if [ "$status" -eq 0 ]; then
        for pid in "${PIDS[@]}"; do
            case " ${WORKER_PIDS[*]} " in *" $pid "*) continue ;; esac
            if ! kill -0 "$pid" 2>/dev/null; then
                wait "$pid" 2>/dev/null; rc=$?
                if [ "$rc" -ne 0 ] && [ "$rc" -ne 127 ]; then
                    echo "run_bisparse_compression.sh: $(name_of "$pid") exited with status $rc" >&2
                    status=$rc
                    break
                fi
            fi
        done
    fi
    [ "${#remaining[@]}" -gt 0 ] && [ "$status" -eq 0 ] && sleep 0.2
done

if [ "$status" -eq 0 ]; then
    # Let the servers and schedulers finish their own shutdown (kStopServer chain) before cleanup.
    for _ in $(seq 25); do  # up to 5 s
        alive=0
        for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [ "$alive" -eq 0 ] && break
        sleep 0.2
    done
fi
exit "$status"
