"""Per-step weight sync: the trainer's Megatron weights -> a rollout engine, as HF-named full tensors.

The names, layouts and TP merging come from the ONE mapping (`scope_mega.weights.stream_shm.
gather_hf_weights`); this module only checks the stream against the engine's model, groups it into
bounded buckets where an engine wants them, and drives the collective export on every rank.
"""

from __future__ import annotations

import collections
import difflib
from collections.abc import Iterable, Iterator, Mapping

import torch
import transformers

from scope_mega.rollout.engine import RolloutEngine, WeightSyncError, WeightUpdate

NamedTensor = tuple[str, torch.Tensor]


def hf_parameter_shapes(hf_config: transformers.PretrainedConfig) -> dict[str, torch.Size]:
    """Every parameter of the HF causal LM for `hf_config` and its shape (tied weights once), from a
    model built on the meta device: the contract an engine whose own parameters are fused or sharded
    (vLLM) checks a stream against."""
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    return {name: p.shape for name, p in model.named_parameters()}


class CheckedStream:
    """Iterate `named_tensors`, failing on the first tensor whose name or shape does not match
    `expected`; `finish` then reports (or, for a full sync, rejects) the names never received."""

    def __init__(self, named_tensors: Iterable[NamedTensor], expected: Mapping[str, torch.Size]) -> None:
        self.source = named_tensors
        self.expected = expected
        self.seen: set[str] = set()
        self.bytes = 0

    def __iter__(self) -> Iterator[NamedTensor]:
        for name, tensor in self.source:
            if name not in self.expected:
                close = difflib.get_close_matches(name, list(self.expected), n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise WeightSyncError(f"weight stream: '{name}' is not a weight of the engine's model{hint}")
            if tensor.shape != self.expected[name]:
                raise WeightSyncError(
                    f"weight stream: '{name}' has shape {tuple(tensor.shape)}, "
                    f"the engine's model expects {tuple(self.expected[name])}"
                )
            if name in self.seen:
                raise WeightSyncError(f"weight stream: '{name}' was sent twice")
            self.seen.add(name)
            self.bytes += tensor.numel() * tensor.element_size()
            yield name, tensor

    def finish(self, full: bool) -> WeightUpdate:
        missing = [name for name in self.expected if name not in self.seen]
        if full and missing:
            more = f" (and {len(missing) - 6} more)" if len(missing) > 6 else ""
            raise WeightSyncError(
                f"weight stream: full sync left {len(missing)} weight(s) unchanged: "
                f"{', '.join(missing[:6])}{more}"
            )
        return WeightUpdate(tensors=len(self.seen), bytes=self.bytes, missing=missing)


def buckets(named_tensors: Iterable[NamedTensor], bucket_bytes: int) -> Iterator[list[NamedTensor]]:
    """Consecutive groups of at most `bucket_bytes` (a larger tensor comes alone), so an engine can move
    and load a stream in bounded pieces."""
    bucket: list[NamedTensor] = []
    size = 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def sync_weights(
    engine: RolloutEngine | None,
    model,
    spec,
    bucket_bytes: int = 1 << 28,
    full: bool = True,
    every_rank: bool = False,
) -> WeightUpdate | None:
    """Stream this rank's Megatron model (`model`, `spec` from `build_gpt_model`) into `engine` after an
    optimizer step. Collective over the model-parallel groups: every rank calls it.

    - `every_rank=False` (the transformers engine): only model-parallel rank 0 (TP and PP rank 0)
      receives the weights, so the engine must be there, and other ranks pass None. The export is
      `stream_shm.gather_hf_weights`: on CPU, through shared memory and, for an engine that is a
      `stream_shm.Destination`, straight into its weights.
    - `every_rank=True` (vLLM, a worker on every rank that takes its own TP shard): every rank
      receives every full tensor (`stream_collective.iter_hf_weights`), one bucket in flight.

    If the engine rejects the stream, the rest of the export is still run so the other ranks are not
    left waiting, then the error is raised."""
    from megatron.core import parallel_state

    from scope_mega.weights.stream_collective import iter_hf_weights
    from scope_mega.weights.stream_shm import Destination, gather_hf_weights

    if every_rank:
        stream = _released(iter_hf_weights(model, spec, bucket_bytes))
        receiver = True
    else:
        receiver = (
            parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_pipeline_model_parallel_rank() == 0
        )
        dest = engine if isinstance(engine, Destination) else None
        stream = _released(gather_hf_weights(model, spec, bucket_bytes, dest=dest))
    try:
        if engine is not None and not receiver:
            raise ValueError(
                "sync_weights: the engine must be on model-parallel rank 0 (TP and PP rank 0), "
                "the only rank that receives the weights"
            )
        return None if engine is None else engine.update_weights(stream, full=full)
    finally:
        collections.deque(stream, maxlen=0)  # run the export to the end, holding no tensor meanwhile


def _released(bucket_iter: Iterator[list[NamedTensor]]) -> Iterator[NamedTensor]:
    """The tensors of each bucket one by one, dropping each bucket's reference as it is handed out, so
    a consumed tensor is freed before the next bucket is gathered (one bucket in flight, not two)."""
    for bucket in bucket_iter:
        bucket.reverse()
        while bucket:
            yield bucket.pop()
