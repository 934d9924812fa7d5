"""PPO mini-batches (`rl.ppo_mini_batches=2`) on a tiny Megatron policy, one process, checked by hand:
the old-policy logprobs come from one forward before the first update, so the first update's ratio is
exactly 1 and nothing is clipped; the second update's ratio is the one a separate forward of the
once-updated weights gives, and its clipped tokens, at asymmetric bounds (0.2 low, 0.28 high), are the
ones counted by hand."""

import json
import math
from pathlib import Path

import pytest
import torch
from _tiny_policy import build_state

from scope_mega.runtime.spawn import spawn_local

pytestmark = [pytest.mark.distributed]


def _micro_batches():
    from scope_mega.rl.batch import Sample, to_micro_batches

    g = torch.Generator().manual_seed(1)
    samples = []
    for i in range(4):
        prompt = torch.randint(3, 64, (4,), generator=g).tolist()
        response = torch.randint(3, 64, (6 + i,), generator=g).tolist()
        adv = 1.0 if i % 2 == 0 else -1.0
        samples.append(
            Sample(prompt, response, [adv] * len(response), [False] * len(response), [0.0] * len(response))
        )
    return to_micro_batches(samples, 1, pad_id=0)  # 4 micro-batches -> 2 mini-batches of 2


def _worker(out: str):
    from functools import partial

    from scope_mega.config import RunConfig, from_dict
    from scope_mega.rl.update import rl_loss, update_policy
    from scope_mega.runtime.distributed import destroy_distributed, init_distributed
    from scope_mega.train_step import store_logprobs, train_step

    dev = init_distributed(device="cpu", seed=3)
    cfg = from_dict(RunConfig, {"rl": {"ppo_mini_batches": 2}, "loss": {"clip_low": 0.2, "clip_high": 0.28}})
    state, twin = [build_state(dev, lr=0.05, clip_grad=0.0) for _ in range(2)]
    micro = _micro_batches()
    timings: dict[str, float] = {}
    metrics = update_policy(state, micro, cfg, timings)

    # by hand: the first mini-batch's step on a twin, then its logprobs of the second mini-batch
    twin_micro = _micro_batches()
    for mb, stored in zip(twin_micro, micro):
        mb["old_logprobs"] = stored["old_logprobs"]
    train_step(twin, twin_micro[:2], partial(rl_loss, cfg.loss), need_entropy=True)
    store_logprobs(twin.model, twin.vocab_size, twin_micro[2:], "mid")
    on = torch.cat([mb["on_mask"].flatten() for mb in twin_micro[2:]]).bool()
    adv = torch.cat([mb["advantages"].flatten() for mb in twin_micro[2:]])[on]
    log_ratio = torch.cat([(mb["mid"] - mb["old_logprobs"]).flatten() for mb in twin_micro[2:]])[on]
    ratio = torch.exp(log_ratio)
    report = {
        "metrics": metrics,
        "timings": sorted(timings),
        "tokens": int(on.sum()),
        "ratio": ratio.mean().item(),
        "low": int(((adv < 0) & (ratio < 0.8)).sum()),
        "high": int(((adv > 0) & (ratio > 1.28)).sum()),
        "outside": int(((ratio < 0.8) | (ratio > 1.28)).sum()),
    }
    Path(out).write_text(json.dumps(report))
    destroy_distributed()


def test_two_mini_batches_by_hand(tmp_path):
    out = tmp_path / "report.json"
    spawn_local(_worker, 1, str(out))
    r = json.loads(out.read_text())
    m = r["metrics"]
    assert r["timings"] == ["timing_s/old_logprobs", "timing_s/update"]
    assert m["update_1/ratio"] == 1.0  # old logprobs = the pre-update weights' own: exactly
    assert m["update_1/clip_frac_low"] == 0.0 and m["update_1/clip_frac_high"] == 0.0
    assert m["update_2/ratio"] != 1.0
    assert m["update_2/ratio"] == pytest.approx(r["ratio"], rel=1e-6)
    n = r["tokens"]
    assert r["low"] > 0 and r["high"] > 0  # both asymmetric bounds act on the second update
    assert m["update_2/clip_frac_low"] * n == pytest.approx(r["low"], abs=1e-6)
    assert m["update_2/clip_frac_high"] * n == pytest.approx(r["high"], abs=1e-6)
    assert r["outside"] > r["low"] + r["high"]  # tokens outside the bounds whose gradient is kept
    assert m["ratio"] == pytest.approx((1.0 + m["update_2/ratio"]) / 2)  # the mean over the updates


def _rollout_worker(out: str):
    from scope_mega.config import RunConfig, from_dict
    from scope_mega.rl.update import update_policy
    from scope_mega.runtime.distributed import destroy_distributed, init_distributed
    from scope_mega.train_step import store_logprobs

    dev = init_distributed(device="cpu", seed=3)
    cfg = from_dict(RunConfig, {"rl": {"ppo_mini_batches": 2, "old_logprobs": "rollout"}})
    state = build_state(dev, lr=0.05, clip_grad=0.0)
    micro = _micro_batches()
    # the engine's logprobs: the pre-update weights' own, 0.05 higher on every response token
    store_logprobs(state.model, state.vocab_size, micro, "pre")
    for mb in micro:
        mb["rollout_logprobs"] = torch.where(mb["on_mask"] > 0, mb.pop("pre") + 0.05, 0.0)
    timings: dict[str, float] = {}
    metrics = update_policy(state, micro, cfg, timings)
    Path(out).write_text(json.dumps({"metrics": metrics, "timings": sorted(timings)}))
    destroy_distributed()


def test_rollout_logprobs_as_old_skip_the_forward(tmp_path):
    out = tmp_path / "report.json"
    spawn_local(_rollout_worker, 1, str(out))
    r = json.loads(out.read_text())
    m = r["metrics"]
    assert r["timings"] == ["timing_s/update"]  # no old-logprob forward
    # the first update's ratio is the trainer's over the engine's logprob: exp(-0.05) on every token
    assert m["update_1/ratio"] == pytest.approx(math.exp(-0.05), rel=1e-5)
    assert m["update_1/abs_log_ratio"] == pytest.approx(0.05, rel=1e-4)
    assert m["update_2/abs_log_ratio"] != pytest.approx(0.05, rel=1e-4)  # the weights moved
