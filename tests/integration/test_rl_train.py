"""End to end on CPU: `scope-mega train` runs RL steps with TP=2, checkpoints and resumes; PP=2 gives
the single-process run's numbers; DP=2 splits the prompts over two replicas and logs all of them."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from _tiny_rl import REPO
from _tiny_rl import train as _train

from scope_mega.logging import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _rl_steps(run_dir: Path) -> list[dict]:
    return [m for m in read_metrics(run_dir) if m["stage"] == "rl" and "loss" in m]


def test_two_rl_steps_with_tp2_then_resume(tmp_path):
    _train(tmp_path, 2, "parallel.tp=2")
    rl = [m for m in read_metrics(tmp_path) if m["stage"] == "rl"]
    assert [m["step"] for m in rl if "loss" in m] == [1, 2]
    assert {"reward", "rollout/accuracy", "rollout/truncated_frac", "scope/failed", "grad_norm"} <= rl[
        1
    ].keys()
    phases = [f"timing_s/{p}" for p in ("rollout", "verify", "scope", "update", "sync")]
    for m in (m for m in rl if "loss" in m):
        assert all(m[k] > 0 for k in phases) and sum(m[k] for k in phases) <= m["timing_s/step"]
    assert all(m["timing_s/eval"] > 0 for m in rl if "eval/greedy_acc" in m)
    plot = subprocess.run(
        [sys.executable, str(REPO / "tools/plot_metrics.py"), str(tmp_path)], capture_output=True, text=True
    )
    assert plot.returncode == 0 and (tmp_path / "plots" / "rl_timing.png").is_file(), plot.stderr
    ckpts = tmp_path / "checkpoints_rl"
    assert (ckpts / "latest").read_text() == "step_00000002"
    state = json.loads((ckpts / "step_00000002" / "trainer_state.json").read_text())
    assert (state["tp"], state["step"]) == (2, 2)

    _train(tmp_path, 3, "parallel.tp=2")  # resumes at step 2: step 3 only, nothing repeated
    rl = [m for m in read_metrics(tmp_path) if m["stage"] == "rl"]
    assert [m["step"] for m in rl if "loss" in m] == [1, 2, 3]
    assert (ckpts / "latest").read_text() == "step_00000003"


def test_pp2_and_offload_match_one_process(tmp_path):
    """Same starting weights, same samples: PP=2, with micro-batches packed by a token budget in the
    THD layout (rows of samples end to end, their lengths differing between micro-batches; the row
    shapes travel between the stages), gives the single-process step's loss and grad norm, and the
    single process with its optimizer state offloaded between updates (`rl.offload=on`) gives them
    exactly. An entropy bonus makes the gradient non-zero although the untrained policy earns no
    reward."""
    _train(tmp_path / "init", 0, nproc=1)  # writes the starting checkpoint (step 0)
    common = (f"rl.init_from={tmp_path / 'init' / 'checkpoints_rl'}", "loss.entropy_coef=0.01")
    _train(tmp_path / "pp1", 3, *common, nproc=1)
    _train(
        tmp_path / "pp2", 2, *common, "parallel.pp=2", "rl.max_tokens_per_micro_batch=64", "rl.packing=thd"
    )
    one, two = _rl_steps(tmp_path / "pp1"), _rl_steps(tmp_path / "pp2")
    assert [m["step"] for m in two] == [1, 2]
    for a, b in zip(one, two):
        assert b["reward"] == a["reward"] and b["entropy"] == pytest.approx(a["entropy"], rel=1e-5)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    assert two[0]["grad_norm"] > 0 and two[0]["packing/pad_frac"] == 0 < one[0]["packing/pad_frac"]
    # step 3's loss is the first to see Adam state that went to the host and back
    _train(tmp_path / "offload", 3, *common, "rl.offload=on", nproc=1)
    off = _rl_steps(tmp_path / "offload")
    assert all(m["timing_s/offload"] > 0 and m["offload/host_gib"] > 0 for m in off)
    assert not any("offload/host_gib" in m for m in one)
    keys = ("reward", "loss", "grad_norm", "entropy")
    assert [[m[k] for k in keys] for m in off] == [[m[k] for k in keys] for m in one]


def test_ppo_mini_batches_in_the_trainer(tmp_path):
    """Mini-batches x epochs per rollout batch with TP=2: old logprobs from one forward before the first
    update (ratio exactly 1 there and equal to the engine's within the logged mismatch), ratios away
    from 1 after it; four optimizer steps per RL step, as 2 x 2 of fixed micro-batches and as 4 x 1
    of packed ones (more mini-batches than rl.micro_batch_size would make). The untrained policy earns
    no reward: an entropy bonus moves the weights. The packed run decays the lr linearly over its four
    optimizer steps, 1e-4 down to 2e-5: each update logs the rate it used."""
    fixed = ("rl.ppo_mini_batches=2", "rl.ppo_epochs=2")
    packed = ("rl.ppo_mini_batches=4", "rl.max_tokens_per_micro_batch=64")
    packed += ("rl.decay_style=linear", "rl.min_lr=2e-5")
    for name, layout in (("fixed", fixed), ("packed", packed)):
        _train(tmp_path / name, 1, "parallel.tp=2", *layout, "loss.entropy_coef=0.01")
        (step,) = _rl_steps(tmp_path / name)
        assert step["update_1/ratio"] == 1.0 and step["rollout_mismatch"] < 1e-4
        assert all(step[f"update_{i}/ratio"] != 1.0 for i in (2, 3, 4)) and "update_5/ratio" not in step
        assert step["timing_s/old_logprobs"] > 0
        # the batch mix (rl/parts.py): no reward, so every trained token is a failure's, at advantage 0
        assert step["mix/tokens/failure"] > 0 and step["mix/adv_mass/failure"] == 0.0
        assert all(step[f"mix/tokens/{p}"] == 0 for p in ("success", "prefix", "guide"))
        lrs = [step[f"update_{i}/lr"] for i in (1, 2, 3, 4)]
        assert lrs == pytest.approx([1e-4] * 4 if name == "fixed" else [1e-4, 8e-5, 6e-5, 4e-5], rel=1e-9)


def test_dynamic_sampling_refill_over_two_replicas(tmp_path):
    """DP=2 with `rl.dynamic_sampling=refill`: the drivers agree on the rounds (every generate is joined),
    and a step trains only on groups with a signal -- none at all for the untrained policy's
    all-zero groups (no optimizer step), one step otherwise."""
    _train(tmp_path, 2, "rl.dynamic_sampling=refill", "rl.max_sampling_rounds=2")
    steps = [m for m in read_metrics(tmp_path) if m["stage"] == "rl" and "updates" in m]
    assert [m["step"] for m in steps] == [1, 2]
    for m in steps:
        assert m["updates"] == (1 if m["dynamic/kept_groups"] else 0)
        assert ("loss" in m) == bool(m["dynamic/kept_groups"])
        assert m["dynamic/kept_groups"] <= 4 and 0 <= m["dynamic/kept_frac"] <= 1
        assert m["dynamic/rounds"] == (1 if m["dynamic/kept_groups"] == 4 else 2)
        # rl.balance_tokens runs with replicas left without samples (here both, every group dropped)
        assert 1.0 <= m["balance/imbalance_after"] <= m["balance/imbalance_before"] <= 2.0


def test_dp2_splits_prompts_and_logs_every_replica(tmp_path):
    """4 prompts x 4 samples over 2 replicas: the logged counts cover all 16 rollouts, not one
    replica's 8, and the run resumes from its DP=2 checkpoint."""
    _train(tmp_path, 1)
    (step,) = _rl_steps(tmp_path)
    assert step["scope/failed"] + step["rollout/accuracy"] * 16 == 16
    assert step["scope/failed"] > 8
    assert 1.0 <= step["balance/imbalance_after"] <= step["balance/imbalance_before"]  # rl.balance_tokens
    state = json.loads((tmp_path / "checkpoints_rl" / "step_00000001" / "trainer_state.json").read_text())
    assert (state["tp"], state["world_size"], state["step"]) == (1, 2, 1)
    _train(tmp_path, 2)
    assert [m["step"] for m in _rl_steps(tmp_path)] == [1, 2]
