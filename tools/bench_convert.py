"""Benchmark HF <-> Megatron conversion on a synthetic checkpoint of a real shape, next to a plain copy.

Writes random bf16 weights of a named shape one tensor at a time (never the whole model in memory),
then runs, each as its own subprocess, `--repeats` interleaved rounds of: `cp -r` of the HF folder
(the physical reference), `hf-to-megatron`, `megatron-to-hf`. Each step reads its input from disk,
as on a cluster: the input is synced and dropped from the page cache first (else the copy and import
would read the synthetic files from memory, and export the files import wrote with O_DIRECT from
disk). For each it prints the median wall time (a copy of the same files took from 0.8 to 8.7 s in
different runs on a shared VM), the peak RSS of the largest process of the subprocess tree (`wait4`
rusage) and the sampled peak of the tree's summed PSS (shared pages counted once), beside the
largest single tensor. After the first round it checks, one tensor at a time, that the exported
weights equal the synthetic ones bit for bit. This process stays small (torch is only imported in
the helper subprocesses), because a child's peak RSS starts at its parent's at fork.

Last, both commands run again on a tiny model of the same family (2 layers, hidden size 64): their
wall time there is the fixed cost of a command (interpreter, torch / transformers / Megatron imports,
setup, exit), printed as a breakdown of the wall times above, which stay the figures that count,
next to the floor under any command: starting Python and importing torch.

    .venv/bin/python tools/bench_convert.py llama3-8b --workdir /tmp/bench_convert
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

LLAMA3 = dict(
    model_type="llama",
    vocab_size=128256,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    num_attention_heads=32,
    num_key_value_heads=8,
    dtype="bfloat16",
)
SHAPES = {
    "llama3-1b": dict(  # Llama-3.2-1B
        LLAMA3,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        head_dim=64,
        tie_word_embeddings=True,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=32.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
    ),
    "llama3-8b": dict(  # Llama-3.1-8B
        LLAMA3,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        head_dim=128,
        tie_word_embeddings=False,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
    ),
}
# Same family, vocabulary and tying as the shape, but tens of MB: what a command costs whatever the size.
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
)
GB = 1e9


@dataclass
class Run:
    name: str
    wall_s: float
    max_rss: int  # bytes, largest single process of the tree
    tree_pss: int  # bytes, sampled peak of the sum over the tree


def write_synthetic(shape: str, out: Path, shard_bytes: int, tiny: bool = False) -> None:
    """Random bf16 HF checkpoint of `shape`, or of its `TINY` variant (names and shapes from
    transformers on the meta device)."""
    import torch
    import transformers

    from scope_mega.weights.files import SafetensorsShardWriter, TensorPlan

    params = dict(SHAPES[shape], **(TINY if tiny else {}))
    config = transformers.AutoConfig.for_model(params.pop("model_type"), **params)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    state = model.state_dict()
    names = [n for n in state if not (config.tie_word_embeddings and n == "lm_head.weight")]
    plan = [TensorPlan(n, tuple(state[n].shape), torch.bfloat16) for n in names]
    out.mkdir(parents=True)
    writer = SafetensorsShardWriter(out, plan, shard_bytes)
    gen = torch.Generator().manual_seed(0)
    for item in plan:
        writer.write(item.name, (0.02 * torch.randn(item.shape, generator=gen)).to(torch.bfloat16))
    writer.close()
    config.save_pretrained(out)
    largest = max(item.nbytes for item in plan)
    (out.parent / "sizes.json").write_text(json.dumps({"total": writer.total_bytes, "largest": largest}))


def measure(name: str, cmd: list[str]) -> Run:
    """Run `cmd`, sampling the summed PSS of its process tree every 0.1 s; fail if it fails. The
    child is the first the kernel's OOM killer picks, so an overrun never hits other work."""
    proc = subprocess.Popen(cmd)
    Path(f"/proc/{proc.pid}/oom_score_adj").write_text("1000")
    peak, done = [0], threading.Event()

    def pss(p: psutil.Process) -> int:
        try:
            return p.memory_full_info().pss
        except psutil.Error:
            return 0

    def sample() -> None:
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                tree = [root, *root.children(recursive=True)]
            except psutil.Error:
                tree = []
            peak[0] = max(peak[0], sum(pss(p) for p in tree))
            done.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    start = time.perf_counter()
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{name} failed with status {proc.returncode}: {' '.join(cmd)}")
    return Run(name, wall, usage.ru_maxrss * 1024, peak[0])


def verify(original: Path, exported: Path) -> None:
    """Compare every tensor bit for bit, one at a time."""
    import torch
    from safetensors import safe_open

    from scope_mega.weights.files import INDEX_NAME

    weight_map = json.loads((original / INDEX_NAME).read_text())["weight_map"]
    exported_map = json.loads((exported / INDEX_NAME).read_text())["weight_map"]
    if sorted(weight_map) != sorted(exported_map):
        raise SystemExit("exported tensor names differ from the original")
    for name, shard in weight_map.items():
        with safe_open(original / shard, "pt") as a, safe_open(exported / exported_map[name], "pt") as b:
            x, y = a.get_tensor(name), b.get_tensor(name)
        if x.dtype != y.dtype or not torch.equal(x.view(torch.int16), y.view(torch.int16)):
            raise SystemExit(f"{name} differs after the round trip")
    print(f"{len(weight_map)} tensors bitwise identical after HF -> Megatron -> HF")


def evict(folder: Path) -> None:
    """Sync the files under `folder` and drop them from the page cache, so that the next step reads
    them from disk."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def median(runs: list[Run]) -> float:
    return statistics.median(r.wall_s for r in runs)


def helper(*args: str) -> None:
    """Run a helper of this script in a subprocess (keeps torch and its memory out of this process)."""
    subprocess.run([sys.executable, __file__, *args], check=True)


def main() -> None:
    if sys.argv[1:2] == ["_synthetic"]:
        return write_synthetic(sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), sys.argv[5:] == ["tiny"])
    if sys.argv[1:2] == ["_verify"]:
        return verify(Path(sys.argv[2]), Path(sys.argv[3]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("--workdir", default="/tmp/bench_convert", help="scratch folder, deleted after")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--shard-gb", type=float, default=2.0, help="shard size of input and output")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of copy, import, export")
    args = parser.parse_args()
    work = Path(args.workdir)
    if work.exists():
        raise SystemExit(f"{work} exists; choose another --workdir")
    hf = str(work / "hf")
    convert = [sys.executable, "-m", "checkpoints_convert"]
    try:
        start = time.perf_counter()
        helper("_synthetic", args.shape, hf, str(int(args.shard_gb * GB)))
        sizes = json.loads((work / "sizes.json").read_text())
        total, largest = sizes["total"], sizes["largest"]
        print(
            f"{args.shape}: {total / GB:.2f} GB bf16 written in {time.perf_counter() - start:.0f} s",
            flush=True,
        )
        par = ["--tp", str(args.tp), "--pp", str(args.pp)]
        shard = ["--max-shard-size", f"{args.shard_gb}GB"]

        def commands(folder: Path) -> list[list[str]]:
            src, meg, out = (str(folder / sub) for sub in ("hf", "megatron", "back"))
            imp = [*convert, "hf-to-megatron", "--hf-dir", src, "--out", meg, *par]
            return [imp, [*convert, "megatron-to-hf", "--megatron-dir", meg, "--out", out, *shard]]

        def rounds(folder: Path, names: list[str], verify_first: bool = False) -> list[list[Run]]:
            """`--repeats` rounds of copy, import, export (interleaved, so that a slow spell of the
            machine hits all three); the outputs are deleted after each round."""
            steps = [["cp", "-r", str(folder / "hf"), str(folder / "copy")], *commands(folder)]
            inputs = [folder / "hf", folder / "hf", folder / "megatron"]
            out: list[list[Run]] = [[] for _ in names]
            for i in range(args.repeats):
                for runs, name, cmd, source in zip(out, names, steps, inputs):
                    evict(source)
                    runs.append(measure(name, cmd))
                if verify_first and i == 0:
                    helper("_verify", str(folder / "hf"), str(folder / "back"))
                for sub in ("copy", "megatron", "back"):
                    shutil.rmtree(folder / sub)
            return out

        names = ["plain copy (cp -r)", f"hf-to-megatron tp={args.tp} pp={args.pp}", "megatron-to-hf"]
        steps = rounds(work, names, verify_first=True)
        tiny = work / "tiny"
        helper("_synthetic", args.shape, str(tiny / "hf"), str(int(args.shard_gb * GB)), "tiny")
        fixed = [median(runs) for runs in rounds(tiny, names)[1:]]
        floor = median([measure("import torch", [sys.executable, "-c", "import torch"]) for _ in range(3)])
        copy = median(steps[0])
        print(f"\nwall: median of {args.repeats} (min-max); peak memory: the largest over them")
        print(
            f"{'step':<28}{'wall s':>8}{'(min-max)':>14}{'x copy':>8}{'GB/s':>7}"
            f"{'peak RSS 1 proc':>17}{'peak PSS all':>14}"
        )
        for runs in steps:
            wall = median(runs)
            spread = f"({min(r.wall_s for r in runs):.1f}-{max(r.wall_s for r in runs):.1f})"
            print(
                f"{runs[0].name:<28}{wall:>8.1f}{spread:>14}{wall / copy:>8.1f}{total / GB / wall:>7.2f}"
                f"{max(r.max_rss for r in runs) / GB:>14.2f} GB{max(r.tree_pss for r in runs) / GB:>11.2f} GB"
            )
        print(f"model {total / GB:.2f} GB; largest single tensor {largest / GB:.2f} GB")
        tiny_gb = json.loads((tiny / "sizes.json").read_text())["total"] / GB
        print(f"\nbreakdown: fixed cost = the same command on a tiny {args.shape} ({tiny_gb:.2f} GB)")
        for runs, f in zip(steps[1:], fixed):
            rest = median(runs) - f
            model = f"{rest:5.1f} s for the model ({rest / copy:.1f} x copy)"
            print(f"{runs[0].name:<28}{f:>6.1f} s fixed + {model}")
        print(
            f"floor: starting Python and importing torch (which any torch_dist writer or reader needs) "
            f"takes {floor:.1f} s, {floor / copy:.1f} x copy"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
