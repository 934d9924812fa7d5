"""slurm/*.sh without a cluster: syntax, #SBATCH headers, argument handling, and the exit-code /
requeue / stop-request logic against a fake `srun` and `scontrol` (tests/slurm runs them for real)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SLURM = REPO / "slurm"
SCRIPTS = sorted(SLURM.glob("*.sh"))
BATCH_SCRIPTS = [SLURM / n for n in ("train.sh", "sweep.sh", "eval.sh")]
BASH = shutil.which("bash")

# sbatch long options the scripts may use in #SBATCH lines (a typo would be a job-time error).
SBATCH_OPTIONS = {
    "account", "array", "chdir", "constraint", "cpus-per-gpu", "cpus-per-task", "dependency", "error",
    "exclusive", "gpus", "gpus-per-node", "gpus-per-task", "gres", "job-name", "mail-type", "mail-user",
    "mem", "mem-per-cpu", "mem-per-gpu", "nodes", "no-requeue", "ntasks", "ntasks-per-node",
    "open-mode", "output", "overcommit", "partition", "qos", "requeue", "signal", "time",
}  # fmt: skip
VALUE_OPTIONS = SBATCH_OPTIONS - {"exclusive", "no-requeue", "overcommit", "requeue"}


def sbatch_header(path: Path) -> tuple[list[str], list[str]]:
    """(#SBATCH lines in the leading comment block, #SBATCH lines after it: ignored by sbatch)."""
    lines = path.read_text().splitlines()
    assert lines[0] == "#!/bin/bash", path
    body = next(i for i, ln in enumerate(lines[1:], 1) if ln.strip() and not ln.lstrip().startswith("#"))
    return (
        [ln for ln in lines[:body] if ln.startswith("#SBATCH")],
        [ln for ln in lines[body:] if ln.lstrip().startswith("#SBATCH")],
    )


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    proc = subprocess.run([BASH, "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", BATCH_SCRIPTS, ids=lambda p: p.name)
def test_sbatch_directives_are_valid(script):
    header, late = sbatch_header(script)
    assert header and not late, f"#SBATCH after the first command is ignored by sbatch: {late}"
    opts = {}
    for line in header:
        m = re.fullmatch(r"#SBATCH --([a-z-]+)(?:=(\S+))?", line)
        assert m, f"malformed directive {line!r}"
        name, value = m.groups()
        assert name in SBATCH_OPTIONS, f"unknown sbatch option --{name}"
        assert (value is not None) == (name in VALUE_OPTIONS), line
        assert name not in opts, f"--{name} given twice"
        opts[name] = value
    assert opts["output"].startswith("logs/") and opts["open-mode"] == "append"
    assert opts["ntasks-per-node"] == opts["gpus-per-node"]  # one rank per GPU
    if script.name == "eval.sh":
        assert "no-requeue" in opts and "signal" not in opts
    else:
        assert "requeue" in opts and re.fullmatch(r"B:USR1@\d+", opts["signal"]), opts
    assert os.access(script, os.X_OK)


# ----------------------------------------------------------------------------- fake Slurm

FAKE_SRUN = r"""#!/bin/bash
# Fake srun: log the options, run the command once per task (SLURM_PROCID set), exit with the
# highest task exit code, like srun.
while [[ "$1" == -* ]]; do echo "srun-opt $1" >>"$FAKE_LOG"; shift; done
pids=()
for ((i = 0; i < ${SLURM_NTASKS:-2}; i++)); do
    SLURM_PROCID=$i SLURM_LOCALID=$i "$@" &
    pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p"; r=$?; [ "$r" -gt "$rc" ] && rc=$r; done
exit "$rc"
"""
FAKE_SCONTROL = r"""#!/bin/bash
echo "scontrol $*" >>"$FAKE_LOG"
case "$1" in
    requeue) exit "${FAKE_REQUEUE_RC:-0}" ;;
    show) exit 1 ;;  # no controller: the scripts fall back to their own parsing
esac
"""
# Stands in for `python -m scope_mega.cli STAGE CONFIG ...`. FAKE_MODE: exit:N; stop (like the
# trainer: after FAKE_HANDLER_DELAY s install a USR1 handler, wait for the signal, exit 42); exiting
# (USR1 at its default action, as in Python's shutdown; exits 0 after 1.5 s unless killed).
FAKE_PYTHON = """\
import json, os, signal, sys, time
rank = os.environ["SLURM_PROCID"]
out = os.environ["FAKE_OUT"]
def touch(name):
    open(os.path.join(out, f"{name}-{rank}"), "w").close()
with open(os.path.join(out, f"argv-{rank}.json"), "w") as f:
    json.dump({"argv": sys.argv[1:], "status_dir": os.environ.get("SM_STATUS_DIR", ""),
               "master": [os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")],
               "rank_env": os.environ.get("RANK")}, f)
mode = os.environ.get("FAKE_MODE", "exit:0")
touch("started")
if mode == "stop":
    time.sleep(float(os.environ.get("FAKE_HANDLER_DELAY", "0")))
    stop = []
    signal.signal(signal.SIGUSR1, lambda *a: stop.append(1))
    touch("ready")
    deadline = time.time() + 30
    while not stop and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    print(f"rank {rank}: {len(stop)} stop signal(s): checkpoint written; exiting for requeue", flush=True)
    sys.exit(42 if stop else 7)
if mode == "exiting":
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    touch("ready")
    time.sleep(1.5)
    sys.exit(0)
sys.exit(int(mode.split(":")[1]))
"""


@pytest.fixture
def fake(tmp_path):
    """A fake Slurm on PATH, a fake python for the ranks, and a submit directory with a config."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (
        ("srun", FAKE_SRUN),
        ("scontrol", FAKE_SCONTROL),
        ("nvidia-smi", "#!/bin/sh\nexit 1\n"),
    ):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (bin_dir / "fakepy").write_text(f'#!/bin/sh\nexec {sys.executable} {tmp_path / "fakepy.py"} "$@"\n')
    (bin_dir / "fakepy").chmod(0o755)
    (tmp_path / "fakepy.py").write_text(FAKE_PYTHON)
    submit = tmp_path / "submit"
    submit.mkdir()
    (submit / "plain.yaml").write_text("seed: 1\nsft:\n  steps: 3\n")
    (submit / "with_run_dir.yaml").write_text("seed: 1\nrun_dir: 'runs/from-config'  # comment\n")
    out = tmp_path / "out"
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SCOPE_MEGA_", "SBATCH_"))}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES"):
        env.pop(k, None)
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}",
        SLURM_JOB_ID="1234",
        SLURM_JOB_NAME="unit",
        SLURM_JOB_NODELIST="gpu[003-005],cpu1",
        SLURM_NTASKS="2",
        SLURM_SUBMIT_DIR=str(submit),
        SCOPE_MEGA_PYTHON=str(bin_dir / "fakepy"),
        SCOPE_MEGA_STOP_POLL="0.2",
        FAKE_LOG=str(tmp_path / "fake.log"),
        FAKE_OUT=str(out),
        RANK="99",  # stale torchrun variables from the submitting shell must not leak into ranks
    )

    class Fake:
        def __init__(self):
            self.env, self.submit, self.out, self.tmp = env, submit, out, tmp_path

        def start(self, script: str, *args: str, **env_extra: str) -> subprocess.Popen:
            return subprocess.Popen(
                [BASH, str(SLURM / script), *args],
                env={**self.env, **env_extra},
                cwd=self.submit,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )

        def run(self, script: str, *args: str, **env_extra: str) -> tuple[int, str]:
            proc = self.start(script, *args, **env_extra)
            out, _ = proc.communicate(timeout=60)
            return proc.returncode, out

        def argv(self, rank: int = 0) -> dict:
            return json.loads((self.out / f"argv-{rank}.json").read_text())

        def log(self) -> str:
            path = self.tmp / "fake.log"
            return path.read_text() if path.exists() else ""

    return Fake()


# ----------------------------------------------------------------------------- train.sh


def test_train_runs_every_rank_with_default_run_dir_and_rendezvous(fake):
    rc, out = fake.run("train.sh", "--stage", "sft", "plain.yaml", "optim.lr=0.1", "note=a b")
    assert rc == 0, out
    run_dir = fake.submit / "runs" / "unit-1234"
    for rank in (0, 1):
        got = fake.argv(rank)
        assert got["argv"] == ["-m", "scope_mega.cli", "sft", "plain.yaml", "optim.lr=0.1", "note=a b",
                               f"run_dir={run_dir}"]  # fmt: skip
        assert got["master"] == ["gpu003", str(20000 + 1234 % 20000)] and got["rank_env"] is None
        assert got["status_dir"] == f"{run_dir}/.slurm_status/job-1234"
    assert "[scope-mega] rank 0/2" in out and "[scope-mega] rank 1/2" in out, out
    assert "devices cpu" in out and "finished (exit 0)" in out, out
    assert "srun-opt --kill-on-bad-exit=1" in fake.log() and "requeue" not in fake.log()
    assert not (run_dir / ".slurm_status").exists()


@pytest.mark.parametrize(
    "args, expected",
    [
        (["plain.yaml", "run_dir=/abs/mine"], "/abs/mine"),
        (["with_run_dir.yaml"], "runs/from-config"),
    ],
)
def test_train_respects_run_dir_from_overrides_or_config(fake, args, expected):
    rc, out = fake.run("train.sh", *args, SCOPE_MEGA_DRY_RUN="1")
    assert rc == 0, out
    assert f"run dir {expected}" in out, out
    launch = next(line for line in out.splitlines() if "launch: srun" in line)
    assert launch.count("run_dir=") == (1 if "run_dir=" in " ".join(args) else 0), launch


@pytest.mark.parametrize(
    "args, env, stage",
    [
        (["plain.yaml"], {}, "train"),
        (["--stage=sft", "plain.yaml"], {}, "sft"),
        (["plain.yaml"], {"SCOPE_MEGA_STAGE": "sft"}, "sft"),
        (["--stage", "eval", "plain.yaml"], {"SCOPE_MEGA_STAGE": "sft"}, "eval"),
    ],
)
def test_train_stage_selection(fake, args, env, stage):
    rc, out = fake.run("train.sh", *args, SCOPE_MEGA_DRY_RUN="1", **env)
    assert rc == 0, out
    assert f"scope_mega.cli {stage} plain.yaml" in out, out


def test_gpu_environment_only_with_gpus(fake):
    rc, out = fake.run("train.sh", "plain.yaml", SCOPE_MEGA_DRY_RUN="1", SLURM_GPUS_ON_NODE="8")
    assert rc == 0 and "devices gpu" in out and "CUDA_DEVICE_MAX_CONNECTIONS=1" in out, out
    rc, out = fake.run("train.sh", "plain.yaml", SCOPE_MEGA_DRY_RUN="1", SLURM_GPUS_ON_NODE="0")
    assert rc == 0 and "devices cpu" in out and "CUDA_DEVICE_MAX_CONNECTIONS" not in out, out


@pytest.mark.parametrize(
    "mode, env, rc_expected, requeued, message",
    [
        ("exit:2", {}, 2, False, "config error"),
        ("exit:1", {}, 1, False, "failed with exit code 1; not requeued"),
        ("exit:42", {}, 0, True, "requeueing job 1234 (restart 1)"),
        ("exit:42", {"SLURM_RESTART_COUNT": "3", "SCOPE_MEGA_MAX_RESTARTS": "3"}, 42, False, "MAX_RESTARTS"),
        ("exit:42", {"FAKE_REQUEUE_RC": "1"}, 42, True, "scontrol requeue failed"),
    ],
)
def test_exit_codes_and_requeue(fake, mode, env, rc_expected, requeued, message):
    rc, out = fake.run("train.sh", "plain.yaml", FAKE_MODE=mode, **env)
    assert rc == rc_expected, out
    assert message in out, out
    assert ("scontrol requeue 1234" in fake.log()) == requeued, fake.log()


def test_missing_config_or_no_slurm_fails_fast(fake):
    rc, out = fake.run("train.sh", "nope.yaml")
    assert rc == 2 and "config error: config file nope.yaml does not exist" in out, out
    rc, out = fake.run("train.sh", "plain.yaml", SLURM_JOB_ID="")
    assert rc == 1 and "not inside a Slurm job" in out, out
    assert "srun" not in fake.log() and "requeue" not in fake.log()


def _signal_run(fake, sig: int, wait_for: str, mode: str = "stop", **env) -> tuple[int, str]:
    """Start train.sh, send `sig` to the batch shell once every rank wrote `wait_for`, finish."""
    proc = fake.start("train.sh", "plain.yaml", FAKE_MODE=mode, **env)
    deadline = time.monotonic() + 30
    while not all((fake.out / f"{wait_for}-{r}").exists() for r in (0, 1)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.02)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=30)
    return proc.returncode, out


def test_usr1_to_batch_shell_stops_every_rank_then_requeues(fake):
    rc, out = _signal_run(fake, signal.SIGUSR1, "ready")
    assert rc == 0, out
    assert "batch script received SIGUSR1" in out and "stop requested: SIGUSR1 to every rank" in out, out
    assert out.count("1 stop signal(s): checkpoint written") == 2, out
    assert "2 of 2 ranks exited 42" in out and "scontrol requeue 1234" in fake.log(), out


def test_early_usr1_waits_for_the_ranks_handlers(fake):
    # Signalled while the ranks start (USR1 still ignored): delivered once the handler exists.
    rc, out = _signal_run(fake, signal.SIGUSR1, "started", FAKE_HANDLER_DELAY="1")
    assert rc == 0, out
    assert out.count("1 stop signal(s): checkpoint written") == 2, out
    assert "scontrol requeue 1234" in fake.log(), out


def test_usr1_never_hits_a_rank_without_handler(fake):
    # A rank that has dropped its handler (Python at exit) must not get USR1: it would die of it.
    rc, out = _signal_run(fake, signal.SIGUSR1, "ready", mode="exiting")
    assert rc == 0, out
    assert "finished (exit 0)" in out and "requeue" not in fake.log(), out


def test_term_to_batch_shell_stops_gracefully_without_requeue(fake):
    rc, out = _signal_run(fake, signal.SIGTERM, "ready")
    assert rc == 42, out
    assert out.count("1 stop signal(s): checkpoint written") == 2 and "not requeued" in out, out
    assert "requeue" not in fake.log()


# ----------------------------------------------------------------------------- sweep.sh and eval.sh


def _sweep(fake, lines: str) -> Path:
    sweep = fake.submit / "sweep"
    sweep.mkdir(exist_ok=True)
    (sweep / "runs.txt").write_text(lines)
    return sweep


def test_sweep_runs_the_line_of_its_array_task(fake):
    sweep = _sweep(
        fake, "a\tplain.yaml\toptim.lr=0.1\r\nb\tplain.yaml\tnote=x y\tsft.steps=5\nc\tplain.yaml\n"
    )
    rc, out = fake.run("sweep.sh", "--stage", "sft", "sweep", "device=cpu", SLURM_ARRAY_TASK_ID="1")
    assert rc == 0, out
    assert fake.argv(0)["argv"] == [
        "-m", "scope_mega.cli", "sft", "plain.yaml", "device=cpu", "note=x y", "sft.steps=5",
        f"run_dir={sweep}/runs/b",
    ]  # fmt: skip
    assert "run 2 of 3, 'b'" in out, out
    rc, out = fake.run("sweep.sh", "sweep", SLURM_ARRAY_TASK_ID="0", SCOPE_MEGA_DRY_RUN="1")
    assert rc == 0 and "plain.yaml optim.lr=0.1 run_dir=" in out, out  # '\r' stripped


@pytest.mark.parametrize(
    "lines, task, message",
    [
        ("a\tplain.yaml\n", "1", "has 1 runs (lines); there is no run for array task 1"),
        ("a\tplain.yaml\na\tplain.yaml\n", "0", "run name 'a' appears more than once"),
        ("a b\tplain.yaml\n", "0", "run name 'a b' must match"),
        ("a\t\tplain.yaml\n", "0", "empty line or empty field"),
        ("\n", "0", "empty line or empty field"),
        ("a\tplain.yaml\tnot-an-override\n", "0", "override 'not-an-override' is not key.path=value"),
        ("a\tmissing.yaml\n", "0", "config file missing.yaml does not exist"),
        ("a\n", "0", "want RUN_NAME<TAB>CONFIG_PATH"),
    ],
)
def test_sweep_rejects_malformed_runs_file(fake, lines, task, message):
    _sweep(fake, lines)
    rc, out = fake.run("sweep.sh", "sweep", SLURM_ARRAY_TASK_ID=task)
    assert rc == 2, out
    assert "config error:" in out and message in out, out
    assert "srun" not in fake.log() and "requeue" not in fake.log()


def test_sweep_needs_an_array_job_and_a_sweep_dir(fake):
    rc, out = fake.run("sweep.sh", "sweep")
    assert rc == 2 and "not an array job" in out, out
    rc, out = fake.run("sweep.sh", "nowhere", SLURM_ARRAY_TASK_ID="0")
    assert rc == 2 and "sweep directory nowhere does not exist" in out, out


def test_eval_runs_the_eval_stage_without_requeue_machinery(fake):
    rc, out = fake.run("eval.sh", "plain.yaml", "checkpoint.load_weights=ckpt", FAKE_MODE="exit:42")
    assert rc == 42, out
    got = fake.argv(0)
    assert got["argv"] == ["-m", "scope_mega.cli", "eval", "plain.yaml", "checkpoint.load_weights=ckpt"]
    assert got["status_dir"] == "" and "requeue" not in fake.log()
    assert "does not requeue" in out, out


def test_header_documents_runs_txt_contract():
    text = (SLURM / "sweep.sh").read_text() + (REPO / "docs" / "slurm.md").read_text()
    for needle in ("RUN_NAME", "CONFIG_PATH", "SLURM_ARRAY_TASK_ID", "runs/RUN_NAME"):
        assert needle in text
