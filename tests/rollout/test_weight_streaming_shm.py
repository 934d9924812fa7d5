"""The shared-memory export (`gather_hf_weights` on CPU, 4 gloo processes at TP=2 x DP=2 and TP=2 x PP=2)
yields bitwise the tensors of the process-group export, to model-parallel rank 0 only: through the
double-buffered slots (several rounds, shards cut across rounds), into a shared arena a destination
adopts once and keeps, and through the slots into a destination's own weights when it cannot have an
arena, and over the process group when a rank cannot create shared memory; and it leaves nothing in
/dev/shm."""

import gc
import os
import secrets
import tempfile
from pathlib import Path

import pytest
import torch
from _tiny_config import TINY

from scope_mega.runtime.spawn import spawn_local

pytestmark = [pytest.mark.distributed]

CONFIGS = [
    dict(model_type="qwen2", tie_word_embeddings=True, **TINY),
    dict(model_type="llama", tie_word_embeddings=False, **TINY),
]
LAYOUTS = [(2, 1), (2, 2)]  # (TP, PP) on 4 processes
BUCKET = 16 * 1024  # slots of 8 KiB: many rounds, the embedding shard spans several


class Weights:
    """A destination like the transformers engine: its own tensors, which it can move into others."""

    def __init__(self, shapes: dict[str, torch.Size], dtype: torch.dtype) -> None:
        self.weights = {name: torch.zeros(shape, dtype=dtype) for name, shape in shapes.items()}
        self.adopted = 0

    def writable_weights(self) -> dict[str, torch.Tensor]:
        return dict(self.weights)

    def adopt_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            tensor.copy_(self.weights[name])
            self.weights[name] = tensor
        self.adopted += 1


def _collect(buckets) -> dict[str, torch.Tensor]:
    out = {}
    for bucket in buckets:
        for name, tensor in bucket:
            assert name not in out, f"{name} streamed twice"
            out[name] = tensor.clone()
    return out


def _ours(pid: int) -> list[str]:
    """This process's scope_mega files: in /dev/shm, mapped, or open."""
    prefix = f"scope_mega_{pid}_"
    named = [p.name for p in Path("/dev/shm").glob(f"{prefix}*")]
    maps = [line for line in Path(f"/proc/{pid}/maps").read_text().splitlines() if "scope_mega_" in line]
    fds = [os.readlink(f) for f in Path(f"/proc/{pid}/fd").iterdir() if "scope_mega_" in _link(f)]
    return named + maps + fds


def _link(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def _check(got: dict, ref: dict, driver: bool, what: str, dtype: torch.dtype = torch.float32) -> None:
    if not driver:
        assert got == {}, f"{what}: a rank other than model-parallel rank 0 got tensors"
        return
    assert sorted(got) == sorted(ref), f"{what}: names differ"
    bad = [n for n in ref if not torch.equal(got[n].to(dtype), ref[n].to(dtype))]
    assert not bad, f"{what}: not bitwise equal: {bad}"


def _layout(tp: int, pp: int, seed: int, hf_dict: dict) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from scope_mega.config import ModelConfig, ParallelConfig
    from scope_mega.models.gpt import build_gpt_model
    from scope_mega.rollout.weight_sync import hf_parameter_shapes
    from scope_mega.runtime import shm
    from scope_mega.runtime.distributed import destroy_distributed, init_distributed
    from scope_mega.weights.stream_collective import iter_hf_weights
    from scope_mega.weights.stream_shm import gather_hf_weights, release_shared_memory

    dev = init_distributed(tp=tp, pp=pp, device="cpu", seed=seed)
    model, spec = build_gpt_model(ModelConfig(hf_config=dict(hf_dict)), ParallelConfig(tp=tp, pp=pp), dev)
    driver = ps.get_tensor_model_parallel_rank() == 0 and ps.get_pipeline_model_parallel_rank() == 0
    shapes = hf_parameter_shapes(spec.hf_config)
    where = f"{hf_dict['model_type']} tp={tp} pp={pp}"

    ref = _collect(iter_hf_weights(model, spec, BUCKET))
    _check(_collect(gather_hf_weights(model, spec, BUCKET)), ref, driver, f"{where} slots")
    _check(_collect(gather_hf_weights(model, spec, BUCKET, transport="group")), ref, driver, f"{where} group")
    assert shm.held_bytes() == BUCKET, "the slots are one bucket per rank"

    # into a destination: at TP=2 it adopts a shared arena once, then keeps receiving in place
    dest = Weights(shapes, torch.float32) if driver else None
    for step in range(2):
        buckets = list(gather_hf_weights(model, spec, BUCKET, dest=dest))
        _check(_collect(buckets), ref, driver, f"{where} arena, step {step}")
        if driver:
            assert dest.adopted == 1
            for name, tensor in (t for b in buckets for t in b):
                assert tensor.data_ptr() == dest.weights[name].data_ptr(), f"{where}: {name} not in place"
        with torch.no_grad():  # an optimizer step
            for p in model.parameters():
                p.mul_(1.5).add_(0.25)
        ref = _collect(iter_hf_weights(model, spec, BUCKET))

    # a destination without one of the weights gets no arena: the slots, writing the rest in place
    partial = {n: s for n, s in shapes.items() if not n.endswith("layers.0.mlp.down_proj.weight")}
    dest = Weights(partial, torch.float32) if driver else None
    buckets = list(gather_hf_weights(model, spec, BUCKET, dest=dest))
    _check(_collect(buckets), ref, driver, f"{where} slots into a destination")
    if driver:
        assert dest.adopted == 0
        for name, tensor in (t for b in buckets for t in b):
            in_place = name in partial and tensor.data_ptr() == dest.weights[name].data_ptr()
            assert in_place == (name in partial), f"{where}: {name} in place: {in_place}"

    # another destination, in bf16: a new arena, written with the dtype converted (other stages' tensors
    # arrive in the trainer's dtype, for the destination to convert)
    dest = Weights(shapes, torch.bfloat16) if driver else None
    got = _collect(gather_hf_weights(model, spec, BUCKET, dest=dest))
    _check(got, ref, driver, f"{where} bf16", torch.bfloat16)
    assert dest is None or dest.adopted == 1
    named = [n for n in _ours(os.getpid()) if n.startswith("scope_mega_")]
    assert named == [], f"{where}: files left in /dev/shm while in use: {named}"

    # a rank that cannot create its shared memory: its group (and the model-parallel group) agree
    # on the process-group path
    release_shared_memory()
    if dist.get_rank() == 1:
        shm.SHM_DIR = os.path.join(tempfile.gettempdir(), f"scope_mega_absent_{secrets.token_hex(8)}")
    _check(_collect(gather_hf_weights(model, spec, BUCKET)), ref, driver, f"{where} fallback")
    assert dist.get_rank() > 1 or shm.held_bytes() == 0
    shm.SHM_DIR = "/dev/shm"
    release_shared_memory()
    destroy_distributed(keep_process_group=True)


def _worker():
    import torch.distributed as dist

    from scope_mega.runtime.distributed import destroy_distributed
    from scope_mega.weights.stream_shm import release_shared_memory

    for tp, pp in LAYOUTS:
        for i, hf_dict in enumerate(CONFIGS):
            _layout(tp, pp, 10 + i, hf_dict)
    release_shared_memory()
    gc.collect()
    left = _ours(os.getpid())
    assert left == [], f"shared memory still mapped or open after release: {left}"
    dist.barrier()
    destroy_distributed()


def test_shared_memory_export_is_bitwise_the_process_group_export_and_cleans_up():
    spawn_local(_worker, 4)
