"""The tiny RL run the integration tests share: examples/tiny_cpu.yaml shrunk to seconds per step."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "wandb_mode=disabled",
    "seed=3",
    "model.hf_config.hidden_size=32",
    "model.hf_config.intermediate_size=64",
    "model.hf_config.num_hidden_layers=2",
    "rl.prompts_per_step=4",
    "rl.group_size=4",
    "rl.micro_batch_size=8",
    "rl.max_tokens_per_micro_batch=null",  # fixed micro-batches; tests that pack say so
    "rl.ppo_mini_batches=1",  # one optimizer step per batch, no group filter, a constant lr (the demo
    "rl.dynamic_sampling=off",  # changes all three); tests of any of them say so
    "rl.decay_style=constant",
    "rl.num_eval_problems=4",
    "rl.eval_samples=2",
    "rl.eval_interval=0",
    "rollout.max_new_tokens=12",
    # no SFT stage first: RL from random weights, asked for (a test that starts from a checkpoint sets
    # rl.init_from after these, and the later override wins)
    "rl.init_from=random",
]


def scope_mega(*args: str, nproc: int = 1) -> None:
    """`scope-mega ARGS` in a fresh process (under torchrun for `nproc` > 1); it must succeed."""
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = [str(torchrun), f"--nproc-per-node={nproc}", "--standalone"] if nproc > 1 else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [*launcher, "-m", "scope_mega.cli", *args], env=env, cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def train(run_dir: Path, steps: int, *overrides: str, nproc: int = 2) -> Path:
    """`steps` RL steps of the tiny config into `run_dir`."""
    config = str(REPO / "examples/tiny_cpu.yaml")
    scope_mega("train", config, f"run_dir={run_dir}", f"rl.steps={steps}", *TINY, *overrides, nproc=nproc)
    return run_dir
