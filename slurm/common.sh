# shellcheck shell=bash
# Shared helpers for slurm/train.sh, slurm/sweep.sh and slurm/eval.sh. Sourced by them, never run.
#
# One launch path for every script: resolve the stage and the python, set up the rendezvous and the
# device environment from Slurm's variables, start every rank with ONE `srun`, forward stop signals
# to the ranks, and turn the trainer's exit status into the job's fate:
#
#   0   finished                       -> job COMPLETED
#   42  stopped on a signal after      -> `scontrol requeue $SLURM_JOB_ID`; the rerun (same job id,
#       writing a checkpoint              same run dir) resumes from <run_dir>/checkpoints/latest
#   2   config error                   -> job FAILED at once, never requeued
#   *   anything else                  -> job FAILED with that code, never requeued
#
# Environment knobs (all optional; sbatch exports the submitting shell's environment by default):
#   SCOPE_MEGA_STAGE           stage run by `python -m scope_mega.cli STAGE` (scripts give the default)
#   SCOPE_MEGA_PYTHON          interpreter for the ranks (default: $SLURM_SUBMIT_DIR/.venv/bin/python,
#                              else <checkout>/.venv/bin/python, else python3)
#   SCOPE_MEGA_MASTER_ADDR     rendezvous host (default: first host of the allocation)
#   SCOPE_MEGA_MASTER_PORT     rendezvous port (default: 20000 + SLURM_JOB_ID % 20000)
#   SCOPE_MEGA_SRUN_ARGS       extra srun options, word-split (e.g. "--mpi=pmix --cpu-bind=none")
#   SCOPE_MEGA_MAX_RESTARTS    stop requeueing once SLURM_RESTART_COUNT reaches this (default: no cap)
#   SCOPE_MEGA_STOP_POLL       seconds between a task's checks for a stop request (default 2)
#   SCOPE_MEGA_DRY_RUN=1       print what would run and exit 0 (no srun, no requeue)

SM_PREEMPTED_EXIT_CODE=42     # scope_mega.runtime.preemption.PREEMPTED_EXIT_CODE
SM_CONFIG_ERROR_EXIT_CODE=2   # scope_mega.cli.CONFIG_ERROR_EXIT_CODE
SM_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

sm_log() { printf '[scope-mega %s] %s\n' "$(date '+%F %T')" "$*"; }

# sm_die CODE MESSAGE: one line on stderr (same job log as stdout unless --error is given), then exit.
sm_die() {
    local code=$1
    shift
    printf '[scope-mega %s] %s\n' "$(date '+%F %T')" "$*" >&2
    exit "$code"
}

sm_require_slurm() {
    [ -n "${SLURM_JOB_ID:-}" ] || sm_die 1 "not inside a Slurm job: submit with 'sbatch $1 ...'"
}

# sm_parse_stage DEFAULT ARGS...: `--stage NAME` or `--stage=NAME` as the first argument, else
# $SCOPE_MEGA_STAGE, else DEFAULT. Sets SM_STAGE and SM_ARGS (the remaining arguments).
sm_parse_stage() {
    SM_STAGE=${SCOPE_MEGA_STAGE:-$1}
    shift
    case "${1:-}" in
        --stage)
            [ $# -ge 2 ] || sm_die 2 "--stage needs a value"
            SM_STAGE=$2
            shift 2
            ;;
        --stage=*)
            SM_STAGE=${1#--stage=}
            shift
            ;;
    esac
    [[ "$SM_STAGE" =~ ^[a-z][a-z0-9_-]*$ ]] || sm_die 2 "invalid stage name '$SM_STAGE'"
    SM_ARGS=("$@")
}

sm_resolve_python() {
    if [ -n "${SCOPE_MEGA_PYTHON:-}" ]; then
        SM_PYTHON=$SCOPE_MEGA_PYTHON
    elif [ -x "${SLURM_SUBMIT_DIR:-$PWD}/.venv/bin/python" ]; then
        SM_PYTHON=${SLURM_SUBMIT_DIR:-$PWD}/.venv/bin/python
    elif [ -x "$SM_ROOT/.venv/bin/python" ]; then
        SM_PYTHON=$SM_ROOT/.venv/bin/python
    else
        SM_PYTHON=python3
    fi
    command -v "$SM_PYTHON" >/dev/null 2>&1 || sm_die 1 "python '$SM_PYTHON' not found (set SCOPE_MEGA_PYTHON)"
}

# sm_first_host NODELIST: `gpu[003-005,010],cpu1` -> gpu003 (scontrol when it works, else parsed here).
sm_first_host() {
    local host
    host=$(scontrol show hostnames "$1" 2>/dev/null | head -n 1)
    if [ -z "$host" ]; then
        if [[ "$1" =~ ^([^,\[]+)(\[([0-9]+)[^]]*\])?([^,]*) ]]; then
            host=${BASH_REMATCH[1]}${BASH_REMATCH[3]}${BASH_REMATCH[4]}
        else
            host=127.0.0.1
        fi
    fi
    printf '%s\n' "$host"
}

# Rendezvous for torch.distributed: every rank of the job computes the same address and port.
# Never taken from the submitting shell's MASTER_ADDR/MASTER_PORT, which may be stale.
sm_setup_rendezvous() {
    MASTER_ADDR=${SCOPE_MEGA_MASTER_ADDR:-$(sm_first_host "${SLURM_JOB_NODELIST:-127.0.0.1}")}
    MASTER_PORT=${SCOPE_MEGA_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
    export MASTER_ADDR MASTER_PORT
    # Ranks come from SLURM_PROCID/SLURM_NTASKS (set per task by srun); drop torchrun-style leftovers.
    unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE
}

sm_gpus_present() {
    case "${SLURM_GPUS_ON_NODE:-}" in "" | 0) ;; *) return 0 ;; esac
    case "${CUDA_VISIBLE_DEVICES:-}" in "" | -1 | NoDevFiles) ;; *) return 0 ;; esac
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'
}

# NCCL/CUDA settings only where GPUs are; CPU jobs get none of them. Values already set win.
sm_setup_devices() {
    if sm_gpus_present; then
        SM_DEVICES=gpu
        : "${CUDA_DEVICE_MAX_CONNECTIONS:=1}"        # Megatron: ordered TP/SP communication kernels
        : "${TORCH_NCCL_ASYNC_ERROR_HANDLING:=1}"    # a dead rank aborts the others instead of hanging
        : "${NCCL_DEBUG:=WARN}"
        export CUDA_DEVICE_MAX_CONNECTIONS TORCH_NCCL_ASYNC_ERROR_HANDLING NCCL_DEBUG
    else
        SM_DEVICES=cpu
    fi
    : "${OMP_NUM_THREADS:=${SLURM_CPUS_PER_TASK:-1}}"
    : "${PYTHONUNBUFFERED:=1}"                       # rank output reaches the job log as it happens
    export OMP_NUM_THREADS PYTHONUNBUFFERED
}

# sm_has_override KEY OVERRIDES...: true when some override sets KEY (`KEY=...`).
sm_has_override() {
    local key=$1 arg
    shift
    for arg in "$@"; do
        [[ "$arg" == "$key="* ]] && return 0
    done
    return 1
}

# sm_config_run_dir CONFIG: the value of a top-level `run_dir:` key of the YAML file (quotes and a
# trailing comment removed); fails when the file has no such key.
sm_config_run_dir() {
    local line
    line=$(grep -E '^run_dir[[:space:]]*:' "$1" | tail -n 1)
    [ -n "$line" ] || return 1
    line=${line#*:}
    line=${line%%[[:space:]]#*}
    line=$(printf '%s' "$line" | sed -E "s/^[[:space:]]+//; s/[[:space:]]+\$//; s/^[\"']//; s/[\"']\$//")
    printf '%s\n' "$line"
}

# sm_parse_runs_line RUNS_FILE INDEX: split line INDEX+1 of a sweep's runs.txt (contract in
# slurm/sweep.sh and docs/slurm.md) into SM_RUN_FIELDS=(RUN_NAME CONFIG_PATH OVERRIDE...); sets
# SM_RUNS_COUNT. On a malformed file prints one `config error:` line and returns 1.
sm_parse_runs_line() {
    local file=$1 index=$2 line name dup
    local err="config error: $file"
    [[ "$index" =~ ^[0-9]+$ ]] || { sm_log "$err: array task id '$index' is not a number" >&2; return 1; }
    SM_RUNS_COUNT=$(awk 'END { print NR }' "$file")
    if [ "$index" -ge "$SM_RUNS_COUNT" ]; then
        sm_log "$err has $SM_RUNS_COUNT runs (lines); there is no run for array task $index" >&2
        return 1
    fi
    dup=$(awk -F '\t' '{ sub(/\r$/, "", $1); if (seen[$1]++) { print $1; exit } }' "$file")
    [ -z "$dup" ] || { sm_log "$err: run name '$dup' appears more than once" >&2; return 1; }
    line=$(sed -n "$((index + 1))p" "$file")
    line=${line%$'\r'}
    err="$err line $((index + 1))"
    if [ -z "$line" ] || [[ "$line" == *$'\t\t'* ]] || [[ "$line" == $'\t'* ]] || [[ "$line" == *$'\t' ]]; then
        sm_log "$err: empty line or empty field (want RUN_NAME<TAB>CONFIG_PATH[<TAB>key=value]...)" >&2
        return 1
    fi
    IFS=$'\t' read -r -a SM_RUN_FIELDS <<<"$line"
    if [ "${#SM_RUN_FIELDS[@]}" -lt 2 ]; then
        sm_log "$err: want RUN_NAME<TAB>CONFIG_PATH[<TAB>key=value]..., got '$line'" >&2
        return 1
    fi
    name=${SM_RUN_FIELDS[0]}
    [[ "$name" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || {
        sm_log "$err: run name '$name' must match [A-Za-z0-9][A-Za-z0-9._-]*" >&2
        return 1
    }
    for line in "${SM_RUN_FIELDS[@]:2}"; do
        [[ "$line" =~ ^[A-Za-z_][A-Za-z0-9_.]*= ]] || {
            sm_log "$err: override '$line' is not key.path=value" >&2
            return 1
        }
    done
}

sm_check_config() {
    [ -f "$1" ] || sm_die "$SM_CONFIG_ERROR_EXIT_CODE" "config error: config file $1 does not exist"
}

# sm_task_main CMD...: what every task runs (srun ... bash -c 'source common.sh; sm_task_main CMD').
# Prints a line naming the rank, then runs CMD. Without SM_STATUS_DIR it just execs CMD. In a
# preemptible launch (SM_STATUS_DIR = a per-job directory in the shared run directory):
#  * a stop request arrives as the file SM_STATUS_DIR/stop (written by the batch shell) and is
#    delivered as ONE SIGUSR1 to the rank's main process, as soon as that process has a USR1 handler
#    (SigCgt in /proc/PID/status; CMD must therefore exec the interpreter, not run it as a child).
#    Not as a signal to the whole job step: srun and `scancel --signal` hit every process of the
#    step, and helper processes the trainer spawns (Megatron's async checkpoint writer starts a
#    multiprocessing Manager) die of a USR1, so the stop checkpoint itself failed. Not before the
#    handler exists or after Python dropped it at exit: the rank would die of it (seen: exit 138).
#  * the rank starts with USR1 and TERM ignored (the trainer's handlers replace that), so a config
#    error is reported by srun as 2 on every rank, not as 143 for the ranks that srun
#    --kill-on-bad-exit SIGTERMs after the first one exits.
#  * exit 42 ("checkpoint written, requeue me") is reported to srun as 0 plus a file
#    SM_STATUS_DIR/exit42-rank-N: with --kill-on-bad-exit, the first rank exiting 42 would make srun
#    SIGTERM the ranks still shutting down (Python restores the default TERM action at exit), and
#    srun would report 143.
# A rank that truly hangs is SIGKILLed KillWait seconds after a TERM; scancel and time limits are
# unaffected (srun turns its own SIGTERM into SIGKILL of the tasks).
sm_task_main() {
    echo "[scope-mega] rank $SLURM_PROCID/$SLURM_NTASKS local_rank ${SLURM_LOCALID:-?} on $(hostname)" \
        "(job $SLURM_JOB_ID, restart ${SLURM_RESTART_COUNT:-0})"
    [ -n "${SM_STATUS_DIR:-}" ] || exec "$@"
    local poll=${SCOPE_MEGA_STOP_POLL:-2} pid rc sent=0
    trap '' USR1 TERM
    "$@" &
    pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        if [ "$sent" = 0 ] && [ -e "$SM_STATUS_DIR/stop" ] && _sm_catches_usr1 "$pid"; then
            kill -s USR1 "$pid" 2>/dev/null
            sent=1
            [ "$SLURM_PROCID" != 0 ] || sm_log "stop requested: SIGUSR1 to every rank"
        fi
        sleep "$poll" &
        wait $!
    done
    wait "$pid"
    rc=$?
    if [ "$rc" = "$SM_PREEMPTED_EXIT_CODE" ] && echo "$rc" >"$SM_STATUS_DIR/exit42-rank-$SLURM_PROCID"; then
        exit 0
    fi
    exit "$rc"
}

# _sm_catches_usr1 PID: true when the process has a handler installed for SIGUSR1.
_sm_catches_usr1() {
    local mask bit
    mask=$(sed -n 's/^SigCgt:[[:space:]]*//p' "/proc/$1/status" 2>/dev/null)
    bit=$(($(kill -l USR1) - 1))
    [ -n "$mask" ] && (((16#${mask: -8} >> bit) & 1))
}

sm_print_header() {
    sm_log "job ${SLURM_JOB_ID:-?}${SLURM_ARRAY_TASK_ID:+ (array ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID})} restart ${SLURM_RESTART_COUNT:-0}: stage '$SM_STAGE'"
    sm_log "nodes ${SLURM_JOB_NODELIST:-?} (${SLURM_JOB_NUM_NODES:-?}), tasks ${SLURM_NTASKS:-?}, devices $SM_DEVICES, rendezvous $MASTER_ADDR:$MASTER_PORT"
    sm_log "python $SM_PYTHON; cwd $PWD"
    if [ "$SM_DEVICES" = gpu ]; then
        sm_log "GPU env: CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-<all>}" \
            "CUDA_DEVICE_MAX_CONNECTIONS=$CUDA_DEVICE_MAX_CONNECTIONS" \
            "TORCH_NCCL_ASYNC_ERROR_HANDLING=$TORCH_NCCL_ASYNC_ERROR_HANDLING NCCL_DEBUG=$NCCL_DEBUG"
    fi
}

# sm_trap_stop_signals: the batch shell's USR1/TERM traps, set first thing by the preemptible
# scripts. A signal asks every rank to stop (the stop file; sm_task_main delivers it as USR1); TERM
# also means "do not requeue" (scancel, preemption without a warning signal). A signal that comes
# before the ranks are launched is remembered and passed on at launch.
sm_trap_stop_signals() {
    trap '_sm_on_signal USR1' USR1
    trap '_sm_on_signal TERM' TERM
}

_sm_on_signal() {
    SM_STOP_REQUESTED=1
    [ "$1" = TERM ] && SM_TERM_SEEN=1
    if [ -n "${SM_STATUS_DIR:-}" ] && [ -d "$SM_STATUS_DIR" ]; then
        sm_log "batch script received SIG$1; asking every rank to finish its step and checkpoint"
        : >"$SM_STATUS_DIR/stop"
    else
        sm_log "batch script received SIG$1 while no ranks were running"
    fi
}

# sm_launch STATUS_DIR CMD...: run CMD on every task with one srun and wait for it; sets SM_RC.
# A non-empty STATUS_DIR (a directory all nodes see) makes the launch preemptible: USR1/TERM to this
# batch shell (sm_trap_stop_signals) become a stop request to every rank (see sm_task_main), and
# ranks exiting 42 make SM_RC 42.
sm_launch() {
    SM_STATUS_DIR=$1
    shift
    local srun_args=(--kill-on-bad-exit=1) extra=() srun_pid stopped
    [ -n "${SLURM_CPUS_PER_TASK:-}" ] && srun_args+=("--cpus-per-task=$SLURM_CPUS_PER_TASK")
    read -r -a extra <<<"${SCOPE_MEGA_SRUN_ARGS:-}"
    srun_args+=(${extra[@]+"${extra[@]}"})
    sm_log "launch: srun ${srun_args[*]} $(printf '%q ' "$@")"
    if [ "${SCOPE_MEGA_DRY_RUN:-0}" = 1 ]; then
        SM_RC=0
        return
    fi
    if [ -n "$SM_STATUS_DIR" ]; then
        { rm -rf "$SM_STATUS_DIR" && mkdir -p "$SM_STATUS_DIR"; } || sm_die 1 "cannot create $SM_STATUS_DIR"
        [ "${SM_STOP_REQUESTED:-0}" = 1 ] && : >"$SM_STATUS_DIR/stop"
    fi
    # shellcheck disable=SC2016  # expanded by the task's bash
    SM_STATUS_DIR=$SM_STATUS_DIR srun "${srun_args[@]}" \
        bash -c 'source "$0" && sm_task_main "$@"' "$SM_ROOT/slurm/common.sh" "$@" &
    srun_pid=$!
    # Poll instead of `wait $srun_pid`: a `wait` interrupted by a trap cannot be told apart from
    # srun's own status; with 1 s sleeps bash runs the trap at once (it interrupts `wait $!`).
    while kill -0 "$srun_pid" 2>/dev/null; do
        sleep 1 &
        wait $! 2>/dev/null
    done
    wait "$srun_pid"
    SM_RC=$?
    if [ -n "$SM_STATUS_DIR" ]; then
        stopped=$(find "$SM_STATUS_DIR" -name 'exit42-rank-*' 2>/dev/null | wc -l)
        if [ "$SM_RC" = 0 ] && [ "$stopped" -gt 0 ]; then
            sm_log "$stopped of ${SLURM_NTASKS:-?} ranks exited $SM_PREEMPTED_EXIT_CODE (stopped after a checkpoint)"
            SM_RC=$SM_PREEMPTED_EXIT_CODE
        fi
        rm -rf "$SM_STATUS_DIR"
        rmdir "$(dirname "$SM_STATUS_DIR")" 2>/dev/null
    fi
}

# sm_finish PREEMPTIBLE RUN_DIR: exit the batch script according to SM_RC (requeue on 42).
sm_finish() {
    local preemptible=$1 run_dir=$2 restarts=${SLURM_RESTART_COUNT:-0}
    case "$SM_RC" in
        0)
            sm_log "finished (exit 0)${run_dir:+; run dir $run_dir}"
            exit 0
            ;;
        "$SM_CONFIG_ERROR_EXIT_CODE")
            sm_die "$SM_RC" "failed: config error (see the 'config error:' line above); not requeued"
            ;;
        "$SM_PREEMPTED_EXIT_CODE")
            if [ "$preemptible" != 1 ]; then
                sm_die "$SM_RC" "stopped on a signal (exit $SM_RC); this script does not requeue"
            fi
            if [ "${SM_TERM_SEEN:-0}" = 1 ]; then
                sm_die "$SM_RC" "checkpoint written after SIGTERM (cancel or preemption); not requeued." \
                    "Resubmit with run_dir=$run_dir to resume"
            fi
            if [ -n "${SCOPE_MEGA_MAX_RESTARTS:-}" ] && [ "$restarts" -ge "$SCOPE_MEGA_MAX_RESTARTS" ]; then
                sm_die "$SM_RC" "checkpoint written, but SCOPE_MEGA_MAX_RESTARTS=$SCOPE_MEGA_MAX_RESTARTS" \
                    "restarts reached; not requeued. Resubmit with run_dir=$run_dir to resume"
            fi
            sm_log "checkpoint written; requeueing job $SLURM_JOB_ID (restart $((restarts + 1)));" \
                "it resumes from $run_dir/checkpoints/latest"
            trap '' TERM USR1 # slurmctld stops this run of the job once it is requeued
            if scontrol requeue "$SLURM_JOB_ID"; then
                sm_log "requeued"
                exit 0
            fi
            sm_die "$SM_RC" "scontrol requeue failed (job not requeueable?); resubmit with run_dir=$run_dir to resume"
            ;;
        *)
            sm_die "$SM_RC" "failed with exit code $SM_RC; not requeued"
            ;;
    esac
}

# sm_run_stage PREEMPTIBLE RUN_DIR CONFIG OVERRIDES...: the whole job after argument handling.
# RUN_DIR is only reported (the caller has already put any run_dir override into OVERRIDES).
sm_run_stage() {
    local preemptible=$1 run_dir=$2
    shift 2
    sm_resolve_python
    sm_setup_rendezvous
    sm_setup_devices
    sm_print_header
    sm_log "config $1; run dir ${run_dir:-<from the config>}"
    local status_dir=""
    if [ "$preemptible" = 1 ]; then
        status_dir=$run_dir/.slurm_status/job-$SLURM_JOB_ID
    fi
    sm_launch "$status_dir" "$SM_PYTHON" -m scope_mega.cli "$SM_STAGE" "$@"
    if [ "${SCOPE_MEGA_DRY_RUN:-0}" = 1 ]; then
        sm_log "dry run: nothing started"
        exit 0
    fi
    sm_finish "$preemptible" "$run_dir"
}
