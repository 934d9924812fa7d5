"""Live export over the process groups: full HF-named tensors from a running TP/PP-sharded Megatron
model, in bounded buckets, for a rollout engine's `update_weights(named_tensors)` after every RL step.
Works on any device (NCCL or gloo); one mapping, `mapping.tp_merge` then `mapping.to_hf`.

- `iter_hf_weights`: every rank gets every tensor (all_gather over TP, broadcast over PP).
- `stream_plan`: the names and shapes the exports yield, in order, before any tensor moves.
- `send_buckets` / `recv_buckets`: one stage's buckets to another rank of the PP group, point to
  point; with `Bucketer` and `exported_parameters`, what the shared-memory export to model-parallel
  rank 0 (`stream_shm.gather_hf_weights`) builds on.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping

import torch
import torch.distributed as dist

from scope_mega.weights.mapping import Binding, Dims, bind_parameters, to_hf, tp_merge

Bucket = list[tuple[str, torch.Tensor]]


def iter_hf_weights(model, spec, bucket_bytes: int = 1 << 30) -> Iterator[Bucket]:
    """Yield `[(hf_name, full_tensor), ...]` buckets of about `bucket_bytes` (a larger tensor gets a
    bucket of its own) covering the whole model once, in HF order.

    `model` is this rank's stage (a module, possibly DDP-wrapped, or a list of chunks) and `spec` its
    `ModelSpec`. Collective over the model-parallel groups, so every rank must run the iterator to
    the end: TP shards are all-gathered over the TP group and merged (`mapping.tp_merge`), then each
    pipeline stage in turn broadcasts its buckets over the PP group, so every rank yields the same
    buckets. Vocab padding is trimmed; the tied output layer is not sent (it is the embedding).
    With TP=1, tensors that need no transform alias live parameters: copy them before the next
    optimizer step.
    """
    from megatron.core import parallel_state

    local, dims = exported_parameters(model, spec)
    mine = _stage_buckets(local, dims, bucket_bytes)
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        yield from mine
        return
    group = parallel_state.get_pipeline_model_parallel_group()
    me = parallel_state.get_pipeline_model_parallel_rank()
    for stage, src in enumerate(dist.get_process_group_ranks(group)):
        yield from _broadcast_buckets(mine if stage == me else None, src, group, local[0][1].device)


def stream_plan(model, spec) -> list[tuple[str, tuple[int, ...]]]:
    """Name and shape of every tensor the exports (`iter_hf_weights`, `stream_shm.gather_hf_weights`)
    yield, in their order, from the stages' parameters alone (the transforms run on meta tensors), so
    a writer can lay out its files before the first tensor arrives. Collective over the PP group;
    every rank gets the whole list."""
    from megatron.core import parallel_state

    local, dims = exported_parameters(model, spec)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    mine = []
    for binding, param in local:
        shape = list(param.shape)
        if binding.rule.tp_dim is not None:
            shape[binding.rule.tp_dim] *= tp  # every TP merge concatenates along tp_dim
        for name, t in zip(binding.hf, to_hf(binding.rule, torch.empty(shape, device="meta"), dims)):
            mine.append((name, tuple(t.shape)))
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return mine
    group = parallel_state.get_pipeline_model_parallel_group()
    stages: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(stages, mine, group=group)
    return [item for stage in stages for item in stage]


def exported_parameters(model, spec) -> tuple[list[tuple[Binding, torch.Tensor]], Dims]:
    """This stage's exported parameters with their bindings, in HF order, and the transforms' sizes."""
    hf = spec.hf_config
    chunks = model if isinstance(model, (list, tuple)) else [model]
    local = [(b, p) for chunk in chunks for b, _, p in bind_parameters(chunk, hf) if b.rule.export]
    return local, Dims.of(hf)


def send_buckets(mine: Iterator[Bucket], dst: int, group) -> None:
    """Send this stage's buckets to global rank `dst` (header, then tensors; an empty header ends)."""
    for bucket in itertools.chain(mine, [None]):
        header = [None if bucket is None else [(n, t.shape, t.dtype) for n, t in bucket]]
        dist.send_object_list(header, dst=dst, group=group)
        if bucket is None:
            return
        for _, tensor in bucket:
            dist.send(tensor.contiguous(), dst=dst, group=group)


def recv_buckets(src: int, group, into: Mapping[str, torch.Tensor] | None) -> Iterator[Bucket]:
    """The buckets `send_buckets` sends from global rank `src`, received straight into matching
    contiguous `into` tensors of the same dtype where there are such."""
    while True:
        header = [None]
        dist.recv_object_list(header, src=src, group=group)
        if header[0] is None:
            return
        bucket = []
        for name, shape, dtype in header[0]:
            dest = into.get(name) if into else None
            usable = dest is not None and dest.shape == shape and dest.dtype == dtype
            if not (usable and dest.is_contiguous() and dest.device.type == "cpu"):
                dest = torch.empty(shape, dtype=dtype)
            dist.recv(dest, src=src, group=group)
            bucket.append((name, dest))
        yield bucket


def _stage_buckets(
    local: list[tuple[Binding, torch.Tensor]], dims: Dims, bucket_bytes: int
) -> Iterator[Bucket]:
    """This stage's tensors, TP-gathered and mapped to HF, in buckets."""
    from megatron.core import parallel_state

    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    bucket = Bucketer(bucket_bytes)
    for binding, param in local:
        shard = param.detach()
        if binding.rule.tp_dim is not None and tp_size > 1:
            shards = [torch.empty_like(shard) for _ in range(tp_size)]
            dist.all_gather(shards, shard.contiguous(), group=tp_group)
            full = tp_merge(binding.rule, shards)
        else:
            full = shard
        for name, tensor in zip(binding.hf, to_hf(binding.rule, full, dims)):
            yield from bucket.add(name, tensor.contiguous())
    yield from bucket.flush()


def _broadcast_buckets(mine: Iterator[Bucket] | None, src: int, group, device) -> Iterator[Bucket]:
    """Buckets of the stage whose rank in this PP group is `src`: it sends names, shapes and dtypes,
    then the tensors; an empty header ends the stage."""
    while True:
        bucket = next(mine, None) if mine is not None else None
        header = [None if bucket is None else [(n, t.shape, t.dtype) for n, t in bucket]]
        dist.broadcast_object_list(header, src=src, group=group)
        if header[0] is None:
            return
        if bucket is None:
            bucket = [(n, torch.empty(shape, dtype=dtype, device=device)) for n, shape, dtype in header[0]]
        for _, tensor in bucket:
            dist.broadcast(tensor, src=src, group=group)
        yield bucket


class Bucketer:
    """Groups named tensors into buckets of at most `limit` bytes (a larger tensor comes alone)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.bucket: Bucket = []
        self.size = 0

    def add(self, name: str, tensor: torch.Tensor) -> Iterator[Bucket]:
        nbytes = tensor.numel() * tensor.element_size()
        yield from self.make_room(nbytes)
        self.bucket.append((name, tensor))
        self.size += nbytes

    def make_room(self, nbytes: int) -> Iterator[Bucket]:
        """Hand out the bucket if `nbytes` more would overflow it (before allocating them, so that
        the two are never held together)."""
        if self.bucket and self.size + nbytes > self.limit:
            yield from self.flush()

    def flush(self) -> Iterator[Bucket]:
        if self.bucket:
            yield self.bucket
        self.bucket, self.size = [], 0
