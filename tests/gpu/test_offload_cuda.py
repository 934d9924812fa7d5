"""`rl.offload`'s bitwise round trip on a CUDA device (pinned host memory), one process: the same
checks as tests/distributed/test_offload.py on CPU. Skipped without CUDA."""

import sys
from pathlib import Path

import pytest
import torch

from scope_mega.runtime.spawn import spawn_local

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_offload_round_trip_is_bitwise_on_cuda():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))  # spawned children too
    from test_offload import _worker

    spawn_local(_worker, 1, "cuda")
