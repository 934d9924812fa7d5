#!/bin/bash
#SBATCH --job-name=scope-mega-convert
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --no-requeue
#
# Convert checkpoints between Hugging Face and Megatron on Slurm (`python -m checkpoints_convert`,
# same options as `scope-mega convert`), on CPUs; one srun starts the tasks (launch via slurm/common.sh).
#
#   mkdir -p logs
#   sbatch --ntasks=8 slurm/convert.sh hf-to-megatron --hf-dir HF_DIR --out CKPT_DIR --tp 4 --pp 2
#   sbatch slurm/convert.sh megatron-to-hf --megatron-dir CKPT_DIR --out HF_DIR  (or RUN/checkpoints_rl/latest)
#
# hf-to-megatron runs one task per TP x PP shard (tp*pp tasks; the allocation needs at least that
# many: pass --ntasks on the sbatch line), each building its shard of the model and reading only the
# HF tensors it needs; megatron-to-hf runs one task and streams layer by layer. The Megatron
# checkpoint loads in the trainer at any TP/PP, whatever --tp/--pp wrote it. Memory per import task
# is its model shard plus one tensor: raise --tp x --pp (or --mem) for big models. Output appears
# under its final name only when complete; an existing one is refused unless --force is given.
# Exit codes: 0 done, 2 bad input (one `convert error:` line), other = a task's failure.
# Environment knobs: see slurm/common.sh.

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

sm_require_slurm slurm/convert.sh
USAGE="usage: sbatch [--ntasks=TP*PP] slurm/convert.sh {hf-to-megatron|megatron-to-hf} OPTIONS"
[ $# -ge 1 ] || sm_die 2 "$USAGE"
TP=1
PP=1
case "$1" in
    hf-to-megatron)
        prev=""
        for arg in "$@"; do
            case "$prev" in --tp) TP=$arg ;; --pp) PP=$arg ;; esac
            case "$arg" in --tp=*) TP=${arg#--tp=} ;; --pp=*) PP=${arg#--pp=} ;; esac
            prev=$arg
        done
        [[ "$TP" =~ ^[1-9][0-9]*$ && "$PP" =~ ^[1-9][0-9]*$ ]] || sm_die 2 "convert error: --tp/--pp must be positive integers"
        ;;
    megatron-to-hf) ;;
    *) sm_die 2 "$USAGE" ;;
esac
TASKS=$((TP * PP))
[ "$TASKS" -le "${SLURM_NTASKS:-1}" ] ||
    sm_die 2 "convert error: --tp $TP --pp $PP needs $TASKS tasks, the job has ${SLURM_NTASKS:-1}; sbatch --ntasks=$TASKS ..."

SM_STAGE=convert
sm_resolve_python
sm_setup_rendezvous
sm_setup_devices
sm_print_header
SCOPE_MEGA_SRUN_ARGS="--ntasks=$TASKS ${SCOPE_MEGA_SRUN_ARGS:-}"
sm_launch "" "$SM_PYTHON" -m checkpoints_convert "$@"
if [ "${SCOPE_MEGA_DRY_RUN:-0}" = 1 ]; then
    sm_log "dry run: nothing started"
    exit 0
fi
sm_finish 0 ""
