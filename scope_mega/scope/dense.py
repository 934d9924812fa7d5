"""PRM-as-dense-reward baseline (`method="prm_dense"`): PRM step scores become per-token advantages.

Definition (process-supervised GRPO of DeepSeekMath, Shao et al. 2024, section 4.1.3, added to the
outcome advantage as in PRIME's combined outcome + process advantage):
- outcome: A_i = `group_advantages` of the group's outcome rewards (the one GRPO formula);
- process: every step score s_ij of every response in the group is normalised as one population,
  r_ij = `group_advantages` of the group's pooled step scores (same estimator: (s - mean) / (std + eps)
  for GRPO, s - mean for Dr.GRPO; 0 when all equal);
- token t of response i, in step j(t): A_it = A_i + dense_coef * sum_{j' >= j(t)} r_ij' (the return
  to go of the normalised step rewards). Tokens outside every step (a response with no steps) get A_i.
The result is a per-token advantage `policy_loss` consumes directly (all tokens on-policy). A
response's early steps accumulate the rewards of all its later steps, so long chains of steps the PRM
likes are rewarded whatever the outcome (the known reward-hacking risk of dense PRM rewards).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from scope_mega.rl.advantages import AdvantageConfig, group_advantages
from scope_mega.scope.prm import PRM, score_responses
from scope_mega.scope.steps import TokenizerLike
from scope_mega.scope.trajectory import PromptInfo, Trajectory


def _normalised(values: Sequence[float], cfg: AdvantageConfig) -> list[float]:
    """One population through `group_advantages` (a single group of any size)."""
    if not values:
        return []
    return group_advantages(torch.tensor([list(values)], dtype=torch.float32), cfg)[0].tolist()


def outcome_advantages(groups: Sequence[Sequence[Trajectory]], cfg: AdvantageConfig) -> list[list[float]]:
    """Per-sequence GRPO advantages of groups of any (possibly unequal, `mode="append"`) sizes."""
    return [_normalised([t.reward for t in group], cfg) for group in groups]


def dense_token_advantages(
    rewards: Sequence[float],
    step_scores: Sequence[Sequence[float]],
    step_token_spans: Sequence[Sequence[tuple[int, int]]],
    num_tokens: Sequence[int],
    cfg: AdvantageConfig,
    dense_coef: float,
) -> list[list[float]]:
    """Per-response-token advantages of one group (see the module docstring). Response i has
    `num_tokens[i]` tokens and steps with PRM scores `step_scores[i]` over token spans
    `step_token_spans[i]` (`[start, end)`)."""
    outcome = _normalised(rewards, cfg)
    process = _normalised([s for scores in step_scores for s in scores], cfg)
    out, pos = [], 0
    for i, (scores, spans) in enumerate(zip(step_scores, step_token_spans, strict=True)):
        r = process[pos : pos + len(scores)]
        pos += len(scores)
        to_go = [sum(r[j:]) for j in range(len(r))]
        adv = [outcome[i]] * num_tokens[i]
        for j, (a, b) in enumerate(spans):
            for t in range(a, b):
                adv[t] += dense_coef * to_go[j]
        out.append(adv)
    return out


def prm_dense_advantages(
    groups: Sequence[Sequence[Trajectory]],
    prompts: Sequence[PromptInfo],
    prm: PRM,
    tokenizer: TokenizerLike,
    delimiter: str,
    cfg: AdvantageConfig,
    dense_coef: float,
) -> list[list[list[float]]]:
    """`[group][member][response token]` advantages: every response segmented with `delimiter` and
    scored in one PRM batch, then `dense_token_advantages` per group."""
    if len(groups) != len(prompts):
        raise ValueError(f"{len(groups)} groups but {len(prompts)} prompts")
    flat = [t for group in groups for t in group]
    questions = [prompts[g].question for g, group in enumerate(groups) for _ in group]
    steps, scores = score_responses(flat, questions, prm, tokenizer, delimiter)
    out, pos = [], 0
    for group in groups:
        sl = slice(pos, pos + len(group))
        pos += len(group)
        out.append(
            dense_token_advantages(
                [t.reward for t in group],
                scores[sl],
                [[(s.token_start, s.token_end) for s in spans] for spans in steps[sl]],
                [len(t.response_ids) for t in group],
                cfg,
                dense_coef,
            )
        )
    return out
