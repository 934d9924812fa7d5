"""`rl.parts.gradient_parts` on a tiny Megatron policy, one process: each part's gradient norm is the
norm of the gradient its tokens alone give (read from the DDP buffers), the parts' gradients sum to
the whole batch's, and the failure/salvaged cosine from norms of sums equals the direct one. No
optimizer step is taken and the buffers are left at zero."""

import json
from pathlib import Path

import pytest
import torch
from _tiny_policy import build_state

from scope_mega.runtime.spawn import spawn_local

pytestmark = [pytest.mark.distributed]


def _samples():
    from scope_mega.rl.batch import Sample

    g = torch.Generator().manual_seed(2)
    out = []
    for kind, adv, guide in (
        ("failure", -0.5, 0),
        ("failure", -0.5, 0),
        ("success", 1.0, 0),
        ("salvaged", 1.5, 4),
    ):
        prompt = torch.randint(3, 64, (4,), generator=g).tolist()
        response = torch.randint(3, 64, (7,), generator=g).tolist()
        off = [False] * (7 - guide) + [True] * guide
        out.append(Sample(prompt, response, [adv] * 7, off, [0.0] * 7, kind=kind))
    return out


def _grad(state, micro, loss) -> torch.Tensor:
    from scope_mega.train_step import _run_schedule

    for chunk in state.model:
        chunk.zero_grad_buffer()
    _run_schedule(state.model, state.vocab_size, micro, loss, forward_only=False, need_entropy=False)
    return torch.cat([p.main_grad.flatten().clone() for p in state.model[0].parameters()])


def _worker(out: str):
    from functools import partial

    from scope_mega.rl.batch import MicroBatchLayout, rank_micro_batches
    from scope_mega.rl.loss import PolicyLossConfig
    from scope_mega.rl.parts import gradient_parts, only_parts
    from scope_mega.rl.update import rl_loss
    from scope_mega.runtime.distributed import destroy_distributed, init_distributed

    dev = init_distributed(device="cpu", seed=3)
    state = build_state(dev, clip_grad=0.0)
    before = [p.detach().clone() for p in state.model[0].parameters()]
    samples, layout, cfg = _samples(), MicroBatchLayout(2, None, False, 1), PolicyLossConfig()
    parts = gradient_parts(state, samples, layout, 0, cfg)
    buffers_zero = all(float(p.main_grad.abs().max()) == 0 for p in state.model[0].parameters())
    unchanged = all(torch.equal(a, p) for a, p in zip(before, state.model[0].parameters()))

    loss = partial(rl_loss, cfg)
    vec = {
        name: _grad(state, rank_micro_batches([only_parts(s, keep) for s in samples], layout, 0), loss)
        for name, keep in (
            ("failure", ("failure",)),
            ("success", ("success",)),
            ("prefix", ("prefix",)),
            ("guide", ("guide",)),
            ("salvaged", ("prefix", "guide")),
        )
    }
    whole = _grad(state, rank_micro_batches(samples, layout, 0), loss)
    f, s = vec["failure"], vec["salvaged"]
    report = {
        "parts": parts,
        "norms": {k: float(v.norm()) for k, v in vec.items()} | {"all": float(whole.norm())},
        "sum_err": float(
            (vec["failure"] + vec["success"] + vec["prefix"] + vec["guide"] - whole).abs().max()
        ),
        "whole_max": float(whole.abs().max()),
        "cos": float(f @ s / (f.norm() * s.norm())),
        "buffers_zero": buffers_zero,
        "unchanged": unchanged,
    }
    Path(out).write_text(json.dumps(report))
    destroy_distributed()


def test_gradient_parts_sum_to_the_whole(tmp_path):
    out = tmp_path / "report.json"
    spawn_local(_worker, 1, str(out))
    r = json.loads(out.read_text())
    assert r["buffers_zero"] and r["unchanged"]
    for name, norm in r["norms"].items():
        assert norm > 0
        assert r["parts"][f"grad/{name}"] == pytest.approx(norm, rel=1e-5)
    assert r["sum_err"] <= 1e-6 * r["whole_max"]  # the parts' gradients add up to the batch's
    assert r["parts"]["grad/cos_failure_salvaged"] == pytest.approx(r["cos"], abs=1e-4)
