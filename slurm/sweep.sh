#!/bin/bash
#SBATCH --job-name=scope-mega-sweep
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%A_%a.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#
# One sweep as a Slurm job array: array task i runs run i of SWEEP_DIR/runs.txt exactly as
# slurm/train.sh runs one job (same launch, signal forwarding and requeue-on-42; slurm/common.sh).
#
#   mkdir -p logs
#   sbatch --array=0-$(($(wc -l < SWEEP_DIR/runs.txt) - 1))%4 slurm/sweep.sh SWEEP_DIR [key=value ...]
#   sbatch --array=0-2 --ntasks-per-node=1 --gpus-per-node=0 --cpus-per-task=1 \
#          slurm/sweep.sh --stage sft sweeps/lr device=cpu                      # CPU-only
#
# Arguments: [--stage NAME] SWEEP_DIR [key=value ...]. Stage as in train.sh (default `train`). The
# key=value arguments apply to every run and come BEFORE the run's own overrides (the run's win).
#
# runs.txt contract (written by tools/sweep.py; see docs/slurm.md, "Sweeps"):
#   * file SWEEP_DIR/runs.txt, UTF-8, one run per line, '\n' line ends ('\r\n' tolerated), no header,
#     no comments, no blank lines; the last line may or may not end with '\n'.
#   * array task i (SLURM_ARRAY_TASK_ID, 0-based) runs line i+1; submit --array=0-(N-1) for N lines.
#   * fields are separated by exactly one TAB; no field is empty or contains a TAB:
#       RUN_NAME <TAB> CONFIG_PATH [<TAB> OVERRIDE]...
#     RUN_NAME     [A-Za-z0-9][A-Za-z0-9._-]*, unique within the file (the run directory's name)
#     CONFIG_PATH  YAML config; absolute, or relative to the submit directory (the job's cwd)
#     OVERRIDE     one dotted `key=value` per field, as on the scope-mega command line; the value may
#                  contain spaces (it is passed as one argument)
#   * the run writes to SWEEP_DIR/runs/RUN_NAME (metrics.jsonl, checkpoints/) unless the line itself
#     has a run_dir= override; a config's own run_dir is ignored (runs of one sweep share configs).
#   * a requeued task (preemption, time limit) resumes in the same run directory.
# A malformed runs.txt or line fails the task at once with exit 2 and a `config error:` line.

# Until common.sh's traps are set: remember a stop request instead of dying of it.
trap 'SM_STOP_REQUESTED=1' USR1
trap 'SM_STOP_REQUESTED=1 SM_TERM_SEEN=1' TERM

# sbatch runs a spooled copy of this file: find the checkout through the job's Command.
_sm_common() {
    local cmd
    if [ -n "${SCOPE_MEGA_ROOT:-}" ]; then
        printf '%s\n' "$SCOPE_MEGA_ROOT/slurm/common.sh"
        return
    fi
    if [ -n "${SLURM_JOB_ID:-}" ]; then
        cmd=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^[[:space:]]*Command=//p' | head -n 1)
        [ -z "$cmd" ] || [[ "$cmd" == /* ]] || cmd=${SLURM_SUBMIT_DIR:-$PWD}/$cmd
        while [ -n "$cmd" ] && [ ! -f "$cmd" ] && [[ "$cmd" == *" "* ]]; do cmd=${cmd% *}; done # drop args
        [ -n "$cmd" ] && [ -f "$(dirname "$cmd")/common.sh" ] && printf '%s\n' "$(dirname "$cmd")/common.sh" && return
    fi
    for cmd in "$(dirname "${BASH_SOURCE[0]}")/common.sh" "${SLURM_SUBMIT_DIR:-$PWD}/slurm/common.sh"; do
        [ -f "$cmd" ] && printf '%s\n' "$cmd" && return
    done
    echo "scope-mega: cannot find slurm/common.sh; set SCOPE_MEGA_ROOT to the checkout" >&2
    return 1
}
_SM_COMMON=$(_sm_common) || exit 1
# shellcheck source=slurm/common.sh
source "$_SM_COMMON"
sm_trap_stop_signals

sm_require_slurm slurm/sweep.sh
sm_parse_stage train "$@"
set -- "${SM_ARGS[@]}"
[ $# -ge 1 ] || sm_die 2 "usage: sbatch --array=0-N slurm/sweep.sh [--stage NAME] SWEEP_DIR [key=value ...]"
[ -n "${SLURM_ARRAY_TASK_ID:-}" ] || sm_die 2 "config error: not an array job; submit with sbatch --array=0-N"
SWEEP_DIR=$(cd "$1" 2>/dev/null && pwd) || sm_die 2 "config error: sweep directory $1 does not exist"
shift
RUNS_FILE=$SWEEP_DIR/runs.txt
[ -f "$RUNS_FILE" ] || sm_die 2 "config error: $RUNS_FILE does not exist"

sm_parse_runs_line "$RUNS_FILE" "$SLURM_ARRAY_TASK_ID" || exit "$SM_CONFIG_ERROR_EXIT_CODE"
CONFIG=${SM_RUN_FIELDS[1]}
OVERRIDES=("$@" "${SM_RUN_FIELDS[@]:2}")
sm_check_config "$CONFIG"
if sm_has_override run_dir "${SM_RUN_FIELDS[@]:2}"; then
    RUN_DIR=$(printf '%s\n' "${SM_RUN_FIELDS[@]:2}" | sed -n 's/^run_dir=//p' | tail -n 1)
else
    RUN_DIR=$SWEEP_DIR/runs/${SM_RUN_FIELDS[0]}
    OVERRIDES+=("run_dir=$RUN_DIR")
fi
sm_log "sweep $SWEEP_DIR: run $((SLURM_ARRAY_TASK_ID + 1)) of $SM_RUNS_COUNT, '${SM_RUN_FIELDS[0]}'"
sm_run_stage 1 "$RUN_DIR" "$CONFIG" ${OVERRIDES[@]+"${OVERRIDES[@]}"}
