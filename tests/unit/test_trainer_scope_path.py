"""The SCOPE path acts: a weak rollout is salvaged with its own prefix tokens, and the loss sees the
guide's tokens only through the off-policy (shaped) term."""

import random

import torch

from scope_mega.config import RunConfig
from scope_mega.data import countdown
from scope_mega.data.tokenizer import train_tokenizer
from scope_mega.rewards.countdown_verifier import CountdownVerifier
from scope_mega.rl.batch import to_micro_batches, to_samples
from scope_mega.rl.loss import PolicyLossConfig
from scope_mega.rl.update import rl_loss
from scope_mega.scope.config import ScopeConfig
from scope_mega.scope.guides import make_guide
from scope_mega.scope.prm import CountdownOraclePRM
from scope_mega.scope.rectify import rectify_groups
from scope_mega.scope.trajectory import PromptInfo, Trajectory

PROBLEM = countdown.Problem((3, 7, 9), 30)
WEAK = "7 * 3 = 21\n21 - 9 = 12\nanswer: 12"  # right first step, then a wrong one


def test_weak_rollout_is_salvaged_and_guide_tokens_are_off_policy(tmp_path):
    rng = random.Random(0)
    problems = countdown.make_problems(300, 0)
    tok = train_tokenizer([p.prompt() + countdown.random_solution(p, rng) for p in problems], tmp_path, 128)
    prompt_ids = [tok.bos_id, *tok.encode(PROBLEM.prompt())]
    verifier = CountdownVerifier()

    def rollout(text: str) -> Trajectory:
        ids = tok.encode(text) + [tok.eos_id]
        v = verifier.verify(text, PROBLEM.prompt())
        return Trajectory(
            prompt_ids, ids, [-0.5] * len(ids), text, v.reward, v.correct, 0, answer=v.extracted
        )

    group = [
        rollout(WEAK),
        rollout("9 - 7 = 2\n3 * 2 = 6\nanswer: 6"),
        rollout("7 * 3 = 21\n21 + 9 = 30\nanswer: 30"),
    ]
    cfg = RunConfig(scope=ScopeConfig(step_delimiter="\n", guide="oracle"), loss=PolicyLossConfig())
    final, stats = rectify_groups(
        [group],
        [PromptInfo(PROBLEM.prompt(), PROBLEM.prompt())],
        cfg.scope,
        tokenizer=tok,
        verifier=verifier,
        guide=make_guide("oracle", delimiter="\n"),
        prm=CountdownOraclePRM(),
    )
    assert stats.salvaged == 1 and len(final[0]) == 3  # replace mode keeps the group size
    salvaged = final[0][0]
    assert salvaged.salvaged and salvaged.correct and salvaged.first_error_step == 1
    prefix = tok.encode("7 * 3 = 21\n")
    assert salvaged.response_ids[: len(prefix)] == group[0].response_ids[: len(prefix)]  # the policy's tokens
    assert salvaged.off_policy == [False] * len(prefix) + [True] * (len(salvaged.response_ids) - len(prefix))

    samples = to_samples(final, cfg, None)
    (mb,) = to_micro_batches(samples, 8, tok.pad_id)
    row_on, row_off = mb["on_mask"][0], mb["off_mask"][0]
    lo = len(prompt_ids) - 1
    assert row_on[lo : lo + len(prefix)].tolist() == [1.0] * len(prefix)
    n_guide = len(salvaged.response_ids) - len(prefix)
    assert row_off.sum().item() == n_guide and row_off[lo + len(prefix) : lo + len(prefix) + n_guide].all()
    assert (
        mb["targets"][0, lo + len(prefix) : lo + len(prefix) + n_guide].tolist()
        == salvaged.response_ids[len(prefix) :]
    )

    # Gradient per token: on-policy tokens get the PPO term (ratio 1): -A/N; guide tokens the shaped one.
    logprobs = torch.full(mb["targets"].shape, -1.0, requires_grad=True)
    loss_sum, n, _ = rl_loss(cfg.loss, logprobs, mb, None)
    (loss_sum / n).backward()
    adv = mb["advantages"][0]
    p, g = torch.exp(torch.tensor(-1.0)), cfg.loss.shaping_gamma
    guide_pos = slice(lo + len(prefix), lo + len(prefix) + n_guide)
    expected_off = -adv[guide_pos] * g * p / (p + g) ** 2 / n
    assert torch.allclose(logprobs.grad[0, guide_pos], expected_off, atol=1e-7)
    assert torch.allclose(logprobs.grad[0, lo : lo + len(prefix)], -adv[lo : lo + len(prefix)] / n, atol=1e-7)
    assert logprobs.grad[0, :lo].abs().sum() == 0  # prompt tokens carry no gradient
