"""Atomic, resumable checkpoints: Megatron `dist_checkpointing` for model and optimizer, plus trainer state.

A checkpoint is one step folder of a checkpoint root (`run_dir` holds the layout: folder names, the
`latest` marker, which checkpoint a path means):
    step_00000010/
        model/               dist checkpoint of the GPTModel's sharded_state_dict (loads at any TP/PP)
        optim/               dist checkpoint of the optimizer state (same parallel layout to resume);
                             empty while the optimizer has not stepped
        trainer_state.json   step, data position, LR schedule, whether the optimizer has stepped,
                             resolved config, parallel layout
        rng/rank_00000.pt    per-rank RNG states (python, numpy, torch, CUDA, Megatron tracker)

Every checkpoint is written into `step_XXXXXXXX.tmp` and renamed into place only after all ranks have
finished; `latest` is then replaced through a temp file + rename. A crash at any point leaves the
previous `latest` pointing to a complete checkpoint (and leftovers that the next stage removes:
`stage.build_stage`).

A checkpoint resumes whatever happened before it. An optimizer that has not stepped yet (Adam without
moments: dynamic sampling dropped every group of every RL step so far, or a stage saved at step 0) is
saved and loaded as such: `trainer_state.json` says `"optimizer_stepped": false`, `optim/` stays empty
(Megatron's distributed optimizer cannot even describe such a state, and its loader would ask for the
moments), and loading keeps the fresh optimizer, its fp32 master weights refreshed from the loaded
model weights: the state that was saved, as nothing but a step changes the masters. A checkpoint
written before that entry existed has stepped if its LR schedule has (`train_step` moves both).

Failures are one line, a `run_dir.CheckpointError`:
- a save that cannot be written (any OSError; a full disk is ENOSPC, found in the error or, where a
  writer lost the errno, from the free space left) names the checkpoint folder and the reason on every
  rank (a rank's failure is shared before the next collective: no rank waits for one that stopped),
  removes the `.tmp` folder and leaves `latest` as it was; a save is refused before it writes anything
  when the disk has less room than the newest checkpoint takes;
- a load names the damaged file (an unreadable `trainer_state.json`, index or RNG file, a shard shorter
  than its index says) and the way back: point `latest` at an earlier checkpoint; a checkpoint of
  another architecture (tensors or shapes the model does not have) does not fit the model, and the
  caller says what to fix.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from scope_mega.run_dir import IN_PROGRESS, LATEST, TRAINER_STATE, CheckpointError, step_dirs, step_name
from scope_mega.train_step import TrainState
from scope_mega.weights.mapping import unwrap
from scope_mega.weights.megatron_ckpt import load_model_weights

T = TypeVar("T")
_TRAINER_STATE_KEYS = ("step", "data_position", "extra", "scheduler", "world_size")
_NEARLY_FULL = 1 << 20  # free bytes below which a failed write is taken for a full disk


@dataclass
class TrainerState:
    """What besides weights and optimizer moments a resumed run needs to continue exactly."""

    step: int = 0
    data_position: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class _Failed(Exception):
    """A phase failed on some rank: `code` is the errno of an OSError a failed rank met (0: none),
    `error` this rank's own failure (None: another rank failed)."""

    def __init__(self, code: int, error: BaseException | None) -> None:
        super().__init__(code, error)
        self.code, self.error = code, error


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _max_over_ranks(values: list[int]) -> list[int]:
    flags = torch.tensor(values, dtype=torch.int64)
    if dist.is_initialized():
        if dist.get_backend() == "nccl":
            flags = flags.cuda()
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags.tolist()


def _causes(error: BaseException | None) -> Iterator[BaseException]:
    """`error`, its causes and contexts, and the per-rank failures a `CheckpointException` collected."""
    todo, seen = [error], set()
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]
        if isinstance(e, CheckpointException):
            todo += [exc for exc, _ in e.failures.values()]


def _describe(error: BaseException) -> str:
    """The error's type and first sentence (of a `CheckpointException`, a wrapper, its first failure's)."""
    e = next((e for e in _causes(error) if not isinstance(e, CheckpointException)), error)
    text = str(e).strip().split("\n")[0].split(". ")[0][:200]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _together(work: Callable[[], None] | None) -> None:
    """Run `work` on this rank (None: nothing to do here), then share over the ranks whether it failed
    anywhere: if it did, every rank raises `_Failed`, so none waits in a later collective."""
    error = None
    if work is not None:
        try:
            work()
        except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
            error = e
    failed, code = _max_over_ranks([error is not None, _errno(error)])
    if failed:
        raise _Failed(code, error)


def _errno(error: BaseException | None) -> int:
    """The errno of the first OSError behind `error` (0: none). Megatron's writer processes and DCP's
    collectives pass failures on pickled, without their causes: an errno is then only in the text of
    the error that wrapped it (`Worker failure: [Errno 28] No space left on device`)."""
    for e in _causes(error):
        if isinstance(e, OSError) and e.errno:
            return e.errno
        if found := re.search(r"\[Errno (\d+)\]", str(e)):
            return int(found.group(1))
    return 0


def _optimizer_metadata(state: TrainState) -> dict:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    opts = getattr(state.optimizer, "chained_optimizers", [state.optimizer])
    if any(isinstance(o, DistributedOptimizer) for o in opts):
        return {"distrib_optim_sharding_type": "fully_reshardable"}
    return {}


def _optimizer_stepped(state: TrainState) -> bool:
    """Whether the optimizer holds per-parameter state (Adam's moments) on any rank: it has stepped."""
    opts = getattr(state.optimizer, "chained_optimizers", [state.optimizer])
    mine = any(len(s) for o in opts if o.optimizer is not None for s in o.optimizer.state.values())
    return bool(_max_over_ranks([mine])[0])


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f"{IN_PROGRESS}{os.getpid()}")  # run_dir.stale_in_progress
    tmp.write_text(text)
    os.replace(tmp, path)


def _rng_state() -> dict[str, Any]:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(rng: dict[str, Any]) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    get_cuda_rng_tracker().set_states(rng["tracker"])


def _rng_file(path: Path) -> Path:
    return path / "rng" / f"rank_{_rank():05d}.pt"


def save_checkpoint(
    ckpt_root: str | Path,
    state: TrainState,
    trainer: TrainerState,
    config: dict[str, Any],
    keep_last: int = 2,
) -> Path:
    """Write checkpoint `step_<trainer.step>` atomically on all ranks; prune old ones; return its path.
    A rank that cannot write its part raises `CheckpointError` on every rank, the `.tmp` folder removed
    and `latest` unchanged."""
    from megatron.core import parallel_state

    root = Path(ckpt_root)
    name = step_name(trainer.step)
    final, tmp = root / name, root / (name + IN_PROGRESS)
    meta = {
        "step": trainer.step,
        "data_position": trainer.data_position,
        "extra": trainer.extra,
        "scheduler": state.scheduler.state_dict(),
        "optimizer_stepped": (stepped := _optimizer_stepped(state)),
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "config": config,
    }
    rank0 = _rank() == 0
    try:
        _together(partial(_prepare, root, tmp) if rank0 else None)
        _together(partial(_write_parts, tmp, state, stepped))
        _together(partial(_publish, tmp, final, meta, keep_last) if rank0 else None)
    except _Failed as failed:
        message = _save_failure(final, tmp, failed)  # before the partial folder goes: its free space
        if rank0:
            shutil.rmtree(tmp, ignore_errors=True)
        if message is None:  # this rank's failure is not the filesystem's: a bug, shown as it is
            raise failed.error from None
        raise CheckpointError(message) from failed.error
    return final


def _prepare(root: Path, tmp: Path) -> None:
    """Rank 0: the empty `.tmp` folder, once the disk has room for another checkpoint as large as the
    newest one (a save that would fill it is refused before it writes anything: Megatron writes some
    files from rank 0 alone, and a failure there leaves the other ranks waiting in its collectives)."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crashed save
    done = step_dirs(root)
    need = sum(f.stat().st_size for f in done[-1].rglob("*") if f.is_file()) if done else 0
    if (free := shutil.disk_usage(root).free) < need:
        raise OSError(errno.ENOSPC, f"{free} bytes free, {need} needed (the size of {done[-1].name})")
    for sub in ("model", "optim", "rng"):
        (tmp / sub).mkdir(parents=True)


def _write_parts(tmp: Path, state: TrainState, stepped: bool) -> None:
    """This rank's shards of the model and of the optimizer once it has stepped (collective), and its
    RNG states."""
    from megatron.core import dist_checkpointing

    model = unwrap(state.model[0])
    dist_checkpointing.save(model.sharded_state_dict(), str(tmp / "model"))
    if stepped:  # a fresh model dict: `save` rewrites the one it is given in place
        optim_sd = state.optimizer.sharded_state_dict(
            model.sharded_state_dict(), metadata=_optimizer_metadata(state)
        )
        dist_checkpointing.save(optim_sd, str(tmp / "optim"))
    with open(_rng_file(tmp), "wb") as f:  # a file object: a failed write keeps its errno
        torch.save(_rng_state(), f)


def _publish(tmp: Path, final: Path, meta: dict[str, Any], keep_last: int) -> None:
    """Rank 0, every part written: trainer state last, the rename, `latest`, pruning."""
    (tmp / TRAINER_STATE).write_text(json.dumps(meta, indent=2, default=str))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _atomic_write_text(final.parent / LATEST, final.name)
    _prune(final.parent, keep_last)


def _nearly_full(path: Path) -> bool:
    """Whether the filesystem of `path` (or of its nearest existing parent) has almost no space left."""
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free < _NEARLY_FULL
    except OSError:
        return False


def _save_failure(final: Path, tmp: Path, failed: _Failed) -> str | None:
    """The one line of a failed save, or None when this rank's own failure is not the filesystem's.
    torch's writer reports a failed write without its errno ("unexpected pos"): a filesystem left with
    almost no space is then taken for a full one."""
    code = failed.code or (errno.ENOSPC if _nearly_full(tmp) else 0)
    if code == errno.ENOSPC:
        why = "the disk is full (ENOSPC); free space on it"
    elif code:
        why = f"{os.strerror(code)} ({errno.errorcode.get(code, code)}); fix the folder"
    elif failed.error is None:
        why = "another rank could not write its part (its error says why)"
    else:
        return None
    marker = final.parent / LATEST
    kept = f"{marker} still names {marker.read_text().strip()}" if marker.is_file() else "nothing is lost"
    return f"could not write checkpoint {final}: {why} and run again: {tmp.name} was removed, {kept}"


def _prune(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    done = step_dirs(root)
    latest = (root / LATEST).read_text().strip()
    for old in done[:-keep_last]:
        if old.name != latest:
            shutil.rmtree(old, ignore_errors=True)


def _way_back(ckpt: Path, option: str | None) -> str:
    """What to do about a damaged checkpoint: use an earlier one of its root, if any, or (`option`: the
    config key that named it as starting weights; None: the stage resumes from it) another one."""
    root = ckpt.parent
    earlier = [p.name for p in step_dirs(root) if p.name < ckpt.name]
    back = f"write the name of an earlier one ({', '.join(earlier)}) into {root / LATEST}" if earlier else ""
    if option:
        return f"{back + ', or ' if back else ''}point {option} at another checkpoint"
    return back or f"no earlier checkpoint is left in {root}: remove {root / LATEST} to start afresh"


def _damaged(ckpt: Path, file: Path, reason: str, option: str | None = None) -> str:
    return f"checkpoint {ckpt} is damaged: {file} ({reason}); {_way_back(ckpt, option)}"


def _misfit(option: str | None) -> str:
    """What to do about a checkpoint that does not fit the model (`option` as in `_way_back`)."""
    if option:
        return (
            f"point {option} at a checkpoint of this architecture, or set model.hf_config to its architecture"
        )
    return "the config's model (model.hf_config) differs from the one this run saved: restore it"


def _damaged_file(part: Path) -> tuple[Path, str] | None:
    """The first file of dist checkpoint `part` that is unreadable or shorter than its index says."""
    from torch.distributed.checkpoint import FileSystemReader

    for file, read in (
        (part / "metadata.json", lambda f: json.loads(f.read_text())),
        (part / "common.pt", lambda f: torch.load(f, map_location="cpu", weights_only=False)),
        (part / ".metadata", lambda f: FileSystemReader(str(f.parent)).read_metadata()),
    ):
        try:
            index = read(file)  # the last one read is the index of the shards
        except Exception as e:
            return file, _describe(e)
    for info in index.storage_data.values():
        file, needed = part / info.relative_path, info.offset + info.length
        size = file.stat().st_size if file.is_file() else -1
        if size < needed:
            return file, "missing" if size < 0 else f"truncated: {size} bytes, its index needs {needed}"
    return None


def _mismatch(error: BaseException) -> str | None:
    """How a checkpoint does not fit the model it was loaded into, from Megatron's validation of the
    saved global shapes and keys against the model's (None: the failure is another)."""
    from megatron.core.dist_checkpointing.core import CheckpointingException

    for e in _causes(error):
        if isinstance(e, CheckpointingException) and "shape mismatch" in str(e):
            return str(e).strip().splitlines()[0]
        if isinstance(e, KeyError) and e.args and "not in state dict" in str(e.args[0]):
            return f"it has no tensor {str(e.args[0]).split(' from model')[0]}"
    return None


def _reading(ckpt: Path, part: str, load: Callable[[], T], option: str | None) -> T:
    """`load()` of dist checkpoint `ckpt/part`, its failure as one `CheckpointError` line (`option` as
    in `_way_back`)."""
    try:
        return load()
    except (Exception, CheckpointException) as error:  # CheckpointException is a BaseException
        if detail := _mismatch(error):
            message = f"checkpoint {ckpt / part} does not fit this model ({detail}): {_misfit(option)}"
        elif damaged := _damaged_file(ckpt / part):
            message = _damaged(ckpt, *damaged, option)
        else:
            message = f"cannot read checkpoint {ckpt / part} ({_describe(error)}); {_way_back(ckpt, option)}"
        raise CheckpointError(message) from error


def load_weights(path: str | Path, model: torch.nn.Module, option: str | None = None) -> None:
    """`weights.megatron_ckpt.load_model_weights` (`<path>/model` into this rank's stage), its failure one
    `CheckpointError` line: the damaged file, or that the checkpoint does not fit the model, and what to
    do (`option`: the config key that named `path` as starting weights; None: the stage resumes)."""
    path = Path(path)
    _reading(path, "model", partial(load_model_weights, path, model), option)


def _read_trainer_state(path: Path) -> dict[str, Any]:
    file = path / TRAINER_STATE
    try:
        meta = json.loads(file.read_text())
    except (OSError, ValueError) as e:  # ValueError: JSON or UTF-8
        raise CheckpointError(_damaged(path, file, _describe(e))) from e
    missing = [k for k in _TRAINER_STATE_KEYS if k not in meta] if isinstance(meta, dict) else ["object"]
    if missing:
        raise CheckpointError(_damaged(path, file, f"it has no {', '.join(missing)}"))
    return meta


def load_checkpoint(path: str | Path, state: TrainState) -> TrainerState:
    """Restore model, optimizer, LR schedule, RNG and trainer state (same parallel layout as saved). An
    optimizer saved before its first step is loaded as such: the fresh one, its fp32 masters from the
    loaded weights. A damaged file or a checkpoint of another model raises `CheckpointError`."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    meta = _read_trainer_state(path)
    world = dist.get_world_size() if dist.is_initialized() else 1
    load_weights(path, state.model[0])
    if meta.get("optimizer_stepped", meta["scheduler"].get("num_steps", 1) > 0):
        model_sd = unwrap(state.model[0]).sharded_state_dict()
        optim_sd = state.optimizer.sharded_state_dict(
            model_sd, is_loading=True, metadata=_optimizer_metadata(state)
        )
        load = partial(dist_checkpointing.load, optim_sd, str(path / "optim"))
        state.optimizer.load_state_dict(_reading(path, "optim", load, None))
    else:  # the fresh optimizer is the saved one, but for the fp32 masters of the weights just loaded
        state.optimizer.reload_model_params()
    state.scheduler.load_state_dict(meta["scheduler"])
    if meta["world_size"] == world:
        try:
            _together(lambda: _set_rng_state(torch.load(_rng_file(path), weights_only=False)))
        except _Failed as failed:
            reason = _describe(failed.error) if failed.error else "another rank's RNG file is damaged"
            raise CheckpointError(_damaged(path, _rng_file(path), reason)) from failed.error
    return TrainerState(step=meta["step"], data_position=meta["data_position"], extra=meta["extra"])
