"""Partial rollouts in the trainer (issue 30): two replicas carry unfinished responses over steps with
their per-token versions, train only tokens at most `rl.max_staleness` = 1 step old, weight them by
decoupled PPO's behaviour weight, and after a SIGKILL and a resume train every prompt of the stream
exactly once, with the straight run's numbers."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _tiny_rl import REPO, TINY, scope_mega
from _tiny_rl import train as _train

from scope_mega.logging import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

CONFIG = str(REPO / "examples/tiny_cpu.yaml")
PARTIAL = (
    "rl.max_staleness=1",
    "loss.tis_cap=2",
    "rl.partial_segment=4",
    "rl.extra_prompts=8",  # 4 more groups in flight per replica than it trains
    "rollout.max_new_tokens=24",
    "loss.entropy_coef=0.01",  # the policy changes although it earns no reward: stale tokens are stale
    "checkpoint.save_interval=1",
)
STEPS = 6


def _rl_steps(run_dir: Path) -> list[dict]:
    return [m for m in read_metrics(run_dir) if m["stage"] == "rl" and "loss" in m]


def _in_flight(run_dir: Path) -> tuple[list[int], list[int]]:
    """The final checkpoint's groups in flight (their positions) and each replica's next position."""
    ckpts = run_dir / "checkpoints_rl"
    state = json.loads((ckpts / (ckpts / "latest").read_text() / "trainer_state.json").read_text())
    replicas = state["extra"]["rollouts"]
    return [g["position"] for r in replicas for g in r["groups"]], [r["next_position"] for r in replicas]


def _killed_at_step(run_dir: Path, step: int, *overrides: str) -> None:
    """Start the 2-rank run, SIGKILL every process of it once the checkpoint of `step` is in place."""
    torchrun = Path(sys.executable).with_name("torchrun")
    args = [f"run_dir={run_dir}", f"rl.steps={STEPS}", *TINY, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(
        [str(torchrun), "--nproc-per-node=2", "--standalone", "-m", "scope_mega.cli", "train", CONFIG, *args],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    latest, deadline = run_dir / "checkpoints_rl" / "latest", time.monotonic() + 600
    while not (latest.exists() and latest.read_text() == f"step_{step:08d}"):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its checkpoint"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_partial_rollouts_survive_a_sigkill_and_train_every_prompt_once(tmp_path):
    sft = tmp_path / "sft"  # a policy that ends its responses at different lengths: some carry over
    scope_mega("sft", CONFIG, f"run_dir={sft}", *TINY, "sft.steps=40")
    common = (f"rl.init_from={sft / 'checkpoints'}", *PARTIAL)
    straight = _train(tmp_path / "straight", STEPS, *common)
    _killed_at_step(tmp_path / "killed", 3, *common)
    assert [m["step"] for m in _rl_steps(tmp_path / "killed")][-1] >= 3
    state = tmp_path / "killed" / "checkpoints_rl" / "step_00000003" / "trainer_state.json"
    responses = [
        r
        for s in json.loads(state.read_text())["extra"]["rollouts"]
        for g in s["groups"]
        for r in g["responses"]
    ]
    assert any(
        r["tokens"] and r["finish"] is None for r in responses
    )  # killed with partial responses in flight
    killed = _train(tmp_path / "killed", STEPS, *common)  # resumes at step 3

    steps, reference = _rl_steps(killed), _rl_steps(straight)
    assert [m["step"] for m in steps] == list(range(1, STEPS + 1))
    for key in ("async/trained_positions", "loss", "grad_norm", "reward", "behav/kl", "async/staleness_mean"):
        assert [m[key] for m in steps] == [m[key] for m in reference], key

    # exactly once: trained positions and those still in flight are every issued position, no repeat
    trained = [p for m in steps for p in m["async/trained_positions"]]
    in_flight, next_positions = _in_flight(killed)
    issued = sorted(trained + in_flight)
    assert issued == list(range(len(issued))) and len(trained) == STEPS * 4
    assert sorted(next_positions) == [len(issued), len(issued) + 1]  # replica r issues r, r + 2, ...

    # responses were carried over unfinished, and stale tokens trained under a weight != 1
    assert any(m["async/carried"] > 0 and m["async/rounds"] > 0 for m in steps)
    stale = [m for m in steps if m["async/staleness_max"] == 1]
    assert stale and all(m["async/staleness_1"] > 0 for m in stale)
    assert all(m["async/staleness_max"] <= 1 for m in steps)
    assert any(m["behav/kl"] > 0 and m["behav/weight_max"] != 1 for m in stale)
    assert all(m["behav/kl"] < 1e-6 for m in steps if m["async/staleness_max"] == 0)  # engine = trainer
