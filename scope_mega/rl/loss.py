"""The one policy loss: PPO-clipped on-policy tokens, shaped or clipped off-policy (guide) tokens,
optional KL to a reference, entropy bonus and truncated importance sampling (TIS).

Conventions (all per-token tensors are ``[B, S]`` and aligned to target tokens):
``logprobs[b, t]`` is log p(token t | tokens < t) under the current policy (with grad);
``old_logprobs`` the same under the trainer's policy that produced the batch (no grad);
``advantages`` the per-token advantage (see ``advantages.token_advantages``).
``on_policy_mask`` marks the model's own response tokens (for a SCOPE-salvaged trajectory: its kept
prefix), ``off_policy_mask`` the guide's tokens; prompt and padding tokens are in neither, and the
masks must be disjoint. Values outside the masks are never used, so they may be garbage (even inf).
A "sequence" (for ``seq_mean`` and ``seq_sum_constant``) is a row, or with ``seq_index`` (rows of
sequences packed end to end) a segment of one, with at least one response token; all-empty ones
(batch padding) count for nothing.

Normaliser contract: ``policy_loss`` returns ``(loss_sum, normaliser)`` and the optimised loss is
``sum(loss_sum) / sum(normaliser)`` over all micro-batches and data-parallel ranks. This is exactly
what Megatron-Core does with ``calculate_per_token_loss=True``: the loss function returns
``(loss_sum, normaliser, ...)``, the schedule backpropagates ``loss_sum`` unscaled and adds
``normaliser`` into an int32 counter, and ``finalize_model_grads`` all-reduces the counter over DP
and scales the gradients by its inverse. Hence the normaliser is an int32 0-dim tensor. Under
context parallelism a rank holds part of each sequence: the per-sequence aggregations then read
``seq_tokens`` and ``seq_first``, counted on the unsplit sequences, so each rank's terms sum to the
whole sequence's (``models.context_parallel`` states the gradient convention).
"""

from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
from torch import Tensor

from scope_mega.ranges import Checked, between, finite, ge, gt

Aggregation = Literal["token_mean", "seq_mean", "seq_sum_constant"]
KLEstimator = Literal["k1", "k2", "k3"]
OffPolicyMode = Literal["shaping", "clip"]

Metrics = dict[str, tuple[Tensor, Tensor]]

# Every log-ratio is clamped to +-LOG_RATIO_CLAMP before it is exponentiated, as verl does (core_algos:
# the PPO ratio and the k3 KL). e^20 ~ 4.9e8 lies far past any clip bound or cap, so ordinary tokens are
# untouched; a token whose logprobs disagree by more (stale or broken logprobs) can no longer add an e^|x|
# loss and gradient (float32 overflows to inf past 88): past the clamp its gradient is 0.
LOG_RATIO_CLAMP = 20.0


@dataclass
class PolicyLossConfig(Checked):
    """Loss choices (docs/design.md section 4); defaults are SCOPE's.

    clip_low, clip_high: PPO ratio clipped to [1 - clip_low, 1 + clip_high]; clip-higher (DAPO) is
        clip_high > clip_low.
    dual_clip: when set (c > 1), dual-clip PPO for on-policy tokens with A < 0: their loss
        max(-A r, -A clip(r)) is capped at -A c, so a token whose ratio rose past c adds a bounded
        loss and no gradient. Default None (off): SCOPE builds on LUFFY, whose token loss has no
        dual clip, and off keeps earlier runs' losses; verl always applies it with c = 3.
    aggregation: "token_mean" (sum over all response tokens / their number), "seq_mean" (mean of the
        per-sequence token means), "seq_sum_constant" (Dr.GRPO: token sum / (num sequences * max_len)).
    max_len: the constant per-sequence token count for "seq_sum_constant" (Dr.GRPO uses the
        generation limit); required there, unused otherwise.
    kl_coef, kl_estimator: weight and estimator of KL(policy || reference) over response tokens.
    kl_clamp: the k3 estimate per token is clamped to at most this (default 10, as verl's low_var_kl):
        at ref - logprob = +5 it would be 142 with gradient -147, and beyond the clamp its gradient
        is 0. None: no value clamp (the log-ratio inside k3 is still clamped to +-20). k1 and k2 are
        never clamped (they have no exponential).
    entropy_coef: weight of the entropy bonus (subtracted from the loss).
    tis_cap: when set, on-policy terms are weighted by min(exp(old - rollout), tis_cap), correcting
        the mismatch between the rollout engine's logprobs and the trainer's.
    off_policy: "shaping" -> loss -A * f(p), f(p) = p / (p + shaping_gamma), no clipping (LUFFY);
        "clip" -> PPO surrogate on the ratio p / p_guide, clipped to 1 -/+ off_policy_clip.
    off_policy_weight: every off-policy (guide) token's loss is multiplied by it (SCOPE's guide
        suffix down-weighted below 1; 0 trains on the salvaged prefix alone). The token still counts
        in the normaliser.
    """

    clip_low: float = field(default=0.2, metadata=between(0, 1, hi_open=True))
    clip_high: float = field(default=0.2, metadata=ge(0))
    dual_clip: float | None = field(default=None, metadata=gt(1))
    aggregation: Aggregation = "token_mean"
    max_len: int | None = field(default=None, metadata=ge(1))
    kl_coef: float = field(default=0.0, metadata=ge(0))
    kl_estimator: KLEstimator = "k3"
    kl_clamp: float | None = field(default=10.0, metadata=gt(0))
    entropy_coef: float = field(default=0.0, metadata=finite())
    tis_cap: float | None = field(default=None, metadata=gt(0))
    off_policy: OffPolicyMode = "shaping"
    shaping_gamma: float = field(default=0.1, metadata=gt(0))
    off_policy_clip: float = field(default=0.2, metadata=between(0, 1, hi_open=True))
    off_policy_weight: float = field(default=1.0, metadata=ge(0))

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, value, allowed in (
            ("aggregation", self.aggregation, get_args(Aggregation)),
            ("kl_estimator", self.kl_estimator, get_args(KLEstimator)),
            ("off_policy", self.off_policy, get_args(OffPolicyMode)),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if self.aggregation == "seq_sum_constant" and self.max_len is None:
            raise ValueError("aggregation 'seq_sum_constant' needs max_len (the generation limit)")


def kl_penalty(
    logprobs: Tensor, ref_logprobs: Tensor, estimator: KLEstimator, kl_clamp: float | None = None
) -> Tensor:
    """Per-token estimate of KL(policy || reference) from sampled-token logprobs (Schulman's k1/k2/k3).
    k3's log-ratio is clamped to +-LOG_RATIO_CLAMP, its value to at most `kl_clamp` (None: no clamp)."""
    return _kl_clamped(logprobs, ref_logprobs, estimator, kl_clamp)[0]


def _kl_clamped(
    logprobs: Tensor, ref_logprobs: Tensor, estimator: KLEstimator, kl_clamp: float | None
) -> tuple[Tensor, Tensor]:
    """`kl_penalty`, and the tokens where one of k3's clamps acted (none for k1 and k2)."""
    log_r = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_r, torch.zeros_like(log_r, dtype=torch.bool)
    if estimator == "k2":
        return 0.5 * log_r**2, torch.zeros_like(log_r, dtype=torch.bool)
    clamped = log_r.detach().abs() > LOG_RATIO_CLAMP
    log_r = torch.clamp(log_r, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    k3 = torch.exp(log_r) - log_r - 1.0
    if kl_clamp is None:
        return k3, clamped
    return torch.clamp(k3, max=kl_clamp), clamped | (k3.detach() > kl_clamp)


def _clamped_exp(log_ratio: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """exp(log_ratio clamped to +-LOG_RATIO_CLAMP), and the tokens of `mask` where the clamp acted."""
    clamped = mask & (log_ratio.detach().abs() > LOG_RATIO_CLAMP)
    return torch.exp(torch.clamp(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)), clamped


def _ppo_surrogate(ratio: Tensor, adv: Tensor, low: float, high: float) -> Tensor:
    """Per-token PPO loss -min(ratio * A, clip(ratio, 1 - low, 1 + high) * A)."""
    return torch.maximum(-ratio * adv, -torch.clamp(ratio, 1.0 - low, 1.0 + high) * adv)


def _clipped(ratio: Tensor, adv: Tensor, mask: Tensor, low: float, high: float) -> tuple[Tensor, Tensor]:
    """Masks of tokens whose gradient the clip removes, at the low and at the high bound."""
    return mask & (adv < 0) & (ratio < 1.0 - low), mask & (adv > 0) & (ratio > 1.0 + high)


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    on_policy_mask: Tensor,
    off_policy_mask: Tensor,
    cfg: PolicyLossConfig,
    *,
    ref_logprobs: Tensor | None = None,
    rollout_logprobs: Tensor | None = None,
    guide_logprobs: Tensor | None = None,
    entropy: Tensor | None = None,
    seq_index: Tensor | None = None,
    seq_tokens: Tensor | None = None,
    seq_first: Tensor | None = None,
) -> tuple[Tensor, Tensor, Metrics]:
    """Loss of one micro-batch as ``(loss_sum, normaliser, metrics)`` (see the module docstring).

    ref_logprobs: reference-model logprobs; needed when ``kl_coef > 0``, else only logged.
    rollout_logprobs: the rollout engine's logprobs of on-policy tokens; needed when ``tis_cap`` is
        set, else only logged (mismatch).
    guide_logprobs: the guide's logprobs of off-policy tokens; needed when ``off_policy == "clip"``.
    entropy: per-token policy entropy (with grad); needed when ``entropy_coef != 0``, else logged.
    seq_index: the sequence of each position (an int tensor), for rows that hold several sequences
        end to end (the THD layout); None: each row is one sequence. Only the per-sequence
        aggregations read it.
    seq_tokens, seq_first: under context parallelism (both given, or neither), each position's
        sequence's response-token count and a 1 at each sequence's first response token, counted on
        the whole sequence; the per-sequence aggregations read them instead of ``seq_index``.

    metrics: name -> (sum, count), detached float 0-dim tensors, so micro-batches and ranks
    aggregate by summing both before dividing. Keys always present: clip_frac_low, clip_frac_high,
    ratio, abs_log_ratio (mean |logprobs - old|, unclamped), log_ratio_clamp_frac (on-policy
    tokens), dual_clip_frac (dual_clip set: on-policy tokens with A < 0 and ratio > dual_clip),
    off_policy_frac (over response tokens), off_policy_prob (mean p over guide tokens); with their
    inputs: kl (as clamped) and kl_clamp_frac (tokens where a k3 clamp acted: its value above
    kl_clamp or its log-ratio), entropy, rollout_mismatch (mean |old - rollout|, unclamped),
    tis_trunc_frac and tis_log_ratio_clamp_frac (tis_cap set), off_clip_frac and
    off_log_ratio_clamp_frac (off_policy == "clip"). A *_log_ratio_clamp_frac
    counts the tokens whose log-ratio lay beyond +-LOG_RATIO_CLAMP.
    """
    shape = logprobs.shape
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, S], got shape {tuple(shape)}")
    named = {
        "old_logprobs": old_logprobs,
        "advantages": advantages,
        "on_policy_mask": on_policy_mask,
        "off_policy_mask": off_policy_mask,
        "ref_logprobs": ref_logprobs,
        "rollout_logprobs": rollout_logprobs,
        "guide_logprobs": guide_logprobs,
        "entropy": entropy,
        "seq_index": seq_index,
        "seq_tokens": seq_tokens,
        "seq_first": seq_first,
    }
    for name, tensor in named.items():
        if tensor is not None and tensor.shape != shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, logprobs has {tuple(shape)}")
    if cfg.kl_coef > 0 and ref_logprobs is None:
        raise ValueError("kl_coef > 0 needs ref_logprobs")
    if cfg.entropy_coef != 0 and entropy is None:
        raise ValueError("entropy_coef != 0 needs entropy")
    if cfg.tis_cap is not None and rollout_logprobs is None:
        raise ValueError("tis_cap needs rollout_logprobs")
    if cfg.off_policy == "clip" and guide_logprobs is None:
        raise ValueError("off_policy='clip' needs guide_logprobs")

    on = on_policy_mask.bool()
    off = off_policy_mask.bool()
    if (on & off).any():
        raise ValueError(f"on- and off-policy masks overlap on {int((on & off).sum())} tokens")
    resp = on | off

    # Every nonlinearity sees 0 outside its mask, so garbage there cannot give inf/NaN gradients.
    def masked(x: Tensor, mask: Tensor) -> Tensor:
        return torch.where(mask, x, 0.0)

    adv = masked(advantages.detach(), resp)
    old = old_logprobs.detach()
    metrics: Metrics = {}

    ratio, clamped = _clamped_exp(masked(logprobs - old, on), on)
    metrics["log_ratio_clamp_frac"] = (clamped.sum(), on.sum())
    on_loss = _ppo_surrogate(ratio, adv, cfg.clip_low, cfg.clip_high)
    if cfg.dual_clip is not None:
        # For A < 0, max(-A r, -A clip(r)) = -A max(r, clip(r)) exceeds -A c exactly when r > c.
        dual = on & (adv < 0) & (ratio.detach() > cfg.dual_clip)
        metrics["dual_clip_frac"] = (dual.sum(), on.sum())
        on_loss = torch.where(adv < 0, torch.minimum(on_loss, -adv * cfg.dual_clip), on_loss)
    if rollout_logprobs is not None:
        mismatch = masked(old - rollout_logprobs.detach(), on)
        metrics["rollout_mismatch"] = (mismatch.abs().sum(), on.sum())
        if cfg.tis_cap is not None:
            weight, clamped = _clamped_exp(mismatch, on)
            metrics["tis_log_ratio_clamp_frac"] = (clamped.sum(), on.sum())
            metrics["tis_trunc_frac"] = ((on & (weight > cfg.tis_cap)).sum(), on.sum())
            on_loss = on_loss * torch.clamp(weight, max=cfg.tis_cap)

    p_off = torch.exp(masked(logprobs, off))
    if cfg.off_policy == "shaping":
        off_loss = -adv * p_off / (p_off + cfg.shaping_gamma)
    else:
        off_ratio, clamped = _clamped_exp(masked(logprobs - guide_logprobs.detach(), off), off)
        metrics["off_log_ratio_clamp_frac"] = (clamped.sum(), off.sum())
        off_loss = _ppo_surrogate(off_ratio, adv, cfg.off_policy_clip, cfg.off_policy_clip)
        low, high = _clipped(off_ratio.detach(), adv, off, cfg.off_policy_clip, cfg.off_policy_clip)
        metrics["off_clip_frac"] = ((low | high).sum(), off.sum())

    token_loss = masked(on_loss, on) + masked(off_loss * cfg.off_policy_weight, off)

    if ref_logprobs is not None:
        # Both inputs are 0 outside the response, where every estimator is then exactly 0.
        kl, clamped = _kl_clamped(
            masked(logprobs, resp), masked(ref_logprobs.detach(), resp), cfg.kl_estimator, cfg.kl_clamp
        )
        metrics["kl"] = (kl.detach().sum(), resp.sum())
        metrics["kl_clamp_frac"] = ((resp & clamped).sum(), resp.sum())
        if cfg.kl_coef > 0:
            token_loss = token_loss + cfg.kl_coef * kl
    if entropy is not None:
        ent = masked(entropy, resp)
        metrics["entropy"] = (ent.detach().sum(), resp.sum())
        if cfg.entropy_coef != 0:
            token_loss = token_loss - cfg.entropy_coef * ent

    low, high = _clipped(ratio.detach(), adv, on, cfg.clip_low, cfg.clip_high)
    metrics["clip_frac_low"] = (low.sum(), on.sum())
    metrics["clip_frac_high"] = (high.sum(), on.sum())
    metrics["ratio"] = (masked(ratio.detach(), on).sum(), on.sum())
    metrics["abs_log_ratio"] = (masked((logprobs - old).detach(), on).abs().sum(), on.sum())
    metrics["off_policy_frac"] = (off.sum(), resp.sum())
    metrics["off_policy_prob"] = (masked(p_off.detach(), off).sum(), off.sum())

    if cfg.aggregation == "token_mean":
        loss_sum, normaliser = token_loss.sum(), resp.sum()
    else:
        seq_loss, num_seqs = _per_sequence(token_loss, resp, seq_index, seq_tokens, seq_first)
        if cfg.aggregation == "seq_mean":
            loss_sum, normaliser = seq_loss, num_seqs
        else:
            loss_sum, normaliser = token_loss.sum(), num_seqs * cfg.max_len

    metrics = {k: (s.detach().float(), c.detach().float()) for k, (s, c) in metrics.items()}
    return loss_sum, normaliser.to(torch.int32), metrics


def _per_sequence(
    token_loss: Tensor,
    resp: Tensor,
    seq_index: Tensor | None,
    seq_tokens: Tensor | None,
    seq_first: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """The sum over sequences of each one's token-mean loss, and the number of sequences with a
    response token: from whole sequences (rows, or `seq_index` segments), or under context
    parallelism from this rank's part of each, with the whole sequences' counts."""
    if seq_tokens is not None:  # each term is this rank's share of its sequence's mean
        return (torch.where(resp, token_loss, 0.0) / seq_tokens.clamp(min=1)).sum(), (seq_first > 0).sum()

    def per_sequence(x: Tensor) -> Tensor:
        if seq_index is None:
            return x.sum(dim=1)
        return x.new_zeros(int(seq_index.max()) + 1).index_add(0, seq_index.flatten(), x.flatten())

    counts = per_sequence(resp.float())
    return (per_sequence(token_loss) / counts.clamp(min=1)).sum(), (counts > 0).sum()
