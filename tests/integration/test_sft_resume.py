"""Kill-and-resume: an SFT run killed mid-way and resumed gives exactly the losses of a straight run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scope_mega.logging import read_metrics

pytestmark = [pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "device=cpu",
    "wandb_mode=disabled",
    "model.hf_config.hidden_size=32",
    "model.hf_config.intermediate_size=64",
    "model.hf_config.num_hidden_layers=2",
    "sft.steps=8",
    "sft.global_batch_size=8",
    "sft.micro_batch_size=4",
    "sft.num_train_problems=200",
    "sft.num_eval_problems=4",
    "checkpoint.save_interval=3",
    "checkpoint.keep_last=1",
]


def _cmd(run_dir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "scope_mega.cli",
        "sft",
        str(REPO / "examples/tiny_cpu.yaml"),
        f"run_dir={run_dir}",
        *TINY,
    ]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(run_dir) if "loss" in m}


def test_killed_and_resumed_run_matches_straight_run(tmp_path):
    straight = tmp_path / "straight"
    subprocess.run(_cmd(straight), check=True, env=_env(), cwd=REPO, capture_output=True)

    resumed = tmp_path / "resumed"
    # its own process group, killed whole as a node loss or a job kill would: SIGKILL to the trainer
    # alone orphans the helper process Megatron's checkpoint writer starts (a multiprocessing Manager)
    proc = subprocess.Popen(
        _cmd(resumed),
        env=_env(),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while max(_losses(resumed), default=0) < 5 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # no chance to clean up: only the atomic checkpoint survives
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    ckpt = (resumed / "checkpoints" / "latest").read_text()
    assert ckpt in ("step_00000003", "step_00000006")

    subprocess.run(_cmd(resumed), check=True, env=_env(), cwd=REPO, capture_output=True)
    assert _losses(resumed) == _losses(straight)  # exact float equality, every step once
    assert sorted(_losses(resumed)) == list(range(1, 9))
    assert (resumed / "checkpoints" / "latest").read_text() == "step_00000008"
