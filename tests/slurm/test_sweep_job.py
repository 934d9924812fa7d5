"""slurm/sweep.sh on the real test cluster: a 3-run sweep as one job array.

runs.txt is written by hand here (tools/sweep.py will write it; contract in docs/slurm.md). Each
array task runs its line through the same launch as slurm/train.sh and writes SWEEP/runs/RUN_NAME.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurm_cluster import parse_kv_line, which

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
SWEEP_SH = REPO / "slurm" / "sweep.sh"
# Applied to every run (command line); each line adds its own learning rate and step count.
COMMON = [
    "device=cpu",
    "wandb_mode=disabled",
    "model.hf_config.hidden_size=32",
    "model.hf_config.intermediate_size=64",
    "model.hf_config.num_hidden_layers=2",
    "sft.global_batch_size=8",
    "sft.micro_batch_size=4",
    "sft.num_train_problems=200",
    "sft.num_eval_problems=4",
    "checkpoint.save_interval=0",
]
RUNS = [("lr-1e-3", "0.001", 3), ("lr-3e-3", "0.003", 3), ("lr-1e-2", "0.01", 4)]  # 1e-3 is a YAML string


def test_three_run_sweep_as_job_array(slurm_cluster, slurm_job_dir):
    sweep = slurm_job_dir / "sweep"
    sweep.mkdir()
    config = REPO / "examples" / "tiny_cpu.yaml"
    lines = [f"{name}\t{config}\toptim.lr={lr}\tsft.steps={steps}\n" for name, lr, steps in RUNS]
    (sweep / "runs.txt").write_text("".join(lines))
    (slurm_job_dir / "logs").mkdir()

    t0 = time.monotonic()
    env = {**slurm_cluster.env, "SCOPE_MEGA_PYTHON": sys.executable, "PYTHONWARNINGS": "ignore"}
    opts = ["--array=0-2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]
    proc = subprocess.run(
        [which("sbatch"), "--parsable", *opts, str(SWEEP_SH), "--stage", "sft", "sweep", *COMMON],
        env=env,
        cwd=slurm_job_dir,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    array_id = int(proc.stdout.strip().split(";")[0])

    deadline = time.monotonic() + 240
    while slurm_cluster.run(["squeue", "-h", "-j", str(array_id)], check=False).stdout.strip():
        assert time.monotonic() < deadline, slurm_cluster.run(["squeue", "-j", str(array_id)]).stdout
        time.sleep(0.5)
    out = slurm_cluster.run(["scontrol", "show", "job", "-o", str(array_id)]).stdout
    tasks = {int(info["ArrayTaskId"]): info for info in map(parse_kv_line, out.splitlines()) if info}

    logs = {
        i: (slurm_job_dir / "logs" / f"scope-mega-sweep-{array_id}_{i}.out").read_text(errors="replace")
        for i in range(len(RUNS))
    }
    assert sorted(tasks) == [0, 1, 2], out
    for i, (name, lr, steps) in enumerate(RUNS):
        state = (tasks[i]["JobState"], tasks[i]["ExitCode"])
        assert state == ("COMPLETED", "0:0"), (state, logs[i])
        assert f"run {i + 1} of 3, '{name}'" in logs[i], logs[i]
        records = [json.loads(x) for x in (sweep / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in records if "loss" in r]
        assert [r["step"] for r in train] == list(range(1, steps + 1)), (name, records)
        # each step logs the rate it used: 0 for the first of the warm-up, then rising to at most lr
        assert train[0]["lr"] == 0 < train[-1]["lr"], (name, train)
        assert all(r["lr"] <= float(lr) for r in train), (name, train)
        assert (sweep / "runs" / name / "checkpoints" / "latest").read_text().strip() == f"step_{steps:08d}"
    # Same seed and data, different learning rates: the runs really differ.
    last = [
        [json.loads(x) for x in (sweep / "runs" / n / "metrics.jsonl").read_text().splitlines()][k - 1][
            "loss"
        ]
        for n, _, k in RUNS
    ]
    assert len(set(last)) == 3, last
    sys.stderr.write(f"\n[sweep] 3 array tasks done in {time.monotonic() - t0:.1f} s\n")
