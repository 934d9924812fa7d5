"""Responses cut off by the generation limit (`rl.overlong`): DAPO's soft penalty by hand, and a masked
response that reaches no loss token while its group's advantages still count it."""

from pathlib import Path

import pytest
import torch

from scope_mega.config import ConfigError, RunConfig, from_dict
from scope_mega.rl.advantages import overlong_reward
from scope_mega.rl.batch import to_micro_batches, to_samples
from scope_mega.scope.trajectory import Trajectory
from scope_mega.validation import load_config

LIMIT = 48


def test_overlong_reward_by_hand():
    # the buffer is the last 8 tokens before the limit: 0 up to 40 tokens, -penalty at 48
    assert overlong_reward(30, LIMIT, 8, 1.0) == 0.0
    assert overlong_reward(40, LIMIT, 8, 1.0) == 0.0
    assert overlong_reward(41, LIMIT, 8, 1.0) == -0.125
    assert overlong_reward(44, LIMIT, 8, 0.5) == -0.25
    assert overlong_reward(48, LIMIT, 8, 1.0) == -1.0


def _group() -> list[Trajectory]:
    """Two correct responses: one cut off at the limit (48 tokens), one of 44 tokens that stopped."""
    cut = Trajectory([1, 2], [5] * 48, [-0.1] * 48, "", 1.0, True, 0, truncated=True)
    stopped = Trajectory([1, 2], [6] * 44, [-0.1] * 44, "", 1.0, True, 0)
    return [cut, stopped]


def _cfg(**rl) -> RunConfig:
    return from_dict(RunConfig, {"rollout": {"max_new_tokens": LIMIT}, "rl": rl})


def test_penalty_enters_the_advantages():
    keep = to_samples([_group()], _cfg(), None)
    assert [s.advantages[0] for s in keep] == [0.0, 0.0]  # equal rewards: no signal
    pen = to_samples([_group()], _cfg(overlong="penalty", overlong_buffer=8, overlong_penalty=1.0), None)
    # final rewards 1 - 1 = 0 (48 tokens) and 1 - 0.5 = 0.5 (44 tokens): mean 0.25, std 0.25 (population)
    # or 0.354 (sample); either way the shorter response gets the positive advantage, equal and opposite
    a_cut, a_stopped = pen[0].advantages[0], pen[1].advantages[0]
    assert a_cut < 0 < a_stopped and a_cut == -a_stopped
    assert all(s.in_loss for s in pen)


def test_masked_response_reaches_no_loss_token():
    samples = to_samples([_group()], _cfg(overlong="mask"), None)
    assert [s.in_loss for s in samples] == [False, True]
    (batch,) = to_micro_batches(samples, 2, pad_id=0)
    assert batch["on_mask"][0].sum() == 0 and batch["off_mask"][0].sum() == 0
    assert batch["on_mask"][1].sum() == 44
    assert torch.count_nonzero(batch["advantages"][0]) == 0  # equal rewards: the group gives no signal


def test_penalty_needs_a_buffer_within_the_limit():
    tiny = Path(__file__).resolve().parents[2] / "examples/tiny_cpu.yaml"
    for buffer in (0, 41):  # the tiny config's limit is 40 tokens
        with pytest.raises(ConfigError, match="rl.overlong=penalty needs 1 <= rl.overlong_buffer"):
            load_config(tiny, ["rl.overlong=penalty", f"rl.overlong_buffer={buffer}"])
    load_config(tiny, ["rl.overlong=penalty", "rl.overlong_buffer=40"])
