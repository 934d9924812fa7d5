"""Benchmark `scope-mega export-fp8` against the bf16 export (`convert megatron-to-hf`) of the same
Megatron checkpoint: wall time and peak memory of each, measured in this run.

A synthetic bf16 checkpoint of a real shape (tools/bench_convert.py's) is imported to Megatron; a
Countdown tokenizer and a run config naming that model calibrate the FP8 export. Both exports then
run as subprocesses; for each it prints the wall time, the peak RSS of its largest process and the
sampled peak of its tree's summed PSS, and the FP8 export's ratios to the bf16 one. Both stream one
layer at a time, so the FP8 export's peak should stay near the bf16 export's (its extra: one layer's
calibration activations and fp32 copies of one weight at a time).

    .venv/bin/python tools/bench_fp8_export.py llama3-1b --workdir /tmp/bench_fp8 --calib-prompts 16
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convert import GB, SHAPES, helper, measure  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def write_run_config(hf: Path, run_dir: Path, out: Path) -> None:
    """The demo's config with `hf` as the model and `run_dir` holding a freshly trained tokenizer."""
    import yaml

    from scope_mega.tasks import prepare_tokenizer
    from scope_mega.validation import load_config

    data = yaml.safe_load((REPO / "examples" / "tiny_cpu.yaml").read_text())
    data.update(run_dir=str(run_dir))
    data["model"]["hf_config"] = str(hf)
    out.write_text(yaml.safe_dump(data))
    prepare_tokenizer(load_config(out))


def main() -> None:
    if sys.argv[1:2] == ["_config"]:
        return write_run_config(*(Path(a) for a in sys.argv[2:5]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("--workdir", default="/tmp/bench_fp8", help="scratch folder, deleted after")
    parser.add_argument("--calib-prompts", type=int, default=16)
    args = parser.parse_args()
    work = Path(args.workdir)
    if work.exists():
        raise SystemExit(f"{work} exists; choose another --workdir")
    hf, meg, config = work / "hf", work / "megatron", work / "run.yaml"
    try:
        helper("_synthetic", args.shape, str(hf), str(2 * 10**9))
        convert = [sys.executable, "-m", "checkpoints_convert"]
        subprocess.run([*convert, "hf-to-megatron", "--hf-dir", str(hf), "--out", str(meg)], check=True)
        subprocess.run(
            [sys.executable, __file__, "_config", str(hf), str(work / "run"), str(config)], check=True
        )
        bf16 = measure("megatron-to-hf (bf16)", [*convert, "megatron-to-hf", "--megatron-dir", str(meg),
                                                 "--out", str(work / "bf16")])  # fmt: skip
        cmd = [sys.executable, "-m", "scope_mega.cli", "export-fp8", str(meg), "--out", str(work / "fp8")]
        fp8 = measure(
            "export-fp8", [*cmd, "--config", str(config), "--calib-prompts", str(args.calib_prompts)]
        )
        size = lambda folder: sum(p.stat().st_size for p in folder.glob("*.safetensors")) / GB
        print(f"\n{args.shape}: {args.calib_prompts} calibration prompts")
        print(f"{'step':<24}{'wall s':>8}{'peak RSS 1 proc':>17}{'peak PSS all':>14}{'written':>10}")
        for run, folder in ((bf16, work / "bf16"), (fp8, work / "fp8")):
            print(
                f"{run.name:<24}{run.wall_s:>8.1f}{run.max_rss / GB:>14.2f} GB{run.tree_pss / GB:>11.2f} GB"
                f"{size(folder):>7.2f} GB"
            )
        ratio = size(work / "fp8") / size(work / "bf16")
        print(
            f"FP8 / bf16: wall {fp8.wall_s / bf16.wall_s:.2f}x, peak RSS {fp8.max_rss / bf16.max_rss:.2f}x, "
            f"peak PSS {fp8.tree_pss / bf16.tree_pss:.2f}x, size {ratio:.2f}x"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
