"""Live export: full HF-named tensors from a running TP/PP-sharded Megatron model, in bounded buckets,
for a rollout engine's `update_weights(named_tensors)` after every RL step."""

from __future__ import annotations

from collections.abc import Iterator

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

    hf = spec.hf_config
    chunks = model if isinstance(model, (list, tuple)) else [model]
    local = [(b, p) for chunk in chunks for b, _, p in bind_parameters(chunk, hf) if b.rule.export]
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    if pp_size == 1:
        yield from _stage_buckets(local, Dims.of(hf), bucket_bytes)
        return
    group = parallel_state.get_pipeline_model_parallel_group()
    stage_ranks = dist.get_process_group_ranks(group)
    me = parallel_state.get_pipeline_model_parallel_rank()
    device = local[0][1].device
    for stage, src in enumerate(stage_ranks):
        mine = _stage_buckets(local, Dims.of(hf), bucket_bytes) if stage == me else None
        yield from _broadcast_buckets(mine, src, group, device)


def _stage_buckets(
    local: list[tuple[Binding, torch.Tensor]], dims: Dims, bucket_bytes: int
) -> Iterator[Bucket]:
    """This stage's tensors, TP-gathered and mapped to HF, in buckets."""
    from megatron.core import parallel_state

    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    bucket: Bucket = []
    size = 0
    for binding, param in local:
        shard = param.detach()
        if binding.rule.tp_dim is not None and tp_size > 1:
            shards = [torch.empty_like(shard) for _ in range(tp_size)]
            dist.all_gather(shards, shard.contiguous(), group=tp_group)
            full = tp_merge(binding.rule, shards)
        else:
            full = shard
        for name, tensor in zip(binding.hf, to_hf(binding.rule, full, dims)):
            if bucket and size + tensor.numel() * tensor.element_size() > bucket_bytes:
                yield bucket
                bucket, size = [], 0
            bucket.append((name, tensor.contiguous()))
            size += tensor.numel() * tensor.element_size()
    if bucket:
        yield bucket


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
