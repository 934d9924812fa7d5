"""What an RL update is made of: the parts of a step's batch and their share of the gradient.

A response token belongs to one part: a "failure" or a "success" of the policy's own rollouts, the
kept "prefix" of a salvaged trajectory (on-policy) or its "guide" suffix (off-policy).
`batch_mix` counts each part's tokens and advantage mass (the signed sum of its tokens' advantages
over all response tokens: its weight in the token-mean loss) and classifies the step's groups.
`gradient_parts` measures each part's gradient at the pre-update weights: the batch's policy-gradient
loss with the advantages of every other part set to 0, so that part's tokens alone move the weights
(a token's loss is linear in its own advantage, and the normaliser is unchanged), hence the parts'
gradients sum to the whole batch's. Cosines come from norms of sums:
cos(a, b) = (|a + b|^2 - |a|^2 - |b|^2) / (2 |a| |b|), so every figure is a norm that Megatron's
optimizer computes over the model-parallel ranks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial

from scope_mega.rl.batch import MicroBatchLayout, Sample, rank_micro_batches
from scope_mega.rl.loss import PolicyLossConfig
from scope_mega.rl.update import rl_loss
from scope_mega.scope.trajectory import Trajectory
from scope_mega.train_step import TrainState, backward_grad_norm

PARTS = ("failure", "success", "prefix", "guide")
# the part sets whose gradient norms `gradient_parts` measures
_NORMS = {
    "failure": ("failure",),
    "success": ("success",),
    "prefix": ("prefix",),
    "guide": ("guide",),
    "salvaged": ("prefix", "guide"),
    "failure+salvaged": ("failure", "prefix", "guide"),
    "all": PARTS,
}


def token_parts(s: Sample) -> list[str]:
    """The part of each response token of `s`."""
    if s.kind != "salvaged":
        return [s.kind] * len(s.response_ids)
    return ["guide" if off else "prefix" for off in s.off_policy]


def batch_mix(groups: Sequence[Sequence[Trajectory]], samples: Sequence[Sample]) -> dict[str, float]:
    """`mix/*` metrics of a step's final groups and their samples: per part, `tokens/<part>` and
    `adv_mass/<part>` (sum of its loss tokens' advantages / all loss tokens); per group kind, the
    count of groups whose successes are the policy's own only (`groups/own`), salvaged only
    (`groups/salvaged_only`) or both (`groups/both`). The trainer logs one replica's figures, averaged
    over the data-parallel replicas (weighted by their groups)."""
    tokens = dict.fromkeys(PARTS, 0)
    mass = dict.fromkeys(PARTS, 0.0)
    for s in samples:
        if not s.in_loss:
            continue
        for part, adv in zip(token_parts(s), s.advantages):
            tokens[part] += 1
            mass[part] += adv
    total = max(1, sum(tokens.values()))
    out = {f"mix/tokens/{p}": float(n) for p, n in tokens.items()}
    out |= {f"mix/adv_mass/{p}": m / total for p, m in mass.items()}
    kinds = {"own": 0, "salvaged_only": 0, "both": 0}
    for group in groups:
        own = any(t.correct and not t.salvaged for t in group)
        salvaged = any(t.correct and t.salvaged for t in group)
        if own or salvaged:
            kinds["both" if own and salvaged else "own" if own else "salvaged_only"] += 1
    return out | {f"mix/groups/{k}": float(n) for k, n in kinds.items()}


def only_parts(s: Sample, keep: Sequence[str]) -> Sample:
    """`s` with the advantage of every token outside the parts `keep` set to 0."""
    adv = [a if p in keep else 0.0 for a, p in zip(s.advantages, token_parts(s))]
    return dataclasses.replace(s, advantages=adv)


def gradient_parts(
    state: TrainState,
    samples: Sequence[Sample],
    layout: MicroBatchLayout,
    pad_id: int,
    loss: PolicyLossConfig,
) -> dict[str, float]:
    """`grad/<name>`: the gradient norm of each part set of `_NORMS` at the current weights (the loss
    with old = current logprobs, its policy-gradient term alone: no KL, no entropy bonus), and
    `grad/cos_failure_salvaged`, the cosine between the failures' and the salvaged trajectories'
    gradients. Leaves the gradient buffers zeroed; no optimizer step."""
    pg = dataclasses.replace(loss, kl_coef=0.0, entropy_coef=0.0)
    norms = {}
    for name, keep in _NORMS.items():
        micro = rank_micro_batches([only_parts(s, keep) for s in samples], layout, pad_id)
        norms[name] = backward_grad_norm(state, micro, partial(rl_loss, pg))
    out = {f"grad/{name}": n for name, n in norms.items()}
    f, v, both = norms["failure"], norms["salvaged"], norms["failure+salvaged"]
    if f > 0 and v > 0:
        out["grad/cos_failure_salvaged"] = (both**2 - f**2 - v**2) / (2 * f * v)
    return out
