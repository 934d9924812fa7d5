"""Micro-batches packed by a token budget (`rl.max_tokens_per_micro_batch`), in both layouts, against
the same samples padded to the longest of all, on a tiny Megatron policy in one process (fp32).

Padded-packed (rows of similar lengths) and THD (the samples end to end in one row, `cu_seqlens`
keeping attention and RoPE within each, through the local core attention a segment at a time): the
logits at every position of every sample, every response token's logprob, the token- and
sequence-mean losses, and one optimizer step's gradient norm and weights agree with the padded
batches, with far less padding. The same THD rows without their boundaries (one segment: attention
and positions run across the samples) are far off, which shows the comparison can fail."""

import json
import random
from functools import partial
from pathlib import Path

import pytest
from _tiny_policy import build_state

from scope_mega.runtime.spawn import spawn_local

pytestmark = [pytest.mark.distributed]

BUDGET = 96


def _worker(out: str, device: str = "cpu", dtype: str = "float32"):
    """Writes the comparison to `out` (JSON); tests/gpu runs it on CUDA with Transformer Engine."""
    import torch

    from scope_mega.config import RunConfig, from_dict
    from scope_mega.models.pipeline import pipeline_forward
    from scope_mega.rl.batch import Sample, to_micro_batches
    from scope_mega.rl.packing import pack_by_token_budget
    from scope_mega.rl.update import rl_loss
    from scope_mega.runtime.distributed import destroy_distributed, init_distributed
    from scope_mega.train_step import evaluate_loss, store_logprobs, train_step

    dev = init_distributed(device=device, seed=2)
    rng = random.Random(0)
    samples = []
    for _ in range(12):  # prompts of 5-9 tokens, responses of 3-60: lengths spread like rollouts
        prompt = [rng.randrange(3, 64) for _ in range(rng.randint(5, 9))]
        response = [rng.randrange(3, 64) for _ in range(rng.randint(3, 60))]
        adv = [rng.uniform(-1, 1)] * len(response)
        samples.append(
            Sample(prompt, response, adv, [j % 7 == 0 for j in range(len(response))], [-1.0] * len(response))
        )
    lengths = [len(s.prompt_ids) + len(s.response_ids) - 1 for s in samples]
    layouts = {
        "padded": (to_micro_batches(samples, 4, pad_id=0), [list(range(i, i + 4)) for i in (0, 4, 8)]),
        "packed": (
            to_micro_batches(samples, 4, pad_id=0, max_tokens=BUDGET),
            pack_by_token_budget(lengths, BUDGET),
        ),
        "thd": (
            to_micro_batches(samples, 4, pad_id=0, max_tokens=BUDGET, thd=True, align=16),
            pack_by_token_budget(lengths, BUDGET, thd=True),
        ),
    }
    leaky = [dict(mb, cu_seqlens=mb["cu_seqlens"][[0, -1]]) for mb in layouts["thd"][0]]

    def per_sample(micro, batches, key, response_only=True):
        """Sample index -> `key` on its response positions (or all of its positions), read from the
        rows or THD segments of `micro`, whose micro-batches hold the samples `batches` in order."""
        result = {}
        for mb, idx in zip(micro, batches):
            starts = mb["cu_seqlens"].tolist() if "cu_seqlens" in mb else [0] * len(idx)
            for r, (i, start) in enumerate(zip(idx, starts)):
                row, lo = (0, start) if "cu_seqlens" in mb else (r, 0)
                s = samples[i]
                if response_only:
                    lo, n = lo + len(s.prompt_ids) - 1, len(s.response_ids)
                else:
                    n = lengths[i]
                result[i] = mb[key][row, lo : lo + n]
        return result

    state = build_state(dev, dtype)
    attention = {
        type(m).__name__ for m in state.model[0].modules() if type(m).__name__.endswith("DotProductAttention")
    }
    lp = {}
    logits = {}
    for name, (micro, order) in layouts.items():
        store_logprobs(state.model, state.vocab_size, micro, "lp")
        lp[name] = per_sample(micro, order, "lp")
        pipeline_forward(state.model, micro, lambda out, mb: mb.update(logits=out))
        logits[name] = per_sample(micro, order, "logits", response_only=False)
    store_logprobs(state.model, state.vocab_size, leaky, "lp")
    thd_micro, thd_order = layouts["thd"]
    lp["leaky"] = per_sample([dict(mb, lp=x["lp"]) for mb, x in zip(thd_micro, leaky)], thd_order, "lp")
    losses = {}
    for agg in ("token_mean", "seq_mean"):
        cfg = from_dict(RunConfig, {"loss": {"entropy_coef": 0.0, "aggregation": agg}})
        for name, (micro, _) in layouts.items():
            losses[f"{agg}/{name}"] = evaluate_loss(state, micro, partial(rl_loss, cfg.loss))["loss"]
    steps = {}
    for name, (micro, _) in layouts.items():
        state = build_state(dev, dtype)  # the same starting weights each time (seed 0)
        grad_norm = train_step(state, micro, partial(rl_loss, RunConfig().loss), need_entropy=True)[
            "grad_norm"
        ]
        weights = torch.cat([p.detach().flatten() for p in state.model[0].parameters()])
        steps[name] = (grad_norm, weights)

    def slots(micro):
        return sum(mb["input_ids"].numel() for mb in micro)

    def max_diff(name):
        return max((lp["padded"][i] - lp[name][i]).abs().max().item() for i in range(12))

    def mean_diff(name):
        return torch.cat([(lp["padded"][i] - lp[name][i]).abs() for i in range(12)]).mean().item()

    report = {
        "attention": sorted(attention),
        "max_diff": {name: max_diff(name) for name in ("packed", "thd", "leaky")},
        "logits_max_diff": {
            name: max((logits["padded"][i] - logits[name][i]).abs().max().item() for i in range(12))
            for name in ("packed", "thd")
        },
        "mean_diff": {name: mean_diff(name) for name in ("packed", "thd", "leaky")},
        "loss": losses,
        "grad_norm": {name: g for name, (g, _) in steps.items()},
        "weights_diff": {name: (w - steps["padded"][1]).abs().max().item() for name, (_, w) in steps.items()},
        "shapes": {name: [list(mb["input_ids"].shape) for mb in m] for name, (m, _) in layouts.items()},
        "waste": {name: 1 - sum(lengths) / slots(m) for name, (m, _) in layouts.items()},
        "tokens": {name: int(sum(mb["tokens"] for mb in m)) for name, (m, _) in layouts.items()},
        "lengths": sum(lengths),
    }
    Path(out).write_text(json.dumps(report))
    destroy_distributed()


def test_packed_micro_batches_give_the_padded_ones_results(tmp_path):
    out = tmp_path / "report.json"
    spawn_local(_worker, 1, str(out))
    r = json.loads(out.read_text())
    print(json.dumps({k: v for k, v in r.items() if k != "shapes"}, indent=1))
    assert r["attention"] == ["PackedDotProductAttention"]
    assert r["max_diff"]["packed"] <= 1e-6 and r["max_diff"]["thd"] <= 1e-6
    assert r["logits_max_diff"]["packed"] <= 1e-6 and r["logits_max_diff"]["thd"] <= 1e-6
    assert r["max_diff"]["leaky"] > 1e-2  # the check fails where sequences see each other
    for agg in ("token_mean", "seq_mean"):
        for name in ("packed", "thd"):
            assert r["loss"][f"{agg}/{name}"] == pytest.approx(r["loss"][f"{agg}/padded"], rel=1e-6, abs=1e-7)
    assert r["loss"]["token_mean/padded"] != pytest.approx(r["loss"]["seq_mean/padded"], rel=1e-2)
    for name in ("packed", "thd"):
        assert r["grad_norm"][name] == pytest.approx(r["grad_norm"]["padded"], rel=1e-5)
        assert r["weights_diff"][name] <= 1e-6
    assert (
        all(b * s <= BUDGET for b, s in r["shapes"]["packed"])
        and len(set(map(tuple, r["shapes"]["packed"]))) > 1
    )
    assert all(b == 1 and s <= BUDGET and s % 16 == 0 for b, s in r["shapes"]["thd"])
    assert r["tokens"] == {name: r["lengths"] for name in ("padded", "packed", "thd")}
    assert r["waste"]["packed"] < r["waste"]["padded"] / 2 and r["waste"]["thd"] < r["waste"]["packed"]
