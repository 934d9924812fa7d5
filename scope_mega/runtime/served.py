"""Collective work that one rank drives: the other ranks of its model-parallel group join each call.

The RL step runs its algorithm (rollout, SCOPE's rectification, evaluation) on the first rank of each
model-parallel group, the driver. Some of what it calls is collective, though: a TP-sharded PRM's
forward needs every rank of the group, and a vLLM engine spans every rank of the world. Each such
callable is registered here under a name on every rank; the driver's `call(name, *args)` first sends
(name, args) to the group, whose other ranks sit in `serve()` running the same handler, until the
driver's `release()`. Handlers run in the driver's order on every rank, so collectives inside them
line up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.distributed as dist


class Served:
    """The named collective handlers of one rank, and the channel to its model-parallel group."""

    def __init__(self, is_driver: bool) -> None:
        from megatron.core import parallel_state

        self.is_driver = is_driver
        self.group = parallel_state.get_model_parallel_group()
        self.src = dist.get_global_rank(self.group, 0)
        self.handlers: dict[str, Callable[..., Any]] = {}

    def register(self, name: str, handler: Callable[..., Any]) -> None:
        if name in self.handlers:
            raise ValueError(f"Served: a handler named {name!r} is registered already")
        self.handlers[name] = handler

    def _exchange(self, request: Any) -> Any:
        if dist.get_world_size(self.group) == 1:
            return request
        box = [request]
        dist.broadcast_object_list(box, src=self.src, group=self.group)
        return box[0]

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
