"""Per-token log-probabilities from vocab-parallel logits, without gathering the full vocabulary."""

from __future__ import annotations

import torch


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Set logits of TP vocab-padding rows (global index >= vocab_size) to -inf on this rank's slice.

    Padding rows exist only so the vocabulary splits evenly over TP ranks; they are not tokens, so
    they must not take probability mass (HF's softmax never sees them).
    """
    from megatron.core import parallel_state

    local = logits.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * local
    if start + local <= vocab_size:
        return logits
    ids = torch.arange(start, start + local, device=logits.device)
    return logits.masked_fill(ids >= vocab_size, float("-inf"))


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """log p(targets) for vocab-parallel `logits` [..., V/tp] and `targets` [...], fp32, differentiable.

    Uses Megatron's `vocab_parallel_cross_entropy` (max, sum-exp and target-logit all-reduced over the
    TP group), so TP > 1 never materialises the full vocabulary on one rank. Megatron's kernel works
    in place on its input; `logits` itself is left untouched (a private copy is passed).
    """
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    masked = mask_padded_vocab(logits.float(), vocab_size)
    if masked is logits:
        masked = masked.clone()
    return -vocab_parallel_cross_entropy(masked, targets)


def vocab_parallel_entropy(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Entropy of softmax(logits) per position, for vocab-parallel logits; differentiable."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.mappings import (
        reduce_from_tensor_model_parallel_region as all_reduce_sum,
    )

    logits = mask_padded_vocab(logits.float(), vocab_size)
    local_max = logits.max(dim=-1, keepdim=True).values.detach()
    global_max = local_max.clone()
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(
            global_max,
            op=torch.distributed.ReduceOp.MAX,
            group=parallel_state.get_tensor_model_parallel_group(),
        )
    shifted = logits - global_max
    exp = shifted.exp()
    sum_exp = all_reduce_sum(exp.sum(dim=-1))
    # H = log Z - sum(p * x) with x the shifted logits; padded entries have p = 0 (avoid 0 * -inf).
    px = torch.where(torch.isfinite(shifted), exp * shifted, torch.zeros_like(shifted))
    return sum_exp.log() - all_reduce_sum(px.sum(dim=-1)) / sum_exp
