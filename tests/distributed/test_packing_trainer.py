"""Micro-batches packed by a token budget (`rl.max_tokens_per_micro_batch`) against the same samples
padded to the longest of all, on a tiny Megatron policy in one process (fp32): every response token's
logprob and the loss agree to 1e-6, with far less padding."""

import json
import random
from functools import partial
from pathlib import Path

import pytest
from _tiny_policy import build_state

from scope_mega.runtime.spawn import spawn_local

pytestmark = [pytest.mark.distributed]


def _worker(out: str):
    from scope_mega.config import RunConfig, from_dict
    from scope_mega.rl.packing import pack_by_token_budget
    from scope_mega.runtime.distributed import destroy_distributed, init_distributed
    from scope_mega.train_step import evaluate_loss, store_logprobs
    from scope_mega.trainer import Sample, rl_loss, to_micro_batches

    dev = init_distributed(device="cpu", seed=2)
    state = build_state(dev)
    rng = random.Random(0)
    samples = []
    for _ in range(12):  # prompts of 5-9 tokens, responses of 3-60: lengths spread like rollouts
        prompt = [rng.randrange(3, 64) for _ in range(rng.randint(5, 9))]
        response = [rng.randrange(3, 64) for _ in range(rng.randint(3, 60))]
        adv = [rng.uniform(-1, 1)] * len(response)
        samples.append(
            Sample(prompt, response, adv, [j % 7 == 0 for j in range(len(response))], [-1.0] * len(response))
        )
    padded = to_micro_batches(samples, 4, pad_id=0)
    packed = to_micro_batches(samples, 4, pad_id=0, max_tokens=96)
    lengths = [len(s.prompt_ids) + len(s.response_ids) - 1 for s in samples]
    order = [i for batch in pack_by_token_budget(lengths, 96) for i in batch]
    for micro in (padded, packed):
        store_logprobs(state.model, state.vocab_size, micro, "lp")

    def response_logprobs(micro, sample_order):
        rows = [(mb, r) for mb in micro for r in range(mb["input_ids"].shape[0])]
        out = {}
        for i, (mb, r) in zip(sample_order, rows):
            s = samples[i]
            lo, hi = len(s.prompt_ids) - 1, len(s.prompt_ids) + len(s.response_ids) - 1
            out[i] = mb["lp"][r, lo:hi]
        return out

    a, b = response_logprobs(padded, range(12)), response_logprobs(packed, order)
    cfg = from_dict(RunConfig, {"loss": {"entropy_coef": 0.0}})
    loss = [evaluate_loss(state, micro, partial(rl_loss, cfg.loss))["loss"] for micro in (padded, packed)]

    def slots(micro):
        return sum(mb["input_ids"].numel() for mb in micro)

    report = {
        "max_diff": max((a[i] - b[i]).abs().max().item() for i in range(12)),
        "loss": loss,
        "shapes": [list(mb["input_ids"].shape) for mb in packed],
        "waste": [1 - sum(lengths) / slots(m) for m in (padded, packed)],
        "tokens": [int(sum(mb["tokens"] for mb in m)) for m in (padded, packed)],
        "lengths": sum(lengths),
    }
    Path(out).write_text(json.dumps(report))
    destroy_distributed()


def test_packed_micro_batches_give_the_padded_ones_results(tmp_path):
    out = tmp_path / "report.json"
    spawn_local(_worker, 1, str(out))
    r = json.loads(out.read_text())
    print(r)
    assert r["max_diff"] <= 1e-6
    assert r["loss"][1] == pytest.approx(r["loss"][0], rel=1e-6, abs=1e-7)
    assert all(b * s <= 96 for b, s in r["shapes"]) and len({tuple(x) for x in r["shapes"]}) > 1
    assert r["tokens"] == [r["lengths"], r["lengths"]]
    assert r["waste"][1] < r["waste"][0] / 2
