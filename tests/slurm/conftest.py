"""The ``slurm_cluster`` fixture: one real single-node Slurm cluster per test session.

See ``slurm_cluster.py`` for the configuration and the API (``env``, ``conf_path``, ``tmpdir``,
``jobs_dir``, ``sbatch``, ``wait``, ``job_info``, ``run``). Without Slurm installed the tests are
skipped, except under ``CI`` (set and not "0"/"false"), where a missing Slurm is an error: CI installs
it with ``.ci/install_slurm.sh``. Set ``SCOPE_MEGA_SLURM_KEEP=1`` to keep the cluster's temporary
directory (logs, slurm.conf) after the session.
"""

import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from slurm_cluster import SlurmCluster, missing_binaries  # noqa: E402


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="session")
def slurm_cluster():
    missing = missing_binaries()
    if missing:
        msg = f"Slurm/MUNGE not installed (missing: {', '.join(missing)}); install with .ci/install_slurm.sh"
        if _in_ci():
            pytest.fail(f"CI is set but {msg}", pytrace=False)
        pytest.skip(msg)
    if os.geteuid() != 0:
        msg = "the Slurm test cluster must run as root (slurmd starts jobs as their user)"
        if _in_ci():
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    cluster = SlurmCluster(keep_tmpdir=os.environ.get("SCOPE_MEGA_SLURM_KEEP", "") not in ("", "0"))
    t0 = time.monotonic()
    cluster.start()
    sys.stderr.write(f"\n[slurm_cluster] up in {time.monotonic() - t0:.1f} s at {cluster.tmpdir}\n")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def slurm_job_dir(slurm_cluster, request):
    """A fresh directory under the cluster's ``jobs_dir`` for one test's scripts and outputs."""
    path = slurm_cluster.jobs_dir / request.node.name.replace("/", "_").replace("[", "_").replace("]", "")
    path.mkdir(parents=True, exist_ok=True)
    return path
