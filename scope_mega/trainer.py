"""The RL loop (docs/design.md section 3): rollout, verify, SCOPE, advantages, update, sync, eval, checkpoint.

Roles: the first rank of each model-parallel group (the "driver") runs the algorithm for its
data-parallel replica: it generates its share of the prompts, verifies, rectifies and computes
advantages, then broadcasts the finished samples to the other ranks of its replica, which all run the
Megatron step. What the driver calls that is collective, its group's other ranks join
(`runtime.served`): a model PRM's forward (TP-sharded over the model-parallel group), and every vLLM
generate. Engines: the transformers engine (`rollout.engine=hf`) lives on the driver alone and
receives the weights there; vLLM has a worker on every rank, in its own TP layout, and every rank
receives the weights (`rollout.collective`). Groups never straddle data-parallel ranks, so GRPO
statistics stay local; logged metrics average all replicas. Between updates the trainer's optimizer
state sits in host memory and its gradient buffers are released (`rl.offload`, runtime/offload.py), so
the engines have the GPU during rollouts and the weight sync. Each rollout batch gives
`rl.ppo_mini_batches` x `rl.ppo_epochs` optimizer steps (default one: fully on-policy, the old-policy
logprobs are the current ones, ratio exactly 1); the KL reference is a frozen copy of the starting
weights.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from scope_mega.checkpointing import TrainerState, load_checkpoint, save_checkpoint
from scope_mega.config import ConfigError, RunConfig, to_dict
from scope_mega.logging import MetricsLogger, is_rank0
from scope_mega.metrics import merge_stats, rollout_metrics, scope_metrics, timed, weighted_mean
from scope_mega.models.arch import load_hf_config
from scope_mega.models.gpt import build_gpt_model
from scope_mega.plan import check_memory_here
from scope_mega.rl.advantages import group_advantages, overlong_reward
from scope_mega.rl.loss import PolicyLossConfig, policy_loss
from scope_mega.rl.packing import cu_seqlens, pack_by_token_budget
from scope_mega.rollout.engine import SamplingParams
from scope_mega.rollout.factory import make_engine
from scope_mega.rollout.weight_sync import sync_weights
from scope_mega.run_dir import RL_CHECKPOINTS, SFT_CHECKPOINTS, has_checkpoint, latest_checkpoint
from scope_mega.runtime import preemption
from scope_mega.runtime.distributed import init_distributed
from scope_mega.runtime.offload import TrainerOffload, offload_wanted
from scope_mega.runtime.served import Served
from scope_mega.scope.dense import prm_dense_advantages
from scope_mega.scope.guides import SampledContinuer, make_guide
from scope_mega.scope.prm import CountdownOraclePRM
from scope_mega.scope.rectify import rectify_groups
from scope_mega.scope.trajectory import Trajectory
from scope_mega.tasks import Prompt, Task, build_task
from scope_mega.train_step import Batch, TrainState, setup_training, store_logprobs, train_step
from scope_mega.weights.hf_export import export_hf
from scope_mega.weights.megatron_ckpt import load_model_weights


@dataclass
class Sample:
    """One training sequence: prompt + response tokens with per-response-token loss inputs."""

    prompt_ids: list[int]
    response_ids: list[int]
    advantages: list[float]
    off_policy: list[bool]
    rollout_logprobs: list[float]  # 0.0 on guide tokens (never sampled by the policy's engine)
    guide_logprobs: list[float] | None = None  # an engine guide's logprobs; 0.0 on the policy's tokens
    in_loss: bool = True  # False: masked out (a cut-off response under rl.overlong=mask)


# ----------------------------------------------------------------------------- rollouts


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


def final_reward(t: Trajectory, cfg: RunConfig) -> float:
    """The reward a trajectory's advantage sees: the verifier's, plus the overlong penalty if set."""
    if cfg.rl.overlong != "penalty":
        return t.reward
    length, limit = len(t.response_ids), cfg.rollout.max_new_tokens
    return t.reward + overlong_reward(length, limit, cfg.rl.overlong_buffer, cfg.rl.overlong_penalty)


def to_samples(groups: list[list[Trajectory]], cfg: RunConfig, dense: list | None) -> list[Sample]:
    """GRPO advantages over the final groups (or PRM-dense ones), one Sample per trajectory."""
    samples = []
    for g, group in enumerate(groups):
        rewards = torch.tensor([[final_reward(t, cfg) for t in group]])
        adv = group_advantages(rewards, cfg.advantage)[0].tolist()
        for i, t in enumerate(group):
            per_token = dense[g][i] if dense is not None else [adv[i]] * len(t.response_ids)
            samples.append(
                Sample(
                    prompt_ids=t.prompt_ids,
                    response_ids=t.response_ids,
                    advantages=per_token,
                    off_policy=list(t.off_policy),
                    rollout_logprobs=[0.0 if o else lp for o, lp in zip(t.off_policy, t.rollout_logprobs)],
                    guide_logprobs=None
                    if t.guide_logprobs is None
                    else [lp if o else 0.0 for o, lp in zip(t.off_policy, t.guide_logprobs)],
                    in_loss=not (cfg.rl.overlong == "mask" and t.truncated),
                )
            )
    return samples


def no_loss_sample(pad_id: int) -> Sample:
    """A one-token sample outside the loss: the micro-batch of a replica with nothing to train on."""
    return Sample([pad_id], [pad_id], [0.0], [False], [0.0], in_loss=False)


def _sample_tensors(s: Sample) -> Batch:
    """One sample's 1-D tensors over its positions, aligned to targets (position t predicts token t+1);
    the loss inputs are 0 on the prompt."""
    toks = torch.tensor(s.prompt_ids + s.response_ids)
    lo = len(s.prompt_ids) - 1  # the target position of the first response token
    per_token = {
        "advantages": s.advantages,
        "off_policy": s.off_policy,
        "rollout_logprobs": s.rollout_logprobs,
    }
    if s.guide_logprobs is not None:
        per_token["guide_logprobs"] = s.guide_logprobs
    for name, values in per_token.items():
        if len(values) != len(s.response_ids):
            raise ValueError(f"a sample has {len(values)} {name} for {len(s.response_ids)} response tokens")
    offp = torch.tensor(s.off_policy, dtype=torch.bool)
    out = {"input_ids": toks[:-1], "targets": toks[1:]}
    response = {
        "on_mask": (~offp).float() * s.in_loss,
        "off_mask": offp.float() * s.in_loss,
        "advantages": torch.tensor(s.advantages),
        "rollout_logprobs": torch.tensor(s.rollout_logprobs),
        "guide_logprobs": torch.tensor(s.guide_logprobs or [0.0] * len(offp)),
    }
    for key, values in response.items():
        out[key] = torch.cat([torch.zeros(lo), values])
    return out


def to_micro_batches(
    samples: list[Sample],
    micro: int,
    pad_id: int,
    max_tokens: int | None = None,
    thd: bool = False,
    align: int = 1,
) -> list[Batch]:
    """The samples as micro-batches of [b, s] tensors (`_sample_tensors`), in one of two layouts.

    Padded: `micro` samples each, right-padded to the longest sample of all; or, with `max_tokens`,
    packed by that token budget (`rl.packing.pack_by_token_budget`), each padded to its own longest.
    THD (`thd`, needs `max_tokens`): each micro-batch is one row of its samples end to end, padded to
    a multiple of `align`, with `cu_seqlens` (the samples' boundaries, the padding a segment of its
    own) and `seq_index` (each position's sample within the row) for per-sequence loss aggregation.
    A sample longer than the budget (a long salvaged trajectory) gets a micro-batch of its own.
    `tokens` holds each micro-batch's count of real positions."""
    lengths = [len(s.prompt_ids) + len(s.response_ids) - 1 for s in samples]
    if max_tokens is None:
        if thd:
            raise ValueError("the THD layout packs by a token budget: give max_tokens")
        indices = [list(range(i, min(i + micro, len(samples)))) for i in range(0, len(samples), micro)]
    else:
        # a THD row's rounding up to `align` stays within a budget that is a multiple of it
        budget = max_tokens // align * align if thd else max_tokens
        indices = pack_by_token_budget(lengths, max(budget, *lengths), thd=thd)
    fill = {"input_ids": pad_id, "targets": pad_id}
    batches = []
    for idx in indices:
        rows = [_sample_tensors(samples[i]) for i in idx]
        if thd:
            bounds, pad = cu_seqlens([lengths[i] for i in idx], align)
            tail = {key: value.new_full((pad,), fill.get(key, 0)) for key, value in rows[0].items()}
            batch = {key: torch.cat([*(r[key] for r in rows), tail[key]])[None] for key in tail}
            batch["position_ids"] = torch.cat([torch.arange(b - a) for a, b in zip(bounds, bounds[1:])])[None]
            batch["cu_seqlens"] = torch.tensor(bounds, dtype=torch.int32)
            batch["seq_index"] = torch.repeat_interleave(
                torch.arange(len(bounds) - 1), torch.tensor(bounds).diff()
            )[None]
        else:
            seq = max(lengths) if max_tokens is None else max(lengths[i] for i in idx)
            batch = {
                key: torch.stack(
                    [F.pad(r[key], (0, seq - r[key].numel()), value=fill.get(key, 0)) for r in rows]
                )
                for key in rows[0]
            }
            batch["position_ids"] = torch.arange(seq).expand(len(rows), seq)
        batch["tokens"] = torch.tensor(sum(lengths[i] for i in idx))
        batches.append(batch)
    return batches


def rl_loss(cfg: PolicyLossConfig, logprobs: torch.Tensor, batch: Batch, entropy: torch.Tensor | None):
    """The one policy loss on a micro-batch. Old logprobs: the batch's `old_logprobs` (stored before the
    first of several updates), else the current ones (a single update: ratio exactly 1). Reference
    logprobs are there when the loss has a KL term (`store_logprobs`); guide logprobs are zero on
    tokens the guide did not write, and only the "clip" off-policy loss reads them."""
    old = batch.get("old_logprobs")
    return policy_loss(
        logprobs,
        logprobs.detach() if old is None else old,
        batch["advantages"],
        batch["on_mask"],
        batch["off_mask"],
        cfg,
        ref_logprobs=batch.get("ref_logprobs"),
        rollout_logprobs=batch["rollout_logprobs"],
        guide_logprobs=batch["guide_logprobs"] if cfg.off_policy == "clip" else None,
        entropy=entropy,
        seq_index=batch.get("seq_index"),
    )


PER_UPDATE = ("ratio", "clip_frac_low", "clip_frac_high", "kl", "loss", "lr")  # logged for each update


def update_policy(
    state: TrainState, micro: list[Batch], cfg: RunConfig, timings: dict[str, float]
) -> dict[str, float]:
    """Steps 4 and 6: `rl.ppo_epochs` passes over `rl.ppo_mini_batches` mini-batches (consecutive
    micro-batches, as even as they split), one optimizer step each. With several steps the old-policy
    logprobs come from one forward of the pre-update weights first; a single step uses the current
    ones. Metrics: the mean over the updates, and each update's ratio, clip fractions and KL as
    `update_<i>/<name>`."""
    from megatron.core import parallel_state

    n, epochs = cfg.rl.ppo_mini_batches, cfg.rl.ppo_epochs
    if n * epochs > 1:
        with timed(timings, "old_logprobs"):
            store_logprobs(state.model, state.vocab_size, micro, "old_logprobs")
    bounds = [len(micro) * i // n for i in range(n + 1)]
    chunks = [micro[lo:hi] for lo, hi in zip(bounds, bounds[1:])]
    # loss tokens of each mini-batch over every replica: one without any (dynamic sampling dropped
    # them all) is no step; a replica short of micro-batches joins a step with one outside the loss
    tokens = [sum(float(b["on_mask"].sum() + b["off_mask"].sum()) for b in c) for c in chunks]
    real, slots = sum(float(b["tokens"]) for b in micro), sum(b["input_ids"].numel() for b in micro)
    device = next(state.model[0].parameters()).device
    counts = torch.tensor([*tokens, real, slots], dtype=torch.float64, device=device)  # exact counts
    dist.all_reduce(counts, group=parallel_state.get_data_parallel_group())
    tokens, (real, slots) = counts[:-2].tolist(), counts[-2:].tolist()
    outside = {
        **micro[0],
        "on_mask": torch.zeros_like(micro[0]["on_mask"]),
        "off_mask": torch.zeros_like(micro[0]["off_mask"]),
    }
    updates = []
    with timed(timings, "update"):
        for _ in range(epochs):
            for chunk, count in zip(chunks, tokens):
                if count:
                    loss = partial(rl_loss, cfg.loss)
                    updates.append(train_step(state, chunk or [outside], loss, need_entropy=True))
    packing = {"updates": len(updates), "packing/pad_frac": 1 - real / slots}
    if not updates:
        return packing
    metrics = {k: sum(u[k] for u in updates) / len(updates) for k in updates[0]} | packing
    if len(updates) > 1:
        for i, u in enumerate(updates, 1):
            metrics.update({f"update_{i}/{k}": u[k] for k in PER_UPDATE if k in u})
    return metrics


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
    engine, guide, prm, task: Task, draw: Callable[[int], list[Prompt]], seed: int
) -> tuple[list[Sample], dict[str, float]]:
    """Steps 1-3 and 5 on a replica's driver: sample and verify groups of the prompts `draw(0)`, rectify
    them (SCOPE or the configured baseline), compute advantages. With `rl.dynamic_sampling`, groups whose
    final rewards are all equal are dropped, and "refill" samples the prompts `draw(r)` of further rounds
    (up to `rl.max_sampling_rounds`, while any replica has fewer signal-carrying groups than prompts)
    and keeps the first ones. Metrics cover every replica (collective over drivers) and every round."""
    cfg = task.cfg
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
        groups = rollout_groups(engine, task, prompts, cfg.rl.group_size, seed + r * 7919, timings)
        infos = [p.info for p in prompts]
        with timed(timings, "scope"):  # the PRM and the guide
            final, stats = rectify_groups(
                groups,
                infos,
                cfg.scope,
                tokenizer=task.tokenizer,
                verifier=task.verifier,
                guide=guide,
                prm=prm,
            )
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
        if r + 1 == rounds or not any(_gather_drivers(len(kept) < len(first))):
            break
    kept = kept[: len(first)]
    n = sum(len(g) for g in sampled)
    metrics = {**rollout_metrics(sampled, ks=(1,)), **timings} if sampled else dict(timings)
    if n:
        metrics["reward"] = sum(t.reward for g in sampled for t in g) / n
        metrics["rollout/truncated_frac"] = sum(t.truncated for g in sampled for t in g) / n
    parts = _gather_drivers((metrics, len(sampled), merge_stats(all_stats), with_signal, len(kept)))
    metrics = weighted_mean([(m, n) for m, n, *_ in parts])
    metrics.update(scope_metrics(merge_stats([st for _, _, st, *_ in parts])))
    if mode != "off":  # groups with a signal among those sampled, those trained on, sampling rounds
        metrics["dynamic/kept_frac"] = sum(p[3] for p in parts) / max(1, sum(p[1] for p in parts))
        metrics["dynamic/kept_groups"] = sum(p[4] for p in parts)
        metrics["dynamic/rounds"] = r + 1
    dense = [d for _, d in kept] if cfg.scope.active_method == "prm_dense" else None
    return to_samples([g for g, _ in kept], cfg, dense), metrics


# ----------------------------------------------------------------------------- evaluation


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


# ----------------------------------------------------------------------------- roles


def check_wired(cfg: RunConfig, world_size: int | None = None, target: str | None = None) -> None:
    """Refuse, before any process starts work, combinations the trainer cannot run. `world_size`: the
    launch's, where known; `target`: the device kind a `--dry-run` plans for (None: this machine's)."""
    if cfg.rollout.engine == "vllm":
        check_vllm(cfg, world_size, target)
    countdown_only = {
        "scope.guide=oracle": cfg.scope.enabled and cfg.scope.guide == "oracle",
        "guide.prm=oracle": cfg.guide.prm == "oracle" and cfg.scope.enabled,
    }
    for what, asked in countdown_only.items():
        if asked and cfg.data.task != "countdown":
            raise ConfigError(
                f"{what} is Countdown's solver/checker; data.task={cfg.data.task} needs a model"
            )
    if cfg.scope.enabled and cfg.scope.guide == "engine" and not cfg.guide.guide_model:
        raise ConfigError("scope.guide=engine needs guide.guide_model (a Hugging Face model directory)")
    if cfg.loss.off_policy == "clip" and not (cfg.scope.enabled and cfg.scope.guide == "engine"):
        raise ConfigError(
            "loss.off_policy=clip needs the guide's logprobs: set scope.guide=engine, or use "
            "loss.off_policy=shaping"
        )
    if cfg.loss.kl_coef > 0 and _init_weights_path(cfg) is None:
        raise ConfigError(
            "loss.kl_coef > 0 needs the starting weights as the reference: set rl.init_from or run the "
            "SFT stage into this run directory first"
        )
    if cfg.scope.enabled and cfg.guide.prm == "model" and not cfg.guide.prm_path:
        raise ConfigError("guide.prm=model needs guide.prm_path (a converted PRM checkpoint directory)")


def check_vllm(cfg: RunConfig, world_size: int | None, target: str | None = None) -> None:
    """What vLLM cannot serve as configured: its TP against the world size and the policy's (and an
    engine guide's) heads, CPU attention's head sizes, FP8 weights without CUDA. The guide is served
    by a second engine at the policy engine's TP (vLLM keeps one TP layout per process). A plan for
    another machine (`target`) skips a guide whose directory is not on this one."""
    from scope_mega.rollout.vllm_engine import vllm_support_problem
    from scope_mega.runtime.distributed import resolve_device

    tp = cfg.rollout.vllm_tensor_parallel_size
    if world_size is not None and world_size % tp:
        raise ConfigError(
            f"rollout.vllm_tensor_parallel_size={tp} must divide the world size {world_size} "
            "(vLLM runs world / TP replicas, one worker on every rank)"
        )
    on_cpu = (target or resolve_device(cfg.device).type) == "cpu"
    if on_cpu and cfg.rollout.vllm_fp8_weights:
        raise ConfigError("rollout.vllm_fp8_weights needs CUDA (vLLM's CPU build cannot serve FP8)")
    models = {"the policy": cfg.model.hf_config}
    guide = cfg.guide.guide_model if cfg.scope.enabled and cfg.scope.guide == "engine" else None
    if guide and (target is None or (Path(guide) / "config.json").is_file()):
        models["the guide (guide.guide_model)"] = guide
    for what, source in models.items():
        if problem := vllm_support_problem(load_hf_config(source), tp, on_cpu):
            raise ConfigError(f"rollout.engine=vllm cannot serve {what}: {problem}")


def build_prm(cfg: RunConfig, device: torch.device, served: Served):
    """SCOPE's PRM: Countdown's exact step checker, or a Megatron PRM loaded on every rank of the
    model-parallel group (in the policy's TP and PP layout), driven by the group's driver (`ServedPRM`)."""
    if cfg.guide.prm == "oracle":
        return CountdownOraclePRM(cfg.task.ops)
    import transformers

    from scope_mega.models.prm import MegatronPRM, ServedPRM, build_prm_model, load_prm_weights

    path = Path(cfg.guide.prm_path)
    if not (path / "model").is_dir() or not (path / "hf").is_dir():
        raise ConfigError(
            f"guide.prm_path={path} is not a converted checkpoint (no model/ and hf/); convert the HF PRM "
            f"with: scope-mega convert hf-to-megatron --hf-dir HF_PRM_DIR --out {path}"
        )
    model_cfg = dataclasses.replace(cfg.model, hf_config=str(path / "hf"))
    kv_heads = load_hf_config(model_cfg.hf_config).num_key_value_heads
    if kv_heads % cfg.parallel.tp:
        raise ConfigError(
            f"the PRM in {path} has {kv_heads} KV heads; it runs at the trainer's parallel.tp="
            f"{cfg.parallel.tp}, which must divide them"
        )
    model, spec = build_prm_model(model_cfg, cfg.parallel, device)
    load_prm_weights(path, model, spec)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path / "hf", local_files_only=True)
    return ServedPRM(MegatronPRM(model, tokenizer), served)


def rollout_model_dir(cfg: RunConfig) -> Path:
    """A model directory for the policy's vLLM engine: the resolved HF config (vocab from the task's
    tokenizer), no weights -- vLLM starts from dummy ones, replaced by the first sync before any
    generate. Every rank writes its own copy and renames it into place (identical content)."""
    out = Path(cfg.run_dir) / "rollout_model"
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".config.json.{dist.get_rank()}"
    load_hf_config(cfg.model.hf_config).to_json_file(tmp)
    tmp.replace(out / "config.json")
    return out


def build_engine(cfg: RunConfig, task: Task, model, name: str, served: Served):
    """The engine serving `model` (the policy's config, or the guide's model directory) as this rank
    holds it, and as its driver generates with it: the transformers engine on drivers only (others:
    None, None); vLLM on every rank, a `CollectiveEngine` for the driver."""
    kwargs = dict(decode=task.tokenizer.decode, eos_token_ids=task.stop_token_ids)
    if cfg.rollout.engine == "hf":
        engine = make_engine("hf", model, **kwargs) if served.is_driver else None
        return engine, engine
    from scope_mega.rollout.collective import CollectiveEngine

    policy = name == "policy"
    local = make_engine(
        "vllm",
        model,
        tensor_parallel_size=cfg.rollout.vllm_tensor_parallel_size,
        gpu_memory_utilization=(cfg.rollout if policy else cfg.guide).vllm_gpu_memory_utilization,
        quantization="fp8" if cfg.rollout.vllm_fp8_weights else None,
        sleep_level=cfg.rollout.vllm_sleep_level if policy else 1,  # a guide is never re-synced
        seed=cfg.seed,
        **kwargs,
    )
    return local, CollectiveEngine(local, served, name)


def step_guide(cfg: RunConfig, task: Task, engine, seed: int):
    """The SCOPE/LUFFY guide for one step: Countdown's solver, or a teacher served by `engine` (the
    driver's view of the engine for `guide.guide_model`, same tokenizer as the policy), sampling with
    the rollout settings. Seeded by the step, so a resumed run draws what the straight run drew."""
    return make_guide(
        cfg.scope.guide,
        delimiter=cfg.scope.step_delimiter,
        engine=None if engine is None else SampledContinuer(engine, sampling_params(cfg, task, 1, seed)),
        oracle_ops=cfg.task.ops,
        seed=seed,
    )


def build_reference(cfg: RunConfig, device: torch.device) -> torch.nn.Module:
    """The frozen KL reference: the policy's architecture holding the weights RL starts from."""
    reference, _ = build_gpt_model(cfg.model, cfg.parallel, device)
    load_model_weights(_init_weights_path(cfg), reference)
    reference.eval()
    reference.requires_grad_(False)
    return reference


def phase_memory(phase: str, device: torch.device) -> dict[str, float]:
    """On CUDA, this rank's GPU memory in the phase that just ended: the peak the PyTorch allocator
    held (the trainer; vLLM's own pool is not in it) and the device's use at its end (everything,
    vLLM included), in GiB; then the peak is reset for the next phase. Nothing on CPU."""
    if device.type != "cuda":
        return {}
    free, total = torch.cuda.mem_get_info()
    out = {
        f"memory/{phase}_peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        f"memory/{phase}_used_gib": (total - free) / 2**30,
    }
    torch.cuda.reset_peak_memory_stats()
    return out


def _driver_broadcast(obj, is_driver: bool):
    """Send the driver's Python object to every rank of its model-parallel group."""
    from megatron.core import parallel_state

    group = parallel_state.get_model_parallel_group()
    if dist.get_world_size(group) == 1:
        return obj
    box = [obj if is_driver else None]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    return box[0]


def _gather_drivers(obj) -> list:
    """`obj` of every data-parallel replica's driver; called by drivers only (their DP group is the
    drivers' group: every driver is model-parallel rank 0)."""
    from megatron.core import parallel_state

    group = parallel_state.get_data_parallel_group()
    if dist.get_world_size(group) == 1:
        return [obj]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def _init_weights_path(cfg: RunConfig) -> Path | None:
    if cfg.rl.init_from:
        p = Path(cfg.rl.init_from)
        return latest_checkpoint(p) or p
    return latest_checkpoint(Path(cfg.run_dir) / SFT_CHECKPOINTS)  # the SFT stage of the same run


# ----------------------------------------------------------------------------- the loop


def run_train(cfg: RunConfig) -> dict[str, float]:
    """The RL stage; returns the final evaluation metrics. Exits with PREEMPTED_EXIT_CODE on a stop signal."""
    from megatron.core import parallel_state

    world = int(os.environ.get("WORLD_SIZE", "1"))
    check_wired(cfg, world)
    check_memory_here(cfg, world)  # every phase fits this node's GPUs (CUDA), or a one-line error
    device = init_distributed(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.cp, cfg.device, cfg.seed)
    preemption.install_handlers()
    task = build_task(cfg)
    cfg = task.cfg
    dp_rank = parallel_state.get_data_parallel_rank()
    dp = parallel_state.get_data_parallel_world_size()
    if cfg.rl.prompts_per_step % dp:
        raise ConfigError(
            f"rl.prompts_per_step={cfg.rl.prompts_per_step} must be divisible by the DP size {dp}"
        )
    seqs = cfg.rl.prompts_per_step // dp * cfg.rl.group_size
    n_micro = -(-seqs // cfg.rl.micro_batch_size)
    if cfg.rl.max_tokens_per_micro_batch is None and n_micro < cfg.rl.ppo_mini_batches:
        raise ConfigError(
            f"rl.ppo_mini_batches={cfg.rl.ppo_mini_batches} is more than the {n_micro} micro-batches of "
            f"rl.micro_batch_size={cfg.rl.micro_batch_size} that {seqs} sequences per DP rank make: "
            "lower one of them"
        )
    is_driver = parallel_state.get_model_parallel_group().rank() == 0

    model, spec = build_gpt_model(cfg.model, cfg.parallel, device)
    # packed micro-batches in the THD layout (rl.packing), each row a multiple of 16 tokens for FP8
    # GEMMs and of TP for sequence parallelism, which splits it over the TP ranks
    packing = (
        cfg.rl.packing if cfg.rl.packing != "auto" else "thd" if spec.transformer_impl == "te" else "padded"
    )
    thd = packing == "thd" and cfg.rl.max_tokens_per_micro_batch is not None
    align = math.lcm(
        16 if cfg.model.fp8.enabled else 1, cfg.parallel.tp if cfg.parallel.sequence_parallel else 1
    )
    ckpt_root = Path(cfg.run_dir) / RL_CHECKPOINTS
    resume = latest_checkpoint(ckpt_root) if cfg.checkpoint.resume else None
    init = None if resume else _init_weights_path(cfg)
    if init is not None:
        load_model_weights(init, model)
    decays = cfg.rl.decay_style != "constant"
    rl_optim = dataclasses.replace(
        cfg.optim,
        lr=cfg.rl.lr,
        min_lr=cfg.rl.min_lr if decays else cfg.rl.lr,
        warmup_steps=0,
        decay_style=cfg.rl.decay_style,
    )
    optimizer_steps = cfg.rl.steps * cfg.rl.ppo_mini_batches * cfg.rl.ppo_epochs
    state = setup_training(model, spec.vocab_size, rl_optim, cfg.parallel, optimizer_steps)
    trainer = load_checkpoint(resume, state) if resume else TrainerState()
    # between updates the trainer keeps only its weights on the device (`rl.offload`); the engines,
    # built next, find the memory free
    offload = TrainerOffload(state, offload_wanted(cfg.rl.offload, device.type))
    offload.to_host()
    reference = build_reference(cfg, device) if cfg.loss.kl_coef > 0 else None

    scope_on = cfg.scope.enabled and cfg.scope.active_method != "grpo"
    served = Served(is_driver)
    prm = build_prm(cfg, device, served) if scope_on else None
    vllm = cfg.rollout.engine == "vllm"
    # engine: this rank's (None on an hf engine's non-drivers); policy: what the driver generates with
    source = rollout_model_dir(cfg) if vllm else cfg.model.hf_config
    engine, policy = build_engine(cfg, task, source, "policy", served)
    guide_engine = guide_driver = None  # this rank's engine for an engine guide; the driver's view
    if scope_on and cfg.scope.guide == "engine":
        guide_engine, guide_driver = build_engine(cfg, task, cfg.guide.guide_model, "guide", served)
    engines = [e for e in (engine, guide_engine) if e is not None]
    bucket = cfg.rollout.sync_bucket_mb << 20
    sync_weights(engine, state.model[0], spec, bucket, every_rank=vllm)

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
    my_eval = task.eval[dp_rank::dp]  # each replica's driver evaluates its share

    def driven(work, memory: dict[str, float] | None = None):
        """`work()` on the driver while the group's other ranks serve its collective calls, with this
        rank's engines awake (their memory, CUDA, into `memory` before they sleep); the driver's
        result, broadcast to the group."""
        for e in engines:
            e.wake_up()
        result = None
        if is_driver:
            try:
                result = work()
            finally:
                served.release()
        else:
            served.serve()
        if memory is not None:
            memory.update(phase_memory("rollout", device))
        for e in engines:
            e.sleep()
        return _driver_broadcast(result, is_driver)

    def run_eval(step: int) -> dict[str, float]:
        def work():
            mine = evaluate(policy, task, my_eval, cfg.seed + 99)
            return weighted_mean(_gather_drivers((mine, len(my_eval))))

        timings: dict[str, float] = {}
        with timed(timings, "eval"):
            metrics = driven(work)
        logger.log(step, {**metrics, **timings})
        return metrics

    if trainer.step == 0:
        run_eval(0)
    while trainer.step < cfg.rl.steps:
        t0 = time.perf_counter()
        # 1-3. rollouts, verification and SCOPE on each replica's driver (the PRM's other ranks serve it)
        draw = partial(step_prompts, task, trainer.step, dp_rank=dp_rank, dp=dp)
        seed = cfg.seed + trainer.step * 9973 + dp_rank
        guide = step_guide(cfg, task, guide_driver, seed) if scope_on and is_driver else None
        memory: dict[str, float] = {}
        samples, metrics = driven(partial(rollout_and_rectify, policy, guide, prm, task, draw, seed), memory)
        # 4-6. the engines asleep, the trainer's state back; reference logprobs, the optimizer steps
        # (a replica whose groups dynamic sampling all dropped trains on one sample outside the loss)
        pad = task.tokenizer.pad_id
        micro = to_micro_batches(
            samples or [no_loss_sample(pad)],
            cfg.rl.micro_batch_size,
            pad,
            cfg.rl.max_tokens_per_micro_batch,
            thd=thd,
            align=align,
        )
        timings: dict[str, float] = {}
        with timed(timings, "offload"):
            offload.to_device()
        if reference is not None:
            with timed(timings, "ref_logprobs"):
                store_logprobs([reference], spec.vocab_size, micro, "ref_logprobs")
        metrics.update(update_policy(state, micro, cfg, timings))
        memory.update(phase_memory("update", device))
        # 7. the trainer's state to the host, then its weights to the engines (weights woken, KV cache not)
        with timed(timings, "offload"):
            offload.to_host()
        if offload.enabled:  # against the plan's host memory per GPU
            metrics["offload/host_gib"] = offload.host_bytes() / 2**30
        with timed(timings, "sync"):
            sync_weights(engine, state.model[0], spec, bucket, every_rank=vllm)
        metrics.update(memory, **timings, **phase_memory("sync", device))
        # 8. log, evaluate, checkpoint
        trainer.step += 1
        trainer.data_position = trainer.step * cfg.rl.prompts_per_step
        tokens = sum(len(s.response_ids) for s in samples) * dp
        metrics["timing_s/step"] = time.perf_counter() - t0
        metrics["tokens_per_s"] = tokens / metrics["timing_s/step"]
        logger.log(trainer.step, metrics)
        if cfg.rl.eval_interval and trainer.step % cfg.rl.eval_interval == 0 and trainer.step < cfg.rl.steps:
            run_eval(trainer.step)
        stop = preemption.should_stop()
        periodic = cfg.checkpoint.save_interval and trainer.step % cfg.checkpoint.save_interval == 0
        if stop or periodic:
            with offload.on_device():
                save_checkpoint(ckpt_root, state, trainer, config_dict, cfg.checkpoint.keep_last)
        export_hf(cfg, state.model[0], spec, task, trainer.step)
        if stop:
            logger.close()
            print(f"stop signal: checkpoint at step {trainer.step} written; exiting for requeue", flush=True)
            sys.exit(preemption.PREEMPTED_EXIT_CODE)

    final_metrics = run_eval(trainer.step)
    if not has_checkpoint(ckpt_root, trainer.step):
        with offload.on_device():
            save_checkpoint(ckpt_root, state, trainer, config_dict, cfg.checkpoint.keep_last)
    export_hf(cfg, state.model[0], spec, task, trainer.step, final=True)
    logger.close()
    task.close()
    if is_rank0():
        print(" ".join(f"{k}={v:.4f}" for k, v in final_metrics.items()), flush=True)
    return final_metrics
