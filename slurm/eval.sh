#!/bin/bash
#SBATCH --job-name=scope-mega-eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --no-requeue
#
# Evaluate with scope-mega on Slurm: `python -m scope_mega.cli eval CONFIG [key=value ...]` on every
# rank, started by one srun (same launch as slurm/train.sh, via slurm/common.sh).
#
#   mkdir -p logs
#   sbatch slurm/eval.sh CONFIG [key=value ...]
#
# Evaluation writes no resumable checkpoint, so this script neither asks for a warning signal nor
# requeues; the run directory is whatever CONFIG and the overrides say (nothing is injected).
# Exit codes: 0 done, 2 config error, other = the ranks' failure. Details: docs/slurm.md.

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

sm_require_slurm slurm/eval.sh
SM_STAGE=eval
[ $# -ge 1 ] || sm_die 2 "usage: sbatch slurm/eval.sh CONFIG [key=value ...]"
sm_check_config "$1"
sm_run_stage 0 "" "$@"
