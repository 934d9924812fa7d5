"""Read tensors of a Megatron `torch_dist` checkpoint piece by piece, in one process, whatever TP/PP
saved it.

A `torch_dist` checkpoint is a PyTorch Distributed Checkpoint (DCP) whose keys are Megatron's sharded
keys. Layer tensors are stacked: `decoder.layers.<suffix>` has shape `[num_layers, ...]`, and fused
gate/up is stored as `[gate; up]` over all TP ranks. Megatron's own `dist_checkpointing.load`
needs a process group and, in a one-process world, every fragment of a key at once (all layers), so
this reader plans DCP reads for exactly the slices asked for: memory is one layer's tensors.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from scope_mega.weights.mapping import LAYER_PREFIX_MEGATRON, ConversionError


class _SlicePlanner(DefaultLoadPlanner):
    """DCP load plan for given (offset, destination tensor) slices of checkpoint keys."""

    def __init__(self, requests: dict[str, tuple[tuple[int, ...], torch.Tensor]]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.requests = requests

    def create_local_plan(self) -> LoadPlan:
        items: list[ReadItem] = []
        for key, (offsets, dest) in self.requests.items():
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=dest.shape)
            items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [chunk])
        return LoadPlan(items)

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        view = self.requests[read_item.dest_index.fqn][1]
        for dim, (offset, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            view = view.narrow(dim, offset, length)
        return view


class MegatronCheckpoint:
    """The tensors of `<dir>` (a `torch_dist` model checkpoint), addressed by canonical Megatron names
    with global layer indices (`decoder.layers.3.mlp.linear_fc1.weight`)."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        if not (self.dir / ".metadata").is_file():
            raise ConversionError(f"{self.dir} is not a torch_dist checkpoint (no .metadata)")
        meta = FileSystemReader(str(self.dir)).read_metadata().state_dict_metadata
        self.tensors: dict[str, TensorStorageMetadata] = {
            k: v for k, v in meta.items() if isinstance(v, TensorStorageMetadata)
        }

    def locate(self, name: str) -> tuple[str, int | None]:
        """(checkpoint key, layer index into its stacked first dim, or None for an unstacked key)."""
        if name in self.tensors:
            return name, None
        if name.startswith(LAYER_PREFIX_MEGATRON):
            layer, suffix = name[len(LAYER_PREFIX_MEGATRON) :].split(".", 1)
            key = LAYER_PREFIX_MEGATRON + suffix
            if key in self.tensors:
                return key, int(layer)
        raise ConversionError(f"Megatron checkpoint {self.dir} has no tensor for {name}")

    def num_layers(self, key: str) -> int:
        return self.tensors[key].size[0]

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Load the named tensors (full, unsharded) with one DCP read."""
        requests: dict[str, tuple[tuple[int, ...], torch.Tensor]] = {}
        where = {}
        for name in names:
            key, layer = self.locate(name)
            md = self.tensors[key]
            shape = tuple(md.size) if layer is None else (1, *md.size[1:])
            offsets = (0,) * len(shape) if layer is None else (layer,) + (0,) * (len(shape) - 1)
            if key in requests:
                raise ValueError(f"two slices of {key} requested in one read")
            requests[key] = (offsets, torch.empty(shape, dtype=md.properties.dtype))
            where[name] = (key, layer)
        with warnings.catch_warnings():  # DCP warns that it loads in one process, which is the intent
            warnings.simplefilter("ignore", UserWarning)
            reader = FileSystemReader(str(self.dir))
            dcp_load({}, storage_reader=reader, planner=_SlicePlanner(requests), no_dist=True)
        return {n: requests[k][1] if layer is None else requests[k][1][0] for n, (k, layer) in where.items()}
