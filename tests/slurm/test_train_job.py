"""slurm/train.sh on the real test cluster: a 2-rank SFT job, USR1 -> checkpoint -> requeue -> resume,
and a config error that fails fast.

The reference job (uninterrupted) and the preempted job are submitted together by one module fixture
and run side by side on the shared node, so the file stays well under 3 minutes on 2 busy cores; the
USR1 test compares the preempted job's per-step losses with the reference job's, exactly.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from slurm_cluster import which

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
TRAIN_SH = REPO / "slurm" / "train.sh"
TINY = [
    "device=cpu",
    "wandb_mode=disabled",
    "model.hf_config.hidden_size=32",
    "model.hf_config.intermediate_size=64",
    "model.hf_config.num_hidden_layers=2",
    "sft.steps=12",
    "sft.global_batch_size=8",
    "sft.micro_batch_size=4",
    "sft.num_train_problems=200",
    "sft.num_eval_problems=4",
    "checkpoint.save_interval=4",
]
STEPS = 12
# 2 ranks on the 2-CPU node; no GPUs (the script's #SBATCH default asks for 8).
TWO_RANKS = ["--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=15"]


def submit(cluster, cwd: Path, sbatch_opts: list[str], script_args: list[str]) -> int:
    """`sbatch OPTS slurm/train.sh ARGS` from `cwd`, with the venv python for the ranks."""
    cwd.joinpath("logs").mkdir(parents=True, exist_ok=True)  # Slurm does not create --output dirs
    env = {**cluster.env, "SCOPE_MEGA_PYTHON": sys.executable, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [which("sbatch"), "--parsable", *sbatch_opts, str(TRAIN_SH), *script_args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.strip().splitlines()[-1].split(";")[0])


def job_log(cwd: Path, job: int, name: str = "scope-mega") -> str:
    path = cwd / "logs" / f"{name}-{job}.out"
    return path.read_text(errors="replace") if path.exists() else f"<no job log at {path}>"


def losses(run_dir: Path) -> dict[int, float]:
    """Per-step training loss from metrics.jsonl; a step logged twice is an error."""
    out: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            assert rec["step"] not in out, f"step {rec['step']} logged twice in {run_dir}"
            out[rec["step"]] = rec["loss"]
    return out


def max_logged_step(run_dir: Path) -> int:
    try:
        text = (run_dir / "metrics.jsonl").read_text()
    except OSError:
        return 0
    steps = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError, KeyError):  # a line being written
            steps.append(json.loads(line)["step"])
    return max(steps, default=0)


def rank_processes(job: int) -> list[int]:
    """PIDs of the job's Python rank processes (not the task wrappers, not spawned helpers)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if not (d / "comm").read_text().startswith("python"):
                continue
            if f"SLURM_JOB_ID={job}".encode() not in (d / "environ").read_bytes().split(b"\0"):
                continue
            if b"scope_mega.cli" in (d / "cmdline").read_bytes():
                pids.append(int(d.name))
    return pids


def preempt_after(slurm_cluster, cwd: Path, job: int, run_dir: Path, step: int, timeout: float) -> int:
    """Send the USR1 preemption notice to `job`'s batch shell once `run_dir` has logged `step`; the
    step logged when it was sent. The ranks are paused (SIGSTOP) while the notice travels (batch shell
    -> stop file -> task wrapper -> USR1 to each rank) and resumed once rank 0's wrapper reports the
    delivery, so the stop lands mid-run however fast the tiny steps are."""
    deadline = time.monotonic() + timeout
    while max_logged_step(run_dir) < step:
        info = slurm_cluster.job_info(job)
        assert info.get("JobState") in ("PENDING", "CONFIGURING", "RUNNING"), (info, job_log(cwd, job))
        assert time.monotonic() < deadline, f"no step {step} after {timeout} s\n{job_log(cwd, job)}"
        time.sleep(0.05)
    ranks = rank_processes(job)
    assert len(ranks) == 2, (ranks, job_log(cwd, job))
    for pid in ranks:
        os.kill(pid, signal.SIGSTOP)
    try:
        signalled = max_logged_step(run_dir)
        slurm_cluster.run(["scancel", "--signal=USR1", "--batch", str(job)])
        deadline = time.monotonic() + 60
        while "stop requested: SIGUSR1 to every rank" not in job_log(cwd, job):
            assert time.monotonic() < deadline, f"stop request not delivered\n{job_log(cwd, job)}"
            time.sleep(0.1)
    finally:
        for pid in ranks:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    return signalled


@pytest.fixture(scope="module")
def jobs(slurm_cluster):
    """Submit the reference job and the job to preempt together (same config, 2 ranks each), then
    send the USR1 preemption notice to the second one once it has logged step 2 (`preempt_after`)."""
    cwd = slurm_cluster.jobs_dir / "train_jobs"
    cwd.mkdir(parents=True, exist_ok=True)
    config = yaml.safe_load((REPO / "examples" / "tiny_cpu.yaml").read_text())
    config.pop("run_dir", None)  # so train.sh picks its per-job default
    (cwd / "tiny.yaml").write_text(yaml.safe_dump(config))
    t0 = time.monotonic()
    ref = submit(slurm_cluster, cwd, TWO_RANKS, ["--stage", "sft", "tiny.yaml", *TINY])
    pre_dir = cwd / "preempted-run"
    pre = submit(slurm_cluster, cwd, TWO_RANKS, ["--stage", "sft", "tiny.yaml", *TINY, f"run_dir={pre_dir}"])
    step = preempt_after(slurm_cluster, cwd, pre, pre_dir, 2, timeout=240)
    return dict(
        cwd=cwd,
        t0=t0,
        ref=ref,
        ref_dir=cwd / "runs" / f"scope-mega-{ref}",
        pre=pre,
        pre_dir=pre_dir,
        signalled_at_step=step,
    )


def test_config_error_fails_fast_without_requeue(slurm_cluster, slurm_job_dir):
    t0 = time.monotonic()
    args = ["--stage", "sft", str(REPO / "examples" / "tiny_cpu.yaml"), *TINY, "optim.lrr=1"]
    job = submit(slurm_cluster, slurm_job_dir, TWO_RANKS, [*args, f"run_dir={slurm_job_dir / 'run'}"])
    result = slurm_cluster.wait(job, timeout=90)
    elapsed = time.monotonic() - t0
    log = job_log(slurm_job_dir, job)
    assert (result.state, result.exit_code, result.restarts) == ("FAILED", 2, 0), (result, log)
    assert "config error: unknown config key 'optim.lrr'" in log, log
    assert "not requeued" in log and "requeueing" not in log, log
    assert elapsed < 60, f"a config error took {elapsed:.0f} s to fail\n{log}"
    sys.stderr.write(f"\n[config error job] failed after {elapsed:.1f} s\n")


def test_two_rank_job_completes_in_default_run_dir(slurm_cluster, jobs):
    cwd, job, run_dir = jobs["cwd"], jobs["ref"], jobs["ref_dir"]
    result = slurm_cluster.wait(job, timeout=300)
    log = job_log(cwd, job)
    assert result.ok and result.restarts == 0, (result, log)
    assert "[scope-mega] rank 0/2" in log and "[scope-mega] rank 1/2" in log, log
    assert f"rendezvous {slurm_cluster.node}:{20000 + job % 20000}" in log, log
    assert sorted(losses(run_dir)) == list(range(1, STEPS + 1)), log
    ckpt = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert (state["step"], state["world_size"]) == (STEPS, 2), state
    sys.stderr.write(f"\n[reference job] done {time.monotonic() - jobs['t0']:.1f} s after submission\n")


def test_usr1_checkpoints_requeues_and_resumes_identically(slurm_cluster, jobs):
    cwd, job, run_dir = jobs["cwd"], jobs["pre"], jobs["pre_dir"]
    result = slurm_cluster.wait(job, timeout=300)
    log = job_log(cwd, job)
    assert result.ok and result.restarts == 1, (result, log)
    assert "batch script received SIGUSR1" in log and "requeueing job" in log, log
    stopped = [
        int(line.split("checkpoint at step ")[1].split()[0])
        for line in log.splitlines()
        if "stop signal: checkpoint at step" in line
    ]
    k = jobs["signalled_at_step"]
    assert stopped and k <= stopped[0] <= k + 1 < STEPS, f"not stopped at step {k} or {k + 1}\n{log}"
    assert "restart 1" in log and "[scope-mega] rank 1/2 local_rank 1 on" in log, log

    ref = slurm_cluster.wait(jobs["ref"], timeout=300)
    assert ref.ok, ref
    resumed, straight = losses(run_dir), losses(jobs["ref_dir"])
    assert sorted(resumed) == list(range(1, STEPS + 1)), resumed  # no step repeated or skipped
    assert resumed == straight  # exact float equality, step by step
    sys.stderr.write(
        f"\n[preempted job] signalled after step {jobs['signalled_at_step']}, stopped at step {stopped[0]},"
        f" resumed, done {time.monotonic() - jobs['t0']:.1f} s after submission\n"
    )
