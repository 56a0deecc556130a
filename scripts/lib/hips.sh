# Shared body of scripts/cpu/run_*.sh (and, through them, scripts/gpu/run_*.sh): a HiPS topology of
# 12 processes on 127.0.0.1 (port of GeoMX's scripts/{cpu,gpu}/run_*.sh), 3 parties, 4 training workers:
#   central party: global scheduler (9092), global server, master worker, scheduler (9093)
#   party A:       scheduler (9094), local server, workers -ds 0 / 1
#   party B:       scheduler (9095), local server, workers -ds 2 / 3
# Non-worker processes run `python -m geomx.node` (with the original GeoMX DMLC_* variables); workers
# run examples/$EXAMPLE.
#
# Sourced, not run: a script sources it (which empties the settings below), sets the settings, then
# calls `hips_run "$@"`:
#   EXAMPLE       file under examples/ the workers and the master worker run (required)
#   ALGO_ENV      VAR=value words for every process except the schedulers (default none)
#   TRAIN_ARGS    arguments for every example process, after the device flag (default none)
#   MASTER_ARGS   arguments for the master worker only (default none)
#   PARTY_A_ARGS  arguments for party A's workers only, PARTY_B_ARGS for party B's (default none)
#   NUM_GLOBAL_SERVERS  global servers (MultiGPS, default 1); NUM_LOCAL_SERVERS  local servers in
#                 each party (default 1; the original refuses more than one)
# The arguments given to the script go last to every example process. The command line of the
# master worker is: $PYTHON -u examples/$EXAMPLE [--cpu] TRAIN_ARGS MASTER_ARGS "$@"; that of a
# worker: $PYTHON -u examples/$EXAMPLE [--cpu] TRAIN_ARGS --data-slice-idx N PARTY_X_ARGS "$@".
#
# Environment: PYTHON (default python3); GEOMX_DEVICE=gpu drops --cpu (what scripts/gpu/*.sh set:
# the examples then use gpu(0) when MXNet sees one, the CPU otherwise, with a note); GEOMX_LOG_DIR
# (every process's log there; otherwise only worker 3's output is shown); PS_VERBOSE (default 1).
# PYTHONPATH gets the repository root in front. DMLC_INTERFACE is left to the caller (the original
# forced eth0).
#
# Process handling: the schedulers start first (as the deployment docs advise), every process
# started here is killed on exit, INT or TERM (TERM, then KILL after 5 s), and the exit status is
# the first non-zero exit status of a process (a failed worker would leave the others blocked in a
# synchronous step, so the first failure ends the run at once).
set -u

EXAMPLE=
ALGO_ENV=()
TRAIN_ARGS=()
MASTER_ARGS=()
PARTY_A_ARGS=()
PARTY_B_ARGS=()
NUM_GLOBAL_SERVERS=1
NUM_LOCAL_SERVERS=1
PIDS=()          # every process started here
WORKER_PIDS=()   # the master worker and the training workers
NAMES=()         # name of each process, by position in PIDS
SCRIPT="$(basename "$0")"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"  # the repository

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
    echo "$SCRIPT: interrupted, stopping all processes" >&2
    cleanup
    exit "$1"
}

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

name_of() {
    local i
    for i in "${!PIDS[@]}"; do [ "${PIDS[$i]}" = "$1" ] && { echo "${NAMES[$i]}"; return; }; done
    echo "$1"
}

# hips_run ARGS...: start the processes (12 by default), wait for the workers, exit with the run's status.
hips_run() {
    PY="${PYTHON:-python3}"
    CNN="$ROOT/examples/${EXAMPLE:?EXAMPLE must name a file under examples/}"
    case "${GEOMX_DEVICE:-cpu}" in
        cpu) DEVICE_FLAGS=(--cpu) ;;
        gpu) DEVICE_FLAGS=() ;;  # the example uses gpu(0) when MXNet sees one
        *) echo "$SCRIPT: GEOMX_DEVICE must be cpu or gpu, not '$GEOMX_DEVICE'" >&2; exit 2 ;;
    esac
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    export PS_VERBOSE="${PS_VERBOSE:-1}"
    HOST=127.0.0.1
    LOG_DIR="${GEOMX_LOG_DIR:-}"
    [ -n "$LOG_DIR" ] && mkdir -p "$LOG_DIR"

    trap cleanup EXIT
    trap 'on_signal 130' INT
    trap 'on_signal 143' TERM

    GLOBAL_ROOT=(DMLC_PS_GLOBAL_ROOT_URI=$HOST DMLC_PS_GLOBAL_ROOT_PORT=9092)
    NODE=("$PY" -m geomx.node)
    TRAIN=("$PY" -u "$CNN" "${DEVICE_FLAGS[@]}" "${TRAIN_ARGS[@]}")

    NGS=$NUM_GLOBAL_SERVERS NLS=$NUM_LOCAL_SERVERS
    NGW=$((2 * NLS))  # the global tier's workers are the parties' local servers

    # ---- central party ----
    start global_scheduler 0 DMLC_ROLE_GLOBAL=global_scheduler "${GLOBAL_ROOT[@]}" \
        DMLC_NUM_GLOBAL_SERVER=$NGS DMLC_NUM_GLOBAL_WORKER=$NGW -- "${NODE[@]}"
    start central_scheduler 0 DMLC_ROLE=scheduler DMLC_PS_ROOT_URI=$HOST DMLC_PS_ROOT_PORT=9093 \
        DMLC_NUM_SERVER=$NGS DMLC_NUM_WORKER=1 -- "${NODE[@]}"
    for ((i = 0; i < NGS; i++)); do
        start "global_server$i" 0 "${ALGO_ENV[@]}" DMLC_ROLE_GLOBAL=global_server DMLC_ROLE=server \
            "${GLOBAL_ROOT[@]}" DMLC_PS_ROOT_URI=$HOST DMLC_PS_ROOT_PORT=9093 DMLC_NUM_SERVER=$NGS \
            DMLC_NUM_WORKER=1 DMLC_NUM_GLOBAL_SERVER=$NGS DMLC_NUM_GLOBAL_WORKER=$NGW \
            DMLC_ENABLE_CENTRAL_WORKER=0 DMLC_NUM_ALL_WORKER=4 -- "${NODE[@]}"
    done
    start master_worker 0 "${ALGO_ENV[@]}" DMLC_ROLE=worker DMLC_ROLE_MASTER_WORKER=1 DMLC_PS_ROOT_URI=$HOST \
        DMLC_PS_ROOT_PORT=9093 DMLC_NUM_SERVER=$NGS DMLC_NUM_WORKER=1 DMLC_NUM_ALL_WORKER=4 \
        -- "${TRAIN[@]}" "${MASTER_ARGS[@]}" "$@"
    WORKER_PIDS+=("${PIDS[-1]}")

    # ---- parties A (port 9094, shards 0 and 1) and B (port 9095, shards 2 and 3) ----
    for party in A B; do
        if [ "$party" = A ]; then
            port=9094; first=0; party_args=("${PARTY_A_ARGS[@]}")
        else
            port=9095; first=2; party_args=("${PARTY_B_ARGS[@]}")
        fi
        start "scheduler_$party" 0 DMLC_ROLE=scheduler DMLC_PS_ROOT_URI=$HOST DMLC_PS_ROOT_PORT=$port \
            DMLC_NUM_SERVER=$NLS DMLC_NUM_WORKER=2 -- "${NODE[@]}"
        for ((i = 0; i < NLS; i++)); do
            start "server_$party$i" 0 "${ALGO_ENV[@]}" DMLC_ROLE=server "${GLOBAL_ROOT[@]}" \
                DMLC_NUM_GLOBAL_SERVER=$NGS DMLC_NUM_GLOBAL_WORKER=$NGW DMLC_PS_ROOT_URI=$HOST \
                DMLC_PS_ROOT_PORT=$port DMLC_NUM_SERVER=$NLS DMLC_NUM_WORKER=2 -- "${NODE[@]}"
        done
        for ds in $first $((first + 1)); do
            show=0; [ "$ds" = 3 ] && show=1  # like the original, only the last worker's output is shown
            start "worker_$ds" $show "${ALGO_ENV[@]}" DMLC_ROLE=worker DMLC_PS_ROOT_URI=$HOST DMLC_PS_ROOT_PORT=$port \
                DMLC_NUM_SERVER=$NLS DMLC_NUM_WORKER=2 DMLC_NUM_ALL_WORKER=4 \
                -- "${TRAIN[@]}" --data-slice-idx "$ds" "${party_args[@]}" "$@"
            WORKER_PIDS+=("${PIDS[-1]}")
        done
    done

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
                    echo "$SCRIPT: $(name_of "$pid") exited with status $rc" >&2
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
                        echo "$SCRIPT: $(name_of "$pid") exited with status $rc" >&2
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
}
