"""PRM-as-dense-reward advantages against hand-computed values, and their use in the policy loss."""

import math

import pytest
import torch

from scope_mega.rl.advantages import AdvantageConfig
from scope_mega.rl.loss import PolicyLossConfig, policy_loss
from scope_mega.scope import (
    PRM,
    PromptInfo,
    Trajectory,
    dense_token_advantages,
    outcome_advantages,
    prm_dense_advantages,
)

DR = AdvantageConfig(estimator="dr_grpo")

# response 0: correct, steps scored [1, 1] over tokens [0, 2) and [2, 3), token 3 outside every step
# response 1: wrong, steps scored [1, 0] over tokens [0, 1) and [1, 3)
REWARDS = [1.0, 0.0]
SCORES = [[1.0, 1.0], [1.0, 0.0]]
SPANS = [[(0, 2), (2, 3)], [(0, 1), (1, 3)]]
LENGTHS = [4, 3]


def test_dense_dr_grpo_by_hand():
    # outcome: mean 0.5 -> [0.5, -0.5]; pooled steps [1, 1, 1, 0], mean 0.75 -> [.25, .25 | .25, -.75]
    # return to go: r0 [0.5, 0.25], r1 [-0.5, -0.75]; dense_coef 0.5
    adv = dense_token_advantages(REWARDS, SCORES, SPANS, LENGTHS, DR, 0.5)
    assert adv[0] == pytest.approx([0.75, 0.75, 0.625, 0.5])
    assert adv[1] == pytest.approx([-0.75, -0.875, -0.875])


def test_dense_grpo_by_hand():
    # outcome: std 0.5 -> [1, -1]; steps: std sqrt(3)/4, normalised [1/sqrt3]*3 and -sqrt3
    # return to go: r0 [2/sqrt3, 1/sqrt3], r1 [1/sqrt3 - sqrt3, -sqrt3]
    s3 = math.sqrt(3.0)
    adv = dense_token_advantages(REWARDS, SCORES, SPANS, LENGTHS, AdvantageConfig(), 1.0)
    assert adv[0] == pytest.approx([1 + 2 / s3, 1 + 2 / s3, 1 + 1 / s3, 1.0], rel=1e-5)
    assert adv[1] == pytest.approx([-1 + 1 / s3 - s3, -1 - s3, -1 - s3], rel=1e-5)


def test_dense_constant_scores_give_the_outcome_advantage():
    adv = dense_token_advantages(REWARDS, [[0.7, 0.7], [0.7, 0.7]], SPANS, LENGTHS, DR, 3.0)
    assert adv == [[0.5] * 4, [-0.5] * 3]
    assert dense_token_advantages([1.0, 0.0], [[], []], [[], []], [2, 1], DR, 1.0) == [[0.5, 0.5], [-0.5]]


class ScoreByLength(PRM):
    """Step score 1 for short steps, 0 otherwise."""

    def score_batch(self, questions, steps):
        return [[1.0 if len(s) <= 2 else 0.0 for s in response] for response in steps]


class Chars:
    eos_id = 0

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids if i)

    def token_offsets(self, ids):
        out, pos = [], 0
        for i in ids:
            width = 1 if i else 0
            out.append((pos, pos + width))
            pos += width
        return out


def traj(text, reward, g=0):
    ids = Chars().encode(text) + [0]
    return Trajectory([1], ids, [0.0] * len(ids), text, reward, reward > 0, g)


def test_prm_dense_end_to_end_feeds_policy_loss():
    groups = [[traj("ab\nc", 1.0), traj("ab\ncde", 0.0)], [traj("x", 1.0), traj("y", 1.0), traj("z", 0.0)]]
    adv = prm_dense_advantages(groups, [PromptInfo("q", "r")] * 2, ScoreByLength(), Chars(), "\n", DR, 0.5)
    # group 0: same numbers as test_dense_dr_grpo_by_hand; "ab\n" is step 0, "c" + EOS step 1
    assert adv[0][0] == pytest.approx([0.75, 0.75, 0.75, 0.625, 0.625])
    assert adv[0][1] == pytest.approx([-0.75] * 3 + [-0.875] * 4)
    # group 1: every step scores 1 -> outcome only (mean 2/3)
    assert [a[0] for a in adv[1]] == pytest.approx([1 / 3, 1 / 3, -2 / 3])
    assert outcome_advantages(groups, DR) == [
        pytest.approx([0.5, -0.5]),
        pytest.approx([1 / 3, 1 / 3, -2 / 3]),
    ]
    # per-token advantages go straight into the loss: at ratio 1, token_mean loss_sum = -sum(A)
    flat = [a for g in adv for a in g]
    width = max(map(len, flat))
    advantages = torch.tensor([a + [0.0] * (width - len(a)) for a in flat])
    mask = torch.tensor([[i < len(a) for i in range(width)] for a in flat])
    lp = torch.zeros_like(advantages, requires_grad=True)
    loss_sum, norm, _ = policy_loss(
        lp, lp.detach(), advantages, mask, torch.zeros_like(mask), PolicyLossConfig()
    )
    assert loss_sum.item() == pytest.approx(-sum(sum(a) for a in flat), abs=1e-5)
    assert norm.item() == sum(map(len, flat))
