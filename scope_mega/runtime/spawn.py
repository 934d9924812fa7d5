"""Run a function on N local processes with torchrun-style variables (tests, tools, CPU benchmarks).

Contract: `spawn_local` returns only when every process returned; otherwise it raises, in the parent,
the exception the first failing process raised (its own object: a `ConfigError` stays a `ConfigError`,
so a command prints its one line), with that process's traceback attached as a note. A process that
dies without raising (a signal, `os._exit`) gives torch's `ProcessExitedException`. Children print no
traceback of their own: the failure reaches the caller once, as an exception.
"""

from __future__ import annotations

import os
import pickle
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch.multiprocessing as mp

# After one process fails, the others get this long to fail or finish by themselves (a peer blocked in
# a collective fails as soon as the failed one's sockets close) and clean up, before SIGTERM.
GRACE_S = 20.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable, nprocs: int, port: int, args: tuple, reports: str) -> None:
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
    try:
        fn(*args)
    except (KeyboardInterrupt, SystemExit):  # the parent's SIGINT, or an exit status chosen on purpose
        raise
    except BaseException as e:  # noqa: BLE001 (BaseException too: DCP's CheckpointException is one)
        _report(Path(reports), rank, e)
        sys.exit(1)  # quietly: torch's wrapper would print the traceback the parent re-raises


def _report(reports: Path, rank: int, error: BaseException) -> None:
    """Leave `error` for the parent: when it happened, the exception (or, if it does not survive
    pickling, a RuntimeError with its text) and its traceback, written atomically."""
    text = "".join(traceback.format_exception(error))
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:  # noqa: BLE001 (any exception may fail to pickle or to rebuild)
        error = RuntimeError(f"{type(error).__name__}: {error}")
    tmp = reports / f".{rank}.tmp"
    tmp.write_bytes(pickle.dumps((time.time(), rank, error, text)))
    os.replace(tmp, reports / f"{rank}.report")


def _first_report(reports: Path, nprocs: int) -> BaseException | None:
    """The exception of the process that failed first, its rank and traceback attached as a note."""
    found = [pickle.loads(p.read_bytes()) for p in reports.glob("*.report")]
    if not found:
        return None
    _, rank, error, text = min(found, key=lambda r: (r[0], r[1]))
    error.add_note(f"raised in spawned process {rank} of {nprocs}:\n{text.rstrip()}")
    return error


def spawn_local(fn: Callable, nprocs: int, *args) -> None:
    """Start `fn(*args)` on `nprocs` fresh processes (spawn) and wait; re-raise the first failure.

    Each process sees RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT, so `runtime.init_distributed` inside
    `fn` forms one gloo group. `fn` must be importable (module level). Results go through files.
    """
    with tempfile.TemporaryDirectory(prefix="spawn-reports-") as reports:
        context = mp.start_processes(
            _entry,
            args=(fn, nprocs, _free_port(), args, reports),
            nprocs=nprocs,
            start_method="spawn",
            join=False,
        )
        try:
            while not context.join(grace_period=GRACE_S):
                pass
        except mp.ProcessExitedException:
            error = _first_report(Path(reports), nprocs)
            if error is None:
                raise
            raise error from None
