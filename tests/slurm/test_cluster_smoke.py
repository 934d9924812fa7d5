"""Smoke tests of the real Slurm test cluster: multi-task srun, exit codes, USR1 + requeue, sharing.

These prove the mechanics the trainer relies on under Slurm: per-task SLURM_PROCID/SLURM_NTASKS,
exit codes visible without slurmdbd, a USR1 delivered to the batch script, and a self-requeue that
restarts the job with SLURM_RESTART_COUNT=1.
"""

import sys
import textwrap
import time

import pytest

pytestmark = pytest.mark.slurm


def _script(path, body: str):
    path.write_text("#!/bin/bash\n" + textwrap.dedent(body).lstrip())
    path.chmod(0o755)
    return path


def test_two_task_srun_sets_rank_env(slurm_cluster, slurm_job_dir):
    script = _script(
        slurm_job_dir / "ranks.sh",
        f"""
        #SBATCH --ntasks=2
        #SBATCH --output=out-%j.txt
        set -euo pipefail
        srun {sys.executable} -c '
        import os
        rank, n = os.environ["SLURM_PROCID"], os.environ["SLURM_NTASKS"]
        open(f"rank-{{rank}}.txt", "w").write(f"{{rank}} {{n}}\\n")
        '
        """,
    )
    job = slurm_cluster.sbatch(script)
    result = slurm_cluster.wait(job, timeout=60)
    out = (slurm_job_dir / f"out-{job}.txt").read_text()
    assert result.state == "COMPLETED", (result, out)
    assert result.exit_code == 0 and result.signal == 0, (result, out)
    for rank in (0, 1):
        assert (slurm_job_dir / f"rank-{rank}.txt").read_text().split() == [str(rank), "2"], out


def test_exit_code_is_reported(slurm_cluster, slurm_job_dir):
    script = _script(slurm_job_dir / "exit3.sh", "echo failing on purpose\nexit 3\n")
    job = slurm_cluster.sbatch(script, "--ntasks=1", "--output=out-%j.txt")
    result = slurm_cluster.wait(job, timeout=60)
    assert (result.state, result.exit_code, result.signal) == ("FAILED", 3, 0), result
    assert not result.ok
    assert slurm_cluster.job_info(job)["ExitCode"] == "3:0"


def test_usr1_to_batch_script_then_self_requeue(slurm_cluster, slurm_job_dir):
    # The first run traps USR1, leaves a marker and requeues itself; the rerun
    # (SLURM_RESTART_COUNT=1) finds the marker and succeeds. Output is appended across runs.
    script = _script(
        slurm_job_dir / "requeue.sh",
        """
        #SBATCH --ntasks=1
        #SBATCH --output=out-%j.txt
        #SBATCH --open-mode=append
        restart="${SLURM_RESTART_COUNT:-0}"
        echo "run restart=$restart"
        if [ "$restart" -ge 1 ]; then
            if [ -f marker ]; then echo "resumed: $(cat marker)"; exit 0; fi
            echo "no marker on restart"; exit 4
        fi
        on_usr1() {
            echo "USR1 seen in run $restart" > marker
            scontrol requeue "$SLURM_JOB_ID" && echo "requeued"
            exit 0
        }
        trap on_usr1 USR1
        touch ready
        # short sleeps: bash runs the trap only between foreground commands
        for _ in $(seq 1200); do sleep 0.05; done
        echo "USR1 never arrived"; exit 5
        """,
    )
    job = slurm_cluster.sbatch(script)
    slurm_cluster.wait_state(job, "RUNNING", timeout=30)
    ready = slurm_job_dir / "ready"
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert time.monotonic() < deadline, "batch script never became ready"
        time.sleep(0.1)
    slurm_cluster.run(["scancel", "--signal=USR1", "--batch", str(job)])
    result = slurm_cluster.wait(job, timeout=60)
    out = (slurm_job_dir / f"out-{job}.txt").read_text()
    assert result.state == "COMPLETED", (result, out)
    assert result.exit_code == 0, (result, out)
    assert result.restarts == 1, (result, out)
    assert "run restart=0" in out and "requeued" in out, out
    assert "run restart=1" in out and "resumed: USR1 seen in run 0" in out, out


def test_two_jobs_share_the_node(slurm_cluster, slurm_job_dir):
    # OverSubscribe=FORCE: two 2-task jobs on a 2-CPU node run at the same time. Each waits for
    # the other's start file, so both succeed only if they ran concurrently.
    jobs = []
    for me, other in (("a", "b"), ("b", "a")):
        script = _script(
            slurm_job_dir / f"share_{me}.sh",
            f"""
            #SBATCH --ntasks=2
            #SBATCH --output=out-{me}-%j.txt
            srun bash -c 'touch started-{me}-$SLURM_PROCID'
            for _ in $(seq 400); do [ -f started-{other}-1 ] && exit 0; sleep 0.05; done
            exit 1
            """,
        )
        jobs.append(slurm_cluster.sbatch(script))
    results = [slurm_cluster.wait(j, timeout=60) for j in jobs]
    assert all(r.ok for r in results), results
