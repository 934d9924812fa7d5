"""The rollout-engine protocol: what every engine (transformers, vLLM; policy, teacher or guide) offers.

One protocol for all of them, so the trainer, SCOPE's guide and evaluation never care which engine or
which model is behind it: `generate` token ids -> completions with per-token logprobs (`generate_each`:
settings per prompt), `update_weights` from a stream of HF-named full tensors, `sleep` / `wake_up`
around the trainer's own GPU work.

Logprob convention (both engines): the log-probability of each sampled token under the distribution it
was actually drawn from -- the model's logits divided by `temperature`, then top-k, then top-p
truncation, renormalised (vLLM's `logprobs_mode="processed_logprobs"`). Greedy decoding reports the
untempered model distribution. With the RL defaults (temperature 1, no top-k/top-p) this is exactly the
model's own log-softmax, which the trainer recomputes with Megatron; with other settings it is the true
behaviour-policy probability, which is what importance corrections need (the trainer must then apply
the same temperature/truncation to compare).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

FinishReason = Literal["stop", "length"]
Decode = Callable[[list[int]], str]


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. `temperature=0` is greedy; `top_k=0` and `top_p=1` switch truncation off.
    `stop` strings and `stop_token_ids` end a completion (the model's EOS ids always do);
    `seed` makes a call reproducible (None: a fresh random seed)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        checks = [
            (self.n >= 1, f"n must be >= 1, got {self.n}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}"),
            (self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (all(self.stop), "stop strings must be non-empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"SamplingParams: {message}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Completion:
    """One sampled continuation. `token_ids` include the token that ended it (EOS / stop token / the
    token completing a stop string); `logprobs[i]` belongs to `token_ids[i]` (see module docstring);
    `stop_reason` is the stop string or token id that ended it (None when the length limit did);
    `text` is `decode(token_ids)`."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    stop_reason: str | int | None
    text: str


@dataclass
class WeightUpdate:
    """What one `update_weights` call loaded; `missing` are engine weights the stream did not contain
    (left unchanged)."""

    tensors: int
    bytes: int
    missing: list[str]


class WeightSyncError(ValueError):
    """The weight stream does not fit the engine's model (unknown name, wrong shape, incomplete)."""


class RolloutEngine(Protocol):
    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingParams) -> list[list[Completion]]:
        """`sampling.n` completions for each prompt, in prompt order."""
        ...

    def generate_each(
        self, prompt_token_ids: Sequence[Sequence[int]], samplings: Sequence[SamplingParams]
    ) -> list[list[Completion]]:
        """`generate` with its own settings (seed, n, length) for each prompt, in one batch."""
        ...

    def update_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], full: bool = True
    ) -> WeightUpdate:
        """Load HF-named full tensors. Unknown names and wrong shapes raise `WeightSyncError`; with
        `full`, so does a stream that leaves some engine weight out (those received stay loaded)."""
        ...

    def sleep(self) -> None:
        """Release accelerator memory (weights / KV cache) for the trainer's turn."""
        ...

    def wake_up(self) -> None:
        """Take accelerator memory back before generating."""
        ...


class StopChecker:
    """Decides after each new token whether a completion has ended, and why."""

    def __init__(self, sampling: SamplingParams, eos_token_ids: Iterable[int], decode: Decode) -> None:
        self.token_ids = set(sampling.stop_token_ids) | set(eos_token_ids)
        self.strings = sampling.stop
        self.decode = decode
        # A stop string must end in the newest token, so decoding a tail is enough: each character
        # takes at most 4 byte-level tokens; the slack covers tokenizers that merge across it.
        self.window = 4 * max((len(s) for s in self.strings), default=0) + 8

    def __call__(self, token_ids: list[int]) -> str | int | None:
        if token_ids[-1] in self.token_ids:
            return token_ids[-1]
        if self.strings:
            tail = self.decode(token_ids[-self.window :])
            found = [(tail.find(s), s) for s in self.strings if s in tail]
            if found:
                return min(found)[1]
        return None


def continue_from(
    engine: RolloutEngine,
    prompt_ids: list[list[int]],
    prefix_ids: list[list[int]],
    sampling: SamplingParams,
) -> list[list[Completion]]:
    """Continue each prompt after its already-written prefix (SCOPE's guide resumes a rollout after its
    last correct step). Completions hold only the new tokens; `max_new_tokens` counts only them, and
    stop strings are looked for in the new text only."""
    if len(prompt_ids) != len(prefix_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(prefix_ids)} prefixes")
    return engine.generate([list(p) + list(q) for p, q in zip(prompt_ids, prefix_ids)], sampling)
