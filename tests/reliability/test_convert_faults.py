"""Conversion under faults (issue 27, items 1 and 10): a wrongly shaped HF tensor at TP 1, 2 and 4, a
writer that fails in the middle of the output (import and export), an unknown `model_type` and
`--tp 0` each end in exactly one `convert error:` line that names the problem, exit status 2, no
traceback, and nothing under the output's name: neither `<out>` nor a `<out>.tmp-*` folder. A
published import is checked against its own index before the rename that publishes it.

Faults are injected through `run_convert`'s `create_file` argument (how output files are opened),
which reaches the writer threads of every spawned process; tools/fault_convert.py repeats these runs.
"""

from __future__ import annotations

import argparse
import errno
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from checkpoints_convert.__main__ import main
from scope_mega.convert import add_direction_parsers, run_convert
from scope_mega.weights import files

BAD_TENSOR = "model.layers.0.self_attn.q_proj.weight"
# 4 query and 4 KV heads: TP 4 divides both; hidden 32 -> q_proj is 32 x 32
SHAPE = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    vocab_size=64,
    max_position_embeddings=32,
    tie_word_embeddings=False,
)


def tiny_llama(path: Path, bad_shape: bool = False) -> Path:
    """A random tiny Llama; with `bad_shape`, its layer-0 q_proj has 24 rows where the config implies 32."""
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE)).save_pretrained(path)
    if bad_shape:
        tensors = load_file(path / "model.safetensors")
        tensors[BAD_TENSOR] = torch.zeros(24, SHAPE["hidden_size"])
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


class FullDisk(io.RawIOBase):
    """An output file that takes 100 bytes, then fails as a full disk does."""

    def __init__(self, path: str | Path):
        super().__init__()
        self.file = open(path, "wb")  # noqa: SIM115 (closed by close())
        self.name = str(path)

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.file.tell()

    def write(self, data) -> int:
        if self.file.tell() + len(memoryview(data).cast("B")) > 100:
            raise OSError(errno.ENOSPC, "No space left on device", self.name)
        return self.file.write(data)

    def close(self) -> None:
        self.file.close()
        super().close()


class LosesBytes(FullDisk):
    """An output file that keeps only the first half of every write but reports it all written, its
    position included (a file system that loses data): only reading the output back can tell."""

    def __init__(self, path: str | Path):
        super().__init__(path)
        self.position = 0

    def tell(self) -> int:
        return self.position

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.file.write(view[: len(view) // 2])
        self.position += len(view)
        return len(view)


def _number(path: Path) -> int:
    """n of `__<rank>_<n>.distcp` or `model-<n>-of-<total>.safetensors`; 0 for any other file."""
    if path.suffix == ".distcp":
        return int(path.stem.split("_")[-1])
    if path.suffix == ".safetensors":
        return int(path.stem.split("-")[1])
    return 0


def losing_bytes_in_file_3(path: str | Path):
    path = Path(path)
    return LosesBytes(path) if _number(path) == 3 else files.create_for_writing(path)


def full_disk_midway(path: str | Path):
    """`create_file` whose third output file (and each one after it) fills the disk: some files are
    complete, one is half-written when the error comes, in whichever writer thread writes it."""
    path = Path(path)
    return FullDisk(path) if _number(path) >= 3 else files.create_for_writing(path)


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_direction_parsers(parser.add_subparsers(dest="direction", required=True))
    return parser.parse_args(argv)


def _one_error_line(capfd, status: int) -> str:
    """`status` must be 2 and stderr (this process's and its children's) one `convert error:` line
    besides library warnings, with no traceback."""
    err = capfd.readouterr().err
    assert status == 2, err[-3000:]
    assert "Traceback" not in err and "terminated" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("convert error: ")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(out.name))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_wrongly_shaped_tensor_is_one_line_and_publishes_nothing(capfd, tmp_path: Path, tp: int):
    hf = tiny_llama(tmp_path / "hf", bad_shape=True)
    out = tmp_path / "out"
    capfd.readouterr()
    status = main(["hf-to-megatron", "--hf-dir", str(hf), "--out", str(out), "--tp", str(tp)])
    line = _one_error_line(capfd, status)
    assert BAD_TENSOR in line and "(24, 32)" in line and "(32, 32)" in line, line
    assert _leftovers(out) == []


@pytest.mark.distributed
def test_writer_failing_mid_output_is_one_line_and_publishes_nothing(capfd, tmp_path: Path):
    hf = tiny_llama(tmp_path / "hf")
    out = tmp_path / "out"
    capfd.readouterr()
    args = _parse("hf-to-megatron", "--hf-dir", str(hf), "--out", str(out), "--tp", "2")
    line = _one_error_line(capfd, run_convert(args, create_file=full_disk_midway))
    assert "No space left on device" in line and ".distcp" in line, line
    assert any(key in line for key in ("decoder.layers.", "embedding.", "output_layer.")), line
    assert _leftovers(out) == []


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imported")
    hf = tiny_llama(root / "hf")
    status = main(["hf-to-megatron", "--hf-dir", str(hf), "--out", str(root / "megatron")])
    assert status == 0
    return root / "megatron"


def test_export_writer_failing_mid_output_is_one_line_and_publishes_nothing(
    capfd, imported: Path, tmp_path: Path
):
    out = tmp_path / "out"
    capfd.readouterr()
    args = _parse("megatron-to-hf", "--megatron-dir", str(imported), "--out", str(out))
    args.max_shard_size = 10_000  # several shards: the third one fails
    line = _one_error_line(capfd, run_convert(args, create_file=full_disk_midway))
    assert "No space left on device" in line and "model-00003-of-" in line and "model." in line, line
    assert _leftovers(out) == []


def test_writer_losing_bytes_is_caught_before_publishing(capfd, imported: Path, tmp_path: Path):
    """Writes that report success but lose data: import and export each read their output back, refuse
    it in one line naming the short file, and publish nothing."""
    hf, out = imported.parent / "hf", tmp_path / "out"
    for argv, short_file in (
        (("hf-to-megatron", "--hf-dir", str(hf), "--out", str(out)), "__0_3.distcp"),
        (("megatron-to-hf", "--megatron-dir", str(imported), "--out", str(out)), "model-00003-of-"),
    ):
        args = _parse(*argv)
        if args.direction == "megatron-to-hf":
            args.max_shard_size = 10_000
        capfd.readouterr()
        line = _one_error_line(capfd, run_convert(args, create_file=losing_bytes_in_file_3))
        assert short_file in line, line
        assert _leftovers(out) == []


def test_published_import_is_verified_against_its_index(imported: Path, tmp_path: Path):
    """The check import runs before its rename: a chunk file cut short, or a chunk missing from
    the index, is refused with the file named."""
    from scope_mega.weights.hf_to_megatron import check_import_output
    from scope_mega.weights.mapping import ConversionError

    hf = transformers.AutoConfig.from_pretrained(imported / "hf")
    check_import_output(hf, imported)  # a published import passes
    copy = tmp_path / "copy"
    shutil.copytree(imported, copy)
    shard = max((copy / "model").glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ConversionError, match=f"{shard.name}.* bytes"):
        check_import_output(hf, copy)
    shard.write_bytes(b"")
    with pytest.raises(ConversionError, match=shard.name):
        check_import_output(hf, copy)


def test_unknown_model_type_is_one_line(capfd, tmp_path: Path):
    hf = tiny_llama(tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "model_type": "llamaz"}))
    out = tmp_path / "out"
    capfd.readouterr()
    line = _one_error_line(capfd, main(["hf-to-megatron", "--hf-dir", str(hf), "--out", str(out)]))
    assert "unsupported architecture 'llamaz'" in line, line
    assert _leftovers(out) == []


@pytest.mark.parametrize("flag", ["--tp", "--pp"])
def test_zero_parallel_size_is_one_line(capfd, tmp_path: Path, flag: str):
    hf = tiny_llama(tmp_path / "hf")
    out = tmp_path / "out"
    capfd.readouterr()
    line = _one_error_line(capfd, main(["hf-to-megatron", "--hf-dir", str(hf), "--out", str(out), flag, "0"]))
    assert f"{flag} must be >= 1, got 0" in line, line
    assert _leftovers(out) == []
