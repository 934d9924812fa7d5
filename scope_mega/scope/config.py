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

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, value, allowed in (
            ("method", self.method, get_args(Method)),
            ("guide", self.guide, get_args(GuideKind)),
            ("mode", self.mode, get_args(Mode)),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if not self.step_delimiter:
            raise ValueError("step_delimiter must be a non-empty string")

    @property
    def active_method(self) -> Method:
        """The method actually run: "none" when SCOPE is disabled."""
        return self.method if self.enabled else "none"
