"""The THD layout on Transformer Engine: tests/distributed/test_packing_trainer.py's comparison on a
CUDA device in bf16, where TE's variable-length attention (not the local one a segment at a time)
runs the packed rows. The bf16 tolerance is measured in the same run: the padded-packed micro-batches
(the same kernels as the padded ones at other shapes) set the noise level. Figures printed. Skipped
without CUDA or Transformer Engine."""

import json
import sys
from pathlib import Path

import pytest
import torch
from _requires import NEEDS_TE

from scope_mega.runtime.spawn import spawn_local

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@NEEDS_TE
def test_thd_rows_on_transformer_engine_match_padded_rows(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))  # spawned children too
    from test_packing_trainer import _worker

    out = tmp_path / "report.json"
    spawn_local(_worker, 1, str(out), "cuda", "bfloat16")
    r = json.loads(out.read_text())
    print(json.dumps({k: v for k, v in r.items() if k != "shapes"}, indent=1))
    assert r["attention"] == ["TEDotProductAttention"]
    noise = max(r["mean_diff"]["packed"], 1e-3)
    assert r["mean_diff"]["thd"] <= 3 * noise and r["max_diff"]["thd"] <= 0.1
    for agg in ("token_mean", "seq_mean"):
        assert r["loss"][f"{agg}/thd"] == pytest.approx(r["loss"][f"{agg}/padded"], rel=2e-2, abs=1e-3)
    assert r["grad_norm"]["thd"] == pytest.approx(r["grad_norm"]["padded"], rel=2e-2)
    assert all(b == 1 and s % 16 == 0 for b, s in r["shapes"]["thd"])
    assert r["tokens"]["thd"] == r["lengths"] and r["waste"]["thd"] < r["waste"]["packed"]
