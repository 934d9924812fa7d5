"""End to end: `scope-mega train` with TP=2 on CPU runs RL steps, checkpoints, and resumes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scope_mega.logging import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "wandb_mode=disabled",
    "model.hf_config.hidden_size=32",
    "model.hf_config.intermediate_size=64",
    "model.hf_config.num_hidden_layers=2",
    "parallel.tp=2",
    "rl.prompts_per_step=4",
    "rl.group_size=4",
    "rl.micro_batch_size=8",
    "rl.num_eval_problems=4",
    "rl.eval_samples=2",
    "rl.eval_interval=0",
    "rollout.max_new_tokens=12",
]


def _train(run_dir: Path, steps: int) -> None:
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [
        str(torchrun),
        "--nproc-per-node=2",
        "--standalone",
        "-m",
        "scope_mega.cli",
        "train",
        str(REPO / "examples/tiny_cpu.yaml"),
        f"run_dir={run_dir}",
        f"rl.steps={steps}",
        *TINY,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_rl_steps_with_tp2_then_resume(tmp_path):
    _train(tmp_path, steps=2)
    rl = [m for m in read_metrics(tmp_path) if m["stage"] == "rl"]
    assert [m["step"] for m in rl if "loss" in m] == [1, 2]
    assert {"reward", "rollout/accuracy", "scope/failed", "grad_norm", "tokens_per_s"} <= rl[1].keys()
    ckpts = tmp_path / "checkpoints_rl"
    assert (ckpts / "latest").read_text() == "step_00000002"
    state = json.loads((ckpts / "step_00000002" / "trainer_state.json").read_text())
    assert (state["tp"], state["step"]) == (2, 2)

    _train(tmp_path, steps=3)  # resumes at step 2: step 3 only, nothing repeated
    rl = [m for m in read_metrics(tmp_path) if m["stage"] == "rl"]
    assert [m["step"] for m in rl if "loss" in m] == [1, 2, 3]
    assert (ckpts / "latest").read_text() == "step_00000003"
