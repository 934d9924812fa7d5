"""Trajectories to training samples to micro-batches: the RL update's batch contract.

`to_samples` turns the final groups of a step (after SCOPE) into `Sample`s with per-token advantages
(GRPO over each group's final rewards, or PRM-dense ones), on/off-policy flags and the behaviour and
guide logprobs. `to_micro_batches` lays samples out as the `Batch` dicts of [b, s] tensors that
`train_step` and the one policy loss (`rl.loss.policy_loss`, through `rl.update.rl_loss`) read:
`input_ids`, `targets`, `position_ids`, `on_mask`, `off_mask`, `advantages`, `rollout_logprobs`,
`guide_logprobs`, `tokens`, and for THD rows `cu_seqlens` and `seq_index`. Position t of a row
predicts token t+1; every loss input is 0 on the prompt. `micro_batch_layout` picks the layout the
trainer uses (`rl.packing`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from scope_mega.config import RunConfig
from scope_mega.models.context_parallel import split_batch
from scope_mega.models.pipeline import Batch
from scope_mega.rl.advantages import group_advantages, overlong_reward
from scope_mega.rl.packing import cu_seqlens, pack_by_token_budget
from scope_mega.scope.trajectory import Trajectory

SampleKind = Literal["failure", "success", "salvaged"]


@dataclass
class Sample:
    """One training sequence: prompt + response tokens with per-response-token loss inputs."""

    prompt_ids: list[int]
    response_ids: list[int]
    advantages: list[float]
    off_policy: list[bool]
    rollout_logprobs: list[float]  # 0.0 on guide tokens (never sampled by the policy's engine)
    guide_logprobs: list[float] | None = None  # an engine guide's logprobs; 0.0 on the policy's tokens
    in_loss: bool = True  # False: masked out (a cut-off response under rl.overlong=mask)
    kind: SampleKind = "failure"  # the policy's own "failure" or "success", or a "salvaged" trajectory


def final_reward(t: Trajectory, cfg: RunConfig) -> float:
    """The reward a trajectory's advantage sees: the verifier's, plus the overlong penalty if set."""
    if cfg.rl.overlong != "penalty":
        return t.reward
    length, limit = len(t.response_ids), cfg.rollout.max_new_tokens
    return t.reward + overlong_reward(length, limit, cfg.rl.overlong_buffer, cfg.rl.overlong_penalty)


def to_samples(groups: list[list[Trajectory]], cfg: RunConfig, dense: list | None) -> list[Sample]:
    """GRPO advantages over the final groups (or PRM-dense ones), one Sample per trajectory; with
    `scope.baseline="on_policy"` each group is centred on its members that are not salvaged; with
    `scope.salvaged_only_failures="drop"` the policy's failures leave the loss in a group whose only
    successes are salvaged."""
    samples = []
    for g, group in enumerate(groups):
        rewards = torch.tensor([[final_reward(t, cfg) for t in group]])
        own = torch.tensor([[not t.salvaged for t in group]]) if cfg.scope.baseline == "on_policy" else None
        adv = group_advantages(rewards, cfg.advantage, own)[0].tolist()
        drop_failures = (
            cfg.scope.salvaged_only_failures == "drop"
            and any(t.correct and t.salvaged for t in group)
            and not any(t.correct and not t.salvaged for t in group)
        )
        for i, t in enumerate(group):
            per_token = dense[g][i] if dense is not None else [adv[i]] * len(t.response_ids)
            samples.append(
                Sample(
                    prompt_ids=t.prompt_ids,
                    response_ids=t.response_ids,
                    advantages=per_token,
                    off_policy=list(t.off_policy),
                    rollout_logprobs=[0.0 if o else lp for o, lp in zip(t.off_policy, t.rollout_logprobs)],
                    guide_logprobs=None
                    if t.guide_logprobs is None
                    else [lp if o else 0.0 for o, lp in zip(t.off_policy, t.guide_logprobs)],
                    in_loss=not (cfg.rl.overlong == "mask" and t.truncated)
                    and not (drop_failures and not t.correct),
                    kind="salvaged" if t.salvaged else "success" if t.correct else "failure",
                )
            )
    return samples


def no_loss_sample(pad_id: int) -> Sample:
    """A one-token sample outside the loss: the micro-batch of a replica with nothing to train on."""
    return Sample([pad_id], [pad_id], [0.0], [False], [0.0], in_loss=False)


def _sample_tensors(s: Sample, length: int, fill: dict[str, int]) -> Batch:
    """One sample's 1-D tensors over its positions, aligned to targets (position t predicts token t+1),
    padded at the end to `length` positions (`fill`'s value, else 0); the loss inputs are 0 on the
    prompt."""
    toks = torch.tensor(s.prompt_ids + s.response_ids)
    lo = len(s.prompt_ids) - 1  # the target position of the first response token
    per_token = {
        "advantages": s.advantages,
        "off_policy": s.off_policy,
        "rollout_logprobs": s.rollout_logprobs,
    }
    if s.guide_logprobs is not None:
        per_token["guide_logprobs"] = s.guide_logprobs
    for name, values in per_token.items():
        if len(values) != len(s.response_ids):
            raise ValueError(f"a sample has {len(values)} {name} for {len(s.response_ids)} response tokens")
    offp = torch.tensor(s.off_policy, dtype=torch.bool)
    out = {"input_ids": toks[:-1], "targets": toks[1:]}
    response = {
        "on_mask": (~offp).float() * s.in_loss,
        "off_mask": offp.float() * s.in_loss,
        "advantages": torch.tensor(s.advantages),
        "rollout_logprobs": torch.tensor(s.rollout_logprobs),
        "guide_logprobs": torch.tensor(s.guide_logprobs or [0.0] * len(offp)),
    }
    for key, values in response.items():
        out[key] = torch.cat([torch.zeros(lo), values])
    return {key: F.pad(v, (0, length - v.numel()), value=fill.get(key, 0)) for key, v in out.items()}


def to_micro_batches(
    samples: list[Sample],
    micro: int,
    pad_id: int,
    max_tokens: int | None = None,
    thd: bool = False,
    align: int = 1,
    cp: int = 1,
) -> list[Batch]:
    """The samples as micro-batches of [b, s] tensors (`_sample_tensors`), in one of two layouts.

    Padded: `micro` samples each, right-padded to the longest sample of all; or, with `max_tokens`,
    packed by that token budget (`rl.packing.pack_by_token_budget`), each padded to its own longest.
    THD (`thd`, needs `max_tokens`): each micro-batch is one row of its samples end to end, padded to
    a multiple of `align`, with `cu_seqlens` (the samples' boundaries, the padding a segment of its
    own) and `seq_index` (each position's sample within the row) for per-sequence loss aggregation.
    A sample longer than the budget (a long salvaged trajectory) gets a micro-batch of its own.
    `tokens` holds each micro-batch's count of real positions.
    Context parallel (`cp` > 1; `models.context_parallel` splits the result): the budget is per rank,
    so a micro-batch packs `max_tokens` x `cp` tokens; every sequence (THD) or row (padded) is padded
    to a multiple of 2 x `cp`, and `seq_tokens` / `seq_first` carry the per-sequence denominators
    counted on the unsplit sequences (`rl.loss.policy_loss`)."""
    real = [len(s.prompt_ids) + len(s.response_ids) - 1 for s in samples]
    lengths = real if cp == 1 else [-(-n // (2 * cp)) * 2 * cp for n in real]
    max_tokens = None if max_tokens is None else max_tokens * cp
    align = math.lcm(align * cp, 2 * cp) if cp > 1 else align
    if max_tokens is None:
        if thd:
            raise ValueError("the THD layout packs by a token budget: give max_tokens")
        indices = [list(range(i, min(i + micro, len(samples)))) for i in range(0, len(samples), micro)]
    else:
        # a THD row's rounding up to `align` stays within a budget that is a multiple of it
        budget = max_tokens // align * align if thd else max_tokens
        indices = pack_by_token_budget(lengths, max(budget, *lengths), thd=thd)
    fill = {"input_ids": pad_id, "targets": pad_id}
    batches = []
    for idx in indices:
        rows = [_sample_tensors(samples[i], lengths[i], fill) for i in idx]
        if thd:
            bounds, pad = cu_seqlens([lengths[i] for i in idx], align)
            tail = {key: value.new_full((pad,), fill.get(key, 0)) for key, value in rows[0].items()}
            batch = {key: torch.cat([*(r[key] for r in rows), tail[key]])[None] for key in tail}
            batch["position_ids"] = torch.cat([torch.arange(b - a) for a, b in zip(bounds, bounds[1:])])[None]
            batch["cu_seqlens"] = torch.tensor(bounds, dtype=torch.int32)
            batch["seq_index"] = torch.repeat_interleave(
                torch.arange(len(bounds) - 1), torch.tensor(bounds).diff()
            )[None]
        else:
            seq = max(lengths) if max_tokens is None else max(lengths[i] for i in idx)
            batch = {
                key: torch.stack(
                    [F.pad(r[key], (0, seq - r[key].numel()), value=fill.get(key, 0)) for r in rows]
                )
                for key in rows[0]
            }
            batch["position_ids"] = torch.arange(seq).expand(len(rows), seq)
        batch["tokens"] = torch.tensor(sum(real[i] for i in idx))
        if cp > 1:
            batch.update(_sequence_denominators(batch))
        batches.append(batch)
    return batches


def _sequence_denominators(batch: Batch) -> Batch:
    """`seq_tokens`: each position's sequence's response-token count; `seq_first`: 1 at the first
    response token of each sequence. Counted here, on the unsplit batch, they let every CP rank
    aggregate per sequence over the part of it that it holds."""
    resp = (batch["on_mask"] + batch["off_mask"]) > 0
    seq = batch.get("seq_index", torch.arange(resp.shape[0])[:, None].expand_as(resp))
    counts = torch.zeros(int(seq.max()) + 1).index_add(0, seq.flatten(), resp.flatten().float())
    where = resp.flatten().nonzero().flatten()
    ids = seq.flatten()[where]
    starts = torch.ones_like(ids, dtype=torch.bool)  # a sequence's positions are contiguous
    starts[1:] = ids[1:] != ids[:-1]
    first = torch.zeros(resp.numel())
    first[where[starts]] = 1.0
    return {"seq_tokens": counts[seq], "seq_first": first.view_as(resp)}


@dataclass(frozen=True)
class MicroBatchLayout:
    """How a step's samples become micro-batches (`to_micro_batches`' layout arguments)."""

    micro: int  # samples per padded micro-batch without a token budget
    max_tokens: int | None  # rl.max_tokens_per_micro_batch
    thd: bool  # one row of samples end to end, with cu_seqlens
    align: int  # a THD row's length (per CP rank) is a multiple of this
    cp: int = 1  # parallel.cp: each sequence split over this many ranks
    cp_rank: int = 0  # this rank's place in its CP group


def micro_batch_layout(cfg: RunConfig, transformer_impl: str, cp_rank: int = 0) -> MicroBatchLayout:
    """`rl.packing` resolved for the model's layer spec ("auto": THD on Transformer Engine, padded rows
    elsewhere); a THD row is a multiple of 16 tokens for FP8 GEMMs and of TP under sequence
    parallelism, which splits it over the TP ranks; `cp_rank`: this rank's part of each sequence."""
    packing = cfg.rl.packing if cfg.rl.packing != "auto" else "thd" if transformer_impl == "te" else "padded"
    align = math.lcm(
        16 if cfg.model.fp8.enabled else 1, cfg.parallel.tp if cfg.parallel.sequence_parallel else 1
    )
    budget = cfg.rl.max_tokens_per_micro_batch
    thd = packing == "thd" and budget is not None
    return MicroBatchLayout(cfg.rl.micro_batch_size, budget, thd, align, cfg.parallel.cp, cp_rank)


def rank_micro_batches(samples: list[Sample], layout: MicroBatchLayout, pad_id: int) -> list[Batch]:
    """This rank's micro-batches of a replica's samples: `to_micro_batches` in `layout`, each split
    for this rank's part of its sequences under context parallelism."""
    micro = to_micro_batches(
        samples, layout.micro, pad_id, layout.max_tokens, layout.thd, layout.align, layout.cp
    )
    return [split_batch(mb, layout.cp, layout.cp_rank) for mb in micro]
