#!/bin/bash
#SBATCH --job-name=scope-mega
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#
# Train with scope-mega on Slurm: one srun starts every rank (one per GPU), preemption-safe.
#
#   mkdir -p logs        # Slurm does not create the --output directory; without it the job dies silently
#   sbatch slurm/train.sh CONFIG [key=value ...]
#   sbatch --nodes=4 --time=48:00:00 slurm/train.sh examples/qwen2.5-32b.yaml optim.lr=1.0e-6
#   sbatch --ntasks-per-node=2 --gpus-per-node=0 --cpus-per-task=1 \
#          slurm/train.sh --stage sft examples/tiny_cpu.yaml device=cpu      # CPU-only, 2 ranks
#
# Arguments: [--stage NAME] CONFIG [key=value ...]. The stage (`python -m scope_mega.cli STAGE`) is
# `--stage`, else $SCOPE_MEGA_STAGE, else `train`. CONFIG and a relative run_dir are relative to the
# submit directory (the job's working directory).
#
# Defaults above are for 8-GPU nodes; override any of them on the sbatch command line (command-line
# options win over #SBATCH lines). World size = nodes x ntasks-per-node; ntasks-per-node must equal
# the GPUs per node. Sites usually also want --partition/--account, and often --exclusive --mem=0.
#
# Run directory: a `run_dir=...` override wins, then a top-level `run_dir:` in CONFIG, else
# runs/${SLURM_JOB_NAME}-${SLURM_JOB_ID} under the submit directory. A requeued job keeps its job id,
# so it finds the same run directory and resumes from <run_dir>/checkpoints/latest.
#
# Preemption and time limits (--signal=B:USR1@300): 300 s before the time limit, or on
# `scancel --signal=USR1 --batch JOB` (a preemption notice), THIS batch shell gets SIGUSR1 and writes
# a stop file in the run directory; each task's wrapper sends SIGUSR1 to its rank's main process.
# The trainer finishes the current step, writes a checkpoint atomically and exits 42; this script
# then runs `scontrol requeue $SLURM_JOB_ID`, and the job starts again with the same id and run dir
# and resumes. `B:` is deliberate: a signal to the job step (no B:, `scancel --signal=USR1 JOB`, srun
# forwarding) reaches EVERY process of the step and kills the trainer's helper processes (Megatron's
# async checkpoint writer), so the stop checkpoint fails. A SIGTERM to this shell (scancel,
# preemption without warning) also stops the ranks gracefully but is never requeued. Keep @N above
# one step plus one checkpoint save.
# Exit codes: 0 done, 2 config error (fails fast, no requeue), 42 checkpointed but not requeued
# (requeue impossible, SCOPE_MEGA_MAX_RESTARTS reached, or SIGTERM), other = the ranks' failure.
# Environment knobs: see slurm/common.sh. Details: docs/slurm.md.

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

sm_require_slurm slurm/train.sh
sm_parse_stage train "$@"
set -- "${SM_ARGS[@]}"
[ $# -ge 1 ] || sm_die 2 "usage: sbatch slurm/train.sh [--stage NAME] CONFIG [key=value ...]"
CONFIG=$1
shift
sm_check_config "$CONFIG"

if sm_has_override run_dir "$@"; then
    RUN_DIR=$(printf '%s\n' "$@" | sed -n 's/^run_dir=//p' | tail -n 1)
elif RUN_DIR=$(sm_config_run_dir "$CONFIG"); then
    :
else
    JOB_NAME=$(printf '%s' "${SLURM_JOB_NAME:-job}" | tr -c 'A-Za-z0-9._-' '_')
    RUN_DIR=$PWD/runs/$JOB_NAME-$SLURM_JOB_ID
    set -- "$@" "run_dir=$RUN_DIR"
fi

sm_run_stage 1 "$RUN_DIR" "$CONFIG" "$@"
