"""The results queue of Megatron's checkpoint writer, served by a process that dies with its parent.

Megatron-Core's filesystem writer (`dist_checkpointing/strategies/filesystem_async.py`,
`_get_write_results_queue`) collects its workers' results through a queue of a spawn-context
`multiprocessing.Manager`, created at the first save and kept in the module global `_results_queue`.
That Manager is a server process of its own (~350 MB: spawn re-imports the caller's main module), and
a spawn start also starts multiprocessing's resource tracker. Both end at a normal exit; when the
trainer is killed with SIGKILL (the OOM killer, a node's hard limit) nothing stops them, and they
stayed alive, orphaned, until someone killed them by hand.

`install_writer_results_queue()` creates that queue first, from a Manager whose server process asks
the kernel for SIGKILL when its parent dies (`prctl(PR_SET_PDEATHSIG)`), and installs it in Megatron's
global, where the writer finds it and creates none. The resource tracker then ends by itself: it
exits when the last process holding its pipe (the trainer, the Manager) is gone. Call it once per
process, in the main thread (the death signal follows the thread that started the Manager), before
the first save: `stage.start_stage` does. A second call does nothing.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
from multiprocessing.managers import SyncManager

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent(parent: int) -> None:
    """The Manager's initializer: SIGKILL when `parent` exits, or at once if it already has."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # the parent died before the request above was in place
        os._exit(1)


def install_writer_results_queue() -> None:
    """Megatron's checkpoint writer's results queue, from a Manager that dies with this process."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is not None:
        return
    manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
    manager.start(_die_with_parent, (os.getpid(),))
    filesystem_async._results_queue = manager.Queue()  # the proxy keeps its manager alive
