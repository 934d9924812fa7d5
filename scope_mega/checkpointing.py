"""Atomic, resumable checkpoints: Megatron `dist_checkpointing` for model and optimizer, plus trainer state.

A checkpoint is one step folder of a checkpoint root (`run_dir` holds the layout: folder names, the
`latest` marker, which checkpoint a path means):
    step_00000010/
        model/               dist checkpoint of the GPTModel's sharded_state_dict (loads at any TP/PP)
        optim/               dist checkpoint of the optimizer state (same parallel layout to resume)
        trainer_state.json   step, data position, LR schedule, resolved config, parallel layout
        rng/rank_00000.pt    per-rank RNG states (python, numpy, torch, CUDA, Megatron tracker)

Every checkpoint is written into `step_XXXXXXXX.tmp` and renamed into place only after all ranks have
finished; `latest` is then replaced through a temp file + rename. A crash at any point leaves the
previous `latest` pointing to a complete checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from scope_mega.run_dir import IN_PROGRESS, LATEST, TRAINER_STATE, step_dirs, step_name
from scope_mega.train_step import TrainState
from scope_mega.weights.mapping import unwrap
from scope_mega.weights.megatron_ckpt import load_model_weights


@dataclass
class TrainerState:
    """What besides weights and optimizer moments a resumed run needs to continue exactly."""

    step: int = 0
    data_position: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _optimizer_metadata(state: TrainState) -> dict:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    opts = getattr(state.optimizer, "chained_optimizers", [state.optimizer])
    if any(isinstance(o, DistributedOptimizer) for o in opts):
        return {"distrib_optim_sharding_type": "fully_reshardable"}
    return {}


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _rng_state() -> dict[str, Any]:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(rng: dict[str, Any]) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    get_cuda_rng_tracker().set_states(rng["tracker"])


def save_checkpoint(
    ckpt_root: str | Path,
    state: TrainState,
    trainer: TrainerState,
    config: dict[str, Any],
    keep_last: int = 2,
) -> Path:
    """Write checkpoint `step_<trainer.step>` atomically on all ranks; prune old ones; return its path."""
    from megatron.core import dist_checkpointing, parallel_state

    root = Path(ckpt_root)
    name = step_name(trainer.step)
    final, tmp = root / name, root / (name + IN_PROGRESS)
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crashed save
        for sub in ("model", "optim", "rng"):
            (tmp / sub).mkdir(parents=True)
    _barrier()
    model = unwrap(state.model[0])
    dist_checkpointing.save(model.sharded_state_dict(), str(tmp / "model"))
    # A fresh model dict: `save` rewrites the one it is given in place.
    optim_sd = state.optimizer.sharded_state_dict(
        model.sharded_state_dict(), metadata=_optimizer_metadata(state)
    )
    dist_checkpointing.save(optim_sd, str(tmp / "optim"))
    torch.save(_rng_state(), tmp / "rng" / f"rank_{_rank():05d}.pt")
    _barrier()
    if _rank() == 0:
        meta = {
            "step": trainer.step,
            "data_position": trainer.data_position,
            "extra": trainer.extra,
            "scheduler": state.scheduler.state_dict(),
            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "tp": parallel_state.get_tensor_model_parallel_world_size(),
            "pp": parallel_state.get_pipeline_model_parallel_world_size(),
            "config": config,
        }
        (tmp / TRAINER_STATE).write_text(json.dumps(meta, indent=2, default=str))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _atomic_write_text(root / LATEST, name)
        _prune(root, keep_last)
    _barrier()
    return final


def _prune(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    done = step_dirs(root)
    latest = (root / LATEST).read_text().strip()
    for old in done[:-keep_last]:
        if old.name != latest:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: str | Path, state: TrainState) -> TrainerState:
    """Restore model, optimizer, LR schedule, RNG and trainer state (same parallel layout as saved)."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    meta = json.loads((path / TRAINER_STATE).read_text())
    world = dist.get_world_size() if dist.is_initialized() else 1
    load_model_weights(path, state.model[0])
    model_sd = unwrap(state.model[0]).sharded_state_dict()
    optim_sd = state.optimizer.sharded_state_dict(
        model_sd, is_loading=True, metadata=_optimizer_metadata(state)
    )
    state.optimizer.load_state_dict(dist_checkpointing.load(optim_sd, str(path / "optim")))
    state.scheduler.load_state_dict(meta["scheduler"])
    if meta["world_size"] == world:
        _set_rng_state(torch.load(path / "rng" / f"rank_{_rank():05d}.pt", weights_only=False))
    return TrainerState(step=meta["step"], data_position=meta["data_position"], extra=meta["extra"])
