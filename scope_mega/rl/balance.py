"""Token-balanced data parallelism (`rl.balance_tokens`): before the update, a step's samples move between
data-parallel replicas so that each replica trains on about the same number of tokens.

Each replica's driver generates its own prompts' samples, and with long-tailed response lengths the
replica whose rollouts ran longest sets the update's time (verl's `balance_batch`, slime's
`--balance-data`, NeMo-RL's dynamic batching do the same). A sample counts its prompt and response tokens.

Group statistics never depend on where a sample trains: balancing runs after `rl.batch.to_samples`,
whose advantages (GRPO's over each whole group, or the PRM's dense ones) each replica's driver computed
over its own complete groups, after dynamic sampling and the overlong penalty; a sample carries its
advantages, masks and logprobs with it. Nor does the loss: its normaliser (token_mean: the response
tokens, seq_mean: the sequences) is summed over every replica (`train_step`, Megatron's
`calculate_per_token_loss`), so a move changes only the order of fp32 sums. With
`rl.ppo_mini_batches > 1` a mini-batch is a share of every replica's micro-batches, so which samples
share an optimizer step does change, as any reshuffle would.

`assign` is pure and deterministic: the best of three partitions by the largest replica's tokens -- the
one the replicas already have, the largest differencing method (Karmarkar-Karp) and longest-first
greedy (LPT) -- never worse than where the samples are, and its bins matched to replicas so that the
most tokens stay where they are. `balance_samples` is the collective around it.

Process groups: every rank of a replica (its TP, PP and CP ranks) holds the same samples, the driver's
(`rl.roles.driven`). Megatron's data-parallel group (without CP) joins the ranks at one TP/PP/CP
position across the replicas, and a rank's index in it is its replica's; so each rank exchanges with its
counterparts, all compute the same assignment from the same gathered lengths, and every rank of a
replica ends with the same samples in the same order. At DP=1 nothing runs: the samples come back as
they are, with no metrics.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import torch.distributed as dist

from scope_mega.rl.batch import Sample

Bins = list[list[int]]  # per bin, the indices of its items


def sample_tokens(s: Sample) -> int:
    """The tokens a sample trains on: prompt and response."""
    return len(s.prompt_ids) + len(s.response_ids)


def imbalance(loads: Sequence[int]) -> float:
    """The largest load over the mean one (1.0: even; a step without tokens is even)."""
    total = sum(loads)
    return max(loads) * len(loads) / total if total else 1.0


def bin_loads(lengths: Sequence[int], bins: Bins) -> list[int]:
    return [sum(lengths[i] for i in b) for b in bins]


def _longest_first(lengths: Sequence[int]) -> list[int]:
    return sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))


def lpt(lengths: Sequence[int], k: int) -> Bins:
    """Longest processing time first: each item, longest first, to the bin with the fewest tokens (the
    lowest-numbered among equals). Its largest bin is within 4/3 - 1/(3k) of the optimum (Graham 1969)."""
    heap = [(0, b) for b in range(k)]
    bins: Bins = [[] for _ in range(k)]
    for i in _longest_first(lengths):
        load, b = heapq.heappop(heap)
        bins[b].append(i)
        heapq.heappush(heap, (load + lengths[i], b))
    return bins


def karmarkar_karp(lengths: Sequence[int], k: int) -> Bins:
    """The largest differencing method for k bins (Karmarkar and Karp 1982): every item starts as a
    k-way partition of its own; the two partitions with the largest spread (largest minus smallest bin)
    merge, the heaviest bin of one with the lightest of the other, until one partition is left. Ties
    break by the order the partitions were made in, so the result is deterministic."""
    if not lengths:
        return [[] for _ in range(k)]
    heap = []
    for n, i in enumerate(_longest_first(lengths)):
        heap.append((-lengths[i], n, [(lengths[i], (i,))] + [(0, ())] * (k - 1)))
    heapq.heapify(heap)
    made = len(heap)
    while len(heap) > 1:
        a, b = heapq.heappop(heap)[2], heapq.heappop(heap)[2]
        merged = sorted(
            ((la + lb, ia + ib) for (la, ia), (lb, ib) in zip(a, reversed(b))), key=lambda p: -p[0]
        )
        heapq.heappush(heap, (merged[-1][0] - merged[0][0], made, merged))
        made += 1
    return [list(items) for _, items in heap[0][2]]


def _match_ranks(bins: Bins, lengths: Sequence[int], origin: Sequence[int]) -> Bins:
    """The bins in rank order: greedily, the (bin, rank) pair keeping the most of the rank's own tokens
    where they are goes first (ties: lower bin, then lower rank)."""
    k = len(bins)
    stay = [[0] * k for _ in bins]
    for b, items in enumerate(bins):
        for i in items:
            stay[b][origin[i]] += lengths[i]
    pairs = sorted((-stay[b][r], b, r) for b in range(k) for r in range(k))
    ranked: list[list[int] | None] = [None] * k
    taken: set[int] = set()
    for _, b, r in pairs:
        if ranked[r] is None and b not in taken:
            ranked[r] = bins[b]
            taken.add(b)
    return [sorted(b) for b in ranked if b is not None]


def assign(lengths_per_rank: Sequence[Sequence[int]]) -> list[int]:
    """The rank each sample trains on, for every rank's samples in rank order (`lengths_per_rank[r]`: the
    token counts of rank r's samples): the partition with the smallest largest bin among the present
    one, Karmarkar-Karp's and LPT's (the present one on a tie, so nothing moves for nothing), its bins
    matched to the ranks that keep the most tokens in place."""
    k = len(lengths_per_rank)
    lengths = [n for rank in lengths_per_rank for n in rank]
    origin = [r for r, rank in enumerate(lengths_per_rank) for _ in rank]
    best = [[i for i, r in enumerate(origin) if r == b] for b in range(k)]
    for bins in (karmarkar_karp(lengths, k), lpt(lengths, k)):
        if max(bin_loads(lengths, bins)) < max(bin_loads(lengths, best)):
            best = _match_ranks(bins, lengths, origin)
    target = [0] * len(lengths)
    for r, items in enumerate(best):
        for i in items:
            target[i] = r
    return target


def balance_metrics(lengths_per_rank: Sequence[Sequence[int]], target: Sequence[int]) -> dict[str, float]:
    """Imbalance (max over mean of the ranks' tokens) before and after, and the fraction of samples moved."""
    k = len(lengths_per_rank)
    lengths = [n for rank in lengths_per_rank for n in rank]
    origin = [r for r, rank in enumerate(lengths_per_rank) for _ in rank]
    after = [0] * k
    for n, r in zip(lengths, target):
        after[r] += n
    return {
        "balance/imbalance_before": imbalance([sum(rank) for rank in lengths_per_rank]),
        "balance/imbalance_after": imbalance(after),
        "balance/moved_frac": sum(t != o for t, o in zip(target, origin)) / max(len(lengths), 1),
    }


def _all_gather(obj: object, group) -> list:
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def balance_samples(samples: list[Sample]) -> tuple[list[Sample], dict[str, float]]:
    """This rank's samples after balancing its replica's against the others' (collective over the
    data-parallel group: every rank of every replica calls it with its replica's samples, possibly
    none), in the order of their replicas and their places there; and `balance_metrics`. Two
    exchanges: every replica's token counts, then only the samples that change replica (none: no
    second exchange)."""
    from megatron.core import parallel_state

    group = parallel_state.get_data_parallel_group()
    if dist.get_world_size(group) == 1:
        return samples, {}
    rank = dist.get_rank(group)
    lengths = _all_gather([sample_tokens(s) for s in samples], group)
    target = assign(lengths)
    first = sum(len(x) for x in lengths[:rank])  # the global index of this replica's first sample
    origin = [r for r, rank_lengths in enumerate(lengths) for _ in rank_lengths]
    mine = dict(enumerate(samples, first))
    leaving = {i: s for i, s in mine.items() if target[i] != rank}
    if any(t != o for t, o in zip(target, origin)):
        for box in _all_gather(leaving, group):
            mine.update(box)
    kept = [mine[i] for i in sorted(mine) if target[i] == rank]
    return kept, balance_metrics(lengths, target)
