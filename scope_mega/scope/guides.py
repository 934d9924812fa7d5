"""Guides: continue a failed rollout from the question and its correct prefix (steps before k*).

A guide gets `GuideRequest`s and returns, per request, a `GuideOutput` whose text continues
`prefix_text` (the decoding of the kept prefix tokens), or None when it cannot continue. An engine
guide also returns token ids and logprobs; text guides return text only and assembly tokenises it.

Kinds (`ScopeConfig.guide`):
- engine: a teacher served by a rollout engine, continuing from prompt tokens + prefix tokens; it must
  share the policy's tokenizer (its tokens enter the policy's batch as they are);
- oracle: the task's programmatic solver (Countdown: `countdown.continue_solution`);
- reference: the dataset's reference solution, step-aligned: the reference is split with the same
  delimiter and its steps from index k* on follow the kept k* steps (k* = 0: the whole reference). It
  assumes the rollout's prefix stands for the reference's first k* steps; when it does not, the result
  is usually wrong and dropped by verification, which is why it is the weakest guide.
"""

from __future__ import annotations

import abc
import dataclasses
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from scope_mega.data import countdown
from scope_mega.scope.config import GuideKind
from scope_mega.scope.steps import split_steps


class Continuation(Protocol):
    """One engine completion: every generated token id (including the final EOS/stop token, as for
    rollouts), the engine's logprob of each, and the decoded text (special tokens excluded)."""

    @property
    def token_ids(self) -> Sequence[int]: ...

    @property
    def logprobs(self) -> Sequence[float]: ...

    @property
    def text(self) -> str: ...


class ContinuationEngine(Protocol):
    """What an engine guide needs: one sampled continuation per token-id prefix, with the engine's own
    sampling settings bound (an adapter over the rollout engine's `generate`)."""

    def continue_prefixes(self, token_prefixes: Sequence[Sequence[int]]) -> Sequence[Continuation]: ...


@dataclass(frozen=True)
class GuideRequest:
    """Continue one failed rollout.

    prefix_ids / prefix_text: the rollout's kept response tokens (bit for bit) and their text.
    pending_text: characters of the kept steps that the token cut left out (a token straddling the
        step boundary, see `scope.steps`); "" in the common case. Text guides continue from
        `prefix_text + pending_text` and start their output with `pending_text`.
    prefix_steps: k*, the number of kept steps (0: solve from scratch).
    """

    question: str
    reference_solution: str | None
    prompt_ids: list[int]
    prefix_ids: list[int]
    prefix_text: str
    pending_text: str
    prefix_steps: int


@dataclass(frozen=True)
class GuideOutput:
    """A continuation: `prefix_text + text` is the whole response text. `token_ids` None: tokenise
    `text` and append EOS; `logprobs` (engine guides): the guide's logprob of each token id."""

    text: str
    token_ids: list[int] | None = None
    logprobs: list[float] | None = None

    def __post_init__(self) -> None:
        if self.logprobs is not None and (
            self.token_ids is None or len(self.logprobs) != len(self.token_ids)
        ):
            raise ValueError("logprobs need token_ids of the same length")


class Guide(abc.ABC):
    """Batched continuation of failed rollouts."""

    @abc.abstractmethod
    def continue_batch(self, requests: Sequence[GuideRequest]) -> list[GuideOutput | None]:
        """One output per request, None where the guide cannot continue."""


@dataclass
class SampledContinuer:
    """A `ContinuationEngine` over a rollout engine: one sample per prefix with `sampling` (n=1); the
    seed advances with every call so successive batches draw fresh samples."""

    engine: Any  # rollout.engine.RolloutEngine
    sampling: Any  # rollout.engine.SamplingParams

    def continue_prefixes(self, token_prefixes: Sequence[Sequence[int]]) -> Sequence[Continuation]:
        outs = self.engine.generate([list(p) for p in token_prefixes], self.sampling)
        if self.sampling.seed is not None:
            self.sampling = dataclasses.replace(self.sampling, seed=self.sampling.seed + 1)
        return [completions[0] for completions in outs]


class EngineGuide(Guide):
    """A teacher model served by a rollout engine, continuing from prompt + prefix token ids."""

    def __init__(self, engine: ContinuationEngine) -> None:
        self.engine = engine

    def continue_batch(self, requests: Sequence[GuideRequest]) -> list[GuideOutput | None]:
        # an empty batch still reaches the engine: a collective engine needs every driver's call
        outs = self.engine.continue_prefixes([r.prompt_ids + r.prefix_ids for r in requests])
        if len(outs) != len(requests):
            raise ValueError(f"engine returned {len(outs)} continuations for {len(requests)} prefixes")
        return [GuideOutput(o.text, list(o.token_ids), [float(x) for x in o.logprobs]) for o in outs]


class CountdownOracleGuide(Guide):
    """Countdown's exact solver: a uniformly drawn correct continuation of a correct prefix."""

    def __init__(self, ops: tuple[str, ...] = countdown.DEFAULT_OPS, seed: int = 0) -> None:
        self.ops = tuple(ops)
        self.rng = random.Random(seed)

    def continue_batch(self, requests: Sequence[GuideRequest]) -> list[GuideOutput | None]:
        out: list[GuideOutput | None] = []
        for r in requests:
            problem = countdown.parse_prompt(r.question, self.ops)
            if problem is None:
                raise ValueError(f"not a Countdown prompt: {r.question!r}")
            rest = countdown.continue_solution(problem, r.prefix_text + r.pending_text, self.rng)
            out.append(None if rest is None else GuideOutput(r.pending_text + rest))
        return out


class ReferenceGuide(Guide):
    """The reference solution's steps from index k* on (see the module docstring)."""

    def __init__(self, delimiter: str) -> None:
        self.delimiter = delimiter

    def continue_batch(self, requests: Sequence[GuideRequest]) -> list[GuideOutput | None]:
        out: list[GuideOutput | None] = []
        for r in requests:
            if r.reference_solution is None:
                raise ValueError("the reference guide needs PromptInfo.reference_solution")
            spans = split_steps(r.reference_solution, self.delimiter)
            if r.prefix_steps >= len(spans):
                out.append(None)
            else:
                rest = r.reference_solution[spans[r.prefix_steps][0] : spans[-1][1]]
                out.append(GuideOutput(r.pending_text + rest))
        return out


def make_guide(
    kind: GuideKind,
    *,
    delimiter: str,
    engine: ContinuationEngine | None = None,
    oracle_ops: tuple[str, ...] = countdown.DEFAULT_OPS,
    seed: int = 0,
) -> Guide:
    """The guide named by `ScopeConfig.guide` ("oracle" is Countdown's, the only task with a solver)."""
    if kind == "engine":
        if engine is None:
            raise ValueError("guide 'engine' needs an engine")
        return EngineGuide(engine)
    if kind == "oracle":
        return CountdownOracleGuide(oracle_ops, seed)
    if kind == "reference":
        return ReferenceGuide(delimiter)
    raise ValueError(f"unknown guide kind {kind!r}")
