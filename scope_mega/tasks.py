"""What the RL trainer needs from a task: tokenised prompts, a verifier, and what SCOPE reads.

Two tasks: the built-in Countdown toy task (its own sentencepiece tokenizer, an exact checker, an oracle
PRM and solver) and math from JSON Lines in the benchmark formats (`data.benchmarks`), with a
Hugging Face tokenizer, the prompt template of `data.template` and the `math-verify` checker.

The Countdown tokenizer is trained on the task's own corpus once per run directory
(`prepare_tokenizer`, shared by the SFT and RL stages), and the toy policy's vocabulary follows it
(`with_task_vocab`).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from scope_mega.config import RunConfig
from scope_mega.data import countdown
from scope_mega.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer
from scope_mega.logging import is_rank0
from scope_mega.rewards.base import Verifier
from scope_mega.scope.trajectory import PromptInfo

TOKENIZER_CORPUS_PROBLEMS = 2000


@dataclass(frozen=True)
class Prompt:
    """One RL prompt: the policy's input token ids and what the verifier and SCOPE read."""

    ids: list[int]
    info: PromptInfo


@dataclass
class Task:
    """A task bound to a run: `cfg` is the run config with the task's vocabulary filled in (Countdown
    sizes the toy model to its tokenizer); `path_signature(prompt, text)` names a response's solution
    path for the diversity metric, where the task can (Countdown)."""

    cfg: RunConfig
    tokenizer: Any  # data.tokenizer.Tokenizer or data.hf_tokenizer.HFTokenizer
    stop_token_ids: list[int]
    train: list[Prompt]
    eval: list[Prompt]
    verifier: Verifier
    path_signature: Callable[[Prompt, str], Hashable | None] | None = None

    def close(self) -> None:
        close = getattr(self.verifier, "close", None)
        if close is not None:
            close()


def build_task(cfg: RunConfig) -> Task:
    """The task named by `data.task`; collective (the Countdown tokenizer is trained on rank 0)."""
    return countdown_task(cfg) if cfg.data.task == "countdown" else math_task(cfg)


def countdown_task(cfg: RunConfig) -> Task:
    """Countdown prompts (BOS + prompt text), the exact checker, the toy model sized to the tokenizer."""
    from scope_mega.rewards.countdown_verifier import CountdownVerifier

    tok = prepare_tokenizer(cfg)

    def prompts(problems: list[countdown.Problem]) -> list[Prompt]:
        return [
            Prompt([tok.bos_id, *tok.encode(p.prompt())], PromptInfo(p.prompt(), p.prompt()))
            for p in problems
        ]

    ops = cfg.task.ops
    return Task(
        cfg=with_task_vocab(cfg, tok),
        tokenizer=tok,
        stop_token_ids=[tok.eos_id],
        train=prompts(
            countdown.make_problems(4 * cfg.sft.num_train_problems, cfg.seed + 7, cfg.task, split="train")
        ),
        eval=prompts(
            countdown.make_problems(
                cfg.rl.num_eval_problems, cfg.seed + 1, cfg.task, split="held_out", unique=True
            )
        ),
        verifier=CountdownVerifier(ops),
        path_signature=lambda prompt, text: countdown.solution_path_signature(
            countdown.parse_prompt(prompt.info.question, ops), text
        ),
    )


def prepare_tokenizer(cfg: RunConfig) -> Tokenizer:
    """Train the task tokenizer once per run directory (rank 0), then load it on every rank."""
    path = Path(cfg.run_dir) / "tokenizer"
    if is_rank0() and not (path / "tokenizer.model").is_file():
        rng = random.Random(cfg.seed)
        problems = countdown.make_problems(TOKENIZER_CORPUS_PROBLEMS, cfg.seed, cfg.task, split="train")
        corpus = [p.prompt() + countdown.random_solution(p, rng) for p in problems]
        train_tokenizer(corpus, path, vocab_size=cfg.sft.tokenizer_vocab_size)
    if dist.is_initialized():
        dist.barrier()
    return load_tokenizer(path / "tokenizer.model")


def with_task_vocab(cfg: RunConfig, tok: Tokenizer) -> RunConfig:
    """The toy policy's HF config takes its vocabulary size and special ids from the task tokenizer."""
    if not isinstance(cfg.model.hf_config, dict):
        return cfg
    hf = dict(cfg.model.hf_config)
    hf.update(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    hf.setdefault("pad_token_id", tok.pad_id)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, hf_config=hf))


def math_task(cfg: RunConfig) -> Task:
    """Math prompts from `data.train_files` / `data.eval_files` rendered with `data.template` and the
    tokenizer of `data.tokenizer`; prompts longer than `data.max_prompt_tokens` are left out."""
    from scope_mega.data.benchmarks import load_benchmark, render_prompt
    from scope_mega.data.hf_tokenizer import HFTokenizer
    from scope_mega.models.arch import load_hf_config
    from scope_mega.rewards.math_verifier import MathVerifier
    from scope_mega.validation import check_math_tokenizer, check_prompts_fit

    data = cfg.data  # named and present: `validation.validate(cfg, stage=...)` checked them
    tok = HFTokenizer.from_dir(data.tokenizer)
    check_math_tokenizer(data.tokenizer, tok.vocab_size, load_hf_config(cfg.model.hf_config).vocab_size)

    def prompts(files: list[str], limit: int | None) -> list[Prompt]:
        out = []
        for path in files:
            for p in load_benchmark(path):
                ids = tok.encode(render_prompt(data.template, p.question))
                if len(ids) <= data.max_prompt_tokens:
                    out.append(Prompt(ids, PromptInfo(p.question, p.answer)))
        check_prompts_fit(files, len(out), data.max_prompt_tokens)
        return out[:limit]

    return Task(
        cfg=cfg,
        tokenizer=tok,
        stop_token_ids=tok.stop_token_ids,
        train=prompts(data.train_files, None),
        eval=prompts(data.eval_files, cfg.rl.num_eval_problems),
        verifier=MathVerifier(),
    )
