"""SCOPE's design-space options (issue 29), each on a case computed by hand: the on-policy baseline,
the guide-token loss weight, the cap on the off-policy token share, the batch mix and the guard."""

import math

import pytest
import torch

from scope_mega.config import RunConfig, from_dict
from scope_mega.rl.advantages import AdvantageConfig, group_advantages
from scope_mega.rl.batch import Sample, to_samples
from scope_mega.rl.loss import PolicyLossConfig, policy_loss
from scope_mega.rl.parts import batch_mix, only_parts
from scope_mega.scope.config import ScopeConfig
from scope_mega.scope.guard import rectification_paused, watch_accuracy
from scope_mega.scope.rectify import cap_off_policy
from scope_mega.scope.trajectory import Trajectory


def _traj(n: int, correct: bool, guide: int = 0) -> Trajectory:
    """A response of `n` tokens whose last `guide` are the guide's (salvaged when guide > 0)."""
    off = [False] * (n - guide) + [True] * guide
    return Trajectory(
        [1], [5] * n, [-0.5] * n, "", float(correct), correct, 0, off_policy=off, salvaged=guide > 0
    )


def test_on_policy_baseline_by_hand():
    cfg = AdvantageConfig(eps=0.0)
    # a salvaged-only group: 1 salvaged success (member 0), 3 failures of the policy
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    own = torch.tensor([[False, True, True, True]])
    std = math.sqrt(0.25 * 0.75)  # the whole group's population std
    assert group_advantages(rewards, cfg).tolist()[0] == pytest.approx(
        [0.75 / std] + [-0.25 / std] * 3, rel=1e-6
    )
    # the failures are centred on the policy's own mean (0): no push down without an own success
    assert group_advantages(rewards, cfg, own).tolist()[0] == pytest.approx([1 / std, 0, 0, 0], rel=1e-6)
    # an own success beside the salvaged one: the own mean is 1/3, the std the group's (0.5)
    rewards = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    got = group_advantages(rewards, cfg, own).tolist()[0]
    assert got == pytest.approx([4 / 3, 4 / 3, -2 / 3, -2 / 3], rel=1e-5)
    # constant groups stay exactly 0; a group with no own member falls back to the whole group
    assert group_advantages(torch.zeros(1, 4), cfg, own).tolist()[0] == [0.0] * 4
    none = torch.zeros(1, 4, dtype=torch.bool)
    assert group_advantages(rewards, cfg, none).tolist() == group_advantages(rewards, cfg).tolist()


def test_to_samples_reads_the_baseline_and_marks_kinds():
    group = [_traj(4, True, guide=2), _traj(4, False), _traj(4, False), _traj(4, True)]
    for baseline, fail_adv in (("group", -1.0), ("on_policy", -2 / 3)):
        cfg = from_dict(RunConfig, {"scope": {"baseline": baseline}})
        samples = to_samples([group], cfg, None)
        assert [s.kind for s in samples] == ["salvaged", "failure", "failure", "success"]
        assert samples[1].advantages == pytest.approx([fail_adv] * 4, rel=1e-5)


def test_off_policy_weight_by_hand():
    # one guide token at p = 0.1, A = 2, gamma 0.1: f = p / (p + gamma) = 0.5
    logp = torch.tensor([[math.log(0.1)]], requires_grad=True)
    zeros = torch.zeros(1, 1)
    for weight, loss_value, grad in ((1.0, -1.0, -0.5), (0.25, -0.25, -0.125), (0.0, 0.0, 0.0)):
        logp.grad = None
        cfg = PolicyLossConfig(off_policy_weight=weight)
        loss, norm, _ = policy_loss(logp, zeros, torch.full((1, 1), 2.0), zeros, torch.ones(1, 1), cfg)
        loss.backward()
        assert loss.item() == pytest.approx(loss_value, rel=1e-6)
        assert int(norm) == 1  # the token still counts in the normaliser
        # d/dlogp of -A w p / (p + gamma) = -A w p gamma / (p + gamma)^2 = -2 w 0.01 / 0.04
        assert logp.grad.item() == pytest.approx(grad, rel=1e-5, abs=1e-12)


def test_cap_undoes_the_largest_guide_share_first():
    sampled = [[_traj(4, False), _traj(4, False)], [_traj(4, False), _traj(4, False)]]
    mostly_guide = _traj(4, True, guide=3)
    little_guide = _traj(8, True, guide=2)
    final = [[sampled[0][0], mostly_guide], [little_guide, sampled[1][1]]]
    # 5 guide tokens of 20: share 0.25
    same, undone = cap_off_policy(final, sampled, 0.25)
    assert undone == 0 and same == final
    # cap 0.15: undoing the 3/4 one leaves 2 of 20 (0.1)
    capped, undone = cap_off_policy(final, sampled, 0.15)
    assert undone == 1 and capped[0][1] is sampled[0][1] and capped[1][0] is little_guide
    capped, undone = cap_off_policy(final, sampled, 0.0)
    assert undone == 2 and capped == sampled
    # an appended salvaged member (past the sampled group's end) is removed
    appended = [[*sampled[0], mostly_guide], list(sampled[1])]
    capped, undone = cap_off_policy(appended, sampled, 0.0)
    assert undone == 1 and capped == sampled


def test_batch_mix_by_hand():
    group = [_traj(4, True, guide=3), _traj(2, False), _traj(2, True)]
    samples = [
        Sample([1], [5] * 4, [2.0] * 4, [False, True, True, True], [0.0] * 4, kind="salvaged"),
        Sample([1], [5] * 2, [-1.0] * 2, [False] * 2, [0.0] * 2, kind="failure"),
        Sample([1], [5] * 2, [0.5] * 2, [False] * 2, [0.0] * 2, kind="success"),
    ]
    mix = batch_mix([group, [_traj(2, False)] * 2], samples)
    assert {k: mix[f"mix/tokens/{k}"] for k in ("failure", "success", "prefix", "guide")} == {
        "failure": 2,
        "success": 2,
        "prefix": 1,
        "guide": 3,
    }
    assert mix["mix/adv_mass/guide"] == pytest.approx(6.0 / 8)
    assert mix["mix/adv_mass/failure"] == pytest.approx(-2.0 / 8)
    assert (mix["mix/groups/both"], mix["mix/groups/own"], mix["mix/groups/salvaged_only"]) == (1, 0, 0)
    # only_parts zeroes the advantages outside the parts asked for, token by token
    assert only_parts(samples[0], ("prefix",)).advantages == [2.0, 0.0, 0.0, 0.0]
    assert only_parts(samples[1], ("prefix", "guide")).advantages == [0.0, 0.0]


def test_guard_trips_pauses_and_resumes(capsys):
    cfg = ScopeConfig(guard="pause", guard_window=2, guard_drop=0.5, guard_pause_steps=3)
    extra: dict = {}
    seen = []
    for step, acc in enumerate([0.4, 0.4, 0.3, 0.05, 0.1, 0.1, 0.1, 0.1]):
        paused = rectification_paused(extra, step)
        m = watch_accuracy(extra, step, acc, cfg)
        seen.append((paused, m.get("guard/tripped"), m["guard/paused"]))
    # step 1: window full (mean 0.4); step 2: 0.35; step 3: 0.175 < 0.5 x 0.4 trips; steps 4-6 paused
    assert seen[:4] == [(False, None, 0.0), (False, 0.0, 0.0), (False, 0.0, 0.0), (False, 1.0, 0.0)]
    assert [s[0] for s in seen[4:]] == [True, True, True, False]
    assert [s[2] for s in seen[4:]] == [1.0, 1.0, 1.0, 0.0]
    assert extra["scope_guard"]["paused_until"] == 7
    # "log" reports the same fall and never pauses
    log, extra = ScopeConfig(guard="log", guard_window=2, guard_drop=0.5), {}
    tripped = [
        watch_accuracy(extra, s, a, log).get("guard/tripped") for s, a in enumerate([0.4, 0.4, 0.1, 0.1])
    ]
    assert tripped == [None, 0.0, 0.0, 1.0] and not rectification_paused(extra, 4)
    watch_accuracy(extra, 4, 0.1, log)  # still below: reported once, when the fall starts
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[scope guard]")]
    assert len(lines) == 2 and "pausing rectification for 3 steps" in lines[0] and "logged" in lines[1]
    assert watch_accuracy({}, 0, 0.5, ScopeConfig(guard="off")) == {}


def test_salvaged_only_failures_can_leave_the_loss():
    salvaged_only = [_traj(4, True, guide=2), _traj(4, False), _traj(4, False)]
    anchored = [_traj(4, True, guide=2), _traj(4, False), _traj(4, True)]
    for mode, kept in (("train", [True] * 3), ("drop", [True, False, False])):
        cfg = from_dict(RunConfig, {"scope": {"salvaged_only_failures": mode}})
        samples = to_samples([salvaged_only, anchored], cfg, None)
        assert [s.in_loss for s in samples[:3]] == kept
        assert [s.in_loss for s in samples[3:]] == [True] * 3  # an own success anchors the group
        # advantages are the group's either way: dropping changes what trains, not the baseline
        assert samples[1].advantages == to_samples([salvaged_only], RunConfig(), None)[1].advantages
