"""A running Megatron model -> an HF model directory, through the live weight export.

What `megatron_to_hf.export_hf_checkpoint` writes for a checkpoint on disk, written from the model in
memory: the HF-named tensors come from `stream_shm.gather_hf_weights` (the one mapping, the weight
sync's transport, one bucket in memory at a time), and `files.SafetensorsShardWriter` streams them into
shards laid out from `stream_collective.stream_plan` before the first tensor arrives. The directory is
written beside its final name and renamed into place only when complete.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from pathlib import Path

from scope_mega.weights import files
from scope_mega.weights.megatron_to_hf import DEFAULT_MAX_SHARD_BYTES, hf_dtype, write_hf_config
from scope_mega.weights.stream_collective import stream_plan
from scope_mega.weights.stream_shm import gather_hf_weights


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
