"""The unit the trainer passes around: one response of a group, with per-token origin and logprobs."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class PromptInfo:
    """What SCOPE needs to know about a group's prompt besides its token ids.

    question: the text the PRM and the oracle guide read (for Countdown: `Problem.prompt()`).
    reference: what the verifier checks a response against.
    reference_solution: a worked solution, for the `reference` guide only.
    """

    question: str
    reference: str
    reference_solution: str | None = None


@dataclass
class Trajectory:
    """One response in a group. Per-token lists are aligned with `response_ids`.

    rollout_logprobs: the rollout engine's logprob of each response token; NaN on guide tokens (the
        policy's engine never sampled them).
    off_policy: True on guide tokens; empty on input means "all on-policy" (a plain rollout).
    guide_logprobs: the guide's logprob of each token (NaN on prefix tokens), only when the guide is an
        engine; needed by the "clip" off-policy loss.
    answer: the final answer the verifier extracted (None if none).
    first_error_step: k* located by the PRM (None: not scored, or no error found).
    prefix_steps: how many of the rollout's steps a salvaged trajectory kept (0 for LUFFY-style).
    salvaged: built by rectification (SCOPE or LUFFY): it carries guide tokens.
    truncated: the generation limit cut the rollout off (a salvaged trajectory is not marked).
    """

    prompt_ids: list[int]
    response_ids: list[int]
    rollout_logprobs: list[float]
    response_text: str
    reward: float
    correct: bool
    group_id: int
    off_policy: list[bool] = field(default_factory=list)
    guide_logprobs: list[float] | None = None
    answer: str | None = None
    first_error_step: int | None = None
    prefix_steps: int | None = None
    salvaged: bool = False
    truncated: bool = False

    def __post_init__(self) -> None:
        n = len(self.response_ids)
        if not self.off_policy:
            self.off_policy = [False] * n
        for name in ("rollout_logprobs", "off_policy", "guide_logprobs"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"{name} has {len(value)} entries for {n} response tokens")

    @property
    def on_policy(self) -> list[bool]:
        """True on the policy's own response tokens (a salvaged trajectory's kept prefix)."""
        return [not x for x in self.off_policy]
