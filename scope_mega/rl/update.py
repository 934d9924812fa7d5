"""The RL update (docs/design.md section 3, steps 5 and 6): PPO epochs over mini-batches of a step's
micro-batches, one optimizer step each, through the one policy loss.

`rl_loss` adapts `rl.loss.policy_loss` to a micro-batch of `rl.batch.to_micro_batches`. The old-policy
logprobs are the batch's `old_logprobs` (one forward of the pre-update weights, stored before the first
of several updates, or the rollout engine's with `rl.old_logprobs="rollout"`), else the current ones (a
single update: ratio exactly 1). Token counts are
summed over every data-parallel replica in float64 (exact past 2^24), so a replica whose dynamic
sampling dropped every group still joins each optimizer step with a micro-batch outside the loss.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist

from scope_mega.config import RunConfig
from scope_mega.metrics import timed
from scope_mega.models.pipeline import Batch
from scope_mega.rl.loss import LOG_RATIO_CLAMP, PolicyLossConfig, kl_penalty, policy_loss
from scope_mega.train_step import TrainState, store_logprobs, train_step


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
        seq_tokens=batch.get("seq_tokens"),
        seq_first=batch.get("seq_first"),
    )


def behaviour_weights(micro: list[Batch], cap: float) -> dict[str, float]:
    """Decoupled PPO's behaviour weight min(exp(proximal - behaviour logprob), cap) over the policy's
    tokens of the step (it does not change between updates): its mean, max and truncated fraction
    before the cap, and the behaviour/proximal KL (`loss.kl_penalty`'s k3 of r = proximal/behaviour).
    The loss applies it as `loss.tis_cap`'s weight. Summed over the world: only the last pipeline
    stage holds the proximal logprobs, tensor-parallel ranks hold the same ones (every sum and count
    scales alike), context-parallel and data-parallel ranks hold disjoint tokens (one process: its own)."""
    sums = torch.zeros(4, dtype=torch.float64)
    top = torch.zeros(1, dtype=torch.float64)
    for mb in micro:
        if "old_logprobs" not in mb:  # not the last pipeline stage
            continue
        on = mb["on_mask"].bool()
        proximal, behaviour = mb["old_logprobs"][on].double(), mb["rollout_logprobs"][on].double()
        r = (proximal - behaviour).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()
        kl = kl_penalty(behaviour, proximal, "k3")  # k3 of r = proximal / behaviour
        sums += torch.stack([r.sum(), (r > cap).sum(), kl.sum(), r.new_tensor(r.numel())]).cpu()
        top = torch.maximum(top, r.max().cpu().reshape(1) if r.numel() else top)
    device = micro[0]["on_mask"].device
    sums, top = sums.to(device), top.to(device)
    if dist.is_initialized():
        dist.all_reduce(sums)
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
    weight, clipped, kl, count = sums.tolist()
    if not count:
        return {}
    return {
        "behav/weight_mean": weight / count,
        "behav/weight_max": top.item(),
        "behav/clip_frac": clipped / count,
        "behav/kl": kl / count,
    }


PER_UPDATE = (
    "ratio",
    "abs_log_ratio",
    "clip_frac_low",
    "clip_frac_high",
    "kl",
    "loss",
    "lr",
)  # logged for each update


def update_policy(
    state: TrainState, micro: list[Batch], cfg: RunConfig, timings: dict[str, float]
) -> dict[str, float]:
    """Steps 5 and 6: `rl.ppo_epochs` passes over `rl.ppo_mini_batches` mini-batches (consecutive
    micro-batches, as even as they split), one optimizer step each. With several steps the old-policy
    logprobs come from one forward of the pre-update weights first; a single step uses the current
    ones; with `rl.old_logprobs="rollout"` every step uses the engine's. Metrics: the mean over the
    updates, and each update's ratio, |log-ratio|, clip fractions and KL as `update_<i>/<name>`."""
    from megatron.core import parallel_state

    n, epochs = cfg.rl.ppo_mini_batches, cfg.rl.ppo_epochs
    if cfg.rl.old_logprobs == "rollout":  # the engine's logprobs: no forward (0 on guide tokens, unread)
        for mb in micro:
            mb["old_logprobs"] = mb["rollout_logprobs"]
    elif n * epochs > 1 or cfg.rl.max_staleness:  # partial rollouts: the proximal policy's, always
        with timed(timings, "old_logprobs"):
            store_logprobs(state.model, state.vocab_size, micro, "old_logprobs")
    behaviour = behaviour_weights(micro, cfg.loss.tis_cap) if cfg.rl.max_staleness else {}
    bounds = [len(micro) * i // n for i in range(n + 1)]
    chunks = [micro[lo:hi] for lo, hi in zip(bounds, bounds[1:])]
    # loss tokens of each mini-batch over every replica: one without any (dynamic sampling dropped
    # them all) is no step; a replica short of micro-batches joins a step with one outside the loss.
    # Each CP rank counts the tokens it holds; `tokens` is a whole micro-batch's, so its share is 1/cp
    tokens = [sum(float(b["on_mask"].sum() + b["off_mask"].sum()) for b in c) for c in chunks]
    cp = parallel_state.get_context_parallel_world_size()
    real, slots = sum(float(b["tokens"]) / cp for b in micro), sum(b["input_ids"].numel() for b in micro)
    device = next(state.model[0].parameters()).device
    counts = torch.tensor([*tokens, real, slots], dtype=torch.float64, device=device)  # exact counts
    dist.all_reduce(counts, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
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
    packing = {"updates": len(updates), "packing/pad_frac": 1 - real / slots} | behaviour
    if not updates:
        return packing
    metrics = {k: sum(u[k] for u in updates) / len(updates) for k in updates[0]} | packing
    if len(updates) > 1:
        for i, u in enumerate(updates, 1):
            metrics.update({f"update_{i}/{k}": u[k] for k in PER_UPDATE if k in u})
    return metrics
