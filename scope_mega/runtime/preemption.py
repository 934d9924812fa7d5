"""Preemption and time-limit signals: finish the current step, checkpoint, then exit for requeue.

Slurm sends SIGUSR1 ahead of a time limit (`--signal=USR1@N`) or on `scancel --signal=USR1`; SIGTERM
arrives on preemption. The handler only records the request; the training loop polls `should_stop()`
between steps, which all-reduces the flag so every rank stops after the same step.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

PREEMPTED_EXIT_CODE = 42  # tells slurm/train.sh that a checkpoint was written and the job should requeue

_requested: list[int] = []


def _handler(signum, frame) -> None:
    _requested.append(signum)


def install_handlers(signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM)) -> None:
    """Record the listed signals instead of dying on them (call once, in the main thread)."""
    for sig in signals:
        signal.signal(sig, _handler)


def should_stop() -> bool:
    """True on every rank once any rank has received a stop signal."""
    flag = torch.tensor([1 if _requested else 0], dtype=torch.int32)
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())
