"""Rollouts on a replica's driver (docs/design.md section 3, steps 1-4) and evaluation.

`rollout_groups` samples and verifies `n` responses per prompt on an engine; `rollout_and_rectify` runs
a whole step's sampling (DAPO's dynamic-sampling rounds included), SCOPE's rectification (or the
configured baseline) and the advantages, and returns the step's `Sample`s and metrics; `evaluate`
scores greedy and sampled responses on held-out prompts. Prompts and seeds are functions of the step
(and round), so a resumed run draws what the straight run drew. Metrics cover every replica: the
drivers exchange theirs (`runtime.served.gather_drivers`), so every driver must make the same calls.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable

from scope_mega.config import RunConfig
from scope_mega.metrics import merge_stats, rollout_metrics, scope_metrics, timed, weighted_mean
from scope_mega.rl.batch import Sample, final_reward, to_samples
from scope_mega.rl.parts import batch_mix
from scope_mega.rollout.engine import Completion, SamplingParams
from scope_mega.runtime.served import gather_drivers
from scope_mega.scope.dense import prm_dense_advantages
from scope_mega.scope.rectify import cap_off_policy, rectify_groups
from scope_mega.scope.trajectory import Trajectory
from scope_mega.tasks import Prompt, Task

GroupTrajectories = list[Trajectory]  # one prompt's verified responses
# (prompts, seed=..., timings=...) -> one verified group of responses per prompt, e.g.
# `partial(rollout_groups, engine, task, n=group_size)`
GroupSampler = Callable[[list[Prompt], int, dict[str, float]], list[GroupTrajectories]]


def sampling_params(cfg: RunConfig, task: Task, n: int, seed: int | None) -> SamplingParams:
    """The rollout settings of `cfg.rollout` with `n` samples per prompt."""
    return SamplingParams(
        n=n,
        temperature=cfg.rollout.temperature,
        top_p=cfg.rollout.top_p,
        top_k=cfg.rollout.top_k,
        max_new_tokens=cfg.rollout.max_new_tokens,
        stop=tuple(cfg.rollout.stop),
        stop_token_ids=tuple(task.stop_token_ids),
        seed=seed,
    )


def rollout_groups(
    engine, task: Task, prompts: list[Prompt], n: int, seed: int, timings: dict[str, float] | None = None
) -> list[list[Trajectory]]:
    """`n` sampled responses per prompt from the policy's engine, verified (generation and verification
    timed into `timings` when given)."""
    with timed(timings, "rollout"):
        outs = engine.generate([p.ids for p in prompts], sampling_params(task.cfg, task, n, seed))
    return verify_groups(task, prompts, outs, timings)


def verify_groups(
    task: Task, prompts: list[Prompt], outs: list[list[Completion]], timings: dict[str, float] | None = None
) -> list[GroupTrajectories]:
    """Each prompt's completions as a verified group of trajectories (verification timed into `timings`)."""
    stops = set(task.stop_token_ids)
    groups = []
    for g, (prompt, comps) in enumerate(zip(prompts, outs)):
        texts = [task.tokenizer.decode([t for t in c.token_ids if t not in stops]) for c in comps]
        with timed(timings, "verify"):
            verdicts = task.verifier.verify_batch(texts, [prompt.info.reference] * len(texts))
        groups.append(
            [
                Trajectory(
                    prompt_ids=prompt.ids,
                    response_ids=list(c.token_ids),
                    rollout_logprobs=list(c.logprobs),
                    response_text=text,
                    reward=v.reward,
                    correct=v.correct,
                    group_id=g,
                    answer=v.extracted,
                    truncated=c.finish_reason == "length",
                )
                for c, text, v in zip(comps, texts, verdicts)
            ]
        )
    return groups


def step_prompts(task: Task, step: int, round_: int, dp_rank: int, dp: int) -> list[Prompt]:
    """This replica's share of the prompts of RL step `step`; dynamic sampling's round `round_` > 0
    draws anew. Seeded by the step and round, so a resumed run draws what the straight run drew."""
    cfg = task.cfg
    rng = random.Random(cfg.seed * 1_000_003 + step + round_ * 7_777_777)
    batch = [task.train[rng.randrange(len(task.train))] for _ in range(cfg.rl.prompts_per_step)]
    per_rank = cfg.rl.prompts_per_step // dp
    return batch[dp_rank * per_rank : (dp_rank + 1) * per_rank]


def carries_signal(group: list[Trajectory], cfg: RunConfig) -> bool:
    """DAPO's dynamic-sampling test: the group's final rewards are not all equal (equal rewards give
    every member a zero advantage: no gradient but the loss's normaliser)."""
    return len({final_reward(t, cfg) for t in group}) > 1


def rollout_and_rectify(
    sample_groups: GroupSampler,
    guide,
    prm,
    task: Task,
    draw: Callable[[int], list[Prompt]],
    seed: int,
    rectify: bool = True,
) -> tuple[list[Sample], dict[str, float]]:
    """Steps 1-4 on a replica's driver: sample and verify groups of the prompts `draw(0)`
    (`sample_groups`, e.g. `rollout_groups` on the policy's engine), rectify them (SCOPE or the
    configured baseline), compute advantages. With `rl.dynamic_sampling`, groups whose
    final rewards are all equal are dropped, and "refill" samples the prompts `draw(r)` of further rounds
    (up to `rl.max_sampling_rounds`, while any replica has fewer signal-carrying groups than prompts)
    and keeps the first ones. `rectify=False` (the SCOPE guard's pause) trains on the groups as sampled.
    `scope.max_off_policy_share` caps each round's guide tokens (`scope.rectify.cap_off_policy`).
    Metrics cover every replica (collective over drivers) and every round; `mix/*`
    (`rl.parts.batch_mix`) describe the groups kept."""
    cfg = task.cfg
    scope_cfg = cfg.scope if rectify else dataclasses.replace(cfg.scope, enabled=False)
    mode = cfg.rl.dynamic_sampling
    timings: dict[str, float] = {}
    sampled: list[list[Trajectory]] = []
    kept: list[tuple[list[Trajectory], list | None]] = []  # (final group, its dense advantages)
    all_stats, with_signal = [], 0
    first = draw(0)
    rounds = cfg.rl.max_sampling_rounds if mode == "refill" else 1
    for r in range(rounds):
        # a replica with enough groups asks for nothing, but still joins the collective calls
        prompts = (first if r == 0 else draw(r)) if len(kept) < len(first) else []
        groups = sample_groups(prompts, seed=seed + r * 7919, timings=timings)
        infos = [p.info for p in prompts]
        with timed(timings, "scope"):  # the PRM and the guide
            final, stats = rectify_groups(
                groups,
                infos,
                scope_cfg,
                tokenizer=task.tokenizer,
                verifier=task.verifier,
                guide=guide,
                prm=prm,
            )
            if scope_cfg.max_off_policy_share < 1:
                final, stats.capped = cap_off_policy(final, groups, scope_cfg.max_off_policy_share)
            dense = None
            if cfg.scope.active_method == "prm_dense":
                dense = prm_dense_advantages(
                    final,
                    infos,
                    prm,
                    task.tokenizer,
                    cfg.scope.step_delimiter,
                    cfg.advantage,
                    cfg.scope.dense_coef,
                )
        sampled += groups
        all_stats.append(stats)
        signal = [mode == "off" or carries_signal(group, cfg) for group in final]
        with_signal += sum(signal)
        kept += [(group, None if dense is None else dense[g]) for g, group in enumerate(final) if signal[g]]
        if r + 1 == rounds or not any(gather_drivers(len(kept) < len(first))):
            break
    kept = kept[: len(first)]
    n = sum(len(g) for g in sampled)
    metrics = {**rollout_metrics(sampled, ks=(1,)), **timings} if sampled else dict(timings)
    if n:
        metrics["reward"] = sum(t.reward for g in sampled for t in g) / n
        metrics["rollout/truncated_frac"] = sum(t.truncated for g in sampled for t in g) / n
        # the engine's decode slots left empty while the longest response ran (one call per round)
        longest = max(len(t.response_ids) for g in sampled for t in g)
        metrics["rollout/engine_idle_frac"] = 1 - sum(len(t.response_ids) for g in sampled for t in g) / (
            n * longest
        )
    dense = [d for _, d in kept] if cfg.scope.active_method == "prm_dense" else None
    samples = to_samples([g for g, _ in kept], cfg, dense)
    mix = batch_mix([g for g, _ in kept], samples)
    parts = gather_drivers((metrics, len(sampled), merge_stats(all_stats), with_signal, len(kept), mix))
    metrics = weighted_mean([(m, n) for m, n, *_ in parts])
    metrics.update(scope_metrics(merge_stats([st for _, _, st, *_ in parts])))
    metrics.update(weighted_mean([(p[5], p[4]) for p in parts]))  # per replica, weighted by its groups
    if mode != "off":  # groups with a signal among those sampled, those trained on, sampling rounds
        metrics["dynamic/kept_frac"] = sum(p[3] for p in parts) / max(1, sum(p[1] for p in parts))
        metrics["dynamic/kept_groups"] = sum(p[4] for p in parts)
        metrics["dynamic/rounds"] = r + 1
    return samples, metrics


def evaluate(engine, task: Task, prompts: list[Prompt], seed: int) -> dict[str, float]:
    """Greedy accuracy, avg@k and pass@k of k = `rl.eval_samples` samples, and diversity, on `prompts`.
    With no prompts it still makes its two generate calls (a collective engine needs every driver's)
    and returns no metrics."""
    cfg = task.cfg
    greedy = engine.generate(
        [p.ids for p in prompts],
        SamplingParams(
            temperature=0.0,
            max_new_tokens=cfg.rollout.max_new_tokens,
            stop=tuple(cfg.rollout.stop),
            stop_token_ids=tuple(task.stop_token_ids),
        ),
    )
    stops = set(task.stop_token_ids)
    texts = [task.tokenizer.decode([t for t in c[0].token_ids if t not in stops]) for c in greedy]
    verdicts = task.verifier.verify_batch(texts, [p.info.reference for p in prompts])
    k = cfg.rl.eval_samples
    groups = rollout_groups(engine, task, prompts, k, seed)
    if not prompts:
        return {}
    signature = task.path_signature
    m = rollout_metrics(
        groups,
        ks=(1, k),
        path_signature=None if signature is None else lambda g, text: signature(prompts[g], text),
    )
    out = {
        "eval/greedy_acc": sum(v.correct for v in verdicts) / len(prompts),
        f"eval/avg@{k}": m["rollout/accuracy"],
        f"eval/pass@{k}": m[f"rollout/pass@{k}"],
    }
    for key in ("distinct_paths", "distinct_4gram", "distinct_answers"):
        if f"rollout/{key}" in m:
            out[f"eval/{key}"] = m[f"rollout/{key}"]
    return out
