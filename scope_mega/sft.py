"""SFT warm-start on the toy task: teach the tiny policy the format and some skill before RL.

`scope-mega sft CONFIG` builds the Countdown task and a sentencepiece tokenizer trained on its corpus,
then trains the Megatron policy on solver-written solutions (a fresh random valid solution each time
a problem is drawn, so the model sees many solution paths), checkpointing atomically and resuming from
`<run_dir>/checkpoints/latest`. It reports greedy and sampled accuracy on held-out problems.
"""

from __future__ import annotations

import random

import torch

from scope_mega.config import RunConfig
from scope_mega.data import countdown
from scope_mega.data.tokenizer import Tokenizer
from scope_mega.models.context_parallel import split_batch
from scope_mega.models.generate import generate
from scope_mega.models.pipeline import Batch
from scope_mega.run_dir import SFT_CHECKPOINTS
from scope_mega.stage import Stage, build_stage, checkpoint_or_stop, close_stage, open_logger, start_stage
from scope_mega.tasks import prepare_tokenizer, with_task_vocab
from scope_mega.train_step import lm_loss, shard_for_data_parallel, train_step


def encode_example(tok: Tokenizer, prompt: str, response: str) -> tuple[list[int], int]:
    """[bos] prompt response [eos] as token ids, and the number of prompt tokens (incl. bos)."""
    prompt_ids = [tok.bos_id, *tok.encode(prompt)]
    return prompt_ids + tok.encode(response) + [tok.eos_id], len(prompt_ids)


def to_micro_batches(
    examples: list[tuple[list[int], int]], micro: int, pad_id: int, multiple: int = 1
) -> list[Batch]:
    """Right-pad every example to the longest one of the step (uniform shapes for the PP schedule),
    rounded up to `multiple` (2 x CP under context parallelism)."""
    seq = -(-(max(len(ids) for ids, _ in examples) - 1) // multiple) * multiple
    batches = []
    for start in range(0, len(examples), micro):
        rows = examples[start : start + micro]
        ids = torch.full((len(rows), seq + 1), pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), seq)
        for r, (toks, n_prompt) in enumerate(rows):
            ids[r, : len(toks)] = torch.tensor(toks)
            mask[r, n_prompt - 1 : len(toks) - 1] = 1.0  # predict response tokens and eos
        batches.append(
            dict(
                input_ids=ids[:, :-1],
                targets=ids[:, 1:],
                position_ids=torch.arange(seq).expand(len(rows), seq),
                loss_mask=mask,
            )
        )
    return batches


def sft_examples(cfg: RunConfig, problems: list[countdown.Problem], tok: Tokenizer, step: int):
    """The global batch of `step`: a pure function of (seed, step), so a resumed run sees the same data."""
    rng = random.Random(cfg.seed * 1_000_003 + step)
    chosen = [problems[rng.randrange(len(problems))] for _ in range(cfg.sft.global_batch_size)]
    return [encode_example(tok, p.prompt(), countdown.random_solution(p, rng)) for p in chosen]


def evaluate_accuracy(
    model, tok: Tokenizer, problems: list[countdown.Problem], temperature: float, seed: int
) -> float:
    """Fraction of problems whose decoded response is a correct Countdown solution."""
    prompts = [[tok.bos_id, *tok.encode(p.prompt())] for p in problems]
    gen = torch.Generator().manual_seed(seed)
    outs = generate(model, prompts, 48, tok.eos_id, tok.vocab_size, temperature=temperature, generator=gen)
    texts = [tok.decode([t for t in out if t != tok.eos_id]) for out in outs]
    return sum(countdown.is_correct(p, t) for p, t in zip(problems, texts)) / max(len(problems), 1)


def run_sft(cfg: RunConfig) -> dict[str, float]:
    """The SFT stage; returns the final held-out metrics. Exits with PREEMPTED_EXIT_CODE on a stop signal."""
    from megatron.core import parallel_state

    device = start_stage(cfg, "sft")
    tok = prepare_tokenizer(cfg)
    cfg = with_task_vocab(cfg, tok)
    train_problems = countdown.make_problems(cfg.sft.num_train_problems, cfg.seed, cfg.task, split="train")
    eval_problems = countdown.make_problems(
        cfg.sft.num_eval_problems, cfg.seed + 1, cfg.task, split="held_out", unique=True
    )
    dp_rank = parallel_state.get_data_parallel_rank()
    dp = parallel_state.get_data_parallel_world_size()
    cp, cp_rank = cfg.parallel.cp, parallel_state.get_context_parallel_rank()
    init = cfg.checkpoint.load_weights
    stage = build_stage(cfg, "sft", device, SFT_CHECKPOINTS, cfg.optim, cfg.sft.steps, init)
    logger = open_logger(stage, cfg.sft.steps)
    progress = stage.progress
    while progress.step < cfg.sft.steps:
        examples = sft_examples(cfg, train_problems, tok, progress.step)
        local = shard_for_data_parallel(examples, dp_rank, dp)
        whole = to_micro_batches(local, cfg.sft.micro_batch_size, tok.pad_id, 2 * cp if cp > 1 else 1)
        micro = [split_batch(mb, cp, cp_rank) for mb in whole]
        metrics = train_step(stage.state, micro, lm_loss)
        progress.step += 1
        progress.data_position = progress.step * cfg.sft.global_batch_size
        if cfg.sft.eval_interval and progress.step % cfg.sft.eval_interval == 0:
            metrics.update(held_out_metrics(stage, tok, eval_problems))
        logger.log(progress.step, metrics)
        checkpoint_or_stop(stage)
    final = held_out_metrics(stage, tok, eval_problems)
    if final:
        logger.log(progress.step, final)
    checkpoint_or_stop(stage, final=True)
    close_stage(stage, final)
    return final


def held_out_metrics(stage: Stage, tok: Tokenizer, problems: list[countdown.Problem]) -> dict[str, float]:
    """Greedy and sampled accuracy of the policy on held-out problems (nothing under PP > 1 or CP > 1,
    where trainer-side decoding does not run: see models.generate)."""
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() > 1 or stage.cfg.parallel.cp > 1:
        return {}
    seed = stage.cfg.seed
    return {
        "heldout_acc_greedy": evaluate_accuracy(stage.model, tok, problems, 0.0, seed),
        "heldout_acc_sampled": evaluate_accuracy(stage.model, tok, problems, 1.0, seed),
    }
