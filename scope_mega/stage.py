"""The skeleton every training stage shares (SFT and RL): start, the model and its training state,
resume, logging, and one `checkpoint_or_stop` after each step.

A stage is `start_stage` (every config check for this launch's world size, the run directory claimed
for this run, then process groups and the preemption handlers: a config mistake, or a run directory
another run holds or this user cannot write, stops before any rank starts work), `build_stage` (what
interrupted saves left removed, the policy, its starting weights unless the stage resumes, Megatron's
DDP and optimizer, the resumed `TrainerState` from `<run_dir>/<checkpoints>/latest`; a damaged
checkpoint or one of another architecture is a one-line `run_dir.CheckpointError`), `open_logger`,
then the stage's own loop, which calls `checkpoint_or_stop(stage)` after each step and
`checkpoint_or_stop(stage, final=True)` at its end. That one function owns the save interval
(`checkpoint.save_interval`), preemption (SIGUSR1 or SIGTERM: every rank finishes its step,
checkpoints, and exits with `PREEMPTED_EXIT_CODE` for the Slurm requeue) and the final save (skipped
when the last step is already saved). Saves run with the optimizer state on the device
(`TrainerOffload.on_device`: the RL stage keeps it on the host between updates); a save that cannot
be written is a one-line `run_dir.CheckpointError` (`checkpointing.save_checkpoint`).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from scope_mega.checkpointing import TrainerState, load_checkpoint, load_weights, save_checkpoint
from scope_mega.config import ConfigError, OptimConfig, RunConfig, to_dict
from scope_mega.logging import MetricsLogger, is_rank0
from scope_mega.models.gpt import ModelSpec, build_gpt_model
from scope_mega.run_dir import has_checkpoint, latest_checkpoint, stale_in_progress
from scope_mega.runtime import preemption, writer_queue
from scope_mega.runtime.distributed import dist_env_from_environ, init_distributed
from scope_mega.runtime.offload import TrainerOffload
from scope_mega.train_step import TrainState, setup_training
from scope_mega.validation import StageName, claim_run_dir, validate

REPORT_GRACE_S = 30.0  # how long a node's other ranks leave its first rank to report a config error
START_WEIGHTS = {"sft": "checkpoint.load_weights", "rl": "rl.init_from"}  # the option naming them


@dataclass
class Stage:
    """One stage's training state and bookkeeping, in one place for its loop."""

    cfg: RunConfig
    name: StageName  # the logger's stage
    device: torch.device
    model: torch.nn.Module  # this rank's pipeline stage of the policy, as built (no DDP wrapper)
    spec: ModelSpec
    state: TrainState  # the model in Megatron's DDP, its optimizer and LR schedule
    progress: TrainerState  # the step and data position, saved with every checkpoint
    ckpt_root: Path
    offload: TrainerOffload
    config_dict: dict = field(default_factory=dict)
    logger: MetricsLogger | None = None


def start_stage(cfg: RunConfig, name: StageName) -> torch.device:
    """Every config check of stage `name` for this launch (its processes: torchrun's `WORLD_SIZE`, else
    Slurm's `SLURM_NTASKS`), the run directory claimed by global rank 0 for the process's life
    (`validation.claim_run_dir`: one run per run directory), then this rank's process groups and the
    preemption handlers. Returns the rank's device.

    Every rank checks the same config and finds the same mistake: the first rank of each node raises
    it at once (the CLI prints its one line and exits 2, and the launcher, torchrun or srun
    --kill-on-bad-exit, stops the other ranks), the others only after `REPORT_GRACE_S`, so that one
    line reports the mistake, and a mistake only they see (a file missing on their node) still does."""
    env = dist_env_from_environ()
    try:
        validate(cfg, world_size=int(os.environ.get("WORLD_SIZE", env.world_size)), stage=name)
    except ConfigError:
        if env.local_rank:
            time.sleep(REPORT_GRACE_S)
        raise
    if env.rank == 0:
        claim_run_dir(cfg.run_dir, name)
    device = init_distributed(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.cp, cfg.device, cfg.seed)
    preemption.install_handlers()
    writer_queue.install_writer_results_queue()  # its helper process dies with this one
    return device


def build_stage(
    cfg: RunConfig,
    name: StageName,
    device: torch.device,
    checkpoints: str,
    optim: OptimConfig,
    optimizer_steps: int,
    init_weights: str | Path | None,
    offload: bool = False,
) -> Stage:
    """The policy with its optimizer, resumed from `<run_dir>/<checkpoints>/latest` when there is one
    (and `checkpoint.resume`), else starting from `init_weights` (None: Megatron's initialisation).
    What interrupted saves left in the checkpoint root goes first (`remove_stale_saves`). Starting
    weights that are damaged or of another architecture raise `run_dir.CheckpointError`."""
    model, spec = build_gpt_model(cfg.model, cfg.parallel, device)
    ckpt_root = Path(cfg.run_dir) / checkpoints
    remove_stale_saves(ckpt_root)
    resume = latest_checkpoint(ckpt_root) if cfg.checkpoint.resume else None
    if resume is None and init_weights is not None:
        load_weights(init_weights, model, START_WEIGHTS[name])
    state = setup_training(model, spec.vocab_size, optim, cfg.parallel, optimizer_steps)
    progress = load_checkpoint(resume, state) if resume else TrainerState()
    stage = Stage(cfg, name, device, model, spec, state, progress, ckpt_root, TrainerOffload(state, offload))
    stage.config_dict = to_dict(cfg)
    return stage


def remove_stale_saves(ckpt_root: Path) -> None:
    """On rank 0, remove what interrupted saves left in `ckpt_root` (`run_dir.stale_in_progress`: no
    other run writes there, `start_stage` claimed the run directory), and say so in one line."""
    stale = stale_in_progress(ckpt_root) if is_rank0() else []
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    if stale:
        names = ", ".join(p.name for p in stale)
        print(f"removed what an interrupted save left in {ckpt_root}: {names}", flush=True)


def open_logger(stage: Stage, total_steps: int, bar_keys: Sequence[str] = ("loss",)) -> MetricsLogger:
    """The stage's console, `metrics.jsonl` and wandb logger, from its resumed step on."""
    cfg = stage.cfg
    stage.logger = MetricsLogger(
        cfg.run_dir, stage.name, total_steps, stage.progress.step, stage.config_dict, cfg.wandb_mode, bar_keys
    )
    return stage.logger


def _save(stage: Stage) -> None:
    with stage.offload.on_device():
        save_checkpoint(
            stage.ckpt_root, stage.state, stage.progress, stage.config_dict, stage.cfg.checkpoint.keep_last
        )


def checkpoint_or_stop(stage: Stage, final: bool = False) -> None:
    """After a step: checkpoint every `checkpoint.save_interval` steps, or on a stop signal, and then
    exit with `PREEMPTED_EXIT_CODE`. At the end (`final`): save the last step unless it is saved."""
    step = stage.progress.step
    if final:
        if not has_checkpoint(stage.ckpt_root, step):
            _save(stage)
        return
    stop = preemption.should_stop()
    interval = stage.cfg.checkpoint.save_interval
    if stop or (interval and step % interval == 0):
        _save(stage)
    if stop:
        stage.logger.close()
        print(f"stop signal: checkpoint at step {step} written; exiting for requeue", flush=True)
        sys.exit(preemption.PREEMPTED_EXIT_CODE)


def close_stage(stage: Stage, final_metrics: dict[str, float]) -> None:
    """Close the logger and print the stage's final metrics on rank 0."""
    stage.logger.close()
    if is_rank0():
        print(" ".join(f"{k}={v:.4f}" for k, v in final_metrics.items()), flush=True)
