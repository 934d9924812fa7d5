"""What the RL trainer needs from a task: tokenised prompts, a verifier, and what SCOPE reads.

Two tasks: the built-in Countdown toy task (its own sentencepiece tokenizer, an exact checker, an oracle
PRM and solver) and math from JSON Lines in the benchmark formats (`scope_mega.eval.FORMATS`), with a
Hugging Face tokenizer, the prompt template of `data.template` and the `math-verify` checker.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scope_mega.config import ConfigError, RunConfig
from scope_mega.data import countdown
from scope_mega.rewards.base import Verifier
from scope_mega.scope.trajectory import PromptInfo


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
    from scope_mega.sft import prepare_tokenizer, with_task_vocab

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


def math_task(cfg: RunConfig) -> Task:
    """Math prompts from `data.train_files` / `data.eval_files` rendered with `data.template` and the
    tokenizer of `data.tokenizer`; prompts longer than `data.max_prompt_tokens` are left out."""
    from scope_mega.data.hf_tokenizer import HFTokenizer
    from scope_mega.eval import load_benchmark, render_prompt
    from scope_mega.models.arch import load_hf_config
    from scope_mega.rewards.math_verifier import MathVerifier

    data = cfg.data
    if not data.tokenizer:
        raise ConfigError("data.task=math needs data.tokenizer (a Hugging Face tokenizer directory)")
    for key in ("train_files", "eval_files"):
        if not getattr(data, key):
            raise ConfigError(f"data.task=math needs data.{key} (JSON Lines in a benchmark format)")
    for path in [*data.train_files, *data.eval_files, data.tokenizer]:
        if not Path(path).exists():
            raise ConfigError(f"{path} does not exist (data.train_files / eval_files / tokenizer)")
    tok = HFTokenizer.from_dir(data.tokenizer)
    model_vocab = load_hf_config(cfg.model.hf_config).vocab_size
    if tok.vocab_size > model_vocab:
        raise ConfigError(
            f"the tokenizer in {data.tokenizer} has {tok.vocab_size} tokens but the model's vocab_size is "
            f"{model_vocab}; use the tokenizer of the model being trained"
        )

    def prompts(files: list[str], limit: int | None) -> list[Prompt]:
        out = []
        for path in files:
            for p in load_benchmark(path):
                ids = tok.encode(render_prompt(data.template, p.question))
                if len(ids) <= data.max_prompt_tokens:
                    out.append(Prompt(ids, PromptInfo(p.question, p.answer)))
        if not out:
            raise ConfigError(
                f"no prompt of {', '.join(files)} fits data.max_prompt_tokens={data.max_prompt_tokens}"
            )
        return out[:limit]

    return Task(
        cfg=cfg,
        tokenizer=tok,
        stop_token_ids=tok.stop_token_ids,
        train=prompts(data.train_files, None),
        eval=prompts(data.eval_files, cfg.rl.num_eval_problems),
        verifier=MathVerifier(),
    )
