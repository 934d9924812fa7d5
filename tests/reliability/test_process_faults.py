"""Issue 27, processes: item 9, no process outlives a trainer killed with SIGKILL (Megatron's checkpoint
writer left its multiprocessing Manager and that Manager's resource tracker behind); item 11, a math
verifier call that times out does not charge the worker's restart to the next call."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from scope_mega.rewards import MathVerifier, MathVerifierConfig

REPO = Path(__file__).resolve().parents[2]
TINY_SFT = [
    "device=cpu",
    "wandb_mode=disabled",
    "model.hf_config.hidden_size=32",
    "model.hf_config.intermediate_size=64",
    "model.hf_config.num_hidden_layers=2",
    "sft.steps=1000",
    "sft.global_batch_size=4",
    "sft.micro_batch_size=4",
    "sft.num_train_problems=100",
    "sft.num_eval_problems=4",
    "checkpoint.save_interval=1",
    "checkpoint.keep_last=1",
]


def _alive(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE  # a zombie has exited; only its parent's reap is due
    except psutil.NoSuchProcess:
        return False


@pytest.mark.slow
def _die_with_parent() -> None:
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def test_no_process_outlives_a_sigkilled_trainer(tmp_path):
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "scope_mega.cli",
        "sft",
        str(REPO / "examples/tiny_cpu.yaml"),
        f"run_dir={run}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    trainer = subprocess.Popen(
        [*cmd, *TINY_SFT],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=_die_with_parent,  # a pytest killed from outside (a time box) takes it along
    )
    children: list[psutil.Process] = []
    try:
        deadline = time.time() + 180
        while not (run / "checkpoints" / "latest").is_file():
            assert trainer.poll() is None, "the trainer ended before its first checkpoint"
            assert time.time() < deadline, "no checkpoint within 180 s"
            time.sleep(0.1)
        children = psutil.Process(trainer.pid).children(recursive=True)
        assert children, "the checkpoint writer started no helper process"
        os.kill(trainer.pid, signal.SIGKILL)  # the trainer alone, as the OOM killer does
        trainer.wait()
        deadline = time.time() + 5
        while any(map(_alive, children)) and time.time() < deadline:
            time.sleep(0.1)
        left = [f"{p.pid} {p.status()} {' '.join(p.cmdline())[:160]}" for p in children if _alive(p)]
        assert not left, f"still running 5 s after the trainer was killed: {left}"
    finally:  # whatever this test started and is still there
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait()
        for p in children:
            if _alive(p):
                p.kill()


def test_a_timed_out_verifier_call_does_not_charge_the_restart_to_the_next(tmp_path):
    """A tower that sympy cannot finish times out; the next call is answered by a worker that is
    already up, not one still importing math-verify (2-3 s here)."""
    with MathVerifier(MathVerifierConfig(timeout_s=1.0)) as verifier:
        assert verifier.verify(r"\boxed{1}", "1").correct  # started and ready
        time.sleep(5)  # whatever the verifier starts in the background has started
        start = time.perf_counter()
        slow = verifier.verify(r"\boxed{10^{10^{10^{10}}}}", "5")
        timed_out = time.perf_counter() - start
        start = time.perf_counter()
        fine = verifier.verify(r"\boxed{5}", "5")
        next_call = time.perf_counter() - start
    assert (slow.correct, slow.reason) == (False, "timeout") and timed_out < 2.0
    assert fine.correct and next_call < 0.5, f"the call after a timeout took {next_call:.2f} s"
