"""SFT warm-start on the toy task: teach the tiny policy the format and some skill before RL.

`scope-mega sft CONFIG` builds the Countdown task and a sentencepiece tokenizer trained on its corpus,
then trains the Megatron policy on solver-written solutions (a fresh random valid solution each time
a problem is drawn, so the model sees many solution paths), checkpointing atomically and resuming from
`<run_dir>/checkpoints/latest`. It reports greedy and sampled accuracy on held-out problems.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import torch

from scope_mega.checkpointing import TrainerState, load_checkpoint, save_checkpoint
from scope_mega.config import RunConfig, to_dict
from scope_mega.data import countdown
from scope_mega.data.tokenizer import Tokenizer
from scope_mega.logging import MetricsLogger, is_rank0
from scope_mega.models.generate import generate
from scope_mega.models.gpt import build_gpt_model
from scope_mega.run_dir import SFT_CHECKPOINTS, has_checkpoint, latest_checkpoint
from scope_mega.runtime import preemption
from scope_mega.runtime.distributed import init_distributed
from scope_mega.tasks import prepare_tokenizer, with_task_vocab
from scope_mega.train_step import Batch, lm_loss, setup_training, shard_for_data_parallel, train_step
from scope_mega.weights.megatron_ckpt import load_model_weights


def encode_example(tok: Tokenizer, prompt: str, response: str) -> tuple[list[int], int]:
    """[bos] prompt response [eos] as token ids, and the number of prompt tokens (incl. bos)."""
    prompt_ids = [tok.bos_id, *tok.encode(prompt)]
    return prompt_ids + tok.encode(response) + [tok.eos_id], len(prompt_ids)


def to_micro_batches(examples: list[tuple[list[int], int]], micro: int, pad_id: int) -> list[Batch]:
    """Right-pad every example to the longest one of the step (uniform shapes for the PP schedule)."""
    seq = max(len(ids) for ids, _ in examples) - 1
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

    device = init_distributed(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.cp, cfg.device, cfg.seed)
    preemption.install_handlers()
    tok = prepare_tokenizer(cfg)
    cfg = with_task_vocab(cfg, tok)
    train_problems = countdown.make_problems(cfg.sft.num_train_problems, cfg.seed, cfg.task, split="train")
    eval_problems = countdown.make_problems(
        cfg.sft.num_eval_problems, cfg.seed + 1, cfg.task, split="held_out", unique=True
    )
    dp_rank = parallel_state.get_data_parallel_rank()
    dp = parallel_state.get_data_parallel_world_size()
    if cfg.sft.global_batch_size % (cfg.sft.micro_batch_size * dp):
        raise SystemExit(
            f"config error: sft.global_batch_size={cfg.sft.global_batch_size} must be a multiple of "
            f"sft.micro_batch_size x data-parallel size = {cfg.sft.micro_batch_size} x {dp}"
        )

    model, spec = build_gpt_model(cfg.model, cfg.parallel, device)
    if cfg.checkpoint.load_weights:
        load_model_weights(cfg.checkpoint.load_weights, model)
    state = setup_training(model, spec.vocab_size, cfg.optim, cfg.parallel, cfg.sft.steps)
    ckpt_root = Path(cfg.run_dir) / SFT_CHECKPOINTS
    trainer = TrainerState()
    latest = latest_checkpoint(ckpt_root) if cfg.checkpoint.resume else None
    if latest is not None:
        trainer = load_checkpoint(latest, state)
    config_dict = to_dict(cfg)
    logger = MetricsLogger(cfg.run_dir, "sft", cfg.sft.steps, trainer.step, config_dict, cfg.wandb_mode)

    def save() -> None:
        save_checkpoint(ckpt_root, state, trainer, config_dict, cfg.checkpoint.keep_last)

    def held_out_metrics() -> dict[str, float]:
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            return {}  # trainer-side decoding needs PP=1 (see models.generate)
        return {
            "heldout_acc_greedy": evaluate_accuracy(model, tok, eval_problems, 0.0, cfg.seed),
            "heldout_acc_sampled": evaluate_accuracy(model, tok, eval_problems, 1.0, cfg.seed),
        }

    while trainer.step < cfg.sft.steps:
        examples = sft_examples(cfg, train_problems, tok, trainer.step)
        local = shard_for_data_parallel(examples, dp_rank, dp)
        metrics = train_step(state, to_micro_batches(local, cfg.sft.micro_batch_size, tok.pad_id), lm_loss)
        trainer.step += 1
        trainer.data_position = trainer.step * cfg.sft.global_batch_size
        if cfg.sft.eval_interval and trainer.step % cfg.sft.eval_interval == 0:
            metrics.update(held_out_metrics())
        logger.log(trainer.step, metrics)
        stop = preemption.should_stop()
        periodic = cfg.checkpoint.save_interval and trainer.step % cfg.checkpoint.save_interval == 0
        if stop or periodic:
            save()
        if stop:
            logger.close()
            print(f"stop signal: checkpoint at step {trainer.step} written; exiting for requeue", flush=True)
            sys.exit(preemption.PREEMPTED_EXIT_CODE)

    final = held_out_metrics()
    if final:
        logger.log(trainer.step, final)
    if not has_checkpoint(ckpt_root, trainer.step):
        save()
    logger.close()
    if is_rank0():
        print(" ".join(f"{k}={v:.4f}" for k, v in final.items()), flush=True)
    return final
