"""Verifier interface: a response and a reference answer in, a verdict and a scalar reward out."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass

# Reasons a verdict can carry; anything but "ok" means incorrect.
REASONS = ("ok", "mismatch", "no_answer", "parse_error", "too_long", "timeout", "error")


@dataclass(frozen=True)
class RewardConfig:
    """Outcome reward values; `format_penalty` is subtracted when no final answer could be extracted."""

    correct: float = 1.0
    incorrect: float = 0.0
    format_penalty: float = 0.0


@dataclass(frozen=True)
class VerifyResult:
    """One verdict: `extracted` is the answer string taken from the response (None if none was found)."""

    correct: bool
    reward: float
    extracted: str | None
    reason: str


def make_result(correct: bool, extracted: str | None, reason: str, config: RewardConfig) -> VerifyResult:
    """Build a `VerifyResult`, turning the verdict into a reward under `config`."""
    assert reason in REASONS, reason
    reward = config.correct if correct else config.incorrect
    if reason == "no_answer":
        reward -= config.format_penalty
    return VerifyResult(correct=correct, reward=reward, extracted=extracted, reason=reason)


class Verifier(abc.ABC):
    """A task checker. Subclasses implement `verify`; override `verify_batch` when batching is cheaper."""

    @abc.abstractmethod
    def verify(self, response_text: str, reference: str) -> VerifyResult:
        """Judge one response against its reference answer."""

    def verify_batch(self, responses: Sequence[str], references: Sequence[str]) -> list[VerifyResult]:
        """Judge `responses[i]` against `references[i]` for every i."""
        if len(responses) != len(references):
            raise ValueError(f"{len(responses)} responses but {len(references)} references")
        return [self.verify(r, ref) for r, ref in zip(responses, references)]
