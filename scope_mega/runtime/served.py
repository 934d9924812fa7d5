"""Collective work that one rank drives: the other ranks of its replica join each call.

The RL step runs its algorithm (rollout, SCOPE's rectification, evaluation) on the first rank of
each data-parallel replica (`runtime.distributed.replica_group`: TP x CP x PP), the driver. Some of
what it calls is collective, though: a TP-sharded PRM's forward needs every rank of the group, and a
vLLM engine spans every rank of the world. Each such callable is registered here under a name on
every rank; the driver's `call(name, *args)` first sends (name, args) to the group, whose other
ranks sit in `serve()` running the same handler, until the driver's `release()`. Handlers run in the
driver's order on every rank, so collectives inside them line up. `from_driver` and `gather_drivers`
are the two plain exchanges around such work: the driver's result to its group, and one object from
every replica's driver.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from scope_mega.runtime.distributed import replica_group


def _broadcast(obj: Any, group, src: int) -> Any:
    """`obj` of global rank `src` on every rank of `group` (what the others pass is ignored)."""
    if dist.get_world_size(group) == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def from_driver(obj: Any, is_driver: bool) -> Any:
    """The driver's Python object `obj` on every rank of its replica."""
    group = replica_group()
    return _broadcast(obj if is_driver else None, group, dist.get_global_rank(group, 0))


def gather_drivers(obj: Any) -> list[Any]:
    """`obj` of every data-parallel replica's driver; called by drivers only (their data-parallel group
    is the drivers' group: every driver is TP, CP and PP rank 0)."""
    from megatron.core import parallel_state

    group = parallel_state.get_data_parallel_group()
    if dist.get_world_size(group) == 1:
        return [obj]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


class Served:
    """The named collective handlers of one rank, and the channel to its replica."""

    def __init__(self, is_driver: bool) -> None:
        self.is_driver = is_driver
        self.group = replica_group()
        self.src = dist.get_global_rank(self.group, 0)
        self.handlers: dict[str, Callable[..., Any]] = {}

    def register(self, name: str, handler: Callable[..., Any]) -> None:
        if name in self.handlers:
            raise ValueError(f"Served: a handler named {name!r} is registered already")
        self.handlers[name] = handler

    def _exchange(self, request: Any) -> Any:
        return _broadcast(request, self.group, self.src)

    def call(self, name: str, *args: Any) -> Any:
        """Driver: run handler `name` on every rank of the group; returns the driver's result."""
        if not self.is_driver:
            raise RuntimeError(f"Served.call({name!r}) runs on the driver; the other ranks call serve()")
        self._exchange((name, args))
        return self.handlers[name](*args)

    def release(self) -> None:
        """Driver: end the other ranks' `serve()`."""
        self._exchange(None)

    def serve(self) -> None:
        """Non-driver ranks: run the driver's calls until it releases the group."""
        while (request := self._exchange(None)) is not None:
            name, args = request
            self.handlers[name](*args)
