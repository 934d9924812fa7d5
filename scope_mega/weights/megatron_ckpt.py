"""Read a Megatron `torch_dist` checkpoint, whatever TP/PP saved it: into a built model stage with
Megatron's own loader (`load_model_weights`, collective over the model's process groups), or tensor by
tensor, piece by piece, in one process (`MegatronCheckpoint`).

A `torch_dist` checkpoint is a PyTorch Distributed Checkpoint (DCP) whose keys are Megatron's sharded
keys. Layer tensors are stacked: `decoder.layers.<suffix>` has shape `[num_layers, ...]`, and fused
gate/up is stored as `[gate; up]` over all TP ranks. Megatron's own `dist_checkpointing.load`
needs a process group and, in a one-process world, every fragment of a key at once (all layers), so
this reader reads exactly the slices asked for: memory is one layer's tensors. `check_complete` reads
the index back and checks it against the files before a conversion publishes its output.

Each stored chunk is one `torch.save` archive inside a DCP file. Its layout (shape, strides, dtype)
comes from `torch.load` onto the meta device, and its bytes are read straight from their place in the
file into the destination tensor: no intermediate copy, unlike DCP's own load, which loads each chunk
and then copies it into the destination.
"""

from __future__ import annotations

import io
import itertools
import math
import os
import pickle
import sys
import zipfile
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    MetadataIndex,
    TensorStorageMetadata,
)

from scope_mega.weights import files
from scope_mega.weights.mapping import LAYER_PREFIX_MEGATRON, ConversionError, some_names, unwrap


def load_model_weights(path: str | Path, model: torch.nn.Module) -> None:
    """Load model weights from `<path>/model` into this rank's stage, whatever TP/PP saved them."""
    from megatron.core import dist_checkpointing

    model = unwrap(model)
    model_dir = Path(path) / "model"
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir} is missing: not a scope-mega/Megatron checkpoint directory")
    loaded = dist_checkpointing.load(model.sharded_state_dict(), str(model_dir))
    model.load_state_dict(loaded, strict=True)


class MegatronCheckpoint:
    """The tensors of `<dir>` (a `torch_dist` model checkpoint), addressed by canonical Megatron names
    with global layer indices (`decoder.layers.3.mlp.linear_fc1.weight`)."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        if not (self.dir / ".metadata").is_file():
            raise ConversionError(f"{self.dir} is not a torch_dist checkpoint (no .metadata)")
        try:
            meta = FileSystemReader(str(self.dir)).read_metadata()
        except (EOFError, pickle.UnpicklingError, ValueError, OSError) as e:
            index = self.dir / ".metadata"
            raise ConversionError(f"{index} cannot be read ({e}): the checkpoint is damaged") from None
        entries = meta.state_dict_metadata.items()
        self.tensors = {k: v for k, v in entries if isinstance(v, TensorStorageMetadata)}
        self.byte_keys = [k for k, v in entries if isinstance(v, BytesStorageMetadata)]
        self.storage = meta.storage_data
        self.buffer = torch.empty(0, dtype=torch.uint8)

    def check_complete(self, keys: set[str]) -> None:
        """Raise `ConversionError` unless the index (`.metadata`, read back) lists exactly the tensors
        `keys`, each covered by its stored chunks, every entry it lists has a place in a file, and
        every file holds the bytes the index puts in it. A conversion calls this before publishing."""
        if set(self.tensors) != keys:
            missing, extra = sorted(keys - set(self.tensors)), sorted(set(self.tensors) - keys)
            raise ConversionError(
                f"{self.dir} holds {len(self.tensors)} tensors, expected {len(keys)} "
                f"(missing: {some_names(missing) or 'none'}; unexpected: {some_names(extra) or 'none'})"
            )
        for key, md in self.tensors.items():
            for chunk in md.chunks:
                if MetadataIndex(key, chunk.offsets) not in self.storage:
                    where = f"chunk {tuple(chunk.offsets)} of {key}"
                    raise ConversionError(f"{self.dir}: {where} is in the index but was never written")
            covered = sum(math.prod(chunk.sizes) for chunk in md.chunks)
            if covered != math.prod(md.size):
                shape = tuple(md.size)
                raise ConversionError(f"{self.dir}: the stored chunks of {key} cover {covered} of {shape}")
        for key in self.byte_keys:
            if MetadataIndex(key) not in self.storage:
                raise ConversionError(f"{self.dir}: {key} was never written")
        sizes: dict[str, int] = {}
        for index, info in self.storage.items():
            path = self.dir / info.relative_path
            if not path.is_file():
                raise ConversionError(f"{path} is missing: the index puts {index.fqn} in it")
            size = sizes.setdefault(info.relative_path, path.stat().st_size)
            if size < info.offset + info.length or info.length <= 0:
                raise ConversionError(
                    f"{path} holds {size} bytes, but the index puts {info.length} bytes of "
                    f"{index.fqn} at offset {info.offset}"
                )

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
        """Load the named tensors (full, unsharded) into one buffer that this reader reuses: they are
        valid until the next `read`. Reusing it saves the page faults of fresh memory, which cost
        more than the copy from the file."""
        slices = {}  # name -> key, layer, dtype, and the slice read: offsets and shape (a layer, or all)
        for name in names:
            key, layer = self.locate(name)
            md = self.tensors[key]
            size = tuple(md.size)
            offsets = (0,) * len(size) if layer is None else (layer,) + (0,) * (len(size) - 1)
            shape = size if layer is None else (1, *size[1:])
            slices[name] = (key, layer, md.properties.dtype, offsets, shape)
        nbytes = {name: math.prod(s[4]) * s[2].itemsize for name, s in slices.items()}
        ends = list(itertools.accumulate(-(-n // 64) * 64 for n in nbytes.values()))  # 64-byte aligned
        if self.buffer.numel() < ends[-1]:
            self.buffer = torch.empty(0, dtype=torch.uint8)  # free the old one first
            self.buffer = torch.empty(ends[-1], dtype=torch.uint8)
        out = {}
        for (name, (key, layer, dtype, offsets, shape)), start in zip(slices.items(), [0, *ends]):
            dest = self.buffer[start : start + nbytes[name]].view(dtype).view(shape)
            covered = sum(self._read_overlap(key, chunk, offsets, dest) for chunk in self.tensors[key].chunks)
            if covered != dest.numel():
                raise ConversionError(f"{self.dir}: the stored chunks of {key} cover {covered} of {shape}")
            out[name] = dest if layer is None else dest[0]
        return out

    def _read_overlap(
        self, key: str, chunk: ChunkStorageMetadata, offsets: tuple[int, ...], dest: torch.Tensor
    ) -> int:
        """Copy the part of stored `chunk` of `key` that overlaps `dest` (the slice at `offsets`); return
        its number of elements."""
        lo = [max(o, c) for o, c in zip(offsets, chunk.offsets)]
        hi = [min(o + n, c + m) for o, n, c, m in zip(offsets, dest.shape, chunk.offsets, chunk.sizes)]
        if any(a >= b for a, b in zip(lo, hi)):
            return 0
        sizes = [b - a for a, b in zip(lo, hi)]
        in_chunk = [a - c for a, c in zip(lo, chunk.offsets)]
        in_dest = [a - o for a, o in zip(lo, offsets)]
        target = _narrow(dest, in_dest, sizes)
        with open(self.dir / self.storage[MetadataIndex(key, chunk.offsets)].relative_path, "rb") as f:
            start = self._chunk_data(f, key, chunk, dest.dtype)
            if _is_block(sizes, chunk.sizes) and _is_block(sizes, dest.shape):
                skip = sum(i * s for i, s in zip(in_chunk, _strides(chunk.sizes))) * dest.dtype.itemsize
                _read_into(f, start + skip, target)
            else:  # e.g. one TP rank's columns: read the whole chunk, copy the overlap
                whole = torch.empty(tuple(chunk.sizes), dtype=dest.dtype)
                _read_into(f, start, whole)
                target.copy_(_narrow(whole, in_chunk, sizes))
        return target.numel()

    def _chunk_data(
        self, f: io.BufferedReader, key: str, chunk: ChunkStorageMetadata, dtype: torch.dtype
    ) -> int:
        """Where the elements of stored `chunk` start in the open file `f`, checking that they are stored
        plainly: row-major, uncompressed, of the checkpoint's dtype."""
        info = self.storage[MetadataIndex(key, chunk.offsets)]
        where = f"{self.dir}: chunk {tuple(chunk.offsets)} of {key}"
        if info.transform_descriptors:
            raise ConversionError(f"{where} is stored with transforms {info.transform_descriptors}")
        archive = _FileRange(f, info.offset, info.length)
        meta = torch.load(archive, map_location="meta", weights_only=True)
        if tuple(meta.shape) != tuple(chunk.sizes) or meta.dtype != dtype or not meta.is_contiguous():
            raise ConversionError(f"{where} is stored as {meta.dtype} {tuple(meta.shape)} {meta.stride()}")
        records = zipfile.ZipFile(archive).infolist()
        data = [r for r in records if r.filename.split("/")[-2:-1] == ["data"]]
        if len(data) != 1 or data[0].compress_type != zipfile.ZIP_STORED:
            raise ConversionError(f"{where} is not one uncompressed tensor record")
        for r in records:  # read directly: CRC32s are not written (see hf_to_megatron.save_streaming)
            if r.filename.endswith("/byteorder"):
                archive.seek(_record_start(archive, r, where))
                if archive.read(r.file_size).decode() != sys.byteorder:
                    raise ConversionError(f"{where} was saved on a machine of the other byte order")
        return info.offset + _record_start(archive, data[0], where) + meta.storage_offset() * dtype.itemsize


def _record_start(archive: io.RawIOBase, record: zipfile.ZipInfo, where: str) -> int:
    """Where the bytes of an uncompressed zip `record` start in `archive`."""
    archive.seek(record.header_offset)
    header = archive.read(30)  # zip local file header: name and extra field lengths at bytes 26..29
    if header[:4] != b"PK\x03\x04":
        raise ConversionError(f"{where}: no zip local header for {record.filename}")
    name_len, extra_len = int.from_bytes(header[26:28], "little"), int.from_bytes(header[28:30], "little")
    return record.header_offset + 30 + name_len + extra_len


def _strides(shape) -> list[int]:
    return [math.prod(shape[i + 1 :]) for i in range(len(shape))]


def _is_block(sizes: list[int], shape) -> bool:
    """Whether a slice of `sizes` of a row-major tensor of `shape` is one contiguous run of elements:
    dims of size 1, then any one dim, then full dims."""
    first = next((i for i, n in enumerate(sizes) if n != 1), len(sizes))
    return all(n == m for n, m in zip(sizes[first + 1 :], shape[first + 1 :]))


def _narrow(t: torch.Tensor, offsets: list[int], sizes: list[int]) -> torch.Tensor:
    for dim, (offset, size) in enumerate(zip(offsets, sizes)):
        t = t.narrow(dim, offset, size)
    return t


def _read_into(f: io.BufferedReader, offset: int, out: torch.Tensor) -> None:
    f.seek(offset)
    files.read_exactly(f, out, f.name)


class _FileRange(io.RawIOBase):
    """Bytes `[offset, offset + length)` of an open file, as a seekable file of their own (one DCP
    chunk's `torch.save` archive, for `torch.load` and `zipfile`)."""

    def __init__(self, f: io.BufferedReader, offset: int, length: int):
        super().__init__()
        self.f, self.start, self.length = f, offset, length
        f.seek(offset)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.f.tell() - self.start

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.tell(), os.SEEK_END: self.length}[whence]
        self.f.seek(self.start + min(max(base + pos, 0), self.length))
        return self.tell()

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        return self.f.readinto(view[: max(self.length - self.tell(), 0)])
