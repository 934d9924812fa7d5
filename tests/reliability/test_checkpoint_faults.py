"""Issue 27, checkpoints under faults: a checkpoint taken before the first optimizer update resumes
(item 2), RL resumes from the checkpoint of every step of a run that never updates and of one that
does, a save that runs out of disk says so in one line and leaves `latest` as it was (item 5), a
stage removes the `*.tmp` folders an interrupted save left, and a damaged checkpoint file or a
checkpoint of another architecture is one line naming it, exit 2 through the CLI (item 7).

Faults are injected, never real: the disk fills through Megatron's filesystem writer (or its
`torch.save` of `common.pt`) opening /dev/full (every write fails with ENOSPC, as on a full disk) and
`shutil.disk_usage` reporting no room; files are damaged by truncating or garbling a copy of a good
checkpoint. Each group of checks runs in one spawned process (a gloo
world), whose imports cost most of its time."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scope_mega.runtime.spawn import spawn_local

pytestmark = [pytest.mark.distributed]

REPO = Path(__file__).resolve().parents[2]
TINY_CPU = REPO / "examples" / "tiny_cpu.yaml"
HF = dict(  # the single-process trainer tests' tiny policy (tests/distributed/_tiny_policy.py)
    model_type="llama",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    vocab_size=64,
    max_position_embeddings=128,
)
RL_TINY = [  # the integration tests' tiny RL run (tests/integration/_tiny_rl.py)
    "wandb_mode=disabled",
    "seed=3",
    "model.hf_config.hidden_size=32",
    "model.hf_config.intermediate_size=64",
    "model.hf_config.num_hidden_layers=2",
    "rl.prompts_per_step=4",
    "rl.group_size=4",
    "rl.micro_batch_size=8",
    "rl.max_tokens_per_micro_batch=null",
    "rl.ppo_mini_batches=1",
    "rl.decay_style=constant",
    "rl.num_eval_problems=4",
    "rl.eval_samples=2",
    "rl.eval_interval=0",
    "rollout.max_new_tokens=12",
]


def _state(dev, dtype: str = "float32", distributed: bool = False, hidden: int = 32):
    """The tiny policy in Megatron DDP with Adam (seed 0 each time)."""
    from scope_mega.config import ModelConfig, OptimConfig, ParallelConfig
    from scope_mega.models.gpt import build_gpt_model
    from scope_mega.train_step import setup_training

    torch.manual_seed(0)
    parallel = ParallelConfig(distributed_optimizer=distributed)
    hf = {**HF, "hidden_size": hidden, "intermediate_size": 2 * hidden}
    model, spec = build_gpt_model(ModelConfig(hf_config=hf, params_dtype=dtype), parallel, dev)
    return setup_training(model, spec.vocab_size, OptimConfig(lr=1e-2), parallel, 10)


def _step(state, seed: int, dev) -> dict[str, float]:
    import torch.distributed as dist

    from scope_mega.train_step import lm_loss, train_step

    g = torch.Generator().manual_seed(seed * 10 + dist.get_rank())
    ids = torch.randint(0, 64, (2, 17), generator=g).to(dev)
    batch = dict(
        input_ids=ids[:, :-1],
        targets=ids[:, 1:],
        position_ids=torch.arange(16, device=dev).expand(2, 16),
        loss_mask=torch.ones(2, 16, device=dev),
    )
    return train_step(state, [batch], lm_loss)


def _tensors(state) -> list[torch.Tensor]:
    """The weights, then each optimizer parameter (the fp32 masters of bf16) and its state by name (a
    loaded state lists `step` first, a stepped one last)."""
    tensors = [p.detach().clone() for chunk in state.model for p in chunk.parameters()]
    for opt in getattr(state.optimizer, "chained_optimizers", [state.optimizer]):
        for group in opt.optimizer.param_groups:
            for p in group["params"]:
                per_param = opt.optimizer.state.get(p, {})
                tensors += [p.detach().clone(), *(per_param[k].detach().clone() for k in sorted(per_param))]
    return tensors


# --- item 2: a checkpoint before the first optimizer update -------------------------------------------


# (params dtype, distributed optimizer, optimizer steps before the checkpoint). Stepped, two layouts
# cannot be checkpointed on a CPU at all, whatever the step, in Megatron-Core 0.16: its distributed
# optimizer cannot load a stepped state into a fresh one without Apex or Transformer Engine (its
# `state_dict` asserts on the missing `step`), and its bf16 optimizer cannot save the fp32 norm weights
# of the CPU layer spec ("Param id ... does not match any model sharded param"). Before the first step
# they are checked here: nothing of the optimizer is saved then.
LAYOUTS = [
    ("float32", False, 0),
    ("float32", False, 1),
    ("bfloat16", False, 0),
    ("float32", True, 0),
    ("bfloat16", True, 0),
]


def _resume_worker(tmp: str):
    from scope_mega.checkpointing import TrainerState, load_checkpoint, save_checkpoint
    from scope_mega.run_dir import step_name
    from scope_mega.runtime.distributed import destroy_distributed, init_distributed

    dev = init_distributed(device="cpu", seed=5)
    for layout in LAYOUTS:
        dtype, distributed, before = layout
        straight, resumed = _state(dev, dtype, distributed), _state(dev, dtype, distributed)
        for s in range(before):
            _step(straight, s, dev)
        root = Path(tmp) / f"{dtype}_{distributed}_{before}"
        save_checkpoint(root, straight, TrainerState(step=before), config={})
        with torch.no_grad():  # other weights (and fp32 masters) than the checkpoint's
            for p in resumed.model[0].parameters():
                p.add_(0.5)
        resumed.optimizer.reload_model_params()
        assert load_checkpoint(root / step_name(before), resumed).step == before
        for s in (before, before + 1):
            assert _step(resumed, s, dev) == _step(straight, s, dev), layout
        for a, b in zip(_tensors(resumed), _tensors(straight), strict=True):
            assert torch.equal(a, b), layout
    destroy_distributed()


def test_checkpoint_before_the_first_update_resumes_bitwise(tmp_path):
    """Saved before any optimizer step (Adam has no moments yet; the distributed optimizer could not
    even save that) and after one; fp32 and bf16 (fp32 masters), DP=2 (`LAYOUTS`): loaded into a model
    of other weights, the run takes the next two steps exactly as the one that saved, weights and
    optimizer state equal bitwise."""
    spawn_local(_resume_worker, 2, str(tmp_path))


# --- RL resume at every step ----------------------------------------------------------------------------


def _rl_worker(tmp: str, scenario: str):
    from scope_mega.logging import read_metrics
    from scope_mega.run_dir import LATEST, RL_CHECKPOINTS, step_name
    from scope_mega.runtime.distributed import destroy_distributed
    from scope_mega.trainer import run_train
    from scope_mega.validation import load_config

    extra = {
        "never_updates": ["rl.dynamic_sampling=filter"],  # the untrained policy fails every rollout
        "updates": ["rl.dynamic_sampling=off", "loss.entropy_coef=0.01"],  # a gradient without reward
    }[scenario]
    common = [*RL_TINY, *extra, "rl.init_from=random", "rl.steps=3"]
    common += ["checkpoint.save_interval=1", "checkpoint.keep_last=0"]
    tmp = Path(tmp)

    def train(run_dir: Path) -> list[dict]:
        run_train(load_config(TINY_CPU, [*common, f"run_dir={run_dir}"]))
        destroy_distributed(keep_process_group=True)
        # every row of the run, without its timings
        rows = read_metrics(run_dir)
        return [{k: v for k, v in m.items() if "timing" not in k and k != "tokens_per_s"} for m in rows]

    straight = train(tmp / "straight")
    runs = {"straight": straight}
    for step in (1, 2, 3):  # resume from each step's checkpoint: `latest` points at it
        run_dir = tmp / f"from_{step}"
        shutil.copytree(tmp / "straight", run_dir)
        (run_dir / RL_CHECKPOINTS / LATEST).write_text(step_name(step))
        runs[f"from_{step}"] = train(run_dir)
    (tmp / "report.json").write_text(json.dumps(runs))
    destroy_distributed()


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["never_updates", "updates"])
def test_rl_resumes_from_the_checkpoint_of_every_step(tmp_path, scenario):
    """A 3-step RL run with a checkpoint after every step, in-process; then, for each step, a copy of
    its run directory with `latest` pointed at that step's checkpoint, resumed to the end: every
    logged row after the resumed step (rollout metrics, loss, grad norm, the final evaluation) equals
    the straight run's (from the last step's checkpoint, only the final evaluation runs again).
    `never_updates`: dynamic sampling drops every group of the untrained policy, so no checkpoint holds
    Adam moments; `updates`: an entropy bonus steps the optimizer each step."""
    spawn_local(_rl_worker, 1, str(tmp_path), scenario)
    runs = json.loads((tmp_path / "report.json").read_text())
    straight = runs.pop("straight")
    train_rows = [m for m in straight if m["stage"] == "rl" and "updates" in m]
    assert [m["step"] for m in train_rows] == [1, 2, 3]
    if scenario == "never_updates":
        assert all(m["updates"] == 0 and m["dynamic/kept_groups"] == 0 for m in train_rows)
    else:
        assert all(m["updates"] == 1 and m["grad_norm"] > 0 for m in train_rows)
    assert runs["from_1"] == straight and runs["from_2"] == straight
    # resumed at its last step, the run only evaluates again: the same final evaluation, logged twice
    assert runs["from_3"] == [*straight, straight[-1]] and "eval/greedy_acc" in straight[-1]


# --- item 5: the disk fills during a save --------------------------------------------------------------


def _failed_save(root: Path, state, step: int) -> str:
    """The save of `step` into `root`, which must fail: the error's type and text, and its cause's."""
    from scope_mega.checkpointing import TrainerState, save_checkpoint

    try:
        save_checkpoint(root, state, TrainerState(step=step), config={})
    except BaseException as err:  # noqa: B036 -- what today's code raises is part of the report
        cause = err.__cause__
        return f"{type(err).__name__}: {err}" + (f" <- {type(cause).__name__}: {cause}" if cause else "")
    raise AssertionError("a save onto a full disk succeeded")


def _full_disk_worker(tmp: str):
    """DP=2, after a good step 1: step 2 on a disk with less room than a checkpoint (refused before
    writing), then with rank 0's shard files on /dev/full (ENOSPC mid-write, in Megatron's writer)."""
    import builtins

    import megatron.core.dist_checkpointing.strategies.filesystem_async as writer
    import torch.distributed as dist

    from scope_mega.checkpointing import TrainerState, load_checkpoint, save_checkpoint
    from scope_mega.runtime.distributed import destroy_distributed, init_distributed

    dev = init_distributed(device="cpu", seed=5)
    state = _state(dev)
    _step(state, 0, dev)
    root = Path(tmp)
    save_checkpoint(root, state, TrainerState(step=1), config={})
    _step(state, 1, dev)
    rank = dist.get_rank()

    disk_usage = shutil.disk_usage
    shutil.disk_usage = lambda path: disk_usage(path)._replace(free=1000)  # less than a checkpoint
    try:
        (root / f"little_room_{rank}.txt").write_text(_failed_save(root, state, 2))
    finally:
        shutil.disk_usage = disk_usage

    def full_disk(name, mode="r", *args, **kwargs):
        if str(name).endswith(".distcp") and "w" in mode and rank == 0:
            name = "/dev/full"
        return builtins.open(name, mode, *args, **kwargs)

    writer.open = full_disk
    try:
        (root / f"shards_{rank}.txt").write_text(_failed_save(root, state, 2))
    finally:
        del writer.open
    dist.barrier()
    assert load_checkpoint(root / "step_00000001", _state(dev)).step == 1  # `latest` still resumes
    destroy_distributed()


def _no_errno_worker(tmp: str):
    """One rank, its first save: Megatron's `common.pt` (a `torch.save` to a path, rank 0 alone) lands
    on /dev/full, which torch reports without the errno ("unexpected pos ..."), on a disk with no room."""
    from scope_mega.runtime.distributed import destroy_distributed, init_distributed

    dev = init_distributed(device="cpu", seed=5)
    state = _state(dev)
    save, disk_usage = torch.save, shutil.disk_usage

    def save_to_full_disk(obj, f, *args, **kwargs):
        return save(obj, "/dev/full" if str(f).endswith("common.pt") else f, *args, **kwargs)

    torch.save = save_to_full_disk
    shutil.disk_usage = lambda path: disk_usage(path)._replace(free=0)
    try:
        (Path(tmp) / "no_errno.txt").write_text(_failed_save(Path(tmp), state, 1))
    finally:
        torch.save, shutil.disk_usage = save, disk_usage
    destroy_distributed()


def test_full_disk_during_a_save_names_the_folder_and_keeps_latest(tmp_path):
    """A disk with less room than the last checkpoint took: refused before anything is written. Rank
    0's shards hit ENOSPC mid-write (DP=2). Megatron's `common.pt` hits it, and torch's error lost the
    errno (the issue's "unexpected pos 704 vs 598", or "basic_ios::clear: iostream error"), on a disk
    left with no room. Each time, on every
    rank: one line that names the checkpoint folder and says the disk is full; no `.tmp` folder left;
    `latest` still names the previous checkpoint, which loads."""
    spawn_local(_full_disk_worker, 2, str(tmp_path / "two"))
    spawn_local(_no_errno_worker, 1, str(tmp_path / "one"))
    two = [
        (tmp_path / "two" / f"{fault}_{rank}.txt").read_text()
        for fault in ("little_room", "shards")
        for rank in (0, 1)
    ]
    no_errno = (tmp_path / "one" / "no_errno.txt").read_text()
    assert " <- RuntimeError: " in no_errno and "Errno" not in no_errno, no_errno  # the errno was lost
    for message in [*two, no_errno]:
        line = message.split(" <- ")[0]
        assert line.startswith("CheckpointError: ") and "\n" not in line, message
        assert "step_0000000" in line and "the disk is full (ENOSPC)" in line, message
    assert all(str(tmp_path / "two" / "step_00000002") in m for m in two), two
    assert all(f"{tmp_path / 'two' / 'latest'} still names step_00000001" in m for m in two), two
    assert "nothing is lost" in no_errno
    assert sorted(p.name for p in (tmp_path / "two").glob("step_*")) == ["step_00000001"]
    assert (tmp_path / "two" / "latest").read_text() == "step_00000001"
    assert not list((tmp_path / "one").glob("step_*")) and not (tmp_path / "one" / "latest").exists()


# --- stale *.tmp folders at the start of a stage -------------------------------------------------------


def _stage_config(run_dir: Path, *overrides: str):
    from scope_mega.validation import load_config

    vocab = ["model.hf_config.vocab_size=128", "model.hf_config.bos_token_id=1"]
    return load_config(TINY_CPU, [*RL_TINY, *vocab, f"run_dir={run_dir}", *overrides])


def _stale_worker(run_dir: str):
    from scope_mega.checkpointing import TrainerState, save_checkpoint
    from scope_mega.run_dir import RL_CHECKPOINTS
    from scope_mega.runtime.distributed import destroy_distributed, init_distributed
    from scope_mega.stage import build_stage

    cfg = _stage_config(Path(run_dir))
    dev = init_distributed(device="cpu", seed=5)
    stage = build_stage(cfg, "rl", dev, RL_CHECKPOINTS, cfg.optim, 1, None)
    root = stage.ckpt_root
    _step(stage.state, 0, dev)
    save_checkpoint(root, stage.state, TrainerState(step=1), config={})
    (root / "step_00000002.tmp" / "model").mkdir(parents=True)  # a save killed half-way
    (root / "step_00000002.tmp" / "model" / "__0_0.distcp").write_bytes(b"\0" * 100)
    (root / "latest.tmp4242").write_text("step_00000002")  # killed between the marker's write and rename
    assert build_stage(cfg, "rl", dev, RL_CHECKPOINTS, cfg.optim, 1, None).progress.step == 1
    destroy_distributed()


def test_stale_tmp_folders_are_removed_at_stage_start(tmp_path, capfd):
    """What a killed save leaves in a checkpoint root (a `step_*.tmp` folder, a temp file of the
    `latest` marker) is removed when the next stage starts, which says so in one line; the
    complete checkpoint it resumes from stays."""
    spawn_local(_stale_worker, 1, str(tmp_path))
    root = tmp_path / "checkpoints_rl"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000001"]
    lines = [line for line in capfd.readouterr().out.splitlines() if "step_00000002.tmp" in line]
    assert len(lines) == 1 and "latest.tmp4242" in lines[0], lines


# --- item 7: damaged checkpoint files, another architecture --------------------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {  # what is done to a copy of a good checkpoint, and the file each message must name
    "model_shard": (lambda c: _truncate(c / "model" / "__0_0.distcp"), "model/__0_0.distcp"),
    "optim_shard": (lambda c: _truncate(c / "optim" / "__0_0.distcp"), "optim/__0_0.distcp"),
    "model_index": (lambda c: _truncate(c / "model" / ".metadata"), "model/.metadata"),
    "trainer_state_truncated": (lambda c: _truncate(c / "trainer_state.json"), "trainer_state.json"),
    "trainer_state_incomplete": (
        lambda c: (c / "trainer_state.json").write_text('{"step": 1}'),
        "trainer_state.json",
    ),
    "rng": (lambda c: _truncate(c / "rng" / "rank_00000.pt"), "rng/rank_00000.pt"),
}


def _damage_worker(tmp: str):
    from scope_mega.checkpointing import TrainerState, load_checkpoint, save_checkpoint
    from scope_mega.runtime.distributed import destroy_distributed, init_distributed

    dev = init_distributed(device="cpu", seed=5)
    state = _state(dev)
    _step(state, 0, dev)
    good = save_checkpoint(Path(tmp) / "good", state, TrainerState(step=1), config={})

    def failure(path: Path, into) -> str:
        try:
            load_checkpoint(path, into)
        except BaseException as err:  # noqa: B036 -- what today's code raises is part of the report
            return f"{type(err).__name__}: {err}"
        return "loaded"

    messages = {}
    for name, (damage, _) in DAMAGE.items():
        copy = Path(tmp) / name / "step_00000001"
        shutil.copytree(good, copy)
        damage(copy)
        messages[name] = failure(copy, _state(dev))
    messages["architecture"] = failure(good, _state(dev, hidden=64))  # twice the hidden size
    (Path(tmp) / "messages.json").write_text(json.dumps(messages))
    destroy_distributed()


def test_damaged_checkpoint_or_another_architecture_is_one_line(tmp_path):
    """A truncated shard (model, optimizer), a truncated index, a truncated or incomplete
    `trainer_state.json`, a truncated RNG file: one line naming the checkpoint's file and the way out
    (point `latest` at an earlier checkpoint). A checkpoint of another hidden size: one line saying it
    does not fit the model. Through the CLI: `rl.init_from` an RL checkpoint of hidden size 32 for a
    policy of 64 exits 2 with one `checkpoint error:` line and no traceback."""
    spawn_local(_damage_worker, 1, str(tmp_path))
    messages = json.loads((tmp_path / "messages.json").read_text())
    for name, (_, file) in DAMAGE.items():
        message = messages[name]
        assert message.startswith("CheckpointError: "), (name, message)
        path = tmp_path / name / "step_00000001" / file
        assert "\n" not in message and str(path) in message, (name, message)
        assert "latest" in message, (name, message)
    arch = messages["architecture"]
    assert (
        arch.startswith("CheckpointError: ")
        and "\n" not in arch
        and str(tmp_path / "good" / "step_00000001") in arch
    ), arch
    assert "does not fit" in arch, arch

    init = tmp_path / "good"  # a checkpoint root: its `latest`
    cmd = [sys.executable, "-m", "scope_mega.cli", "train", str(TINY_CPU), f"run_dir={tmp_path / 'run'}"]
    cmd += [*RL_TINY, "model.hf_config.hidden_size=64", "model.hf_config.intermediate_size=128"]
    cmd += [f"rl.init_from={init}", "rl.steps=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("checkpoint error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "rl.init_from" in errors[0], errors
