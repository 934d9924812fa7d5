"""SCOPE rectification and the LUFFY-style baseline: failed rollouts in, groups with salvaged
trajectories out (docs/design.md section 3, step 3).

SCOPE: every failed rollout is split into steps and scored by the PRM; k* = first step below
`prm_threshold`. Candidates have k* >= `min_prefix_steps` (no error found, or k* = 0, is never
salvageable). Per group at most `max_rectified_per_group` candidates are chosen, longest correct
prefix (k*) first, ties to the lower index; only those go to the guide, in one batched call (a
rejected guide result is not retried with the next candidate: the guide cost stays bounded). The guide
continues question + prefix; the result is verified and kept only if correct (`require_correct`).

LUFFY-style: the guide solves from scratch (empty prefix, whole response off-policy) for the first
failed rollouts of each group, under the same per-group budget and verification.

Salvaged trajectories keep the rollout's prefix tokens bit for bit (cut at the token boundary of step
k*, never re-tokenised; on-policy, with their rollout logprobs) followed by the guide's tokens
(off-policy). They replace their failed rollout (`mode="replace"`, group size unchanged) or are
appended to the group (`mode="append"`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from scope_mega.rewards.base import Verifier, VerifyResult
from scope_mega.scope.config import ScopeConfig
from scope_mega.scope.guides import Guide, GuideOutput, GuideRequest
from scope_mega.scope.prm import PRM, first_error_step, score_responses
from scope_mega.scope.steps import StepSpan, TokenizerLike
from scope_mega.scope.trajectory import PromptInfo, Trajectory


@dataclass
class ScopeStats:
    """Counts of one rectification pass (see `metrics.scope_metrics`).

    failed: rollouts the verifier rejected; no_error: scored failed rollouts with no step below the
    threshold; first_errors: k* of every scored failed rollout with an error (0 included);
    candidates: failed rollouts eligible for rectification; selected: those sent to the guide;
    guide_none: the guide could not continue; rejected: guided results dropped as incorrect;
    salvaged: trajectories put into groups; prefix_fractions: prefix tokens / response tokens of each;
    capped: salvaged trajectories undone by `scope.max_off_policy_share` (`cap_off_policy`).
    """

    failed: int = 0
    no_error: int = 0
    first_errors: list[int] = field(default_factory=list)
    candidates: int = 0
    selected: int = 0
    guide_none: int = 0
    rejected: int = 0
    salvaged: int = 0
    prefix_fractions: list[float] = field(default_factory=list)
    capped: int = 0


def select_candidates(
    first_errors: Sequence[int | None], correct: Sequence[bool], min_prefix_steps: int, budget: int
) -> list[int]:
    """Indices (within a group) to rectify: failed, k* >= min_prefix_steps (and >= 1), at most
    `budget`, longest prefix first, ties to the lower index."""
    floor = max(1, min_prefix_steps)
    eligible = [
        i for i, (k, ok) in enumerate(zip(first_errors, correct)) if not ok and k is not None and k >= floor
    ]
    return sorted(eligible, key=lambda i: (-first_errors[i], i))[:budget]


def assemble_salvaged(
    rollout: Trajectory,
    request: GuideRequest,
    output: GuideOutput,
    verdict: VerifyResult,
    tokenizer: TokenizerLike,
) -> Trajectory:
    """`request.prefix_ids` (the rollout's own first tokens: on-policy, rollout logprobs kept) + the
    guide's tokens (off-policy; its token ids, or `output.text` tokenised with EOS appended)."""
    n_prefix = len(request.prefix_ids)
    if rollout.response_ids[:n_prefix] != request.prefix_ids:
        raise ValueError("the request's prefix is not the rollout's own tokens")
    if output.token_ids is not None:
        guide_ids = list(output.token_ids)
    else:
        guide_ids = tokenizer.encode(output.text) + [tokenizer.eos_id]
    nan = [math.nan]
    return dataclasses.replace(
        rollout,
        response_ids=request.prefix_ids + guide_ids,
        rollout_logprobs=rollout.rollout_logprobs[:n_prefix] + nan * len(guide_ids),
        response_text=request.prefix_text + output.text,
        reward=verdict.reward,
        correct=verdict.correct,
        off_policy=[False] * n_prefix + [True] * len(guide_ids),
        guide_logprobs=None if output.logprobs is None else nan * n_prefix + list(output.logprobs),
        answer=verdict.extracted,
        prefix_steps=request.prefix_steps,
        salvaged=True,
    )


@dataclass(frozen=True)
class _Job:
    group: int
    index: int
    request: GuideRequest


def _job(g: int, i: int, prompt: PromptInfo, rollout: Trajectory, k: int, step: StepSpan | None) -> _Job:
    """Guide request for rollout (g, i) cut before step `step` (k* = k); None: from scratch."""
    cut, char_cut, clean = (step.token_start, step.token_char_start, step.start) if step else (0, 0, 0)
    request = GuideRequest(
        question=prompt.question,
        reference_solution=prompt.reference_solution,
        prompt_ids=list(rollout.prompt_ids),
        prefix_ids=rollout.response_ids[:cut],
        prefix_text=rollout.response_text[:char_cut],
        pending_text=rollout.response_text[char_cut:clean],
        prefix_steps=k,
    )
    return _Job(g, i, request)


def _scope_jobs(
    groups: Sequence[Sequence[Trajectory]],
    prompts: Sequence[PromptInfo],
    cfg: ScopeConfig,
    prm: PRM,
    tokenizer: TokenizerLike,
    out: list[list[Trajectory]],
    stats: ScopeStats,
) -> list[_Job]:
    """Score failed rollouts, record k* in `out` and `stats`, and pick each group's candidates."""
    failed = [(g, i) for g, group in enumerate(groups) for i, t in enumerate(group) if not t.correct]
    steps, scores = score_responses(
        [groups[g][i] for g, i in failed],
        [prompts[g].question for g, _ in failed],
        prm,
        tokenizer,
        cfg.step_delimiter,
    )
    located: dict[tuple[int, int], tuple[int | None, list[StepSpan]]] = {}
    for (g, i), spans, sc in zip(failed, steps, scores):
        k = first_error_step(sc, cfg.prm_threshold)
        located[g, i] = (k, spans)
        out[g][i] = dataclasses.replace(out[g][i], first_error_step=k)
        if k is None:
            stats.no_error += 1
        else:
            stats.first_errors.append(k)
    jobs = []
    for g, group in enumerate(groups):
        first_errors = [located[g, i][0] if (g, i) in located else None for i in range(len(group))]
        stats.candidates += sum(k is not None and k >= cfg.min_prefix_steps for k in first_errors)
        correct = [t.correct for t in group]
        for i in select_candidates(first_errors, correct, cfg.min_prefix_steps, cfg.max_rectified_per_group):
            k, spans = located[g, i]
            jobs.append(_job(g, i, prompts[g], group[i], k, spans[k]))
    return jobs


def _luffy_jobs(
    groups: Sequence[Sequence[Trajectory]], prompts: Sequence[PromptInfo], cfg: ScopeConfig, stats: ScopeStats
) -> list[_Job]:
    """The first `max_rectified_per_group` failed rollouts of each group, to be solved from scratch."""
    jobs = []
    for g, group in enumerate(groups):
        failed = [i for i, t in enumerate(group) if not t.correct]
        stats.candidates += len(failed)
        jobs += [_job(g, i, prompts[g], group[i], 0, None) for i in failed[: cfg.max_rectified_per_group]]
    return jobs


def rectify_groups(
    groups: Sequence[Sequence[Trajectory]],
    prompts: Sequence[PromptInfo],
    cfg: ScopeConfig,
    *,
    tokenizer: TokenizerLike,
    verifier: Verifier,
    guide: Guide,
    prm: PRM | None = None,
) -> tuple[list[list[Trajectory]], ScopeStats]:
    """Run `cfg.active_method` ("scope" or "luffy"; other methods return the groups unchanged) on
    verified rollout groups; `prompts[g]` describes group g. Inputs are not modified: scored failed
    rollouts come back as copies carrying `first_error_step`. `prm` is needed for "scope"."""
    if len(groups) != len(prompts):
        raise ValueError(f"{len(groups)} groups but {len(prompts)} prompts")
    out = [list(group) for group in groups]
    stats = ScopeStats(failed=sum(not t.correct for group in groups for t in group))
    method = cfg.active_method
    if method == "scope":
        if prm is None:
            raise ValueError("method 'scope' needs a PRM")
        jobs = _scope_jobs(groups, prompts, cfg, prm, tokenizer, out, stats)
    elif method == "luffy":
        jobs = _luffy_jobs(groups, prompts, cfg, stats)
    else:
        return out, stats
    stats.selected = len(jobs)

    outputs = guide.continue_batch([j.request for j in jobs])
    if len(outputs) != len(jobs):
        raise ValueError(f"guide returned {len(outputs)} outputs for {len(jobs)} requests")
    guided = [(j, o) for j, o in zip(jobs, outputs) if o is not None]
    stats.guide_none = len(jobs) - len(guided)
    verdicts = verifier.verify_batch(
        [j.request.prefix_text + o.text for j, o in guided], [prompts[j.group].reference for j, _ in guided]
    )
    for (job, output), verdict in zip(guided, verdicts):
        if cfg.require_correct and not verdict.correct:
            stats.rejected += 1
            continue
        salvaged = assemble_salvaged(out[job.group][job.index], job.request, output, verdict, tokenizer)
        stats.salvaged += 1
        stats.prefix_fractions.append(len(job.request.prefix_ids) / max(1, len(salvaged.response_ids)))
        if cfg.mode == "replace":
            out[job.group][job.index] = salvaged
        else:
            out[job.group].append(salvaged)
    return out, stats


def cap_off_policy(
    final: Sequence[Sequence[Trajectory]], sampled: Sequence[Sequence[Trajectory]], cap: float
) -> tuple[list[list[Trajectory]], int]:
    """Undo salvaged trajectories until guide tokens are at most `cap` of the response tokens of
    `final` (`scope.max_off_policy_share`): the one with the largest guide share first (ties to the
    earlier group and member). Undoing puts the sampled rollout back at its place in the group
    (`sampled[g][i]`, mode "replace") or removes the appended member (past the sampled group's end).
    Returns the groups and how many were undone."""
    out: list[list[Trajectory | None]] = [list(group) for group in final]
    kept = [t for group in final for t in group]
    off, total = sum(sum(t.off_policy) for t in kept), sum(len(t.response_ids) for t in kept)

    def share(t: Trajectory) -> float:
        return sum(t.off_policy) / len(t.response_ids)

    salvaged = [(g, i) for g, group in enumerate(final) for i, t in enumerate(group) if t.salvaged]
    undone = 0
    for g, i in sorted(salvaged, key=lambda gi: (-share(final[gi[0]][gi[1]]), gi)):
        if off <= cap * total:
            break
        t = final[g][i]
        back = sampled[g][i] if i < len(sampled[g]) else None  # None: an appended member, removed
        out[g][i] = back
        off -= sum(t.off_policy)
        total += (len(back.response_ids) if back is not None else 0) - len(t.response_ids)
        undone += 1
    return [[t for t in group if t is not None] for group in out], undone
