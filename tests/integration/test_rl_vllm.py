"""The RL trainer rolling out with a real vLLM (the CPU build), a worker on every rank under the
external launcher, in its own TP layout: at every step the engine's logprobs of the sampled tokens
equal the trainer's (`rollout_mismatch`), so every vLLM shard received every update and no stale
prefix cache survived; a run stopped by the preemption signal resumes to the straight run's metrics;
a run at trainer CP=2 trains as TP=2 does and its checkpoint resumes at CP=1.

The policy moves at every step (an entropy bonus with a large learning rate), so an engine that missed
an update would be off by far more than the bound; tests/rollout/test_vllm_engine.py shows the same
measure catching a withheld bucket and a skipped prefix-cache reset."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from _tiny_rl import REPO, TINY, train

from scope_mega.logging import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

VLLM = (
    "rollout.engine=vllm",
    "model.hf_config.hidden_size=64",  # head size 32: one vLLM's CPU attention runs
    "model.hf_config.num_attention_heads=2",
    "loss.entropy_coef=0.01",
    "rl.lr=1e-2",
    "checkpoint.save_interval=1",
)
LAYOUTS = {
    "tp2-vllm_tp2": ("parallel.tp=2", "rollout.vllm_tensor_parallel_size=2"),
    "tp2-vllm_tp1": ("parallel.tp=2", "rollout.vllm_tensor_parallel_size=1"),  # two vLLM replicas
    "pp2-vllm_tp2": ("parallel.pp=2", "rollout.vllm_tensor_parallel_size=2"),
    "cp2-vllm_tp2": ("parallel.cp=2", "rollout.vllm_tensor_parallel_size=2"),  # each sequence over 2 ranks
}


def _rl_steps(run_dir: Path) -> list[dict]:
    return [m for m in read_metrics(run_dir) if m["stage"] == "rl" and "loss" in m]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two RL steps at each layout (three for the one the resume test compares with)."""
    out = {}
    for name, layout in LAYOUTS.items():
        steps = 3 if name == "tp2-vllm_tp2" else 2
        out[name] = train(tmp_path_factory.mktemp(name), steps, *VLLM, *layout)
    return out


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_vllm_holds_the_trainers_weights_at_every_step(runs, layout):
    steps = _rl_steps(runs[layout])
    assert [m["step"] for m in steps][:2] == [1, 2]
    for m in steps:
        assert m["rollout_mismatch"] <= 1e-4, (layout, m["step"], m["rollout_mismatch"])
        assert m["grad_norm"] > 0
    assert steps[1]["entropy"] != steps[0]["entropy"]  # the policy the engine samples from moved
    evals = [m for m in read_metrics(runs[layout]) if "eval/greedy_acc" in m]
    assert [m["step"] for m in evals] == [0, len(steps)]  # held-out evaluation through vLLM too


def test_kill_and_resume_gives_the_straight_runs_metrics(runs, tmp_path):
    """SIGUSR1 (Slurm's time-limit notice) to both ranks after step 1: they checkpoint and exit;
    the rerun resumes there and logs steps 2 and 3 exactly as the uninterrupted run did."""
    run = tmp_path / "preempted"
    args = ["train", str(REPO / "examples/tiny_cpu.yaml"), f"run_dir={run}", "rl.steps=3", *TINY, *VLLM]
    args += LAYOUTS["tp2-vllm_tp2"]
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [str(torchrun), "--nproc-per-node=2", "--standalone", "-m", "scope_mega.cli", *args]
    proc = subprocess.Popen(
        cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + 300
    while not (run / "metrics.jsonl").exists() or not _rl_steps(run):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before step 1"
        time.sleep(0.2)
    for worker in psutil.Process(proc.pid).children():
        worker.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "exiting for requeue" in out, out[-2000:]
    stopped = [m["step"] for m in _rl_steps(run)]
    assert stopped[-1] < 3

    train(run, 3, *VLLM, *LAYOUTS["tp2-vllm_tp2"])
    resumed, straight = _rl_steps(run), _rl_steps(runs["tp2-vllm_tp2"])
    assert [m["step"] for m in resumed] == [1, 2, 3]
    for a, b in zip(straight, resumed):
        timing = {k for k in a.keys() | b.keys() if k == "tokens_per_s" or k.startswith("timing")}
        assert {k: v for k, v in a.items() if k not in timing} == {
            k: v for k, v in b.items() if k not in timing
        }


def test_context_parallel_run_matches_and_resumes_at_cp1(runs, tmp_path):
    """Trainer CP=2 (each sequence split over both ranks) samples and trains as TP=2 does, to fp32
    rounding: the same rollouts, losses and gradient norms. Its step-2 checkpoint resumes at CP=1
    (TP=2) and gives the straight TP=2 run's step-3 loss."""
    run = tmp_path / "cp2"
    shutil.copytree(runs["cp2-vllm_tp2"], run)
    train(run, 3, *VLLM, *LAYOUTS["tp2-vllm_tp2"])
    resumed, straight = _rl_steps(run), _rl_steps(runs["tp2-vllm_tp2"])
    assert [m["step"] for m in resumed] == [1, 2, 3]
    for a, b in zip(straight, resumed):
        assert b["entropy"] == pytest.approx(a["entropy"], rel=1e-6)  # the same sampled tokens
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
