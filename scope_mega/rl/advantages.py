"""Group-relative advantages (GRPO, Dr.GRPO): the one place the advantage formula lives.

Rollouts are laid out group-major: row ``b`` of a flattened batch is member ``b % group_size`` of
prompt group ``b // group_size``. ``group_advantages`` works on ``[num_groups, group_size]``;
``token_advantages`` broadcasts the flattened ``[B]`` sequence advantages over response tokens.

Dr.GRPO ("Understanding R1-Zero-Like Training", Liu et al. 2025) removes two biases of GRPO: the
per-group std division (here: ``estimator="dr_grpo"``) and the per-sequence length normalisation
(in the loss: ``PolicyLossConfig(aggregation="seq_sum_constant", max_len=<generation max tokens>)``,
which divides the token sum by a constant instead of each response's length). The two halves live
in different configs because the loss does not know about groups; use them together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
from torch import Tensor

from scope_mega.ranges import Checked, ge

Estimator = Literal["grpo", "dr_grpo"]


@dataclass
class AdvantageConfig(Checked):
    """How group rewards become advantages.

    estimator: "grpo" -> (r - mean) / (std + eps) (or mean-centred only when ``std_scale=False``);
        "dr_grpo" -> mean-centred, never std-scaled (``std_scale`` is not consulted).
    std_scale: divide by the group's std (GRPO only).
    eps: added to the std so that near-constant groups do not blow up.
    """

    estimator: Estimator = "grpo"
    std_scale: bool = True
    eps: float = field(default=1e-6, metadata=ge(0))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.estimator not in get_args(Estimator):
            raise ValueError(f"estimator must be one of {get_args(Estimator)}, got {self.estimator!r}")


def group_advantages(rewards: Tensor, cfg: AdvantageConfig, baseline: Tensor | None = None) -> Tensor:
    """Advantages ``[num_groups, group_size]`` from rewards of the same shape.

    ``baseline`` (bool, the same shape): the members whose mean reward centres their group (SCOPE's
    ``scope.baseline="on_policy"`` leaves salvaged trajectories out of it); None or a group with none
    marked: every member. The std (when scaling) is always the whole group's.

    The std is the population (biased, ``correction=0``) std of the group. The group is the whole
    population being normalised, not a sample of a larger one, so the biased std makes each
    std-scaled group have unit variance exactly, and a group of size 1 gives 0 instead of NaN.
    (TRL/verl use ``torch.std``, the unbiased one: their advantages are ours times
    ``sqrt((G-1)/G)``, e.g. 0.935 for G=8; the difference is a constant learning-rate factor.)

    A group whose rewards are all equal carries no learning signal and gets advantages of exactly 0
    (set explicitly, so float rounding of the mean cannot leak a tiny nonzero value).
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [num_groups, group_size], got shape {tuple(rewards.shape)}")
    if not rewards.is_floating_point():
        rewards = rewards.float()
    constant = rewards.amax(dim=1, keepdim=True) == rewards.amin(dim=1, keepdim=True)
    mean = rewards.mean(dim=1, keepdim=True)
    if baseline is not None:
        if baseline.shape != rewards.shape:
            raise ValueError(f"baseline has shape {tuple(baseline.shape)}, rewards {tuple(rewards.shape)}")
        marked = baseline.float().sum(dim=1, keepdim=True)
        own = (rewards * baseline).sum(dim=1, keepdim=True) / marked.clamp(min=1)
        mean = torch.where(marked > 0, own, mean)
    centred = torch.where(constant, 0.0, rewards - mean)
    if cfg.estimator == "grpo" and cfg.std_scale:
        std = torch.where(constant, 1.0, rewards.std(dim=1, keepdim=True, correction=0))
        return centred / (std + cfg.eps)
    return centred


def token_advantages(advantages: Tensor, response_mask: Tensor) -> Tensor:
    """Broadcast per-sequence advantages over response tokens: ``[B, S]``, 0 outside the mask.

    ``advantages`` may be ``[B]`` or ``[num_groups, group_size]`` (flattened group-major);
    ``response_mask`` is ``[B, S]`` (bool or 0/1), True on every response token, on- or off-policy.
    """
    flat = advantages.reshape(-1)
    if response_mask.dim() != 2 or flat.numel() != response_mask.shape[0]:
        raise ValueError(
            f"{flat.numel()} advantages do not match response_mask of shape {tuple(response_mask.shape)}"
        )
    return torch.where(response_mask.bool(), flat[:, None], 0.0)


def overlong_reward(length: int, max_new_tokens: int, buffer: int, penalty: float) -> float:
    """DAPO's soft overlong punishment, added to a response's reward before its group's advantages: 0 up
    to `max_new_tokens - buffer` tokens, then falling linearly to `-penalty` at `max_new_tokens`."""
    return min(0.0, -(length - (max_new_tokens - buffer)) / buffer * penalty)
