"""Issue 27, the run directory and the start of a stage under faults: a second run in a directory a
live run holds is refused in one line naming the holder, and the directory is free again once that
run dies (item 3); a torn last line of `metrics.jsonl` is recovered at the start (item 6); RL with no
weights to start from is refused unless `rl.init_from=random` asks for it (item 8); a world size
that does not fit the layout at a real launch, an `rl.init_from` that is missing or names a run
directory, and a run directory that cannot be written are one `config error:` line each, exit 2,
before any rank starts work (item 10).

The in-process tests replace `stage.init_distributed` by a tripwire: reaching it means the stage got
past every check and would have started work."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scope_mega import stage
from scope_mega.cli import CONFIG_ERROR_EXIT_CODE, main
from scope_mega.logging import MetricsLogger, read_metrics
from scope_mega.run_dir import LATEST, SFT_CHECKPOINTS, TRAINER_STATE, step_name

REPO = Path(__file__).resolve().parents[2]
TINY_CPU = str(REPO / "examples" / "tiny_cpu.yaml")
MODEL = [
    "model.hf_config.hidden_size=32",
    "model.hf_config.intermediate_size=64",
    "model.hf_config.num_hidden_layers=2",
]
SFT_TINY = [
    "wandb_mode=disabled",
    *MODEL,
    "sft.global_batch_size=8",
    "sft.micro_batch_size=4",
    "sft.num_train_problems=200",
    "sft.num_eval_problems=4",
]
RL_TINY = [  # the integration tests' tiny RL run (tests/integration/_tiny_rl.py)
    "wandb_mode=disabled",
    *MODEL,
    "rl.prompts_per_step=4",
    "rl.group_size=4",
    "rl.micro_batch_size=8",
    "rl.max_tokens_per_micro_batch=null",
    "rl.ppo_mini_batches=1",
    "rl.dynamic_sampling=off",
    "rl.num_eval_problems=4",
    "rl.eval_samples=2",
    "rl.eval_interval=0",
    "rollout.max_new_tokens=12",
]
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")


@pytest.fixture
def tripwire(monkeypatch):
    """No launcher variables from outside, and `init_distributed` raises: a stage that reaches it
    got past every check."""

    def started(*args, **kwargs):
        raise AssertionError("started work: the stage reached init_distributed")

    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(stage, "init_distributed", started)
    return monkeypatch


def _refused(args: list[str], capsys) -> str:
    """`scope-mega ARGS` in-process exits 2 with exactly one line, a `config error:`; returns it."""
    code = main(args)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == CONFIG_ERROR_EXIT_CODE and len(lines) == 1, (code, lines)
    assert lines[0].startswith("config error: "), lines
    return lines[0]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "scope_mega.cli", *args]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


# --- item 3: one run per run directory ------------------------------------------------------------


@pytest.mark.slow
def test_second_run_in_a_used_run_dir_is_refused(tmp_path):
    """A live SFT run holds its run directory: a second `sft` there exits 2 with one line naming the
    holder's pid and host, and writes nothing. Killed (SIGKILL: no cleanup), the first run's lock goes
    with it: the RL stage then runs in the same directory, from the first run's SFT checkpoint."""
    run = tmp_path / "run"
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(
        _cli("sft", TINY_CPU, f"run_dir={run}", *SFT_TINY, "sft.steps=500", "checkpoint.save_interval=2"),
        env=_env(),
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not (run / SFT_CHECKPOINTS / LATEST).is_file():
            assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()
            time.sleep(0.2)
        second = subprocess.run(
            _cli("sft", TINY_CPU, f"run_dir={run}", *SFT_TINY, "sft.steps=3"),
            env=_env(),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert first.poll() is None, "the first run ended while the second one ran"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        log.close()
    errors = [line for line in second.stderr.splitlines() if line.strip()]
    assert second.returncode == CONFIG_ERROR_EXIT_CODE and len(errors) == 1, second.stderr[-3000:]
    assert errors[0].startswith(f"config error: run_dir {run} is in use by another run"), errors
    assert f"pid {first.pid} on host {socket.gethostname()}" in errors[0], errors
    steps = [m["step"] for m in read_metrics(run) if m["stage"] == "sft"]
    assert steps == sorted(set(steps)), "two runs wrote metrics.jsonl"

    rl = subprocess.run(
        _cli("train", TINY_CPU, f"run_dir={run}", *RL_TINY, "rl.steps=1"),
        env=_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rl.returncode == 0, rl.stderr[-3000:]
    assert [m["step"] for m in read_metrics(run) if m["stage"] == "rl" and "loss" in m] == [1]


def test_run_dir_lock_dies_with_its_run(tmp_path):
    """The fast half of the test above: a run (a process that claimed the directory) holds it, with
    its pid in the refusal; SIGKILLed, it frees it at once, even though a child it forked lives on
    (the child does not inherit the lock)."""
    from scope_mega.config import ConfigError
    from scope_mega.validation import claim_run_dir

    run = tmp_path / "run"
    script = (
        "import os, sys, time\n"
        "from scope_mega.validation import claim_run_dir\n"
        f"claim_run_dir({str(run)!r}, 'sft')\n"
        "if os.fork() == 0:\n"
        "    time.sleep(15)\n"
        "    os._exit(0)\n"
        "print('claimed', flush=True)\n"
        "time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert holder.stdout.readline().strip() == "claimed"
        with pytest.raises(ConfigError, match=f"in use by another run \\(pid {holder.pid} on host "):
            claim_run_dir(run, "rl")
    finally:
        holder.kill()
        holder.wait()
    claim_run_dir(run, "rl")
    assert (run / "run.lock").read_text().startswith(f"pid {os.getpid()} on host {socket.gethostname()}")


# --- item 6: a torn last line of metrics.jsonl ----------------------------------------------------


def test_torn_metrics_line_is_recovered_at_start(tmp_path, capsys):
    """A run killed mid-write left half a line: the reader keeps the whole lines and says so in one
    line; the stage's logger drops the torn line from the file and appends after the whole ones; the
    plot tool reads such a file too. A bad line before the last is damage: a ValueError naming it."""
    whole = [{"stage": "sft", "step": s, "loss": 1.0 / s} for s in (1, 2, 3)]
    path = tmp_path / "metrics.jsonl"
    torn = "".join(json.dumps(m) + "\n" for m in whole) + '{"stage": "sft", "step": 4, "lo'
    path.write_text(torn)
    assert read_metrics(tmp_path) == whole
    note = capsys.readouterr().err.strip()
    assert note.startswith(f"{path}: left out its torn last line") and "kept the 3 whole lines" in note
    assert "\n" not in note

    logger = MetricsLogger(tmp_path, "sft", 10, 3, {}, wandb_mode="disabled")
    logger.log(4, {"loss": 0.25})
    logger.close()
    assert path.read_text().splitlines() == [
        json.dumps(m) for m in [*whole, {**whole[0], "step": 4, "loss": 0.25}]
    ]

    path.write_text(torn)
    spec = importlib.util.spec_from_file_location("plot_metrics_tool", REPO / "tools" / "plot_metrics.py")
    plot_metrics = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot_metrics)
    assert plot_metrics.report(tmp_path, []).is_file()

    path.write_text('{"stage": "sft", "step": 1\n' + json.dumps(whole[1]) + "\n")
    with pytest.raises(ValueError, match=f"{path}:1 is not JSON"):
        read_metrics(tmp_path)


# --- item 8: RL with no weights to start from -----------------------------------------------------


def test_rl_without_starting_weights_is_refused(tripwire, tmp_path, capsys):
    """No SFT checkpoint in the run directory and no `rl.init_from`: one line saying how to get
    starting weights, before any work. `rl.init_from=random` asks for random weights: accepted."""
    run = tmp_path / "run"
    line = _refused(["train", TINY_CPU, f"run_dir={run}", *RL_TINY], capsys)
    assert "holds no SFT checkpoint and rl.init_from is unset" in line, line
    assert f"run_dir={run}" in line and "rl.init_from=random" in line, line
    assert not run.exists()
    with pytest.raises(AssertionError, match="started work"):
        main(["train", TINY_CPU, f"run_dir={run}", *RL_TINY, "rl.init_from=random"])


# --- item 10: a launch's mistakes, one line each ---------------------------------------------------


def test_world_size_that_does_not_fit_is_one_line(tripwire, tmp_path, capsys):
    """Three processes for TP=2, as torchrun starts them: the node's first rank reports the one line at
    once, the others only after `stage.REPORT_GRACE_S` (the launcher stops them meanwhile: see the
    torchrun test); under Slurm (its variables, not torchrun's) the world size is Slurm's, not 1: three
    tasks are refused, two start."""
    args = ["sft", TINY_CPU, "parallel.tp=2", f"run_dir={tmp_path / 'run'}", *SFT_TINY]
    message = "config error: world size 3 is not a multiple of tp*pp*cp = 2"
    waits = []
    tripwire.setattr(stage.time, "sleep", waits.append)
    tripwire.setenv("WORLD_SIZE", "3")
    for rank in (0, 1, 2):
        tripwire.setenv("RANK", str(rank))
        tripwire.setenv("LOCAL_RANK", str(rank))
        assert _refused(args, capsys) == message
        assert waits == ([stage.REPORT_GRACE_S] if rank else [])
        waits.clear()
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        tripwire.delenv(name)
    tripwire.setenv("SLURM_PROCID", "0")
    tripwire.setenv("SLURM_LOCALID", "0")
    tripwire.setenv("SLURM_NTASKS", "3")
    assert _refused(args, capsys) == message
    assert not (tmp_path / "run").exists()
    tripwire.setenv("SLURM_NTASKS", "2")  # a layout that fits: past every check (it was "world size 1")
    with pytest.raises(AssertionError, match="started work"):
        main(args)


@pytest.mark.slow
def test_world_size_that_does_not_fit_under_torchrun(tmp_path):
    """The real launch: `torchrun --nproc-per-node 3 ... parallel.tp=2` prints one `config error:`
    line, from rank 0, which exits 2; torchrun then stops the other ranks, prints its own summary
    (root cause: rank 0, exit code 2) and exits 1, as it does for any failed worker. No frame of
    scope_mega's is printed."""
    torchrun = Path(sys.executable).with_name("torchrun")
    run = tmp_path / "run"
    proc = subprocess.run(
        [str(torchrun), "--nproc-per-node=3", "--standalone", "-m", "scope_mega.cli", "sft", TINY_CPU]
        + ["parallel.tp=2", f"run_dir={run}", *SFT_TINY],
        env=_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    errors = [line for line in out.splitlines() if "config error" in line]
    assert errors == ["config error: world size 3 is not a multiple of tp*pp*cp = 2"], out[-3000:]
    root_cause = out[out.index("Root Cause") :]
    assert proc.returncode != 0 and "rank      : 0" in root_cause and "exitcode  : 2" in root_cause, out
    assert "scope_mega/" not in out, out[-3000:]
    assert not run.exists()


def test_rl_init_from_missing_or_a_run_dir(tripwire, tmp_path, capsys):
    """`rl.init_from` that does not exist, or that names an SFT run's directory instead of its
    checkpoints: one line each, the second naming the path to use, which is then accepted."""
    sft_run = tmp_path / "sft_run"
    ckpt = sft_run / SFT_CHECKPOINTS / step_name(2)
    (ckpt / "model").mkdir(parents=True)
    (ckpt / TRAINER_STATE).write_text("{}")
    (sft_run / SFT_CHECKPOINTS / LATEST).write_text(step_name(2))
    base = ["train", TINY_CPU, f"run_dir={tmp_path / 'run'}", *RL_TINY]

    line = _refused([*base, f"rl.init_from={tmp_path / 'nowhere'}"], capsys)
    assert line.startswith(f"config error: rl.init_from={tmp_path / 'nowhere'} does not exist"), line
    line = _refused([*base, f"rl.init_from={sft_run}"], capsys)
    assert line == (
        f"config error: rl.init_from={sft_run} is a run directory, not a checkpoint; use its checkpoints: "
        f"rl.init_from={sft_run / SFT_CHECKPOINTS}"
    )
    line = _refused([*base, f"rl.init_from={tmp_path}"], capsys)
    assert f"rl.init_from={tmp_path} is not a checkpoint" in line, line
    with pytest.raises(AssertionError, match="started work"):
        main([*base, f"rl.init_from={sft_run / SFT_CHECKPOINTS}"])


def test_read_only_run_dir_is_one_line(tripwire, tmp_path, capsys):
    """A new run directory under a folder nobody may write, and a used one (an earlier run's lock file
    inside) that became read-only (immutable for root, mode 555 for a user): one line naming the
    directory, exit 2, before any work."""
    used = tmp_path / "used"
    used.mkdir()
    (used / "run.lock").write_text("pid 1 on host elsewhere, stage sft, since yesterday\n")
    for folder, run in ((tmp_path / "read_only", tmp_path / "read_only" / "run"), (used, used)):
        folder.mkdir(exist_ok=True)
        with _read_only(folder):
            line = _refused(["sft", TINY_CPU, f"run_dir={run}", *SFT_TINY], capsys)
        assert line.startswith(f"config error: run_dir {run} is not writable"), line


@contextlib.contextmanager
def _read_only(folder: Path):
    """`folder` read-only for this process, root included (chattr +i), for the `with` block."""
    root = os.geteuid() == 0
    if root and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
        pytest.skip("cannot make a folder read-only for root here (chattr +i)")
    if not root:
        folder.chmod(0o555)
    try:
        yield
    finally:
        if root:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        else:
            folder.chmod(0o755)
