"""Shared pytest setup: vLLM's settings for tests, and the repository's own data folder."""

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# Before anything imports vLLM (the trainer's subprocesses inherit them): its engine core in the test's
# own process, and 1 GiB of CPU KV cache per engine instead of vLLM's default share of the machine.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """`data/` of this checkout: the math benchmarks and the verifier's graded responses."""
    return REPO_ROOT / "data"
