"""Context parallelism is exact: CP=2 against CP=1 on the same samples, in fp32, on 4 real processes.

Layouts (TP, CP) = (1, 1), (1, 2), (2, 1), (2, 2) in turn on one set of 4 gloo ranks, and (1, 2)
again with selective recompute (its attention checkpoint gathers K and V again in the backward); every
data-parallel replica trains on the same samples, so each layout optimises the same loss. In the
padded and the THD layouts, with sequences whose lengths do not divide 2 x CP, CP=2 matches CP=1 (at
the same TP): every response token's logprob (gathered back from the ranks that hold it) within 1e-6,
the token- and sequence-mean losses within 1e-6, one optimizer step's gradient norm within 1e-5 and
its parameters within 1e-6 (rank by rank: the same TP shard; Adam's first step moves each by about
the LR, 1e-4, and turns a gradient's relative rounding into up to that fraction of the LR where the
gradient is near 0). The logprobs come out bitwise equal (each query's softmax runs over the same
keys in the same order); the losses and gradients differ in summation order (a gathered key's
gradient is summed over the ranks), so those match to tolerance.

The negative control: a contiguous split (chunk r of CP chunks, no load-balanced pairing) fed to the
same model puts tokens where Megatron's RoPE slicing and the attention's global positions do not
expect them; its logprobs are far off, so the comparison can fail.
"""

import json
import random
from functools import partial
from pathlib import Path

import pytest
import torch

from scope_mega.runtime.spawn import spawn_local

pytestmark = [pytest.mark.distributed]

WORLD = 4
HF = dict(
    model_type="llama",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=64,
    max_position_embeddings=256,
)
LAYOUTS = [(1, 1), (1, 2), (2, 1), (2, 2)]
BUDGET = 48  # per rank: THD micro-batches of whole sequences, several per step


def _samples():
    from scope_mega.rl.batch import Sample

    rng = random.Random(0)
    samples = []
    for i in range(8):  # total lengths 5..40: most are not multiples of 4
        prompt = [rng.randrange(3, 64) for _ in range(rng.randint(3, 8))]
        response = [rng.randrange(3, 64) for _ in range(rng.randint(2, 32))]
        off = [j % 5 == 4 for j in range(len(response))] if i % 2 else [False] * len(response)
        samples.append(
            Sample(prompt, response, [rng.uniform(-1, 1)] * len(response), off, [-1.0] * len(response))
        )
    return samples


def _state(dev, tp: int, cp: int, recompute: str = "none"):
    from scope_mega.config import ModelConfig, OptimConfig, ParallelConfig
    from scope_mega.models.gpt import build_gpt_model
    from scope_mega.train_step import setup_training

    torch.manual_seed(0)
    parallel = ParallelConfig(tp=tp, cp=cp)
    cfg = ModelConfig(
        hf_config=dict(HF), params_dtype="float32", make_vocab_size_divisible_by=16, recompute=recompute
    )
    model, spec = build_gpt_model(cfg, parallel, dev)
    return setup_training(model, spec.vocab_size, OptimConfig(lr=1e-4), parallel, 10)


def _response_logprobs(whole: list, local: list, samples, cp: int, rank: int) -> dict[int, list[float]]:
    """Sample index -> its response tokens' logprobs, the local values of every CP rank put back in
    place on the unsplit micro-batches `whole` (sequences found by their tokens)."""
    from megatron.core import parallel_state

    from scope_mega.models.context_parallel import local_positions

    keys = {tuple(s.prompt_ids + s.response_ids)[:-1]: i for i, s in enumerate(samples)}
    out = {}
    for mb, lp in zip(whole, local):
        full = torch.zeros(mb["input_ids"].shape)
        full[:, local_positions(mb, cp, rank)] = lp
        if cp > 1:
            torch.distributed.all_reduce(full, group=parallel_state.get_context_parallel_group())
        rows = (
            [(0, a, b) for a, b in zip(mb["cu_seqlens"].tolist(), mb["cu_seqlens"].tolist()[1:])]
            if ("cu_seqlens" in mb)
            else [(r, 0, mb["input_ids"].shape[1]) for r in range(mb["input_ids"].shape[0])]
        )
        for row, a, b in rows:
            for n in range(b - a, 0, -1):  # the sequence is a prefix of its padded segment
                i = keys.get(tuple(mb["input_ids"][row, a : a + n].tolist()))
                if i is not None:
                    lo = a + len(samples[i].prompt_ids) - 1
                    out[i] = full[row, lo : lo + len(samples[i].response_ids)].tolist()
                    break
    return out


def _layout_report(dev, tp: int, cp: int, contiguous: bool, recompute: str = "none") -> dict:
    from megatron.core import parallel_state

    from scope_mega.config import RunConfig, from_dict
    from scope_mega.models import context_parallel
    from scope_mega.rl.batch import to_micro_batches
    from scope_mega.rl.update import rl_loss
    from scope_mega.train_step import evaluate_loss, store_logprobs, train_step

    samples = _samples()
    rank = parallel_state.get_context_parallel_rank()
    report: dict = {}
    for name, kwargs in {"padded": dict(micro=4), "thd": dict(micro=4, max_tokens=BUDGET, thd=True)}.items():
        whole = to_micro_batches(samples, pad_id=0, cp=cp, **kwargs)
        micro = [context_parallel.split_batch(mb, cp, rank) for mb in whole]
        state = _state(dev, tp, cp, recompute)
        store_logprobs(state.model, state.vocab_size, micro, "lp")
        report[f"lp/{name}"] = _response_logprobs(whole, [mb["lp"] for mb in micro], samples, cp, rank)
        if contiguous:
            continue
        for agg in ("token_mean", "seq_mean"):
            loss_cfg = from_dict(RunConfig, {"loss": {"aggregation": agg}}).loss
            report[f"loss/{name}/{agg}"] = evaluate_loss(state, micro, partial(rl_loss, loss_cfg))["loss"]
        step = train_step(state, micro, partial(rl_loss, RunConfig().loss), need_entropy=True)
        report[f"grad_norm/{name}"] = step["grad_norm"]
        report[f"weights/{name}"] = torch.cat([p.detach().flatten() for p in state.model[0].parameters()])
    return report


def _worker(out: str):
    from scope_mega.models import context_parallel
    from scope_mega.runtime.distributed import destroy_distributed, init_distributed

    reports = {}
    for tp, cp in LAYOUTS:
        dev = init_distributed(tp=tp, pp=1, cp=cp, device="cpu", seed=2)
        reports[(tp, cp)] = _layout_report(dev, tp, cp, contiguous=False)
        if (tp, cp) == (1, 2):  # the recomputed attention gathers K and V again in the backward
            reports["recompute"] = _layout_report(dev, tp, cp, contiguous=False, recompute="selective")
        destroy_distributed(keep_process_group=True)
    balanced = context_parallel.chunk_positions
    context_parallel.chunk_positions = lambda length, cp, rank: torch.arange(
        rank * length // cp, (rank + 1) * length // cp
    )
    dev = init_distributed(tp=1, pp=1, cp=2, device="cpu", seed=2)
    contiguous = _layout_report(dev, 1, 2, contiguous=True)
    context_parallel.chunk_positions = balanced

    def lp_diff(a: dict, b: dict, name: str) -> float:
        x, y = a[f"lp/{name}"], b[f"lp/{name}"]
        assert sorted(x) == sorted(y) == list(range(8)), (sorted(x), sorted(y))
        return max(abs(u - v) for i in x for u, v in zip(x[i], y[i], strict=True))

    result = {"contiguous": lp_diff(reports[(1, 1)], contiguous, "padded")}
    for tp, label, got in (
        (1, "tp1", reports[(1, 2)]),
        (2, "tp2", reports[(2, 2)]),
        (1, "rc", reports["recompute"]),
    ):
        ref = reports[(tp, 1)]
        for name in ("padded", "thd"):
            key = f"{label}/{name}"
            result[f"{key}/lp"] = lp_diff(ref, got, name)
            for agg in ("token_mean", "seq_mean"):
                result[f"{key}/loss/{agg}"] = (ref[f"loss/{name}/{agg}"], got[f"loss/{name}/{agg}"])
            result[f"{key}/grad_norm"] = (ref[f"grad_norm/{name}"], got[f"grad_norm/{name}"])
            result[f"{key}/weights"] = (ref[f"weights/{name}"] - got[f"weights/{name}"]).abs().max().item()
    Path(out).joinpath(f"rank{torch.distributed.get_rank()}.json").write_text(json.dumps(result))
    destroy_distributed()


def test_context_parallel_matches_cp1(tmp_path):
    spawn_local(_worker, WORLD, str(tmp_path))
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    print(json.dumps(results[0], indent=1))
    for r in results:
        assert r["contiguous"] > 1e-2  # a split the model does not expect is caught
        for label in ("tp1", "tp2", "rc"):
            for name in ("padded", "thd"):
                key = f"{label}/{name}"
                assert r[f"{key}/lp"] <= 1e-6
                for agg in ("token_mean", "seq_mean"):
                    ref, got = r[f"{key}/loss/{agg}"]
                    assert got == pytest.approx(ref, abs=1e-6)
                ref, got = r[f"{key}/grad_norm"]
                assert got == pytest.approx(ref, rel=1e-5)
                assert r[f"{key}/weights"] <= 1e-6
