"""SCOPE options (docs/design.md section 4): every choice the paper's abstract leaves open, with our default.

Off-policy loss choices (shaping vs clipped ratio, gamma) live in `rl.loss.PolicyLossConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from scope_mega.ranges import Checked, between, ge

Method = Literal["scope", "luffy", "prm_dense", "none"]
GuideKind = Literal["engine", "oracle", "reference"]
Mode = Literal["replace", "append"]
Baseline = Literal["group", "on_policy"]
Unanchored = Literal["train", "drop"]
GuardMode = Literal["off", "log", "pause"]


@dataclass
class ScopeConfig(Checked):
    """How failed rollouts are rectified.

    enabled: False is plain GRPO whatever `method` says.
    method: "scope" (PRM first error + guide continues the correct prefix), "luffy" (guide solves from
        scratch, whole response off-policy), "prm_dense" (no rectification: PRM step scores become dense
        token advantages, see `scope.dense`), "none" (plain GRPO).
    step_delimiter: steps are the pieces of the response text split on it ("\\n" for Countdown).
    prm_threshold: first error k* = first step whose PRM score is below it.
    min_prefix_steps: a failed rollout is a candidate only if k* >= this (k* = 0 never is).
    max_rectified_per_group: at most this many candidates per group go to the guide (longest prefix first).
    guide: "engine" (a teacher served by a rollout engine), "oracle" (the task's programmatic solver),
        "reference" (the dataset's reference solution spliced in step-aligned; weakest).
    require_correct: keep a guided trajectory only if the verifier accepts it.
    mode: the salvaged trajectory "replace"s the failed rollout in its group, or is "append"ed to it.
    dense_coef: weight of the PRM return-to-go in `method="prm_dense"` advantages.
    baseline: the group mean that advantages are centred on: "on_policy" (the default: only the
        members that are not salvaged, so a salvaged success does not push the policy's own failures
        below zero; `rl.advantages.group_advantages`) or "group" (every final member, GRPO's, the
        default before issue 29). The scale is the whole group's std either way.
    salvaged_only_failures: the policy's failures in a group whose only successes are salvaged:
        "train" them (pushed down by the salvaged success's advantage) or "drop" them from the loss
        and its token count, so such a group trains on its salvaged trajectories alone and does not
        dilute the groups where the policy succeeded on its own.
    max_off_policy_share: at most this share of a sampling round's response tokens may be guide
        tokens; past it, the salvaged trajectories with the largest guide share are undone (the failed
        rollout is put back, or an appended one removed). 1.0: no cap.
    guard: watch the policy's own rollout accuracy while rectification is on (`scope.guard`): "off",
        "log" (the `guard/*` metrics only) or "pause" (also pause rectification for
        `guard_pause_steps` steps when the accuracy fell by `guard_drop`).
    guard_window: steps in the moving mean of the rollout accuracy that the guard compares.
    guard_drop: relative fall of that mean below its best (since the window first filled) that trips it.
    guard_pause_steps: steps without rectification after a trip ("pause").
    """

    enabled: bool = True
    method: Method = "scope"
    step_delimiter: str = "\n\n"
    prm_threshold: float = field(default=0.5, metadata=between(0, 1, lo_open=True))
    min_prefix_steps: int = field(default=1, metadata=ge(1))  # k* = 0 is never salvageable
    max_rectified_per_group: int = field(default=1, metadata=ge(1))
    guide: GuideKind = "engine"
    require_correct: bool = True
    mode: Mode = "replace"
    dense_coef: float = field(default=1.0, metadata=ge(0))
    baseline: Baseline = "on_policy"  # docs/results.md, "SCOPE on a weak policy"
    salvaged_only_failures: Unanchored = "train"
    max_off_policy_share: float = field(default=1.0, metadata=between(0, 1))
    guard: GuardMode = "log"
    guard_window: int = field(default=10, metadata=ge(1))
    guard_drop: float = field(default=0.3, metadata=between(0, 1, lo_open=True, hi_open=True))
    guard_pause_steps: int = field(default=20, metadata=ge(1))

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, value, allowed in (
            ("method", self.method, get_args(Method)),
            ("guide", self.guide, get_args(GuideKind)),
            ("mode", self.mode, get_args(Mode)),
            ("baseline", self.baseline, get_args(Baseline)),
            ("salvaged_only_failures", self.salvaged_only_failures, get_args(Unanchored)),
            ("guard", self.guard, get_args(GuardMode)),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if not self.step_delimiter:
            raise ValueError("step_delimiter must be a non-empty string")

    @property
    def active_method(self) -> Method:
        """The method actually run: "none" when SCOPE is disabled."""
        return self.method if self.enabled else "none"
