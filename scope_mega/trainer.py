"""The RL loop, in the order of docs/design.md section 3: rollout and rectify, advantages, update,
sync, evaluation and checkpoint.

`run_train` builds every role once (`rl.roles.setup_rl`: config checks, process groups, policy,
engines, PRM, reference, logger) and then only calls phases. Each phase is a function of the run:
- `generate`: steps 1-4 on each replica's driver (sample, verify, SCOPE, advantages,
  `rl.rollouts`), the engines awake; every rank of the replica receives the driver's samples; the
  SCOPE guard (`scope.guard`) watches the policy's rollout accuracy and may pause rectification;
- `update`: steps 5 and 6, the engines asleep: the optimizer state back on the device, every
  `rl.grad_parts_interval` steps the gradient's parts (`rl.parts`), reference logprobs,
  `rl.ppo_mini_batches` x `rl.ppo_epochs` optimizer steps (`rl.update`);
- `sync`: step 7, the optimizer state to the host, the weights to the engines;
- `log_step`, `evaluate_policy`, then the HF export and `stage.checkpoint_or_stop` (step 8).
Groups never straddle data-parallel replicas, so GRPO statistics stay local; logged metrics average
all replicas. A stop signal checkpoints and exits with `PREEMPTED_EXIT_CODE`.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any

from scope_mega.config import RunConfig
from scope_mega.metrics import phase_memory, timed, weighted_mean
from scope_mega.rl.balance import balance_samples
from scope_mega.rl.batch import Sample, no_loss_sample, rank_micro_batches
from scope_mega.rl.partial import merge_partial_metrics, partial_rollouts
from scope_mega.rl.parts import gradient_parts
from scope_mega.rl.roles import RLRun, driven, setup_rl, step_guide, sync_policy_weights
from scope_mega.rl.rollouts import evaluate, rollout_and_rectify, rollout_groups, step_prompts
from scope_mega.rl.update import update_policy
from scope_mega.runtime.served import gather_drivers
from scope_mega.scope.guard import rectification_paused, watch_accuracy
from scope_mega.stage import checkpoint_or_stop, close_stage
from scope_mega.train_step import store_logprobs
from scope_mega.weights.hf_export import export_hf


def run_train(cfg: RunConfig) -> dict[str, float]:
    """The RL stage; returns the final evaluation metrics. Exits with PREEMPTED_EXIT_CODE on a stop signal."""
    run = setup_rl(cfg)
    cfg, stage = run.cfg, run.stage
    if stage.progress.step == 0:
        evaluate_policy(run)
    while stage.progress.step < cfg.rl.steps:
        start = time.perf_counter()
        timings: dict[str, float] = {}
        with timed(timings, "generate"):
            samples, metrics, memory = generate(run)
        metrics.update(update(run, samples, memory, timings))
        metrics.update(sync(run, timings))
        log_step(run, samples, {**metrics, **memory, **timings}, start)
        step = stage.progress.step
        if cfg.rl.eval_interval and step % cfg.rl.eval_interval == 0 and step < cfg.rl.steps:
            evaluate_policy(run)
        export_hf(cfg, stage.state.model[0], stage.spec, run.task, step)
        checkpoint_or_stop(stage)
    final = evaluate_policy(run)
    checkpoint_or_stop(stage, final=True)
    export_hf(cfg, stage.state.model[0], stage.spec, run.task, stage.progress.step, final=True)
    run.task.close()
    close_stage(stage, final)
    return final


def generate(run: RLRun) -> tuple[list[Sample], dict[str, float], dict[str, float]]:
    """Steps 1-4: this replica's samples of the step with their advantages, the step's rollout
    metrics (every replica), and the rollout phase's memory (CUDA)."""
    cfg, step = run.cfg, run.stage.progress.step
    seed = cfg.seed + step * 9973 + run.dp_rank
    draw = partial(step_prompts, run.task, step, dp_rank=run.dp_rank, dp=run.dp)
    guide = step_guide(cfg, run.task, run.guide_engine, seed) if run.scope_on and run.is_driver else None
    groups = partial(rollout_groups, run.policy, run.task, n=cfg.rl.group_size)
    memory: dict[str, float] = {}
    extra = run.stage.progress.extra
    rectify = not rectification_paused(extra, step)
    if cfg.rl.max_staleness:
        work = partial(partial_step, run, guide, seed, rectify)
    else:
        work = partial(rollout_and_rectify, groups, guide, run.prm, run.task, draw, seed, rectify)
    samples, metrics = driven(run, work, memory)
    if run.scope_on and "rollout/accuracy" in metrics:
        metrics.update(watch_accuracy(extra, step, metrics["rollout/accuracy"], cfg.scope))
    return samples, metrics, memory


def partial_step(run: RLRun, guide, seed: int, rectify: bool) -> tuple[list[Sample], dict[str, Any]]:
    """Steps 1-4 with partial rollouts (`rl.partial`), on a driver: the buffer's finished groups of the
    step, rectified and with advantages as synchronous ones; every replica's buffer into the
    checkpoint's `extra["rollouts"]`."""
    cfg, progress = run.cfg, run.stage.progress
    need = cfg.rl.prompts_per_step // run.dp
    prompts, groups, stats = partial_rollouts(run.policy, run.task, run.buffer, need, progress.step, run.dp)

    def finished(_prompts, seed: int, timings: dict[str, float]) -> list:
        timings.update({k: stats.pop(k) for k in list(stats) if k.startswith("timing_s/")})
        return groups

    draw = lambda _: prompts  # noqa: E731
    samples, metrics = rollout_and_rectify(finished, guide, run.prm, run.task, draw, seed, rectify)
    metrics.pop("rollout/engine_idle_frac", None)  # of the finished groups: the rounds give the real one
    replicas = gather_drivers((stats, run.buffer.state()))
    progress.extra["rollouts"] = [state for _, state in replicas]
    return samples, metrics | merge_partial_metrics([s for s, _ in replicas])


def update(
    run: RLRun, samples: list[Sample], memory: dict[str, float], timings: dict[str, float]
) -> dict[str, float]:
    """Steps 5 and 6, the engines asleep: the optimizer state back, reference logprobs, the optimizer
    steps. A replica whose groups dynamic sampling all dropped trains on one sample outside the loss."""
    stage, layout, pad = run.stage, run.layout, run.task.tokenizer.pad_id
    samples, balance = balance_samples(samples) if run.cfg.rl.balance_tokens else (samples, {})
    micro = rank_micro_batches(samples or [no_loss_sample(pad)], layout, pad)
    with timed(timings, "offload"):
        stage.offload.to_device()
    interval, parts = run.cfg.rl.grad_parts_interval, {}
    if interval and stage.progress.step % interval == 0 and samples:
        with timed(timings, "grad_parts"):
            parts = gradient_parts(stage.state, samples, layout, pad, run.cfg.loss)
    if run.reference is not None:
        with timed(timings, "ref_logprobs"):
            store_logprobs([run.reference], stage.spec.vocab_size, micro, "ref_logprobs")
    metrics = update_policy(stage.state, micro, run.cfg, timings) | balance | parts
    memory.update(phase_memory("update", stage.device))
    return metrics


def sync(run: RLRun, timings: dict[str, float]) -> dict[str, float]:
    """Step 7: the optimizer state to the host, then the weights to the engines (weights woken, their
    KV cache not). Returns the host memory the offload holds, against the plan's."""
    offload = run.stage.offload
    with timed(timings, "offload"):
        offload.to_host()
    metrics = {"offload/host_gib": offload.host_bytes() / 2**30} if offload.enabled else {}
    with timed(timings, "sync"):
        sync_policy_weights(run)
    return metrics


def log_step(run: RLRun, samples: list[Sample], metrics: dict[str, float], start: float) -> None:
    """Count the step done and log its metrics, with the sync phase's memory and the step's time."""
    progress = run.stage.progress
    metrics.update(phase_memory("sync", run.stage.device))
    progress.step += 1
    progress.data_position = progress.step * run.cfg.rl.prompts_per_step
    metrics["timing_s/step"] = time.perf_counter() - start
    metrics["timing/trainer_wait_frac"] = metrics["timing_s/generate"] / metrics["timing_s/step"]
    metrics["tokens_per_s"] = sum(len(s.response_ids) for s in samples) * run.dp / metrics["timing_s/step"]
    run.stage.logger.log(progress.step, metrics)


def evaluate_policy(run: RLRun) -> dict[str, float]:
    """Greedy and sampled accuracy on the held-out prompts, every replica's share, logged at the
    current step."""
    timings: dict[str, float] = {}
    with timed(timings, "eval"):
        metrics = driven(run, partial(_evaluate_replicas, run))
    run.stage.logger.log(run.stage.progress.step, {**metrics, **timings})
    return metrics


def _evaluate_replicas(run: RLRun) -> dict[str, float]:
    mine = evaluate(run.policy, run.task, run.eval_prompts, run.cfg.seed + 99)
    return weighted_mean(gather_drivers((mine, len(run.eval_prompts))))
