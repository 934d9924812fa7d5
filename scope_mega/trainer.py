"""The RL loop (DESIGN.md section 3): rollout, verify, SCOPE, advantages, update, sync, eval, checkpoint.

Roles: every data-parallel replica owns one rollout engine, held by its first model-parallel rank (the
"driver"); the driver generates its share of the prompts, verifies, rectifies and computes advantages,
then broadcasts the finished samples to the other ranks of its replica, which all run the Megatron step.
Groups never straddle data-parallel ranks, so GRPO statistics stay local. One optimizer step per
rollout batch (fully on-policy): the old-policy logprobs are the current ones (ratio 1, exact).
"""

from __future__ import annotations

import dataclasses
import random
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from scope_mega.checkpointing import (
    TrainerState,
    has_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    load_model_weights,
    save_checkpoint,
)
from scope_mega.config import ConfigError, RunConfig, to_dict
from scope_mega.data import countdown
from scope_mega.logging import MetricsLogger, is_rank0
from scope_mega.metrics import rollout_metrics, scope_metrics
from scope_mega.models.gpt import build_gpt_model
from scope_mega.rewards.countdown_verifier import CountdownVerifier
from scope_mega.rl.advantages import group_advantages
from scope_mega.rl.loss import PolicyLossConfig, policy_loss
from scope_mega.rollout.engine import SamplingParams
from scope_mega.rollout.weight_sync import sync_weights
from scope_mega.runtime import preemption
from scope_mega.runtime.distributed import init_distributed
from scope_mega.scope.dense import prm_dense_advantages
from scope_mega.scope.guides import make_guide
from scope_mega.scope.prm import CountdownOraclePRM
from scope_mega.scope.rectify import rectify_groups
from scope_mega.scope.trajectory import PromptInfo, Trajectory
from scope_mega.sft import prepare_tokenizer, with_task_vocab
from scope_mega.train_step import Batch, setup_training, train_step

RL_CHECKPOINTS = "checkpoints_rl"


@dataclass
class Sample:
    """One training sequence: prompt + response tokens with per-response-token loss inputs."""

    prompt_ids: list[int]
    response_ids: list[int]
    advantages: list[float]
    off_policy: list[bool]
    rollout_logprobs: list[float]  # 0.0 on guide tokens (never sampled by the policy's engine)


# ----------------------------------------------------------------------------- rollouts


def rollout_groups(engine, tok, problems, cfg: RunConfig, verifier, seed: int) -> list[list[Trajectory]]:
    """G sampled responses per problem from the policy's engine, verified."""
    prompts = [[tok.bos_id, *tok.encode(p.prompt())] for p in problems]
    sampling = SamplingParams(
        n=cfg.rl.group_size,
        temperature=cfg.rollout.temperature,
        top_p=cfg.rollout.top_p,
        top_k=cfg.rollout.top_k,
        max_new_tokens=cfg.rollout.max_new_tokens,
        stop=tuple(cfg.rollout.stop),
        seed=seed,
    )
    outs = engine.generate(prompts, sampling)
    groups = []
    for g, (problem, ids, comps) in enumerate(zip(problems, prompts, outs)):
        group = []
        for c in comps:
            text = tok.decode([t for t in c.token_ids if t != tok.eos_id])
            v = verifier.verify(text, problem.prompt())
            group.append(
                Trajectory(
                    prompt_ids=ids,
                    response_ids=list(c.token_ids),
                    rollout_logprobs=list(c.logprobs),
                    response_text=text,
                    reward=v.reward,
                    correct=v.correct,
                    group_id=g,
                    answer=v.extracted,
                )
            )
        groups.append(group)
    return groups


def to_samples(groups: list[list[Trajectory]], cfg: RunConfig, dense: list | None) -> list[Sample]:
    """GRPO advantages over the final groups (or PRM-dense ones), one Sample per trajectory."""
    samples = []
    for g, group in enumerate(groups):
        adv = group_advantages(torch.tensor([[t.reward for t in group]]), cfg.advantage)[0].tolist()
        for i, t in enumerate(group):
            per_token = dense[g][i] if dense is not None else [adv[i]] * len(t.response_ids)
            samples.append(
                Sample(
                    prompt_ids=t.prompt_ids,
                    response_ids=t.response_ids,
                    advantages=per_token,
                    off_policy=list(t.off_policy),
                    rollout_logprobs=[0.0 if o else lp for o, lp in zip(t.off_policy, t.rollout_logprobs)],
                )
            )
    return samples


def to_micro_batches(samples: list[Sample], micro: int, pad_id: int) -> list[Batch]:
    """Right-padded [b, s] tensors aligned to targets (position t predicts token t+1)."""
    seq = max(len(s.prompt_ids) + len(s.response_ids) for s in samples) - 1
    batches = []
    for start in range(0, len(samples), micro):
        rows = samples[start : start + micro]
        b = len(rows)
        ids = torch.full((b, seq + 1), pad_id, dtype=torch.long)
        on, off = torch.zeros(b, seq), torch.zeros(b, seq)
        adv, rollout_lp = torch.zeros(b, seq), torch.zeros(b, seq)
        for r, s in enumerate(rows):
            toks = s.prompt_ids + s.response_ids
            ids[r, : len(toks)] = torch.tensor(toks)
            lo, hi = len(s.prompt_ids) - 1, len(toks) - 1  # target positions of the response tokens
            offp = torch.tensor(s.off_policy, dtype=torch.bool)
            on[r, lo:hi] = (~offp).float()
            off[r, lo:hi] = offp.float()
            adv[r, lo:hi] = torch.tensor(s.advantages)
            rollout_lp[r, lo:hi] = torch.tensor(s.rollout_logprobs)
        batches.append(
            dict(
                input_ids=ids[:, :-1],
                targets=ids[:, 1:],
                position_ids=torch.arange(seq).expand(b, seq),
                on_mask=on,
                off_mask=off,
                advantages=adv,
                rollout_logprobs=rollout_lp,
            )
        )
    return batches


def rl_loss(cfg: PolicyLossConfig, logprobs: torch.Tensor, batch: Batch, entropy: torch.Tensor | None):
    """The one policy loss on a micro-batch; old logprobs = current ones (single on-policy update)."""
    return policy_loss(
        logprobs,
        logprobs.detach(),
        batch["advantages"],
        batch["on_mask"],
        batch["off_mask"],
        cfg,
        rollout_logprobs=batch["rollout_logprobs"],
        entropy=entropy,
    )


# ----------------------------------------------------------------------------- evaluation


def evaluate(engine, tok, problems, cfg: RunConfig, verifier, seed: int) -> dict[str, float]:
    """Held-out greedy accuracy, avg@k and pass@k of k = `rl.eval_samples` samples, and diversity."""
    prompts = [[tok.bos_id, *tok.encode(p.prompt())] for p in problems]
    greedy = engine.generate(
        prompts, SamplingParams(temperature=0.0, max_new_tokens=cfg.rollout.max_new_tokens)
    )
    texts = [tok.decode([t for t in c[0].token_ids if t != tok.eos_id]) for c in greedy]
    acc = sum(verifier.verify(t, p.prompt()).correct for t, p in zip(texts, problems)) / len(problems)
    k = cfg.rl.eval_samples
    eval_cfg = dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl, group_size=k))
    groups = rollout_groups(engine, tok, problems, eval_cfg, verifier, seed)
    m = rollout_metrics(
        groups,
        ks=(1, k),
        path_signature=lambda g, text: countdown.solution_path_signature(problems[g], text),
    )
    out = {
        "eval/greedy_acc": acc,
        f"eval/avg@{k}": m["rollout/accuracy"],
        f"eval/pass@{k}": m[f"rollout/pass@{k}"],
    }
    for key in ("distinct_paths", "distinct_4gram", "distinct_answers"):
        if f"rollout/{key}" in m:
            out[f"eval/{key}"] = m[f"rollout/{key}"]
    return out


# ----------------------------------------------------------------------------- the loop


def _driver_broadcast(obj, is_driver: bool):
    """Send the driver's Python object to every rank of its model-parallel group."""
    from megatron.core import parallel_state

    group = parallel_state.get_model_parallel_group()
    if dist.get_world_size(group) == 1:
        return obj
    box = [obj if is_driver else None]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    return box[0]


def _init_weights_path(cfg: RunConfig) -> Path | None:
    if cfg.rl.init_from:
        p = Path(cfg.rl.init_from)
        return latest_checkpoint(p) or p
    return latest_checkpoint(Path(cfg.run_dir) / "checkpoints")  # the SFT stage of the same run


def run_train(cfg: RunConfig) -> dict[str, float]:
    """The RL stage; returns the final evaluation metrics. Exits with PREEMPTED_EXIT_CODE on a stop signal."""
    from megatron.core import parallel_state

    if cfg.data.task != "countdown":
        raise ConfigError(
            "data.task=math training is not wired into the trainer yet; use data.task=countdown"
        )
    unwired = {
        "loss.kl_coef > 0 (needs a frozen reference model)": cfg.loss.kl_coef > 0,
        "loss.off_policy=clip (needs guide logprobs)": cfg.loss.off_policy == "clip",
        "scope.guide=engine (needs a teacher engine)": cfg.scope.guide == "engine" and cfg.scope.enabled,
    }
    for what, asked in unwired.items():
        if asked:
            raise ConfigError(f"{what} is not wired into the trainer yet")
    device = init_distributed(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.cp, cfg.device, cfg.seed)
    preemption.install_handlers()
    tok = prepare_tokenizer(cfg)
    cfg = with_task_vocab(cfg, tok)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp = parallel_state.get_data_parallel_world_size()
    if cfg.rl.prompts_per_step % dp:
        raise ConfigError(
            f"rl.prompts_per_step={cfg.rl.prompts_per_step} must be divisible by the DP size {dp}"
        )
    is_driver = parallel_state.get_model_parallel_group().rank() == 0

    train_problems = countdown.make_problems(
        4 * cfg.sft.num_train_problems, cfg.seed + 7, cfg.task, split="train"
    )
    eval_problems = countdown.make_problems(
        cfg.rl.num_eval_problems, cfg.seed + 1, cfg.task, split="held_out", unique=True
    )
    model, spec = build_gpt_model(cfg.model, cfg.parallel, device)
    ckpt_root = Path(cfg.run_dir) / RL_CHECKPOINTS
    resume = latest_checkpoint(ckpt_root) if cfg.checkpoint.resume else None
    init = None if resume else _init_weights_path(cfg)
    if init is not None:
        load_model_weights(init, model)
    rl_optim = dataclasses.replace(
        cfg.optim, lr=cfg.rl.lr, min_lr=cfg.rl.lr, warmup_steps=0, decay_style="constant"
    )
    state = setup_training(model, spec.vocab_size, rl_optim, cfg.parallel, cfg.rl.steps)
    trainer = load_checkpoint(resume, state) if resume else TrainerState()

    verifier = CountdownVerifier(cfg.task.ops)
    prm = CountdownOraclePRM(cfg.task.ops)
    engine = None
    if is_driver:
        from scope_mega.rollout.engine import make_engine

        engine = make_engine(
            cfg.rollout.engine, cfg.model.hf_config, decode=tok.decode, eos_token_ids=[tok.eos_id]
        )
    guide = make_guide(
        cfg.scope.guide, delimiter=cfg.scope.step_delimiter, oracle_ops=cfg.task.ops, seed=cfg.seed
    )
    bucket = cfg.rollout.sync_bucket_mb << 20
    sync_weights(engine, state.model[0], spec, bucket)

    config_dict = to_dict(cfg)
    logger = MetricsLogger(
        cfg.run_dir,
        "rl",
        cfg.rl.steps,
        trainer.step,
        config_dict,
        cfg.wandb_mode,
        bar_keys=("reward", "rollout/accuracy", "scope/salvage_rate_failed", "tokens_per_s"),
    )

    def run_eval(step: int) -> dict[str, float]:
        metrics = None
        if is_driver:
            engine.wake_up()
            metrics = evaluate(engine, tok, eval_problems, cfg, verifier, cfg.seed + 99)
            engine.sleep()
        metrics = _driver_broadcast(metrics, is_driver)
        logger.log(step, metrics)
        return metrics

    if trainer.step == 0:
        run_eval(0)
    per_rank = cfg.rl.prompts_per_step // dp
    while trainer.step < cfg.rl.steps:
        t0 = time.perf_counter()
        rng = random.Random(cfg.seed * 1_000_003 + trainer.step)
        batch = [train_problems[rng.randrange(len(train_problems))] for _ in range(cfg.rl.prompts_per_step)]
        mine = batch[dp_rank * per_rank : (dp_rank + 1) * per_rank]
        payload = None
        if is_driver:
            engine.wake_up()
            groups = rollout_groups(
                engine, tok, mine, cfg, verifier, seed=cfg.seed + trainer.step * 9973 + dp_rank
            )
            infos = [PromptInfo(question=p.prompt(), reference=p.prompt()) for p in mine]
            metrics = rollout_metrics(groups, ks=(1,))
            final, stats = rectify_groups(
                groups, infos, cfg.scope, tokenizer=tok, verifier=verifier, guide=guide, prm=prm
            )
            dense = None
            if cfg.scope.active_method == "prm_dense":
                dense = prm_dense_advantages(
                    final, infos, prm, tok, cfg.scope.step_delimiter, cfg.advantage, cfg.scope.dense_coef
                )
            engine.sleep()
            metrics.update(scope_metrics(stats))
            metrics["reward"] = sum(t.reward for g in groups for t in g) / sum(len(g) for g in groups)
            payload = (to_samples(final, cfg, dense), metrics)
        samples, metrics = _driver_broadcast(payload, is_driver)
        micro = to_micro_batches(samples, cfg.rl.micro_batch_size, tok.pad_id)
        loss_fn = partial(rl_loss, cfg.loss)
        metrics.update(train_step(state, micro, loss_fn, need_entropy=True))
        sync_weights(engine, state.model[0], spec, bucket)
        trainer.step += 1
        trainer.data_position = trainer.step * cfg.rl.prompts_per_step
        tokens = sum(len(s.response_ids) for s in samples) * dp
        metrics["tokens_per_s"] = tokens / (time.perf_counter() - t0)
        logger.log(trainer.step, metrics)
        if cfg.rl.eval_interval and trainer.step % cfg.rl.eval_interval == 0 and trainer.step < cfg.rl.steps:
            run_eval(trainer.step)
        stop = preemption.should_stop()
        periodic = cfg.checkpoint.save_interval and trainer.step % cfg.checkpoint.save_interval == 0
        if stop or periodic:
            save_checkpoint(ckpt_root, state, trainer, config_dict, cfg.checkpoint.keep_last)
        if stop:
            logger.close()
            print(f"stop signal: checkpoint at step {trainer.step} written; exiting for requeue", flush=True)
            sys.exit(preemption.PREEMPTED_EXIT_CODE)

    final_metrics = run_eval(trainer.step)
    if not has_checkpoint(ckpt_root, trainer.step):
        save_checkpoint(ckpt_root, state, trainer, config_dict, cfg.checkpoint.keep_last)
    logger.close()
    if is_rank0():
        print(" ".join(f"{k}={v:.4f}" for k, v in final_metrics.items()), flush=True)
    return final_metrics
