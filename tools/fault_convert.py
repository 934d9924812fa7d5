"""Conversion under faults, repeated: `hf-to-megatron` of a tiny Llama whose layer-0 q_proj is wrongly
shaped (24 x 32 where its config implies 32 x 32), and of a sound one whose writer fills the disk in
the middle of the output (the third file of every rank fails after 100 bytes, in whichever writer
thread writes it), each at TP 1, 2 and 4, `--runs` times, every run a fresh command-line process.

Each run must end with exit status 2, exactly one `convert error:` line on stderr that names the
tensor (the HF tensor for the bad shape, the Megatron tensor being written for the full disk), no
traceback, and nothing under the output's name (`<out>` or `<out>.tmp-*`). Prints one row per TP and
fault: the exit codes seen, in how many runs the tensor was named in one line, and the leftovers.

    .venv/bin/python tools/fault_convert.py --runs 10 --workdir /tmp/fault_convert
"""

from __future__ import annotations

import argparse
import collections
import errno
import io
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BAD_TENSOR = "model.layers.0.self_attn.q_proj.weight"
WRITTEN_TENSORS = ("embedding.", "decoder.", "output_layer.")  # Megatron keys a chunk file may hold
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


def write_models(workdir: Path) -> tuple[Path, Path]:
    """The sound tiny Llama and its copy with the wrongly shaped q_proj."""
    import torch
    import transformers
    from safetensors.torch import load_file, save_file

    good, bad = workdir / "hf_good", workdir / "hf_bad_shape"
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE)).save_pretrained(good)
    shutil.copytree(good, bad)
    tensors = load_file(bad / "model.safetensors")
    tensors[BAD_TENSOR] = torch.zeros(24, SHAPE["hidden_size"])
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    return good, bad


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


def full_disk_midway(path: str | Path):
    """`create_file` for the converter: chunk files `__<rank>_<n>.distcp` with n >= 3 fill the disk."""
    from scope_mega.weights.files import create_for_writing

    path = Path(path)
    if path.suffix == ".distcp" and int(path.stem.split("_")[-1]) >= 3:
        return FullDisk(path)
    return create_for_writing(path)


def full_disk_command(hf: str, out: str, tp: str) -> int:
    """`convert hf-to-megatron` as the command line runs it, with `full_disk_midway` as its writer."""
    from scope_mega.convert import add_direction_parsers, run_convert

    parser = argparse.ArgumentParser()
    add_direction_parsers(parser.add_subparsers(dest="direction", required=True))
    args = parser.parse_args(["hf-to-megatron", "--hf-dir", hf, "--out", out, "--tp", tp])
    return run_convert(args, create_file=full_disk_midway)


def one_run(fault: str, hf: Path, out: Path, tp: int) -> tuple[int, bool, list[str], float]:
    """(exit status, whether stderr is one clean line naming the tensor, leftovers, seconds)."""
    if fault == "bad shape":
        cmd = [sys.executable, "-m", "checkpoints_convert", "hf-to-megatron"]
        cmd += ["--hf-dir", str(hf), "--out", str(out), "--tp", str(tp)]
        names = (BAD_TENSOR,)
    else:
        cmd = [sys.executable, __file__, "--full-disk-run", str(hf), str(out), str(tp)]
        names = WRITTEN_TENSORS
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    lines = [line for line in result.stderr.splitlines() if line.startswith("convert error: ")]
    clean = (
        len(lines) == 1
        and any(n in lines[0] for n in names)
        and "Traceback" not in result.stderr
        and "terminated" not in result.stderr
    )
    if not clean:
        print(f"  {fault} tp={tp}: stderr tail: {result.stderr[-1500:]}", file=sys.stderr)
    leftovers = sorted(p.name for p in out.parent.iterdir() if p.name.startswith(out.name))
    for name in leftovers:
        shutil.rmtree(out.parent / name, ignore_errors=True)
    return result.returncode, clean, leftovers, seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--faults", nargs="+", default=["bad shape", "full disk"])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/fault_convert"))
    parser.add_argument("--full-disk-run", nargs=3, metavar=("HF", "OUT", "TP"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.full_disk_run:
        from scope_mega.convert import exit_without_teardown

        exit_without_teardown(full_disk_command(*args.full_disk_run))
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    good, bad = write_models(args.workdir)
    rows = []
    for fault in args.faults:
        for tp in args.tp:
            codes, clean, left, times = collections.Counter(), 0, [], []
            for i in range(args.runs):
                out = args.workdir / f"out_{fault.replace(' ', '_')}_tp{tp}_{i}"
                code, ok, leftovers, seconds = one_run(fault, bad if fault == "bad shape" else good, out, tp)
                codes[code] += 1
                clean += ok
                left += leftovers
                times.append(seconds)
            rows.append((tp, fault, args.runs, dict(codes), clean, left, sum(times) / len(times)))
            print(f"done: tp={tp} {fault}: {dict(codes)}", file=sys.stderr, flush=True)
    header = ("TP", "fault", "runs", "exit codes seen", "tensor named", "leftovers", "s/run")
    print("{:>2}  {:<10} {:>4}  {:<16} {:<13} {:<10} {}".format(*header))
    for tp, fault, runs, codes, clean, left, seconds in rows:
        seen = ", ".join(f"{c}: {n}x" for c, n in sorted(codes.items()))
        print(
            f"{tp:>2}  {fault:<10} {runs:>4}  {seen:<16} {f'{clean}/{runs}':<13} "
            f"{(', '.join(left) or 'none'):<10} {seconds:.1f}"
        )
    ok = all(codes == {2: runs} and clean == runs and not left for _, _, runs, codes, clean, left, _ in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
