"""Run Megatron-Core's own training code path on CPU.

Megatron-Core (0.16) assumes CUDA in a handful of places that have nothing to do with the maths. This
module redirects exactly those, inside this process, so CPU runs (laptops, CI) execute the *same*
Megatron forward/backward, DDP, optimizer, pipeline schedule and dist_checkpointing code as GPU runs.
It is activated by `scope_mega.runtime.distributed.init_runtime` only when no CUDA device is used.

What is redirected, and why:
1. `torch.cuda.current_device()` returns 0 instead of raising: Megatron passes it as `device=` when
   allocating buffers (param/grad buffers, p2p shapes, gathers). Device 0 is then mapped to CPU by (3).
2. `torch.cuda.synchronize()` becomes a no-op: CPU ops are synchronous; p2p and DDP call it.
3. A `TorchFunctionMode` (`CudaToCpuMode`) that, for every torch call made in this process,
   - rewrites a `device=` argument that names CUDA (`"cuda"`, `"cuda:N"`, `torch.device("cuda")`, or an
     integer index) to `"cpu"` (literal `device="cuda"` tensors in schedules, optimizer, clip_grads and
     the grad scaler);
   - drops `pin_memory=True` (Megatron pins the index tensors it sends to the GPU, e.g. when RoPE picks
     a context-parallel rank's positions), which CPU-only torch cannot allocate;
   - makes `Tensor.cuda()` return the tensor itself and `Tensor.to("cuda"...)` stay on CPU;
   - answers `Tensor.type()` (no arguments) for floating CPU tensors with the CUDA type name
     (`torch.cuda.FloatTensor` ...), because the optimizer and clip_grads check parameter types with
     `param.type() == 'torch.cuda.FloatTensor'` and reject anything else.
4. A CPU RNG tracker in place of Megatron's CUDA RNG tracker (`get_cuda_rng_tracker().fork()`), with
   the same named states and seeds as `model_parallel_cuda_manual_seed`, forking the CPU generator.
5. `megatron.core.tensor_parallel.random._get_cuda_rng_state` / `_set_cuda_rng_state` read and set the
   CPU generator instead of the CUDA one (which CPU-only torch refuses, or silently never sets).
   Activation recompute saves and restores the RNG through them: `CheckpointFunction` (full recompute,
   selective "core_attn" and "mlp") and `CheckpointWithoutOutput` (selective "layernorm") capture
   `_get_all_rng_states()` = (CPU state, "CUDA" state, the tracker's named states) in the forward and set
   them back before recomputing, so dropout draws the same masks twice: the plain dropout from the CPU
   generator, the tracker-forked attention dropout from the tracker's states (item 4).
6. The recompute itself runs under the mode of item 3. torch (2.13) dispatches `torch.autograd.backward`
   through the mode, and a mode is off the stack while it handles a call, so the whole backward pass,
   and a recompute inside it (`CheckpointFunction.backward`, `CheckpointWithoutOutput._recompute`),
   would otherwise see CUDA again (the local attention's `get_default_causal_mask` allocates on
   `device="cuda"`). Those two are wrapped to put the mode back while they run.
Nothing else is touched; on a CUDA run none of this is installed.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
}


def _is_cuda_device(device) -> bool:
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True  # a bare index means a CUDA ordinal in torch
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class CudaToCpuMode(TorchFunctionMode):
    """Maps CUDA device requests to CPU; see the module docstring, item 3."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = _CUDA_TYPE_NAMES.get(args[0].dtype)
            if name is not None and args[0].device.type == "cpu":
                return name
        if func is torch.Tensor.to:
            args = tuple("cpu" if i > 0 and _is_cuda_device(a) else a for i, a in enumerate(args))
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        return func(*args, **kwargs)


class CpuRNGStatesTracker:
    """Megatron's named RNG states (model-parallel, data-parallel, expert) on the CPU generator."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._is_initialized = False

    def is_initialized(self) -> bool:
        return self._is_initialized

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_ or name in self.states_:
            raise ValueError(f"RNG state {name!r} or seed {seed} already registered")
        self._is_initialized = True
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise ValueError(f"RNG state {name!r} is not added")
        saved = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)


_mode: CudaToCpuMode | None = None


def enable_cpu_execution() -> None:
    """Install the redirects above for the rest of this process (idempotent)."""
    global _mode
    if _mode is not None:
        return
    torch.cuda.current_device = lambda: 0
    torch.cuda.synchronize = lambda device=None: None
    _redirect_checkpoint_rng()
    _mode = CudaToCpuMode()
    _recompute_under_mode()
    _mode.__enter__()


def _get_cpu_rng_state(device=None, clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    """`_get_cuda_rng_state` on CPU: a copy of the CPU generator's state (`device` and the CUDA-graph
    options name the CUDA generator, which CPU runs do not have)."""
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, device=None, graph_safe: bool = False) -> None:
    """`_set_cuda_rng_state` on CPU: the CPU generator takes `new_state`."""
    torch.set_rng_state(new_state)


def _redirect_checkpoint_rng() -> None:
    """Item 5: Megatron's checkpoint code reaches the CUDA generator only through these two module
    functions (looked up at call time), so replacing them covers every recompute path."""
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = _get_cpu_rng_state
    mrandom._set_cuda_rng_state = _set_cpu_rng_state


@contextlib.contextmanager
def _mode_on_stack():
    """`_mode` active inside, pushed only when it is not on the stack already (inside its own handler)."""
    if _mode is None or _mode in _get_current_function_mode_stack():
        yield
        return
    with _mode:
        yield


def _under_mode(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with _mode_on_stack():
            return fn(*args, **kwargs)

    return run


def _recompute_under_mode() -> None:
    """Item 6: Megatron's recompute entry points run under the mode, also inside a backward pass."""
    from megatron.core.tensor_parallel import random as mrandom

    fn = mrandom.CheckpointFunction
    fn.backward = staticmethod(_under_mode(fn.backward))
    wo = mrandom.CheckpointWithoutOutput
    wo._recompute = _under_mode(wo._recompute)


def seed_cpu_rng_tracker(seed: int, tp_rank: int, ep_rank: int = 0, etp_rank: int = 0) -> None:
    """CPU twin of `model_parallel_cuda_manual_seed`: same state names, same seed offsets."""
    from megatron.core.tensor_parallel import random as mrandom

    tracker = CpuRNGStatesTracker()
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * ep_rank + etp_rank)
    mrandom._CUDA_RNG_STATE_TRACKER = tracker
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
