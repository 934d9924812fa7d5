"""Build the GPU kit: the cp312 wheels that `tests/gpu/run.sh` installs on a bare CUDA machine.

    python3 tools/gpu_kit.py            # or `make gpu-kit`; writes .gpu-kit/ (git-ignored)

The target is the device image described in docs/gpu/README.md: Python 3.12, torch 2.11 (CUDA 13),
transformers 5.17, safetensors, sentencepiece, numpy, pyyaml, psutil, tqdm, matplotlib, requests,
pytest and pytest-timeout already there, and no package index. The kit holds, without their
dependencies (`pip download --no-deps`: each needed one is named in KIT), the packages of
pyproject.toml's dependencies that the image lacks and that the GPU checks import. Left out on purpose:
wandb (imported only when `wandb_mode` is not `disabled`, and every GPU check disables it),
nvidia-modelopt (imported only by `export-fp8`, whose GPU test needs vLLM first), and vLLM and
Transformer Engine (CUDA wheels far over the 64 MiB a device call may carry: their tests skip).

Contract: the folder holds exactly KIT's wheels, one version each (two versions of one package stop
`pip install --no-index`), at most MAX_MIB in all; the script exits non-zero otherwise. It needs pip
and the network, not Python 3.12 (pip is told the target's version and platforms).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The versions .venv resolves on CPU (pyproject.toml's ranges), so both sides run the same code.
KIT = [
    "megatron-core==0.16.1",  # a cp312 manylinux wheel (2.5 MiB); needs torch, numpy, packaging: in the image
    "math-verify==0.9.0",  # the reward verifier (scope_mega/rewards/math_verifier.py)
    "latex2sympy2_extended==1.11.0",  # math-verify's parser, pinned by it; needs sympy: in the image
    "antlr4-python3-runtime==4.13.2",  # the parser's runtime (latex2sympy2_extended allows 4.9.3-4.13.2)
    # the image has 0.2.2, whose BPE trainer aborts on the Countdown corpus (bpe_model_trainer.cc:45
    # "Check failed: freq > 0") when merges run out before vocab_size; 0.2.3, as .venv has, does not
    "sentencepiece==0.2.3",
]
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (28, 27, 24, 17)] + ["manylinux2014_x86_64"]
MAX_MIB = 40
RUN_COMMAND = "bash tests/gpu/run.sh"


def download(dest: Path) -> list[Path]:
    """Download KIT's wheels for CPython 3.12 on x86-64 Linux into a fresh `dest`; return them."""
    tmp = Path(tempfile.mkdtemp(prefix=".gpu-kit-", dir=dest.parent))
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    cmd += ["--python-version", "3.12", "--implementation", "cp", "-d", str(tmp)]
    cmd += [arg for p in PLATFORMS for arg in ("--platform", p)]
    try:
        subprocess.run([*cmd, *KIT], check=True)
    except BaseException:
        shutil.rmtree(tmp)
        raise
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return sorted(dest.glob("*.whl"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / ".gpu-kit", help="the kit's folder (replaced)")
    args = parser.parse_args()
    out = args.out.resolve()
    wheels = download(out)
    if len(wheels) != len(KIT):
        print(f"expected {len(KIT)} wheels, got {[w.name for w in wheels]}", file=sys.stderr)
        return 1
    total = sum(w.stat().st_size for w in wheels)
    for w in wheels:
        print(f"{w.stat().st_size / 2**20:7.2f} MiB  {w.name}")
    print(f"{total / 2**20:7.2f} MiB  in all (limit {MAX_MIB} MiB)")
    if total > MAX_MIB * 2**20:
        return 1
    carry = out.relative_to(REPO) if out.is_relative_to(REPO) else out
    print(f"\ncarry: {carry}\ncommand (repository root on the GPU machine): {RUN_COMMAND}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
