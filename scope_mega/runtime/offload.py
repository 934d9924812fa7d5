"""The trainer's state off the GPU while the colocated engines roll out (`rl.offload`).

Between one optimizer step and the next, the trainer needs only its weights on the device: the engines
read them at every weight sync. Everything else leaves:
- the optimizer state (Adam's m and v, and the fp32 master weights of bf16 training) goes to host
  memory (pinned on CUDA), storage by storage, and comes back bitwise unchanged;
- the gradient buffers are released: they hold the last step's gradients, already applied, and the
  next step zeroes them before use. Megatron's `_ParamAndGradBuffer.offload_to_cpu(move_params=False)`
  frees their storage and `reload_from_cpu` reallocates it zeroed.

Storages, not tensors, move: views into them (the gradient shards of the distributed optimizer, the
`main_grad` of every parameter, optimizer shards aliasing the parameter buffer) stay valid. Storages
that hold model parameters never move, whatever the optimizer aliases. Nothing may touch the optimizer
state while it is away: the trainer brings it back for the update and around a checkpoint save.

What the offload reads of the trainer's state is `TrainerParts` (a `train_step.TrainState` fits it);
this module imports nothing from the stages.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol

import torch


def offload_wanted(setting: str, device_type: str) -> bool:
    """`rl.offload`: `on`, `off`, or `auto` -- on when the engines share a GPU with the trainer. On a
    CPU the "device" is host memory already, so `auto` is off there (`on` still runs the mechanism)."""
    return setting == "on" or (setting == "auto" and device_type == "cuda")


def _buffers(state: TrainerParts) -> list:
    return [b for chunk in state.model for b in (*chunk.buffers, *chunk.expert_parallel_buffers)]


def _optimizer_tensors(state: TrainerParts) -> Iterator[torch.Tensor]:
    for opt in getattr(state.optimizer, "chained_optimizers", [state.optimizer]):
        inner = opt.optimizer
        for group in inner.param_groups:
            yield from group["params"]
        for per_param in inner.state.values():
            yield from (v for v in per_param.values() if isinstance(v, torch.Tensor))


class TrainerParts(Protocol):
    """The trainer's model chunks (Megatron DDP modules, with their parameter and gradient buffers)
    and its Megatron optimizer (possibly chained)."""

    model: list
    optimizer: Any


class TrainerOffload:
    """Moves a trainer's optimizer state to host memory and releases its gradient buffers
    (`to_host`), and back (`to_device`). Disabled, both are no-ops. Host buffers are kept between steps."""

    def __init__(self, state: TrainerParts, enabled: bool) -> None:
        self.state = state
        self.enabled = enabled
        self.on_host = False
        self._moved: list[tuple[torch.UntypedStorage, torch.Tensor]] = []  # (device storage, host bytes)
        self._host: list[torch.Tensor] = []

    def _storages(self) -> list[torch.UntypedStorage]:
        """The optimizer's storages on the trainer's device, once each, without the model's own."""
        params = [p for chunk in self.state.model for p in chunk.parameters()]
        params += [b.param_data for b in _buffers(self.state) if b.param_data is not None]
        device = params[0].device
        keep = {p.untyped_storage().data_ptr() for p in params}
        found: dict[int, torch.UntypedStorage] = {}
        for t in _optimizer_tensors(self.state):
            s = t.untyped_storage()
            if t.device == device and s.nbytes() and s.data_ptr() not in keep:
                found.setdefault(s.data_ptr(), s)
        return list(found.values())

    def host_bytes(self) -> int:
        """Host memory the offload holds (after the first `to_host`)."""
        return sum(h.numel() for h in self._host)

    def to_host(self) -> None:
        if not self.enabled or self.on_host:
            return
        storages = self._storages()
        cuda = storages[0].device.type == "cuda" if storages else False
        sizes = [s.nbytes() for s in storages]
        if [h.numel() for h in self._host] != sizes:  # the first time, or the state changed shape
            self._host = [torch.empty(n, dtype=torch.uint8, pin_memory=cuda) for n in sizes]
        for s, host in zip(storages, self._host):
            host.copy_(_bytes(s), non_blocking=cuda)
        if cuda:
            torch.cuda.synchronize()  # the copies must land before the storages are freed
        for s in storages:
            s.resize_(0)
        self._moved = list(zip(storages, self._host))
        for b in _buffers(self.state):
            b.offload_to_cpu(move_params=False, move_grads=True)
        self.on_host = True

    def to_device(self) -> None:
        if not self.enabled or not self.on_host:
            return
        for b in _buffers(self.state):
            b.reload_from_cpu(move_params=False, move_grads=True)
        for s, host in self._moved:
            s.resize_(host.numel())
            _bytes(s).copy_(host, non_blocking=host.is_pinned())
        if any(host.is_pinned() for _, host in self._moved):
            torch.cuda.synchronize()
        self._moved = []
        self.on_host = False

    @contextlib.contextmanager
    def on_device(self) -> Iterator[None]:
        """The state on the device for the block (a checkpoint save), then where it was."""
        was_on_host = self.on_host
        self.to_device()
        try:
            yield
        finally:
            if was_on_host:
                self.to_host()


def _bytes(storage: torch.UntypedStorage) -> torch.Tensor:
    """A uint8 tensor over the whole of `storage`."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)
