"""The environment part of the GPU check (tests/gpu/run.sh): package versions, the GPU and its driver,
whether every module of scope_mega and checkpoints_convert imports, and on CUDA two device figures:
the pinned host <-> device copy bandwidth (the ceiling of `rl.offload`'s transfers) and a large bf16
GEMM's rate (a reference for the bench's model FLOP/s). Writes one JSON file (the first argument); exits
non-zero when a module fails to import. Not a test module: pytest does not collect it.

    python3 tests/gpu/probe_env.py OUT.json
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import pkgutil
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

PACKAGES = [
    "torch", "transformers", "megatron-core", "math-verify", "latex2sympy2_extended",
    "antlr4-python3-runtime", "numpy", "safetensors", "sentencepiece", "tokenizers", "triton", "pytest",
    "pytest-timeout",
    # not in the image nor the kit: the tests that need them skip
    "vllm", "transformer-engine", "nvidia-modelopt", "wandb",
]  # fmt: skip


def versions() -> dict[str, str | None]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def import_failures() -> tuple[int, dict[str, str]]:
    """Import every module of the two packages; return their number and the failures' errors."""
    count, failed = 0, {}
    for top in ("scope_mega", "checkpoints_convert"):
        pkg = importlib.import_module(top)
        for mod in pkgutil.walk_packages(pkg.__path__, top + "."):
            count += 1
            try:
                importlib.import_module(mod.name)
            except Exception as e:  # reported, not raised
                failed[mod.name] = f"{type(e).__name__}: {e}"[:500]
    return count + 2, failed


def nvidia_smi() -> dict[str, str] | None:
    try:
        line = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout.splitlines()[0]  # fmt: skip
    except (OSError, subprocess.SubprocessError, IndexError):
        return None
    name, driver, memory = (s.strip() for s in line.split(","))
    return {"name": name, "driver": driver, "memory": memory}


def _best_seconds(fn, repeats: int = 5) -> float:
    best = float("inf")
    for i in range(repeats + 1):  # the first is a warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        if i:
            best = min(best, time.perf_counter() - start)
    return best


def _copy_bandwidth(n: int) -> tuple[float, float]:
    """GB/s of n-byte copies from pinned host memory to the GPU and back."""
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    h2d = _best_seconds(lambda: dev.copy_(host, non_blocking=True))
    d2h = _best_seconds(lambda: host.copy_(dev, non_blocking=True))
    return n / h2d / 1e9, n / d2h / 1e9


def device_figures() -> dict[str, float]:
    """GB/s of 1 GiB copies between pinned host memory and the GPU, each way; TFLOP/s of a bf16
    8192 x 8192 x 8192 matmul on random data (best of 5 after a warm-up)."""
    h2d, d2h = _copy_bandwidth(1 << 30)
    a, b = (torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    gemm = _best_seconds(lambda: a @ b)
    tflops = 2 * 8192**3 / gemm / 1e12
    return {"pinned_h2d_gb_s": h2d, "pinned_d2h_gb_s": d2h, "gemm_bf16_8192_tflops": tflops}


def main() -> int:
    cuda = torch.cuda.is_available()
    env: dict = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": cuda,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "versions": versions(),
        "nvidia_smi": nvidia_smi(),
    }
    if cuda:
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 2),
            "multiprocessors": props.multi_processor_count,
        }
    env["modules"], env["import_failures"] = import_failures()
    if cuda:
        env["device_figures"] = device_figures()
    Path(sys.argv[1]).write_text(json.dumps(env, indent=1) + "\n")
    print(json.dumps(env, indent=1))
    return 1 if env["import_failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
