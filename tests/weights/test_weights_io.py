"""Reading without extra copies: import chunks read row block by row block from safetensors, and export
reads chunk bytes straight out of a `torch_dist` checkpoint's files. Both checked against plain
in-memory references (`to_megatron`, `torch.load`)."""

import errno
import fcntl
import os
from pathlib import Path

import pytest
import torch
from _tiny_models import write_hf_checkpoint
from safetensors.torch import save_file
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint import save as dcp_save

from scope_mega.models import arch
from scope_mega.weights.files import (
    DIRECT_ALIGN,
    DirectFile,
    HFCheckpoint,
    create_for_writing,
)
from scope_mega.weights.hf_to_megatron import ChunkSource
from scope_mega.weights.mapping import ConversionError, Dims, bindings, to_megatron
from scope_mega.weights.megatron_ckpt import MegatronCheckpoint

PADDED_VOCAB = 256  # tiny models have vocab 100
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def _chunks(shape: tuple[int, ...]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Offsets and sizes of: the whole tensor, row splits in 2 and 3 (not aligned to any block), and
    for 2-D tensors a column split in 2 (what TP does to linear_proj / linear_fc2)."""
    rows, rest = shape[0], shape[1:]
    out = [((0,) * len(shape), shape)]
    for parts in (2, 3):
        cuts = [rows * i // parts for i in range(parts + 1)]
        out += [((a, *(0,) * len(rest)), (b - a, *rest)) for a, b in zip(cuts, cuts[1:])]
    if rest:
        half = rest[0] // 2
        out += [((0, 0), (rows, half)), ((0, half), (rows, rest[0] - half))]
    return out


@pytest.mark.parametrize("case", ["qwen2_tied", "qwen3"])
def test_import_chunks_equal_slices_of_the_in_memory_transform(case, tmp_path: Path):
    """Every chunk ChunkSource reads (as bf16 from fp32 files, so through the cast too) is the slice of
    `to_megatron`'s full tensor; vocab padding rows are zero."""
    write_hf_checkpoint(case, tmp_path)
    hf = arch.load_hf_config(tmp_path)
    ckpt = HFCheckpoint(tmp_path)
    source, dims = ChunkSource(hf, ckpt), Dims.of(hf)
    reference = {}
    for b in bindings(hf):
        tensors = [torch.zeros(ckpt.stored(n).shape) for n in b.hf]
        for name, t in zip(b.hf, tensors):
            ckpt.read_rows(name, 0, t)
        full = to_megatron(b.rule, tensors, dims, PADDED_VOCAB)
        if b.rule.kind == "vocab":
            assert full.shape[0] == PADDED_VOCAB and not full[dims.vocab_size :].any()
        if b.layer is None:
            reference[b.megatron] = full
        else:  # stacked under decoder.layers.<suffix>, first dim = layer
            reference.setdefault("decoder.layers." + b.megatron.split(".", 3)[3], {})[b.layer] = full
    for key, full in reference.items():
        layers = full if isinstance(full, dict) else {None: full}
        for layer, t in layers.items():
            for offsets, sizes in _chunks(tuple(t.shape)):
                if layer is None:
                    got = source.chunk(key, offsets, sizes, tuple(t.shape), torch.bfloat16)
                else:
                    shape = (len(layers), *t.shape)
                    got = source.chunk(key, (layer, *offsets), (1, *sizes), shape, torch.bfloat16)[0]
                want = t
                for dim, (o, n) in enumerate(zip(offsets, sizes)):
                    want = want.narrow(dim, o, n)
                assert torch.equal(got, want.to(torch.bfloat16)), (key, layer, offsets, sizes)
                assert got.untyped_storage().nbytes() == got.nbytes  # the writer would copy a view


def test_import_read_refuses_rows_that_do_not_fit(tmp_path: Path):
    save_file({"w": torch.zeros(4, 3)}, str(tmp_path / "model.safetensors"))
    ckpt = HFCheckpoint(tmp_path)
    with pytest.raises(ConversionError, match="does not fit"):
        ckpt.read_rows("w", 2, torch.empty(3, 3))
    with pytest.raises(ConversionError, match="does not fit"):
        ckpt.read_rows("w", 0, torch.empty(4, 2))


def _save_dcp(path: Path, state: dict[str, torch.Tensor]) -> None:
    dcp_save(state, storage_writer=FileSystemWriter(str(path)), no_dist=True)


def test_export_reads_chunk_bytes_of_every_layout(tmp_path: Path):
    """Whole tensors, layer slices of stacked keys, and each dtype read from the files bit for bit."""
    gen = torch.Generator().manual_seed(0)
    state = {
        "decoder.layers.mlp.linear_fc2.weight": torch.randn(3, 5, 7, generator=gen),
        "decoder.layers.input_layernorm.weight": torch.randn(3, 7, generator=gen).to(torch.bfloat16),
        "embedding.word_embeddings.weight": torch.randn(11, 7, generator=gen).to(torch.float16),
    }
    _save_dcp(tmp_path, state)
    ckpt = MegatronCheckpoint(tmp_path)
    emb = ckpt.read(["embedding.word_embeddings.weight"])["embedding.word_embeddings.weight"]
    assert emb.dtype == torch.float16 and torch.equal(emb, state["embedding.word_embeddings.weight"])
    for layer in range(3):
        names = [
            f"decoder.layers.{layer}.mlp.linear_fc2.weight",
            f"decoder.layers.{layer}.input_layernorm.weight",
        ]
        got = ckpt.read(names)
        assert torch.equal(got[names[0]], state["decoder.layers.mlp.linear_fc2.weight"][layer])
        assert torch.equal(got[names[1]], state["decoder.layers.input_layernorm.weight"][layer])


def test_export_refuses_a_chunk_stored_with_other_strides(tmp_path: Path):
    """A transposed tensor is saved with its strides: reading its bytes row-major would permute it."""
    _save_dcp(tmp_path, {"output_layer.weight": torch.randn(7, 5).t()})
    with pytest.raises(ConversionError, match="is stored as"):
        MegatronCheckpoint(tmp_path).read(["output_layer.weight"])


def _pieces() -> list[bytes]:
    """Writes of awkward sizes: empty, one byte, unaligned, and larger than the staging buffer."""
    gen = torch.Generator().manual_seed(0)
    sizes = [0, 1, DIRECT_ALIGN - 1, DIRECT_ALIGN + 1, 3 * DIRECT_ALIGN + 5, 1000, 17 * DIRECT_ALIGN + 3]
    return [bytes(torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen).tolist()) for n in sizes]


def test_direct_file_writes_exactly_the_bytes_given(tmp_path: Path):
    """Through a staging buffer smaller than some writes (several O_DIRECT blocks per write), the file
    holds exactly the bytes written, `tell` counts them as they come, and the padding of the last
    block is cut off."""
    path = tmp_path / "out.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_DIRECT", 0))
    written = b""
    with DirectFile(fd, path, buffer_bytes=2 * DIRECT_ALIGN) as f:
        for piece in _pieces():
            assert f.write(memoryview(piece)) == len(piece)
            written += piece
            assert f.tell() == len(written)
    assert path.read_bytes() == written


def test_direct_file_falls_back_to_the_page_cache_where_o_direct_writes_are_refused(tmp_path, monkeypatch):
    """A file system that opens with O_DIRECT but refuses the writes (EINVAL) gets the same bytes
    through the page cache."""
    real_write, refused = os.write, []

    def write(fd, data):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0):
            refused.append(len(data))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    path = tmp_path / "out.bin"
    with create_for_writing(path) as f:
        for piece in _pieces():
            f.write(piece)
    assert path.read_bytes() == b"".join(_pieces())
    assert refused or not hasattr(os, "O_DIRECT")
