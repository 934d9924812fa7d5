"""Dynamic sampling (`rl.dynamic_sampling`) on scripted rollouts, one process: groups whose rewards are
all equal never reach the loss; "refill" samples a second round until every prompt slot holds a group
with a signal; the kept fraction is counted. The policy's rollouts are replaced by a script (given to
`rollout_and_rectify` in place of `rollout_groups` on an engine); everything after them is the trainer's."""

import json
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest

from scope_mega.runtime.spawn import spawn_local

pytestmark = [pytest.mark.distributed]

# per round, per prompt: the rewards of its group of 4 ("u": uniform, "m": mixed)
SCRIPT = {
    0: [[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 1, 0]],  # u m u m
    1: [[0, 0, 1, 0], [0, 0, 0, 0], [1, 0, 1, 1], [1, 1, 0, 1]],  # m u m m
}


def _scripted_groups(engine, task, prompts, n, seed, timings=None):
    from scope_mega.scope.trajectory import Trajectory

    groups = []
    for prompt in prompts:
        rewards = SCRIPT[prompt.round][prompt.index]
        ids = [100 * prompt.round + prompt.index]  # the prompt's tag: which group a sample came from
        groups.append([Trajectory(ids, [7, 8], [-0.5, -0.5], "", r, bool(r), 0) for r in rewards])
    return groups


def _worker(out: str):
    from scope_mega.config import RunConfig, from_dict
    from scope_mega.rl.rollouts import rollout_and_rectify
    from scope_mega.runtime.distributed import destroy_distributed, init_distributed

    init_distributed(device="cpu", seed=1)
    report = {}
    for mode in ("off", "filter", "refill"):
        rl = {"group_size": 4, "dynamic_sampling": mode, "max_sampling_rounds": 3}
        cfg = from_dict(RunConfig, {"rl": rl, "scope": {"enabled": False}})
        task = SimpleNamespace(cfg=cfg, tokenizer=None, verifier=None)

        def draw(r):
            return [SimpleNamespace(round=r, index=i, info=None) for i in range(4)]

        groups = partial(_scripted_groups, None, task, n=4)
        samples, metrics = rollout_and_rectify(groups, None, None, task, draw, seed=0)
        report[mode] = {
            "tags": [s.prompt_ids[0] for s in samples],
            "zero_advantage": sum(all(a == 0 for a in s.advantages) for s in samples),
            "metrics": {k: v for k, v in metrics.items() if k.startswith("dynamic/") or k == "reward"},
        }
    Path(out).write_text(json.dumps(report))
    destroy_distributed()


def test_uniform_groups_never_reach_the_loss(tmp_path):
    out = tmp_path / "report.json"
    spawn_local(_worker, 1, str(out))
    r = json.loads(out.read_text())
    # off: all four groups of round 0, the two uniform ones with zero advantages (8 samples)
    assert r["off"]["tags"] == [t for t in (0, 1, 2, 3) for _ in range(4)]
    assert r["off"]["zero_advantage"] == 8 and not any(k.startswith("dynamic/") for k in r["off"]["metrics"])
    # filter: round 0's mixed groups only
    assert r["filter"]["tags"] == [t for t in (1, 3) for _ in range(4)] and r["filter"]["zero_advantage"] == 0
    assert r["filter"]["metrics"] == {
        "reward": 7 / 16,  # 4 + 1 + 0 + 2 of 16
        "dynamic/kept_frac": 0.5,
        "dynamic/kept_groups": 2,
        "dynamic/rounds": 1,
    }
    # refill: two more from round 1 (its first two mixed groups), then stop: 4 slots, 4 groups
    assert r["refill"]["tags"] == [t for t in (1, 3, 100, 102) for _ in range(4)]
    assert r["refill"]["zero_advantage"] == 0
    assert r["refill"]["metrics"] == {
        "reward": (7 + 7) / 32,
        "dynamic/kept_frac": 5 / 8,
        "dynamic/kept_groups": 4,
        "dynamic/rounds": 2,
    }
