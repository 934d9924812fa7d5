"""slurm/train.sh on the real test cluster, RL with partial rollouts (issue 30): a 2-rank job whose two
replicas carry unfinished responses over steps gets the USR1 preemption notice mid-run, checkpoints
its groups in flight, is requeued and resumes; every prompt of the stream is then trained exactly once,
with the uninterrupted job's numbers.

The policy is random (no SFT stage): stopping at any digit gives its responses lengths from 1 to the
limit, so groups finish in different rounds and unfinished ones carry over.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_train_job import REPO, TWO_RANKS, job_log, losses, preempt_after, submit

pytestmark = pytest.mark.slurm

STEPS = 8
TINY_RL = [
    "device=cpu",
    "wandb_mode=disabled",
    "seed=3",
    "model.hf_config.hidden_size=32",
    "model.hf_config.intermediate_size=64",
    "model.hf_config.num_hidden_layers=2",
    "rl.init_from=random",
    f"rl.steps={STEPS}",
    "rl.prompts_per_step=4",
    "rl.group_size=4",
    "rl.micro_batch_size=8",
    "rl.max_tokens_per_micro_batch=null",
    "rl.ppo_mini_batches=1",
    "rl.dynamic_sampling=off",
    "rl.num_eval_problems=4",
    "rl.eval_samples=2",
    "rl.eval_interval=0",
    "rollout.max_new_tokens=24",
    'rollout.stop=["0","1","2","3","4","5","6","7","8","9"]',
    "rl.max_staleness=1",
    "loss.tis_cap=2",
    "rl.partial_segment=4",
    "rl.extra_prompts=8",
    "loss.entropy_coef=0.01",
]


def trained_positions(run_dir: Path) -> dict[int, list[int]]:
    """Each RL step's trained stream positions (both replicas), from metrics.jsonl."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "async/trained_positions" in rec:
            out[rec["step"]] = rec["async/trained_positions"]
    return out


@pytest.fixture(scope="module")
def rl_jobs(slurm_cluster):
    """The uninterrupted RL job and the one to preempt, side by side; USR1 to the second's batch shell
    once it has logged step 3 (`test_train_job.preempt_after`)."""
    cwd = slurm_cluster.jobs_dir / "partial_jobs"
    cwd.mkdir(parents=True, exist_ok=True)
    config = yaml.safe_load((REPO / "examples" / "tiny_cpu.yaml").read_text())
    config.pop("run_dir", None)
    (cwd / "tiny.yaml").write_text(yaml.safe_dump(config))
    ref_dir, pre_dir = cwd / "reference-run", cwd / "preempted-run"
    ref = submit(
        slurm_cluster, cwd, TWO_RANKS, ["--stage", "train", "tiny.yaml", *TINY_RL, f"run_dir={ref_dir}"]
    )
    pre = submit(
        slurm_cluster, cwd, TWO_RANKS, ["--stage", "train", "tiny.yaml", *TINY_RL, f"run_dir={pre_dir}"]
    )
    step = preempt_after(slurm_cluster, cwd, pre, pre_dir, 3, timeout=300)
    return dict(cwd=cwd, ref=ref, ref_dir=ref_dir, pre=pre, pre_dir=pre_dir, signalled_at_step=step)


def test_usr1_requeue_trains_every_prompt_once_with_the_straight_numbers(slurm_cluster, rl_jobs):
    cwd, job, run_dir = rl_jobs["cwd"], rl_jobs["pre"], rl_jobs["pre_dir"]
    result = slurm_cluster.wait(job, timeout=400)
    log = job_log(cwd, job)
    assert result.ok and result.restarts == 1, (result, log)
    stopped = [
        int(line.split("checkpoint at step ")[1].split()[0])
        for line in log.splitlines()
        if "stop signal: checkpoint at step" in line
    ]
    assert stopped and stopped[0] < STEPS, log
    ckpt = run_dir / "checkpoints_rl" / f"step_{stopped[0]:08d}"
    in_flight_then = json.loads((ckpt / "trainer_state.json").read_text())["extra"]["rollouts"]
    carried = [r for state in in_flight_then for g in state["groups"] for r in g["responses"] if r["tokens"]]
    assert carried, "no response was in flight at the stop"

    ref = slurm_cluster.wait(rl_jobs["ref"], timeout=400)
    assert ref.ok, (ref, job_log(cwd, rl_jobs["ref"]))
    resumed, straight = trained_positions(run_dir), trained_positions(rl_jobs["ref_dir"])
    assert sorted(resumed) == list(range(1, STEPS + 1)) and resumed == straight
    assert losses(run_dir) == losses(rl_jobs["ref_dir"])  # exact float equality, step by step
    trained = [p for step in sorted(resumed) for p in resumed[step]]
    final = json.loads((run_dir / "checkpoints_rl" / "step_00000008" / "trainer_state.json").read_text())
    in_flight = [g["position"] for state in final["extra"]["rollouts"] for g in state["groups"]]
    issued = sorted(trained + in_flight)
    assert issued == list(range(len(issued))) and len(trained) == STEPS * 4  # each prompt once
