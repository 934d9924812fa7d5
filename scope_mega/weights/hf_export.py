"""A running Megatron model -> an HF model directory, through the live weight export.

What `megatron_to_hf.export_hf_checkpoint` writes for a checkpoint on disk, written from the model in
memory: the HF-named tensors come from `stream_shm.gather_hf_weights` (the one mapping, the weight
sync's transport, one bucket in memory at a time), and `files.SafetensorsShardWriter` streams them into
shards laid out from `stream_collective.stream_plan` before the first tensor arrives. The directory is
written beside its final name and renamed into place only when complete.

A run's exports (`checkpoint.export_hf`): `export_hf` writes the RL policy where `hf_export_dir` says
(the `run_dir` layout), with the tokenizer it was trained with and a generation config that samples as
the rollouts did (`write_generation_files`). It reads of the task only what `TaskTokenizer` names.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from scope_mega.config import RunConfig
from scope_mega.run_dir import HF_EXPORT, HF_EXPORT_STEPS, step_name
from scope_mega.weights import files
from scope_mega.weights.megatron_to_hf import DEFAULT_MAX_SHARD_BYTES, hf_dtype, write_hf_config
from scope_mega.weights.stream_collective import stream_plan
from scope_mega.weights.stream_shm import gather_hf_weights


class TaskTokenizer(Protocol):
    """What an export reads of a `tasks.Task`: the tokenizer the policy was trained with (`save(folder)`,
    `pad_id`) and the token ids that end a response."""

    tokenizer: Any
    stop_token_ids: list[int]


def save_hf_model(
    model,
    spec,
    out: str | Path,
    bucket_bytes: int,
    write_side_files: Callable[[Path], None],
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path | None:
    """Write this model-parallel group's model (`model`, `spec` as from `build_gpt_model`) to `out`:
    safetensors shards + index in the HF config's dtype (else the parameters'), config.json, and what
    `write_side_files(folder)` adds (tokenizer, generation config). An existing `out` is replaced.

    Collective over the model-parallel group: every rank calls it; model-parallel rank 0 writes and
    returns `out`, the others return None. If writing fails, the export still runs to its end (so no
    peer is left waiting) and nothing appears under `out`."""
    from megatron.core import parallel_state

    plan = stream_plan(model, spec)
    stream = gather_hf_weights(model, spec, bucket_bytes)
    if parallel_state.get_model_parallel_group().rank() != 0:
        collections.deque(stream, maxlen=0)
        return None
    dtype = hf_dtype(spec.hf_config) or spec.dtype
    try:
        with files.atomic_output_dir(out, force=True) as tmp:
            layout = [files.TensorPlan(name, shape, dtype) for name, shape in plan]
            writer = files.SafetensorsShardWriter(tmp, layout, max_shard_bytes)
            for bucket in stream:
                for name, tensor in bucket:
                    writer.write(name, tensor.to("cpu", dtype))
            writer.close()
            write_hf_config(spec.hf_config, tmp, dtype)
            write_side_files(tmp)
    finally:
        collections.deque(stream, maxlen=0)
    return Path(out)


def hf_export_dir(cfg: RunConfig, step: int, final: bool) -> Path | None:
    """Where `checkpoint.export_hf` puts the policy after RL step `step` (None: no export then):
    `<run_dir>/hf` at the end of training, `<run_dir>/hf_steps/step_XXXXXXXX` every N steps before it."""
    every = cfg.checkpoint.export_hf
    if every == "off":
        return None
    if final:
        return Path(cfg.run_dir) / HF_EXPORT
    if isinstance(every, int) and step % every == 0 and step < cfg.rl.steps:
        return Path(cfg.run_dir) / HF_EXPORT_STEPS / step_name(step)
    return None


def export_hf(
    cfg: RunConfig, model, spec, task: TaskTokenizer, step: int, final: bool = False
) -> Path | None:
    """Write the policy as an HF model directory where `hf_export_dir` says, if it says so: weights
    streamed from the live model (`save_hf_model`, one weight-sync bucket in memory), config, the
    task's tokenizer and a generation config with the rollout settings. Called by every rank after
    each step (`final`: after training); the first data-parallel replica exports, its model-parallel
    rank 0 writes. Returns the directory on the rank that wrote it."""
    from megatron.core import parallel_state

    out = hf_export_dir(cfg, step, final)
    first = parallel_state.get_data_parallel_rank() == 0 and parallel_state.get_context_parallel_rank() == 0
    if out is None or not first:  # CP ranks hold the same weights, each with its own TP x PP group
        return None
    bucket = cfg.rollout.sync_bucket_mb << 20
    return save_hf_model(model, spec, out, bucket, partial(write_generation_files, cfg, spec.hf_config, task))


def write_generation_files(cfg: RunConfig, hf_config, task: TaskTokenizer, folder: Path) -> None:
    """The tokenizer the policy was trained with and a generation config that samples as the rollouts did."""
    import transformers

    task.tokenizer.save(folder)
    ro = cfg.rollout
    sampling = dict(do_sample=True, temperature=ro.temperature, top_p=ro.top_p, top_k=ro.top_k)
    transformers.GenerationConfig(
        bos_token_id=getattr(hf_config, "bos_token_id", None),
        eos_token_id=list(task.stop_token_ids),
        pad_token_id=task.tokenizer.pad_id,
        max_new_tokens=ro.max_new_tokens,
        **(sampling if ro.temperature > 0 else dict(do_sample=False)),
    ).save_pretrained(folder)
