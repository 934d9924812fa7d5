"""Context parallelism (CP): each sequence split over the CP ranks, and exact local attention over it.

Layout (Megatron's `get_batch_on_this_cp_rank`, Transformer Engine's THD partitioning, and what
Megatron's RoPE assumes when it picks a rank's positions): a sequence whose length L is a multiple
of 2·CP is cut into 2·CP chunks of L / (2·CP) tokens; CP rank r holds chunks r and 2·CP-1-r, in that
order. Causal attention makes later chunks dearer, and the pairing gives every rank the same work.
- Padded micro-batches ([b, s], s a multiple of 2·CP) split every row.
- THD rows ([1, t], every `cu_seqlens` segment a multiple of 2·CP) split every segment; `cu_seqlens`
  stays global, as Megatron and TE expect: the local row holds t / CP tokens, segment i of it
  (cu[i+1] - cu[i]) / CP.
Every [b, s] tensor of a micro-batch is split the same way (`split_batch`): targets were shifted on
the whole sequence before (position t predicts token t+1), so no boundary loses a label.

Attention on the local spec (`cp_attention`): K and V of every rank are all-gathered, put back in
each sequence's global order, and the rank's queries attend to them at their global positions under
the causal mask, so each query's softmax runs over exactly the keys it sees at CP=1. On Transformer
Engine, its context-parallel attention does this (`parallel.cp_comm_type`).

Gradient convention (one, for both backends): a rank's loss is the sum over its own tokens, never
scaled by CP; the K/V gather's backward returns to each rank the gradient summed over every rank's
queries (TE's ring attention does the same); Megatron's DDP sums parameter gradients over DP x CP and
`finalize_model_grads` divides them by the token normaliser summed over DP x CP. Denominators that
count tokens or sequences come from the unsplit batch (`rl.batch.to_micro_batches`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

Batch = dict[str, torch.Tensor]


def chunk_positions(length: int, cp: int, rank: int) -> torch.Tensor:
    """Positions (in [0, length)) of a sequence that CP rank `rank` holds, in its local order."""
    if cp == 1:
        return torch.arange(length)
    if length % (2 * cp):
        raise ValueError(f"a sequence of {length} tokens does not split into 2 x cp={cp} chunks")
    c = length // (2 * cp)
    first, second = rank * c, (2 * cp - 1 - rank) * c
    return torch.cat([torch.arange(first, first + c), torch.arange(second, second + c)])


def local_positions(batch: Batch, cp: int, rank: int) -> torch.Tensor:
    """Indices along dim 1 of `batch`'s [b, s] tensors that this rank keeps: the row split (padded),
    or each `cu_seqlens` segment split and offset (THD)."""
    if "cu_seqlens" not in batch:
        return chunk_positions(batch["input_ids"].shape[1], cp, rank)
    bounds = batch["cu_seqlens"].tolist()
    return torch.cat([a + chunk_positions(b - a, cp, rank) for a, b in zip(bounds, bounds[1:])])


def split_batch(batch: Batch, cp: int, rank: int) -> Batch:
    """This CP rank's part of a micro-batch: every tensor with the micro-batch's [b, s] shape indexed
    along s by `local_positions`; the rest (`cu_seqlens`, counts) as they are."""
    if cp == 1:
        return batch
    shape = batch["input_ids"].shape
    index = local_positions(batch, cp, rank)
    return {
        key: value[:, index] if isinstance(value, torch.Tensor) and value.shape[:2] == shape else value
        for key, value in batch.items()
    }


def gather_positions(local: torch.Tensor, cp: int, rank: int) -> torch.Tensor:
    """Per-position values [b, s / cp] of this rank's part of padded rows -> [b, s] in sequence order,
    every CP rank's part in place (collective over the CP group; no gradient)."""
    if cp == 1:
        return local
    from megatron.core import parallel_state

    full = local.new_zeros(local.shape[0], local.shape[1] * cp)
    full[:, chunk_positions(full.shape[1], cp, rank).to(local.device)] = local
    dist.all_reduce(full, group=parallel_state.get_context_parallel_group())
    return full


class _GatherFromContextParallel(torch.autograd.Function):
    """All-gather along a new leading dim over the CP group; the backward sums every rank's gradient
    and returns this rank's slice (an all-reduce, which gloo has, then a slice)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[dist.get_rank(ctx.group)], None


def gather_global(x: torch.Tensor, local_bounds: list[int], group) -> torch.Tensor:
    """Every CP rank's `x` (local tokens along dim 0, segments at `local_bounds`) in global order:
    each segment's 2·CP chunks put back in sequence order, segments one after another."""
    cp = dist.get_world_size(group)
    stacked = _GatherFromContextParallel.apply(x, group)  # [cp, t_local, ...]
    flat = stacked.flatten(0, 1)
    t_local = x.shape[0]
    order = []
    for a, b in zip(local_bounds, local_bounds[1:]):
        c = (b - a) // 2
        for k in range(2 * cp):  # chunk k is rank k's first chunk, or rank 2cp-1-k's second
            owner, offset = (k, 0) if k < cp else (2 * cp - 1 - k, c)
            start = owner * t_local + a + offset
            order.append(torch.arange(start, start + c))
    return flat[torch.cat(order).to(x.device)]


def causal_mask(positions: torch.Tensor, keys: int) -> torch.Tensor:
    """[1, 1, len(positions), keys] bool, True where key k lies after query position q (masked)."""
    return (torch.arange(keys, device=positions.device)[None, :] > positions[:, None])[None, None]
