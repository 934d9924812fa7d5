"""Process reward models: per-step probability that a step is correct given the question and the
previous steps, and the first-error location built on it.

The interface is batched over responses so a model PRM (Qwen2.5-Math-PRM layout: one score per step,
read at each step's separator token) scores a whole rollout batch in one forward pass.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

from scope_mega.data import countdown
from scope_mega.scope.steps import StepSpan, TokenizerLike, segment_steps
from scope_mega.scope.trajectory import Trajectory


class PRM(abc.ABC):
    """A step scorer. Subclasses implement `score_batch`."""

    @abc.abstractmethod
    def score_batch(self, questions: Sequence[str], steps: Sequence[Sequence[str]]) -> list[list[float]]:
        """`result[i][j]` = P(step j of response i is correct | questions[i], steps[i][:j])."""

    def score_steps(self, question: str, steps: Sequence[str]) -> list[float]:
        """Scores of one response's steps."""
        return self.score_batch([question], [steps])[0]


class CountdownOraclePRM(PRM):
    """Exact 1.0/0.0 labels from `countdown.step_correctness`; needs `step_delimiter="\\n"` and the
    question to be the Countdown prompt."""

    def __init__(self, ops: tuple[str, ...] = countdown.DEFAULT_OPS) -> None:
        self.ops = tuple(ops)

    def score_batch(self, questions: Sequence[str], steps: Sequence[Sequence[str]]) -> list[list[float]]:
        out = []
        for question, response_steps in zip(questions, steps, strict=True):
            problem = countdown.parse_prompt(question, self.ops)
            if problem is None:
                raise ValueError(f"not a Countdown prompt: {question!r}")
            flags = countdown.step_correctness(problem, countdown.STEP_DELIMITER.join(response_steps))
            if len(flags) != len(response_steps):
                raise ValueError("steps are not Countdown lines; use step_delimiter '\\n'")
            out.append([1.0 if ok else 0.0 for ok in flags])
        return out


def first_error_step(scores: Sequence[float], threshold: float) -> int | None:
    """k* = index of the first step scored below `threshold`; None when every step passes."""
    return next((k for k, s in enumerate(scores) if s < threshold), None)


def score_responses(
    trajectories: Sequence[Trajectory],
    questions: Sequence[str],
    prm: PRM,
    tokenizer: TokenizerLike,
    delimiter: str,
) -> tuple[list[list[StepSpan]], list[list[float]]]:
    """Segment each trajectory's response and score all of them in one `prm.score_batch` call."""
    steps = [
        segment_steps(t.response_text, delimiter, tokenizer.token_offsets(t.response_ids))
        for t in trajectories
    ]
    scores = prm.score_batch(questions, [[s.text for s in spans] for spans in steps])
    for i, (spans, sc) in enumerate(zip(steps, scores, strict=True)):
        if len(sc) != len(spans):
            raise ValueError(f"PRM gave {len(sc)} scores for the {len(spans)} steps of response {i}")
    return steps, [list(map(float, sc)) for sc in scores]
