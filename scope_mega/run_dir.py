"""The layout of a run directory: where each stage keeps its checkpoints and HF exports, how a checkpoint
folder is named, and which checkpoint a path or a run means.

    <run_dir>/
        checkpoints/             SFT_CHECKPOINTS: the SFT warm-start's checkpoints
        checkpoints_rl/          RL_CHECKPOINTS: the RL policy's checkpoints
            step_00000010/       one complete checkpoint (`step_name`; `checkpointing` writes its inside,
                                 `trainer_state.json` last of all)
            step_00000012.tmp/   a checkpoint being written (IN_PROGRESS), renamed into place when complete
            latest               LATEST: the name of the newest complete checkpoint, replaced last
        hf/                      HF_EXPORT: the policy at the end of RL, as an HF model directory
        hf_steps/step_00000010/  HF_EXPORT_STEPS: periodic HF exports during RL
        run.lock                 RUN_LOCK: the running stage's lock and its pid and host
                                 (`validation.claim_run_dir`): one run per run directory

This module imports nothing from `scope_mega`: the checkpoint code, the weight exporters and
`tools/sweep.py` all read the layout from here. A broken `latest` marker raises `FileNotFoundError`;
a checkpoint that cannot be written or read is a `CheckpointError` (one line: which checkpoint, which
file, what to do), which the CLI prints and exits 2 on.
"""

from __future__ import annotations

from pathlib import Path

LATEST = "latest"
SFT_CHECKPOINTS = "checkpoints"
RL_CHECKPOINTS = "checkpoints_rl"
HF_EXPORT = "hf"
HF_EXPORT_STEPS = "hf_steps"
TRAINER_STATE = "trainer_state.json"  # written last into a checkpoint: its presence means complete
IN_PROGRESS = ".tmp"
RUN_LOCK = "run.lock"
RANDOM_INIT = "random"  # rl.init_from=random: RL from Megatron's initialisation, asked for by name


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or read, in one line naming it (and its file where known)."""


def step_name(step: int) -> str:
    """The folder name of step `step`'s checkpoint or export: `step_00000010`."""
    return f"step_{step:08d}"


def step_dirs(ckpt_root: str | Path) -> list[Path]:
    """The step folders under `ckpt_root`, oldest first, without those still being written."""
    root = Path(ckpt_root)
    return sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(IN_PROGRESS))


def stale_in_progress(ckpt_root: str | Path) -> list[Path]:
    """What an interrupted save leaves under `ckpt_root`: `step_*.tmp` folders, and temp files of the
    `latest` marker (`latest.tmp<pid>`). Stale once no run writes there (one run per run directory)."""
    root = Path(ckpt_root)
    return sorted([*root.glob(f"step_*{IN_PROGRESS}"), *root.glob(f"{LATEST}{IN_PROGRESS}*")])


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    """The complete checkpoint `latest` points to, or None when there is none yet."""
    marker = Path(ckpt_root) / LATEST
    if not marker.is_file():
        return None
    path = marker.parent / marker.read_text().strip()
    if not (path / TRAINER_STATE).is_file():
        raise FileNotFoundError(f"{marker} points to {path}, which is not a complete checkpoint")
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory a user names: a step directory (model/ inside) as it is, a checkpoint
    root (a `latest` marker inside) or the `latest` marker file itself as the checkpoint it points to."""
    path = Path(path)
    root = path.parent if path.name == LATEST and path.is_file() else path
    if not (root / "model").is_dir() and (root / LATEST).is_file():
        return latest_checkpoint(root)
    return root


def has_checkpoint(ckpt_root: str | Path, step: int) -> bool:
    """Whether the complete checkpoint of `step` exists (so a final save can be skipped)."""
    return (Path(ckpt_root) / step_name(step) / TRAINER_STATE).is_file()


def rl_start_weights(run_dir: str | Path, init_from: str | None) -> Path | None:
    """The checkpoint the RL policy starts from: `init_from` (a checkpoint root's newest checkpoint, or a
    checkpoint directory as it is) when given, else the newest checkpoint of the run's SFT stage (None:
    there is none, or `init_from` is RANDOM_INIT)."""
    if init_from == RANDOM_INIT:
        return None
    if init_from:
        path = Path(init_from)
        return latest_checkpoint(path) or path
    return latest_checkpoint(Path(run_dir) / SFT_CHECKPOINTS)
