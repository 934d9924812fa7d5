"""Token-balanced data parallelism (`rl.balance.balance_samples`) with real process groups, one spawn of 4
gloo processes.

At TP=2 x DP=2 and PP=2 x DP=2 every rank of a replica ends with the same samples, and the replicas
together hold each of the step's samples exactly once. At DP=4, with replicas of 5 long, 2 short, no
and 1 short samples, one `update_policy` step on the balanced samples gives the unbalanced step's
loss, entropy, grad norm and reduced gradient within fp32 rounding (the loss's normaliser is summed
over every replica: token_mean's tokens, seq_mean's sequences): loss and entropy within 1e-6
relative, grad norm within 1e-5, every gradient entry within 1e-6 of the largest. The weights after
the step are not compared: Adam's first step, g / (|g| + eps), blows a rounding-sized gradient entry
up to a visible step (2e-5 at lr 1e-3 seen here), whatever the placement."""

import json
import random
from pathlib import Path

import pytest
import torch
from _tiny_policy import build_state

from scope_mega.runtime.spawn import spawn_local

pytestmark = [pytest.mark.distributed]

COUNTS = [5, 2, 0, 1]  # samples per replica at DP=4 (replica 2: dynamic sampling dropped its groups)


def _samples(replica: int, n: int):
    """`n` samples of replica `replica`: long responses on replica 0, short ones elsewhere."""
    from scope_mega.rl.batch import Sample

    rng = random.Random(replica)
    out = []
    for _ in range(n):
        prompt = [rng.randrange(3, 64) for _ in range(rng.randint(4, 8))]
        length = rng.randint(30, 60) if replica == 0 else rng.randint(3, 10)
        response = [rng.randrange(3, 64) for _ in range(length)]
        off = [rng.random() < 0.2 for _ in range(length)]
        out.append(Sample(prompt, response, [rng.uniform(-1, 1)] * length, off, [-1.0] * length))
    return out


def _key(s) -> tuple:
    return (tuple(s.prompt_ids), tuple(s.response_ids), tuple(s.advantages), tuple(s.off_policy))


def _gather(obj) -> list:
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _check_layout(tp: int, pp: int) -> None:
    """Every rank of a replica holds its replica's samples; after balancing, the replica's ranks agree
    and the replicas hold every sample once."""
    from megatron.core import parallel_state

    from scope_mega.rl.balance import balance_samples
    from scope_mega.runtime.distributed import destroy_distributed, init_distributed

    init_distributed(tp=tp, pp=pp, device="cpu", seed=1)
    replica = parallel_state.get_data_parallel_rank()
    mine = _samples(replica, [6, 1][replica])
    moved, metrics = balance_samples(mine)
    seen = _gather((replica, [_key(s) for s in mine], [_key(s) for s in moved]))
    views = {r: [(b, a) for rep, b, a in seen if rep == r] for r in (0, 1)}
    for r, v in views.items():
        assert len(v) == tp * pp and all(x == v[0] for x in v), (tp, pp, r)
    before = sorted(k for v in views.values() for k in v[0][0])
    assert sorted(k for v in views.values() for k in v[0][1]) == before, (tp, pp)
    assert metrics["balance/imbalance_after"] < metrics["balance/imbalance_before"]
    destroy_distributed(keep_process_group=True)


def _step(samples, aggregation: str) -> tuple[dict, torch.Tensor]:
    """One `update_policy` step of this replica's `samples` from seed 0's weights: its metrics and the
    reduced gradient (Megatron's `main_grad` buffers, scaled by the global normaliser)."""
    from scope_mega.config import RunConfig, from_dict
    from scope_mega.rl.batch import no_loss_sample, to_micro_batches
    from scope_mega.rl.update import update_policy

    cfg = from_dict(RunConfig, {"loss": {"aggregation": aggregation, "entropy_coef": 0.01}})
    state = build_state(torch.device("cpu"), lr=1e-3)
    micro = to_micro_batches(samples or [no_loss_sample(0)], 2, pad_id=0)
    metrics = update_policy(state, micro, cfg, {})
    return metrics, torch.cat([p.main_grad.flatten() for p in state.model[0].parameters()])


def _worker(out: str):
    import torch.distributed as dist
    from megatron.core import parallel_state

    from scope_mega.rl.balance import balance_samples
    from scope_mega.runtime.distributed import destroy_distributed, init_distributed

    for tp, pp in [(2, 1), (1, 2)]:
        _check_layout(tp, pp)
    init_distributed(device="cpu", seed=1)
    replica = parallel_state.get_data_parallel_rank()
    mine = _samples(replica, COUNTS[replica])
    moved, balance = balance_samples(mine)
    everyone = _gather(([_key(s) for s in mine], [_key(s) for s in moved]))
    before, after = (sorted(k for pair in everyone for k in pair[i]) for i in (0, 1))
    report = {
        "balance": balance,
        "exactly_once": before == after,
        "tokens": [sum(len(k[0]) + len(k[1]) for k in a) for _, a in everyone],
    }
    for aggregation in ("token_mean", "seq_mean"):
        (m0, g0), (m1, g1) = _step(mine, aggregation), _step(moved, aggregation)
        report[aggregation] = {
            "unbalanced": {k: m0[k] for k in ("loss", "grad_norm", "entropy")},
            "balanced": {k: m1[k] for k in ("loss", "grad_norm", "entropy")},
            "grad_diff": (g0 - g1).abs().max().item(),
            "grad_max": g0.abs().max().item(),
        }
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(report))
    destroy_distributed()


def test_balancing_moves_samples_not_the_update(tmp_path):
    out = tmp_path / "report.json"
    spawn_local(_worker, 4, str(out))
    r = json.loads(out.read_text())
    print(json.dumps(r, indent=1))
    assert r["exactly_once"]
    b = r["balance"]
    assert b["balance/imbalance_before"] > 2.5 and b["balance/imbalance_after"] < 1.2
    assert max(r["tokens"]) == pytest.approx(b["balance/imbalance_after"] * sum(r["tokens"]) / 4)
    for aggregation in ("token_mean", "seq_mean"):
        one, two = r[aggregation]["unbalanced"], r[aggregation]["balanced"]
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-6, abs=1e-7)
        assert two["entropy"] == pytest.approx(one["entropy"], rel=1e-6)
        assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)
        assert r[aggregation]["grad_diff"] <= 1e-6 * r[aggregation]["grad_max"]
