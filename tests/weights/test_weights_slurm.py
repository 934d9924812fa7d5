"""`sbatch slurm/convert.sh` on a real single-node Slurm cluster: import with one task per TP shard,
export with one task, bitwise round trip; a job with too few tasks fails fast with status 2."""

import sys
from pathlib import Path

import pytest
import torch
from _tiny_models import write_hf_checkpoint
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "slurm"))

from slurm_cluster import SlurmCluster, missing_binaries  # noqa: E402

pytestmark = [pytest.mark.slurm, pytest.mark.distributed]
SCRIPT = REPO / "slurm" / "convert.sh"


@pytest.fixture(scope="module")
def cluster():
    missing = missing_binaries()
    if missing:
        pytest.skip(f"Slurm/MUNGE not installed (missing: {', '.join(missing)}); see .ci/install_slurm.sh")
    with SlurmCluster() as c:
        yield c


def _submit(cluster, workdir: Path, *args: str, tasks: int = 1):
    """sbatch convert.sh with `args`; wait; return the job result and its log."""
    opts = [f"--ntasks={tasks}", "--cpus-per-task=1", "--output=out-%j.txt"]
    out = cluster.run(["sbatch", "--parsable", *opts, str(SCRIPT), *args], cwd=workdir).stdout
    job = int(out.strip().splitlines()[-1].split(";")[0])
    return cluster.wait(job, timeout=600), (workdir / f"out-{job}.txt").read_text()


def test_sbatch_convert_round_trip(cluster, tmp_path: Path):
    hf = write_hf_checkpoint("qwen2_tied", tmp_path / "hf")
    meg, back = tmp_path / "megatron", tmp_path / "back"
    result, log = _submit(
        cluster, tmp_path, "hf-to-megatron", "--hf-dir", str(hf), "--out", str(meg), "--tp", "2", tasks=2
    )
    assert result.state == "COMPLETED", log
    assert "rank 1/2" in log
    result, log = _submit(cluster, tmp_path, "megatron-to-hf", "--megatron-dir", str(meg), "--out", str(back))
    assert result.state == "COMPLETED", log
    original = load_file(hf / "model.safetensors")
    exported = {}
    for shard in back.glob("*.safetensors"):
        exported.update(load_file(shard))
    assert sorted(exported) == sorted(original)
    assert all(torch.equal(exported[n], t) for n, t in original.items())


def test_sbatch_convert_with_too_few_tasks_fails_fast(cluster, tmp_path: Path):
    args = (
        "hf-to-megatron",
        "--hf-dir",
        str(tmp_path),
        "--out",
        str(tmp_path / "o"),
        "--tp",
        "2",
        "--pp",
        "2",
    )
    result, log = _submit(cluster, tmp_path, *args, tasks=1)
    assert (result.state, result.exit_code) == ("FAILED", 2), log
    assert "needs 4 tasks, the job has 1" in log
