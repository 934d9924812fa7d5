"""The toy task's exact outcome checker behind the common `Verifier` interface.

The reference is the problem's prompt text (`Problem.prompt()`): it carries the numbers, the target
and, through `ops`, the allowed operations, so SCOPE and the trainer verify Countdown responses the
same way they verify math answers.
"""

from __future__ import annotations

from scope_mega.data import countdown
from scope_mega.rewards.base import RewardConfig, Verifier, VerifyResult, make_result


class CountdownVerifier(Verifier):
    """Correct iff every step is valid and the answer line states the target (`countdown.is_correct`)."""

    def __init__(self, ops: tuple[str, ...] = countdown.DEFAULT_OPS, reward: RewardConfig | None = None):
        self.ops = tuple(ops)
        self.reward = reward or RewardConfig()

    def verify(self, response_text: str, reference: str) -> VerifyResult:
        problem = countdown.parse_prompt(reference, self.ops)
        if problem is None:
            raise ValueError(f"CountdownVerifier: reference is not a Countdown prompt: {reference!r}")
        lines = countdown.split_steps(response_text)
        answer = countdown.parse_answer(lines[-1]) if lines else None
        if answer is None:
            return make_result(False, None, "no_answer", self.reward)
        correct = countdown.is_correct(problem, response_text)
        return make_result(correct, str(answer), "ok" if correct else "mismatch", self.reward)
