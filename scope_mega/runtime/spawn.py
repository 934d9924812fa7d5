"""Run a function on N local processes with torchrun-style variables (tests, tools, CPU benchmarks)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable, nprocs: int, port: int, args: tuple) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(nprocs),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)
    fn(*args)


def spawn_local(fn: Callable, nprocs: int, *args) -> None:
    """Start `fn(*args)` on `nprocs` fresh processes (spawn) and wait; re-raises the first failure.

    Each process sees RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT, so `runtime.init_distributed` inside
    `fn` forms one gloo group. `fn` must be importable (module level). Results go through files.
    """
    mp.start_processes(_entry, args=(fn, nprocs, _free_port(), args), nprocs=nprocs, start_method="spawn")
