"""Group advantages against values computed by hand."""

import math

import pytest
import torch

from scope_mega.rl.advantages import AdvantageConfig, group_advantages, token_advantages

# group 0: mean 0.25, population std sqrt(0.1875) = 0.4330127 -> sqrt(3), -1/sqrt(3)
# group 1: mean 1, population std sqrt(0.5) -> +-sqrt(2), 0, 0
# group 2: all equal -> exactly 0
REWARDS = torch.tensor([[1.0, 0.0, 0.0, 0.0], [2.0, 0.0, 1.0, 1.0], [0.1, 0.1, 0.1, 0.1]])
CENTRED = [[0.75, -0.25, -0.25, -0.25], [1.0, -1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]


def test_grpo_std_scaled_uses_population_std():
    adv = group_advantages(REWARDS, AdvantageConfig(eps=0.0))
    s3, s2 = 1.7320508, 1.4142136
    expected = [[s3, -1 / s3, -1 / s3, -1 / s3], [s2, -s2, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    torch.testing.assert_close(adv, torch.tensor(expected), rtol=0, atol=1e-6)
    assert (adv[2] == 0).all()


def test_grpo_eps_is_added_to_std():
    adv = group_advantages(REWARDS, AdvantageConfig(eps=0.1))
    # 0.75 / (0.4330127 + 0.1) = 1.4070959; -0.25 / 0.5330127 = -0.4690320
    assert adv[0, 0].item() == pytest.approx(1.4070959, abs=1e-6)
    assert adv[0, 1].item() == pytest.approx(-0.4690320, abs=1e-6)


def test_grpo_without_std_scale_is_mean_centred():
    adv = group_advantages(REWARDS, AdvantageConfig(std_scale=False))
    torch.testing.assert_close(adv, torch.tensor(CENTRED), rtol=0, atol=1e-7)


def test_dr_grpo_is_mean_centred_regardless_of_std_scale():
    adv = group_advantages(REWARDS, AdvantageConfig(estimator="dr_grpo", std_scale=True))
    torch.testing.assert_close(adv, torch.tensor(CENTRED), rtol=0, atol=1e-7)


def test_unscaled_advantages_sum_to_zero_per_group():
    rewards = torch.rand(16, 8, generator=torch.Generator().manual_seed(0))
    for cfg in (AdvantageConfig(std_scale=False), AdvantageConfig(estimator="dr_grpo")):
        sums = group_advantages(rewards, cfg).sum(dim=1)
        torch.testing.assert_close(sums, torch.zeros(16), rtol=0, atol=1e-6)


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo"])
@pytest.mark.parametrize("value", [0.0, 1.0, 0.1, 0.7])
def test_constant_group_is_exactly_zero_even_with_zero_eps(estimator, value):
    rewards = torch.full((2, 5), value)
    adv = group_advantages(rewards, AdvantageConfig(estimator=estimator, eps=0.0))
    assert (adv == 0).all()
    single = group_advantages(torch.tensor([[3.0]]), AdvantageConfig(estimator=estimator, eps=0.0))
    assert single.item() == 0.0


def test_integer_rewards_are_accepted():
    adv = group_advantages(torch.tensor([[1, 0]]), AdvantageConfig(eps=0.0))
    torch.testing.assert_close(adv, torch.tensor([[1.0, -1.0]]))


def test_binary_group_values():
    # k=2 of G=8 correct: mean 0.25, std sqrt(0.25*0.75) -> correct sqrt(3), wrong -1/sqrt(3)
    rewards = torch.tensor([[1.0, 1.0, 0, 0, 0, 0, 0, 0]])
    adv = group_advantages(rewards, AdvantageConfig(eps=0.0))
    assert adv[0, 0].item() == pytest.approx(math.sqrt(3), abs=1e-6)
    assert adv[0, 7].item() == pytest.approx(-1 / math.sqrt(3), abs=1e-6)


def test_token_advantages_broadcast_over_response():
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 0, 0]])
    out = token_advantages(torch.tensor([0.5, -1.0]), mask)
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.5, 0.5, 0.0], [-1.0, -1.0, 0.0, 0.0]]))
    grouped = token_advantages(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.ones(4, 1, dtype=torch.bool))
    torch.testing.assert_close(grouped, torch.tensor([[1.0], [2.0], [3.0], [4.0]]))
    with pytest.raises(ValueError, match="do not match"):
        token_advantages(torch.tensor([1.0, 2.0, 3.0]), mask)


def test_config_validation():
    with pytest.raises(ValueError, match="estimator"):
        AdvantageConfig(estimator="ppo")
    with pytest.raises(ValueError, match="rewards must be"):
        group_advantages(torch.zeros(4), AdvantageConfig())
