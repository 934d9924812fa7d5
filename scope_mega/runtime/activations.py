"""Measure the activation memory a forward keeps for its backward (recompute tests, the long-context bench).

`SavedActivations` is a context manager around a forward: autograd calls its pack hook for every
tensor an op saves for backward (`torch.autograd.graph.saved_tensors_hooks`), and it keeps a reference
to each saved tensor's storage. `nbytes()` sums the *unique* storages (views of one buffer count once)
at the time it is called, not at the time they were saved, so a storage that Megatron's
`CheckpointWithoutOutput` released after the fact (resized to 0, selective "layernorm" recompute)
counts 0, as it holds no memory. Parameters (saved by every linear layer) are not activations and are
left out when the model is given. Call `nbytes()` after the forward, before the backward frees the
graph; the references it keeps hold the storages alive only until the context exits.

Contract: with gradients off no op saves anything, so `count == 0` means the forward kept nothing for a
backward, recompute or not; a recomputing forward saves only each checkpoint's inputs (and whatever
runs outside the checkpoints), which `nbytes()` shows.
"""

from __future__ import annotations

import torch


class SavedActivations:
    """Sum of the unique storages saved for backward inside the context (parameters excluded)."""

    def __init__(self, model: torch.nn.Module | None = None) -> None:
        params = [] if model is None else list(model.parameters())
        self._exclude = {p.untyped_storage()._cdata for p in params}
        self._storages: dict[int, torch.UntypedStorage] = {}
        self.count = 0  # how many tensors were saved (views and repeats included)
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self.count += 1
        storage = tensor.untyped_storage()
        if storage._cdata not in self._exclude:
            self._storages.setdefault(storage._cdata, storage)
        return tensor

    def nbytes(self) -> int:
        """Bytes now held by the unique non-parameter storages saved so far."""
        return sum(s.nbytes() for s in self._storages.values())

    def __enter__(self) -> SavedActivations:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self._storages.clear()
