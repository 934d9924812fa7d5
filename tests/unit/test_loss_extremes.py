"""The policy loss at extreme log-ratios (float64, values computed by hand): every exponential sees a
log-ratio clamped to +-LOG_RATIO_CLAMP (20, as verl), and the clamp metrics count exactly those tokens."""

import math

import pytest
import torch

from scope_mega.ranges import RangeError
from scope_mega.rl.loss import LOG_RATIO_CLAMP, PolicyLossConfig, kl_penalty, policy_loss

E20 = math.exp(20.0)


def row(*values: float, dtype=torch.float64) -> torch.Tensor:
    return torch.tensor([values], dtype=dtype)


def on_policy(log_ratios, advs, cfg, dtype=torch.float64, **kwargs):
    """One row of on-policy tokens with the given log-ratios lp - old (old = -1 everywhere)."""
    old = torch.full((1, len(log_ratios)), -1.0, dtype=dtype)
    lp = (old + row(*log_ratios, dtype=dtype)).requires_grad_(True)
    mask = torch.ones(1, len(log_ratios), dtype=dtype)
    loss_sum, _, metrics = policy_loss(
        lp, old, row(*advs, dtype=dtype), mask, torch.zeros_like(mask), cfg, **kwargs
    )
    loss_sum.backward()
    return loss_sum, lp.grad, metrics


def counts(metrics, key):
    return [v.item() for v in metrics[key]]


def test_clamp_is_verls():
    assert LOG_RATIO_CLAMP == 20.0


def test_ppo_ratio_is_clamped():
    # A=-1, lp - old = +24: the unclipped branch -A r wins; r = e^20 after the clamp, whose gradient is 0
    #   (unclamped: loss = grad = e^24 = 2.6e10).
    # A=+1, lp - old = -24: loss -e^-20, grad 0 (unclamped: -e^-24, grad -e^-24).
    # A=-1, lp - old = +19.5: inside the clamp, loss = grad = e^19.5.
    loss_sum, grad, metrics = on_policy([24.0, -24.0, 19.5], [-1.0, 1.0, -1.0], PolicyLossConfig())
    assert math.isclose(loss_sum.item(), E20 - math.exp(-20.0) + math.exp(19.5), rel_tol=1e-15)
    assert grad[0, 0].item() == 0.0 and grad[0, 1].item() == 0.0
    assert math.isclose(grad[0, 2].item(), math.exp(19.5), rel_tol=1e-15)
    assert counts(metrics, "log_ratio_clamp_frac") == [2.0, 3.0]
    assert math.isclose(
        metrics["ratio"][0].item(), E20 + math.exp(-20.0) + math.exp(19.5), rel_tol=1e-6
    )  # metrics are float32


def test_float32_ratio_stays_finite():
    # e^100 overflows float32: unclamped, this token's loss and gradient are inf.
    loss_sum, grad, metrics = on_policy([100.0], [-1.0], PolicyLossConfig(), dtype=torch.float32)
    assert torch.isfinite(loss_sum) and grad.item() == 0.0
    assert counts(metrics, "log_ratio_clamp_frac") == [1.0, 1.0]


def test_off_policy_clip_ratio_is_clamped():
    # log p/p_guide = +24 with A=-1 -> loss e^20, grad 0; -30 with A=+1 -> loss -e^-20, grad 0;
    # p/p_guide = 0.2 with A=+1 -> loss -0.2, grad -0.2 (inside every clip).
    cfg = PolicyLossConfig(off_policy="clip")
    guide = row(-25.0, -0.5, math.log(0.5))
    lp = row(-1.0, -30.5, math.log(0.1)).requires_grad_(True)
    off = torch.ones(1, 3, dtype=torch.float64)
    loss_sum, _, metrics = policy_loss(
        lp, torch.zeros_like(off), row(-1.0, 1.0, 1.0), torch.zeros_like(off), off, cfg, guide_logprobs=guide
    )
    loss_sum.backward()
    assert math.isclose(loss_sum.item(), E20 - math.exp(-20.0) - 0.2, rel_tol=1e-15)
    assert lp.grad[0, 0].item() == 0.0 and lp.grad[0, 1].item() == 0.0
    assert math.isclose(lp.grad[0, 2].item(), -0.2, rel_tol=1e-12)
    assert counts(metrics, "off_log_ratio_clamp_frac") == [2.0, 3.0]
    assert counts(metrics, "log_ratio_clamp_frac") == [0.0, 0.0]


def test_tis_weight_is_clamped():
    # ratio 1, A=+1, tis_cap 1e12 (above e^20): old - rollout = +30 -> weight e^20 (unclamped: e^30 capped
    # to 1e12), loss -e^20, grad -e^20; old - rollout = log 2 -> weight 2, loss -2, grad -2.
    rollout = row(-31.0, -1.0 - math.log(2.0))
    loss_sum, grad, metrics = on_policy(
        [0.0, 0.0], [1.0, 1.0], PolicyLossConfig(tis_cap=1e12), rollout_logprobs=rollout
    )
    assert math.isclose(loss_sum.item(), -E20 - 2.0, rel_tol=1e-15)
    torch.testing.assert_close(grad, row(-E20, -2.0), rtol=1e-15, atol=0)
    assert counts(metrics, "tis_log_ratio_clamp_frac") == [1.0, 2.0]
    assert counts(metrics, "tis_trunc_frac") == [0.0, 2.0]
    assert math.isclose(metrics["rollout_mismatch"][0].item(), 30.0 + math.log(2.0), rel_tol=1e-6)  # float32


def kl_only(log_r, cfg):
    """Zero-advantage on-policy tokens with ref - lp = log_r: only the KL term (kl_coef 1) remains."""
    lp = row(*[-1.0] * len(log_r)).requires_grad_(True)
    mask = torch.ones_like(lp)
    ref = lp.detach() + row(*log_r)
    loss_sum, _, metrics = policy_loss(
        lp, lp.detach(), torch.zeros_like(mask), mask, torch.zeros_like(mask), cfg, ref_logprobs=ref
    )
    loss_sum.backward()
    return loss_sum, lp.grad, metrics


def test_k3_value_clamp_default_is_verls():
    # ref - lp = +5: k3 = e^5 - 6 = 142.4 (gradient 1 - e^5 = -147.4) is clamped to 10, gradient 0;
    # ref - lp = +1: k3 = e - 2, gradient 1 - e;
    # ref - lp = -25: k3 = e^-20 + 19 (log-ratio clamp) -> 10, gradient 0.
    assert PolicyLossConfig().kl_clamp == 10.0
    loss_sum, grad, metrics = kl_only([5.0, 1.0, -25.0], PolicyLossConfig(kl_coef=1.0))
    assert math.isclose(loss_sum.item(), 20.0 + math.e - 2.0, rel_tol=1e-15)
    assert grad[0, 0].item() == 0.0 and grad[0, 2].item() == 0.0
    assert math.isclose(grad[0, 1].item(), 1.0 - math.e, rel_tol=1e-15)
    assert counts(metrics, "kl_clamp_frac") == [2.0, 3.0]
    assert math.isclose(metrics["kl"][0].item(), 20.0 + math.e - 2.0, rel_tol=1e-6)  # float32


def test_k3_log_ratio_clamp_without_value_clamp():
    # kl_clamp None: +5 and +1 are exact; -25 has its log-ratio clamped to -20: k3 = e^-20 + 19, grad 0
    # (unclamped: e^-25 + 24, gradient 1 - e^-25).
    loss_sum, grad, metrics = kl_only([5.0, 1.0, -25.0], PolicyLossConfig(kl_coef=1.0, kl_clamp=None))
    assert math.isclose(
        loss_sum.item(), math.exp(5.0) - 6.0 + math.e - 2.0 + math.exp(-20.0) + 19.0, rel_tol=1e-15
    )
    assert math.isclose(grad[0, 0].item(), 1.0 - math.exp(5.0), rel_tol=1e-15)
    assert math.isclose(grad[0, 1].item(), 1.0 - math.e, rel_tol=1e-15)
    assert grad[0, 2].item() == 0.0
    assert counts(metrics, "kl_clamp_frac") == [1.0, 3.0]


def test_k1_k2_are_not_clamped():
    # k2 at ref - lp = +25: 0.5 * 25^2 = 312.5, gradient lp - ref = -25; no clamp counted.
    loss_sum, grad, metrics = kl_only([25.0], PolicyLossConfig(kl_coef=1.0, kl_estimator="k2"))
    assert loss_sum.item() == 312.5 and grad.item() == -25.0
    assert counts(metrics, "kl_clamp_frac") == [0.0, 1.0]
    loss_sum, grad, metrics = kl_only([25.0], PolicyLossConfig(kl_coef=1.0, kl_estimator="k1"))
    assert loss_sum.item() == -25.0 and grad.item() == 1.0
    assert counts(metrics, "kl_clamp_frac") == [0.0, 1.0]


def test_kl_penalty_clamps():
    lp, ref = row(-1.0, -1.0), row(4.0, 24.0)
    assert kl_penalty(lp, ref, "k3", kl_clamp=10.0).tolist() == [[10.0, 10.0]]
    # without kl_clamp, only the log-ratio clamp: e^5 - 6 and e^20 - 21
    torch.testing.assert_close(kl_penalty(lp, ref, "k3"), row(math.exp(5) - 6, E20 - 21), rtol=1e-15, atol=0)


def test_clamp_options_have_ranges():
    with pytest.raises(RangeError, match="kl_clamp"):
        PolicyLossConfig(kl_clamp=0.0)
    with pytest.raises(RangeError, match="dual_clip must be > 1"):
        PolicyLossConfig(dual_clip=1.0)


def test_dual_clip_caps_negative_advantage_tokens():
    # c = 3, clip 0.2; token: (A, r) -> loss, gradient d/dlp
    # (-2, 5): min(max(10, 2.4), 6) = 6, gradient 0 (without dual clip: 10, gradient -A r = 10)
    # (-1, 2): min(2, 3) = 2, gradient 2 (r < c: untouched)
    # (+1, 5): clipped at 1.2 -> -1.2, gradient 0 (A > 0: untouched)
    # (-1, 0.5): clipped at 0.8 -> +0.8, gradient 0
    # (-1, e^24): log-ratio clamped to 20, then dual-clipped: 3, gradient 0
    log_r = [math.log(5.0), math.log(2.0), math.log(5.0), math.log(0.5), 24.0]
    advs = [-2.0, -1.0, 1.0, -1.0, -1.0]
    loss_sum, grad, metrics = on_policy(log_r, advs, PolicyLossConfig(dual_clip=3.0))
    assert math.isclose(loss_sum.item(), 6.0 + 2.0 - 1.2 + 0.8 + 3.0, rel_tol=1e-14)
    torch.testing.assert_close(grad, row(0.0, 2.0, 0.0, 0.0, 0.0), rtol=1e-14, atol=0)
    assert counts(metrics, "dual_clip_frac") == [2.0, 5.0]

    loss_sum, grad, metrics = on_policy(log_r, advs, PolicyLossConfig())
    assert PolicyLossConfig().dual_clip is None and "dual_clip_frac" not in metrics
    assert math.isclose(loss_sum.item(), 10.0 + 2.0 - 1.2 + 0.8 + E20, rel_tol=1e-14)
    torch.testing.assert_close(grad, row(10.0, 2.0, 0.0, 0.0, 0.0), rtol=1e-14, atol=0)


def test_dual_clip_leaves_off_policy_tokens_alone():
    # off_policy="clip" with A=-1 and p/p_guide = 5: PPO clip only, loss 5, gradient 5
    cfg = PolicyLossConfig(off_policy="clip", dual_clip=3.0)
    guide = row(math.log(0.1))
    lp = row(math.log(0.5)).requires_grad_(True)
    off = torch.ones_like(guide)
    loss_sum, _, metrics = policy_loss(
        lp, torch.zeros_like(off), row(-1.0), torch.zeros_like(off), off, cfg, guide_logprobs=guide
    )
    loss_sum.backward()
    assert math.isclose(loss_sum.item(), 5.0, rel_tol=1e-14)
    assert math.isclose(lp.grad.item(), 5.0, rel_tol=1e-14)
    assert counts(metrics, "dual_clip_frac") == [0.0, 0.0]
