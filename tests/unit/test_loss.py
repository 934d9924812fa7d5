"""The policy loss against values and gradients computed by hand."""

import math

import pytest
import torch

from scope_mega.rl.loss import PolicyLossConfig, kl_penalty, policy_loss

LOG2 = math.log(2.0)


def row(*values: float) -> torch.Tensor:
    return torch.tensor([values], dtype=torch.float32)


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.clone().requires_grad_(True)


def on_policy(ratios, advs, cfg, **kwargs):
    """One row of on-policy tokens with the given ratios (old logprob log 0.4 everywhere)."""
    old = torch.full((1, len(ratios)), math.log(0.4))
    lp = leaf(old + torch.log(row(*ratios)))
    mask = torch.ones(1, len(ratios))
    out = policy_loss(lp, old, row(*advs), mask, torch.zeros_like(mask), cfg, **kwargs)
    out[0].backward()
    return out, lp.grad


def test_ppo_clipping_cases():
    # token: (A, ratio) -> loss, d loss / d lp
    # A=+1 r=1.5: clipped at 1.2 -> -1.2, grad 0
    # A=-1 r=0.5: clipped at 0.8 -> +0.8, grad 0
    # A=+2 r=1.1: inside -> -2.2, grad -A*r = -2.2
    # A=-1 r=1.5: pessimistic branch is unclipped -> +1.5, grad +1.5
    # A=+1 r=0.5: unclipped -> -0.5, grad -0.5
    (loss_sum, norm, metrics), grad = on_policy(
        [1.5, 0.5, 1.1, 1.5, 0.5], [1.0, -1.0, 2.0, -1.0, 1.0], PolicyLossConfig()
    )
    assert loss_sum.item() == pytest.approx(-1.6, abs=1e-5)
    assert norm.item() == 5 and norm.dtype == torch.int32
    torch.testing.assert_close(grad, row(0.0, 0.0, -2.2, 1.5, -0.5), rtol=0, atol=1e-5)
    assert [v.item() for v in metrics["clip_frac_low"]] == [1.0, 5.0]
    assert [v.item() for v in metrics["clip_frac_high"]] == [1.0, 5.0]
    assert metrics["ratio"][0].item() == pytest.approx(5.1, abs=1e-5)
    assert metrics["ratio"][1].item() == 5.0


def test_clip_higher_is_asymmetric():
    cfg = PolicyLossConfig(clip_low=0.2, clip_high=0.28)
    # A=+1 r=1.25: inside [0.8, 1.28] -> -1.25, grad -1.25 (symmetric 0.2 would clip: -1.2, grad 0)
    # A=+1 r=1.3: clipped at 1.28 -> -1.28, grad 0
    # A=-1 r=0.75: clipped at 0.8 -> +0.8, grad 0
    (loss_sum, _, metrics), grad = on_policy([1.25, 1.3, 0.75], [1.0, 1.0, -1.0], cfg)
    assert loss_sum.item() == pytest.approx(-1.25 - 1.28 + 0.8, abs=1e-5)
    torch.testing.assert_close(grad, row(-1.25, 0.0, 0.0), rtol=0, atol=1e-5)
    assert metrics["clip_frac_high"][0].item() == 1.0
    assert metrics["clip_frac_low"][0].item() == 1.0

    (sym_sum, _, _), sym_grad = on_policy([1.25], [1.0], PolicyLossConfig())
    assert sym_sum.item() == pytest.approx(-1.2, abs=1e-6)
    assert sym_grad.item() == 0.0


def test_off_policy_shaping_value_and_gradient():
    gamma = 0.1
    p = row(0.3, 0.05)
    adv = row(1.0, -0.5)
    lp = leaf(torch.log(p))
    off = torch.ones(1, 2)
    # loss = -A p/(p+g): -0.3/0.4 = -0.75; 0.5*0.05/0.15 = 0.1666667
    loss_sum, norm, metrics = policy_loss(
        lp, torch.zeros(1, 2), adv, torch.zeros(1, 2), off, PolicyLossConfig()
    )
    assert loss_sum.item() == pytest.approx(-0.75 + 0.5 * 0.05 / 0.15, abs=1e-6)
    assert norm.item() == 2
    loss_sum.backward()
    # d/dlp[-A p/(p+g)] = -A g p/(p+g)^2: -0.1*0.3/0.16 = -0.1875; 0.5*0.1*0.05/0.0225 = 0.1111111
    torch.testing.assert_close(lp.grad, row(-0.1875, 0.5 * 0.1 * 0.05 / 0.0225), rtol=0, atol=1e-6)
    closed_form = -adv * gamma * p / (p + gamma) ** 2
    torch.testing.assert_close(lp.grad, closed_form, rtol=1e-5, atol=1e-7)
    assert [v.item() for v in metrics["off_policy_frac"]] == [2.0, 2.0]
    assert metrics["off_policy_prob"][0].item() == pytest.approx(0.35, abs=1e-6)
    assert metrics["clip_frac_high"][1].item() == 0.0


def test_off_policy_clip_against_guide():
    cfg = PolicyLossConfig(off_policy="clip", off_policy_clip=0.2)
    # p/p_guide: 0.6/0.4 = 1.5 with A=+1 -> clipped -1.2, grad 0; 0.1/0.5 = 0.2 with A=+1 -> -0.2, grad -0.2
    lp = leaf(torch.log(row(0.6, 0.1)))
    guide = torch.log(row(0.4, 0.5))
    off = torch.ones(1, 2)
    loss_sum, _, metrics = policy_loss(
        lp, torch.zeros(1, 2), row(1.0, 1.0), torch.zeros(1, 2), off, cfg, guide_logprobs=guide
    )
    loss_sum.backward()
    assert loss_sum.item() == pytest.approx(-1.4, abs=1e-5)
    torch.testing.assert_close(lp.grad, row(0.0, -0.2), rtol=0, atol=1e-6)
    assert [v.item() for v in metrics["off_clip_frac"]] == [1.0, 2.0]
    with pytest.raises(ValueError, match="guide_logprobs"):
        policy_loss(lp, torch.zeros(1, 2), row(1.0, 1.0), torch.zeros(1, 2), off, cfg)


def test_kl_estimators_values():
    # lp - ref = log 2 and -log 2
    lp, ref = torch.log(row(0.5, 0.2)), torch.log(row(0.25, 0.4))
    expected = {
        "k1": [LOG2, -LOG2],
        "k2": [0.5 * LOG2**2, 0.5 * LOG2**2],
        "k3": [0.5 + LOG2 - 1.0, 2.0 - LOG2 - 1.0],
    }
    for name, values in expected.items():
        torch.testing.assert_close(kl_penalty(lp, ref, name), row(*values), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("estimator", "total", "grads"),
    [
        ("k1", 0.0, [1.0, 1.0]),  # d(lp - ref) = 1
        ("k2", LOG2**2, [LOG2, -LOG2]),  # d 0.5(lp-ref)^2 = lp - ref
        ("k3", 0.5, [0.5, -1.0]),  # d[e^(ref-lp) - (ref-lp) - 1] = 1 - e^(ref-lp)
    ],
)
def test_kl_in_loss_over_both_masks(estimator, total, grads):
    # one on-policy and one off-policy token, zero advantage: only the KL term remains
    lp = leaf(torch.log(row(0.5, 0.2)))
    ref = torch.log(row(0.25, 0.4))
    on, off = row(1, 0), row(0, 1)
    cfg = PolicyLossConfig(kl_coef=1.0, kl_estimator=estimator)
    loss_sum, norm, metrics = policy_loss(lp, lp.detach(), torch.zeros(1, 2), on, off, cfg, ref_logprobs=ref)
    loss_sum.backward()
    assert loss_sum.item() == pytest.approx(total, abs=1e-6)
    assert norm.item() == 2
    torch.testing.assert_close(lp.grad, row(*grads), rtol=0, atol=1e-6)
    assert metrics["kl"][0].item() == pytest.approx(total, abs=1e-6)

    logged = policy_loss(lp, lp.detach(), torch.zeros(1, 2), on, off, PolicyLossConfig(), ref_logprobs=ref)
    assert logged[0].item() == 0.0
    assert logged[2]["kl"][0].item() == pytest.approx(0.5, abs=1e-6)  # default k3


def test_tis_weight_and_mismatch():
    # ratio 1, A=+1 -> loss -w per token; w = min(exp(old - rollout), 1.5): min(2, 1.5) = 1.5, 0.5
    old = torch.log(row(0.5, 0.3))
    rollout = torch.log(row(0.25, 0.6))
    lp = leaf(old)
    mask = torch.ones(1, 2)
    cfg = PolicyLossConfig(tis_cap=1.5)
    loss_sum, _, metrics = policy_loss(
        lp, old, row(1.0, 1.0), mask, torch.zeros(1, 2), cfg, rollout_logprobs=rollout
    )
    loss_sum.backward()
    assert loss_sum.item() == pytest.approx(-2.0, abs=1e-6)
    torch.testing.assert_close(lp.grad, row(-1.5, -0.5), rtol=0, atol=1e-6)
    assert [v.item() for v in metrics["tis_trunc_frac"]] == [1.0, 2.0]
    assert metrics["rollout_mismatch"][0].item() == pytest.approx(2 * LOG2, abs=1e-6)
    with pytest.raises(ValueError, match="rollout_logprobs"):
        policy_loss(lp, old, row(1.0, 1.0), mask, torch.zeros(1, 2), cfg)


def test_entropy_bonus():
    ent = leaf(row(0.5, 1.5))
    lp = leaf(row(-1.0, -2.0))
    cfg = PolicyLossConfig(entropy_coef=0.1)
    loss_sum, _, metrics = policy_loss(
        lp, lp.detach(), torch.zeros(1, 2), row(1, 0), row(0, 1), cfg, entropy=ent
    )
    loss_sum.backward()
    assert loss_sum.item() == pytest.approx(-0.2, abs=1e-6)
    torch.testing.assert_close(ent.grad, row(-0.1, -0.1))
    assert [v.item() for v in metrics["entropy"]] == [2.0, 2.0]
    with pytest.raises(ValueError, match="entropy"):
        policy_loss(lp, lp.detach(), torch.zeros(1, 2), row(1, 0), row(0, 1), cfg)


def ragged_batch():
    """3 rows x 4 tokens. Row 0: prompt + 3 on-policy tokens, A=+1, ratio 1 -> token losses -1.
    Row 1: 2 prompt, 1 on-policy (A=-2, ratio 1 -> +2), 1 guide token (p=0.9, shaped 0.9/1.0 -> +1.8).
    Row 2: all prompt/padding. Prompt positions hold garbage that must not leak."""
    on = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    off = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]], dtype=torch.bool)
    lp = torch.full((3, 4), math.log(0.5))
    lp[1, 3] = math.log(0.9)
    lp[~(on | off)] = 50.0
    old = torch.where(on, lp, torch.tensor(-1e9))
    adv = torch.tensor([[1.0] * 4, [-2.0] * 4, [float("nan")] * 4])
    ref = torch.where(on | off, lp - 0.1, torch.tensor(float("inf")))
    return leaf(lp), old, adv, on, off, ref


@pytest.mark.parametrize(
    ("aggregation", "loss_sum", "normaliser"),
    [
        ("token_mean", -3.0 + 3.8, 5),  # all response tokens / their count
        ("seq_mean", -1.0 + 1.9, 2),  # per-row means (-3/3, 3.8/2); the empty row is no sequence
        ("seq_sum_constant", -3.0 + 3.8, 2 * 8),  # token sum / (2 sequences * max_len 8)
    ],
)
def test_aggregation_on_ragged_mask(aggregation, loss_sum, normaliser):
    lp, old, adv, on, off, _ = ragged_batch()
    cfg = PolicyLossConfig(aggregation=aggregation, max_len=8)
    total, norm, metrics = policy_loss(lp, old, adv, on, off, cfg)
    assert total.item() == pytest.approx(loss_sum, abs=1e-5)
    assert norm.item() == normaliser and norm.dtype == torch.int32
    assert [v.item() for v in metrics["off_policy_frac"]] == [1.0, 5.0]
    assert metrics["off_policy_prob"][0].item() == pytest.approx(0.9, abs=1e-6)


@pytest.mark.parametrize(
    ("aggregation", "loss_sum", "normaliser"),
    [("token_mean", -3.0 + 3.8, 5), ("seq_mean", -1.0 + 1.9, 2), ("seq_sum_constant", -3.0 + 3.8, 2 * 8)],
)
def test_aggregation_of_sequences_packed_in_one_row(aggregation, loss_sum, normaliser):
    """The ragged batch's rows end to end in one row (the THD layout): `seq_index` gives the same
    hand-computed values and gradients as the rows. Without it the packed row would be one sequence,
    and seq_mean would be the mean over all 5 tokens, 0.8 / 5 over 1 sequence."""
    lp, old, adv, on, off, _ = ragged_batch()
    cfg = PolicyLossConfig(aggregation=aggregation, max_len=8)
    total, norm, _ = policy_loss(lp, old, adv, on, off, cfg)
    total.backward()
    flat = leaf(lp.detach().reshape(1, 12))
    seq_index = torch.arange(3).repeat_interleave(4)[None]
    packed = [x.reshape(1, 12) for x in (old, adv, on, off)]
    total_packed, norm_packed, _ = policy_loss(flat, *packed, cfg, seq_index=seq_index)
    total_packed.backward()
    assert total_packed.item() == pytest.approx(loss_sum, abs=1e-5) and norm_packed.item() == normaliser
    assert torch.equal(flat.grad.reshape(3, 4), lp.grad)
    one_sequence, one, _ = policy_loss(leaf(flat.detach()), *packed, cfg)
    if aggregation == "seq_mean":
        assert (one_sequence.item(), one.item()) == (pytest.approx(0.8 / 5, abs=1e-6), 1)
    with pytest.raises(ValueError, match="seq_index has shape"):
        policy_loss(flat, *packed, cfg, seq_index=seq_index[:, :6])


def test_prompt_tokens_get_zero_gradient():
    lp, old, adv, on, off, ref = ragged_batch()
    cfg = PolicyLossConfig(kl_coef=0.5, entropy_coef=0.01)
    ent = leaf(torch.ones(3, 4))
    loss_sum, _, metrics = policy_loss(lp, old, adv, on, off, cfg, ref_logprobs=ref, entropy=ent)
    loss_sum.backward()
    assert torch.isfinite(loss_sum)
    assert all(torch.isfinite(s) and torch.isfinite(c) for s, c in metrics.values())
    prompt = ~(on | off)
    assert (lp.grad[prompt] == 0).all() and (ent.grad[prompt] == 0).all()
    assert (lp.grad[on | off] != 0).all()


def test_overlapping_masks_raise():
    lp = leaf(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="overlap on 1 tokens"):
        policy_loss(lp, lp.detach(), torch.zeros(1, 3), row(1, 1, 0), row(0, 1, 1), PolicyLossConfig())


def test_input_and_config_validation():
    lp = leaf(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="advantages has shape"):
        policy_loss(lp, lp.detach(), torch.zeros(3), row(1, 1, 1), row(0, 0, 0), PolicyLossConfig())
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(
            lp, lp.detach(), torch.zeros(1, 3), row(1, 1, 1), row(0, 0, 0), PolicyLossConfig(kl_coef=0.1)
        )
    with pytest.raises(ValueError, match="max_len"):
        PolicyLossConfig(aggregation="seq_sum_constant")
    with pytest.raises(ValueError, match="aggregation"):
        PolicyLossConfig(aggregation="mean")
    with pytest.raises(ValueError, match="clip_low"):
        PolicyLossConfig(clip_low=1.0)


def test_decoupled_ppo_by_hand_at_staleness_one():
    """AReaL's decoupled PPO on two tokens sampled one update ago: the PPO ratio is taken against the
    proximal policy (the trainer's logprobs before this step's first update), times the stop-gradient
    behaviour weight min(proximal / behaviour, cap)."""
    from scope_mega.rl.update import behaviour_weights

    current, proximal, behaviour = row(0.5, 0.3).log(), row(0.4, 0.3).log(), row(0.2, 0.6).log()
    lp, cfg = leaf(current), PolicyLossConfig(tis_cap=1.5)
    mask = torch.ones(1, 2)
    loss, norm, _ = policy_loss(
        lp, proximal, row(1.0, 1.0), mask, torch.zeros_like(mask), cfg, rollout_logprobs=behaviour
    )
    loss.backward()
    # token 1: ratio 0.5/0.4 = 1.25, clipped to 1.2 (A > 0), weight 0.4/0.2 = 2 capped at 1.5: -1.5 * 1.2
    # token 2: ratio 1, weight 0.3/0.6 = 0.5: -0.5 * 1; the clipped token has no gradient
    assert loss.item() == pytest.approx(-1.8 - 0.5, abs=1e-6) and int(norm) == 2
    assert lp.grad[0].tolist() == pytest.approx([0.0, -0.5], abs=1e-6)
    batch = {"on_mask": mask, "old_logprobs": proximal, "rollout_logprobs": behaviour}
    stats = behaviour_weights([batch], cap=1.5)
    kl = ((2 - 1 - math.log(2)) + (0.5 - 1 + math.log(2))) / 2  # k3 of r = proximal/behaviour
    assert stats == pytest.approx(
        {"behav/weight_mean": 1.25, "behav/weight_max": 2.0, "behav/clip_frac": 0.5, "behav/kl": kl}
    )


def test_decoupled_ppo_is_the_plain_loss_at_staleness_zero():
    """Behaviour = proximal (staleness 0, no mismatch): the weight is exactly 1 and the loss and its
    gradient are bitwise those without the weight."""
    from scope_mega.rl.update import behaviour_weights

    torch.manual_seed(0)
    old = torch.randn(3, 7).clamp(max=-0.1)
    current, adv = old + 0.3 * torch.randn(3, 7), torch.randn(3, 7)
    mask = (torch.rand(3, 7) > 0.2).float()
    outs = []
    for cfg, rollout in ((PolicyLossConfig(tis_cap=2.0), old.clone()), (PolicyLossConfig(), None)):
        lp = leaf(current)
        loss, _, _ = policy_loss(lp, old, adv, mask, torch.zeros_like(mask), cfg, rollout_logprobs=rollout)
        loss.backward()
        outs.append((loss, lp.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    stats = behaviour_weights([{"on_mask": mask, "old_logprobs": old, "rollout_logprobs": old}], cap=2.0)
    assert stats == {
        "behav/weight_mean": 1.0,
        "behav/weight_max": 1.0,
        "behav/clip_frac": 0.0,
        "behav/kl": 0.0,
    }
