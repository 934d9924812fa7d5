"""The rollout-engine protocol: what every engine (transformers, vLLM; policy, teacher or guide) offers.

One protocol for all of them, so the trainer, SCOPE's guide and evaluation never care which engine or
which model is behind it: `generate` token ids -> completions with per-token logprobs, `update_weights`
from a stream of HF-named full tensors, `sleep` / `wake_up` around the trainer's own GPU work.

Logprob convention (both engines): the log-probability of each sampled token under the distribution it
was actually drawn from -- the model's logits divided by `temperature`, then top-k, then top-p
truncation, renormalised (vLLM's `logprobs_mode="processed_logprobs"`). Greedy decoding reports the
untempered model distribution. With the RL defaults (temperature 1, no top-k/top-p) this is exactly the
model's own log-softmax, which the trainer recomputes with Megatron; with other settings it is the true
behaviour-policy probability, which is what importance corrections need (the trainer must then apply
the same temperature/truncation to compare).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

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


def load_decoder(model_dir: str | os.PathLike) -> Decode:
    """`decode(ids)` for the tokenizer stored with a model: the project's sentencepiece
    `tokenizer.model`, else a transformers tokenizer (special tokens skipped)."""
    from scope_mega.data.hf_tokenizer import load_model_tokenizer

    return load_model_tokenizer(model_dir).decode


def make_engine(
    kind: Literal["hf", "vllm"],
    model: str | os.PathLike | dict[str, Any] | Any,
    decode: Decode | None = None,
    **kwargs: Any,
) -> RolloutEngine:
    """A rollout engine of `kind` for `model`: the policy, a teacher, or a guide -- any number of them
    side by side. `model` is a model directory, or (hf only) an HF config / config dict; without stored
    weights the engine starts from random ones, to be replaced through `update_weights`. `decode`
    defaults to the tokenizer stored with the model. Other keyword arguments go to the engine."""
    is_dir = isinstance(model, (str, os.PathLike))
    if decode is None:
        if not is_dir:
            raise ValueError("make_engine: pass decode=... when the model is given as a config")
        decode = load_decoder(model)
    if kind == "hf":
        from scope_mega.rollout.hf_engine import HFEngine

        stored = is_dir and any(p.suffix in (".safetensors", ".bin") for p in Path(model).iterdir())
        if stored:
            return HFEngine.from_pretrained(model, decode, **kwargs)
        return HFEngine.from_config(model, decode, **kwargs)
    if kind == "vllm":
        if not is_dir:
            raise ValueError("make_engine: the vllm engine needs a model directory (config, tokenizer)")
        from scope_mega.rollout.vllm_engine import VLLMEngine

        return VLLMEngine(str(model), decode, **kwargs)
    raise ValueError(f"make_engine: unknown engine kind {kind!r}; choose 'hf' or 'vllm'")
