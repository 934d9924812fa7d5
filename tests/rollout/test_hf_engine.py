"""The transformers rollout engine: greedy parity with `generate`, exact logprobs, seeds, stops,
prefix continuation, strict weight updates, sleep/wake and engine construction."""

import re

import pytest
import torch
import transformers
from _tiny_config import TINY as TINY_SHAPE

from scope_mega.rollout import SamplingParams, WeightSyncError, continue_from, make_engine
from scope_mega.rollout.hf_engine import HFEngine

TINY = dict(
    TINY_SHAPE,
    vocab_size=96,
    max_position_embeddings=128,
    initializer_range=0.3,  # peaked distributions: greedy choices are never near-ties
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [15], [16, 17, 18, 19]]
ALPHABET = "abcdefghijklmnopqrstuvwxyz .,;\n"


def decode(ids):
    """A character per token, so stop strings can be placed anywhere."""
    return "".join(ALPHABET[i % len(ALPHABET)] for i in ids)


def tiny_model(family="llama", seed=0, **overrides):
    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(family, **{**TINY, **overrides})
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def engine(family="llama", seed=0, **kwargs):
    return HFEngine(tiny_model(family, seed), decode, **kwargs)


def full_logprobs(model, prompt, completion, temperature=1.0):
    """log-softmax of one unpadded forward pass over prompt + completion, at the completion tokens."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].double() / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None])[:, 0]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_greedy_matches_transformers_generate(family):
    eng = engine(family, eos_token_ids=[])  # no EOS: every row runs the full length
    model = eng.model
    ours = [c[0].token_ids for c in eng.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=16))]
    width = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])
    mask = (ids != 0).long()
    ref = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=16,
        eos_token_id=None,
        pad_token_id=0,
    )
    assert ours == ref[:, width:].tolist()
    # With an EOS id that some rows emit: they stop there (EOS included), the others go on.
    eos = ours[1][5]
    eng.eos_token_ids = [eos]
    stopped = eng.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=16))
    ref = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=16,
        eos_token_id=eos,
        pad_token_id=0,
    )
    for row, completions in zip(ref[:, width:].tolist(), stopped):
        c = completions[0]
        expected = row[: row.index(eos) + 1] if eos in row else row
        assert c.token_ids == expected
        assert (c.finish_reason, c.stop_reason) == (("stop", eos) if eos in row else ("length", None))


def test_logprobs_equal_a_full_forward_recomputation():
    eng = engine()
    for sampling in [
        SamplingParams(n=3, temperature=1.0, max_new_tokens=12, seed=3),
        SamplingParams(temperature=0, max_new_tokens=12),
    ]:
        for prompt, completions in zip(PROMPTS, eng.generate(PROMPTS, sampling)):
            for c in completions:
                ref = full_logprobs(eng.model, prompt, c.token_ids)
                diff = (torch.tensor(c.logprobs, dtype=torch.float64) - ref).abs().max().item()
                assert diff <= 1e-5, f"logprobs differ from a full forward pass by {diff}"


def test_truncated_sampling_reports_the_truncated_distribution():
    """temperature/top-k/top-p: the logprob is that of the distribution actually sampled from, and
    every sampled token lies inside the kept set.

    The reference is computed in float64 from the very logits the engine sampled from (recorded from
    its forward calls), not from a fresh full forward pass: the engine's padded, KV-cached fp32 forward
    and a full one differ by up to ~2e-5 in the logits, by CPU kernel and transformers version (the
    untruncated test above checks the engine against a full pass), which would swamp the truncation
    check. What remains is the engine's fp32 rounding of logits / T and its log-softmax: a few units of
    roundoff of the largest |logit / T| (here < 15, so below ~7e-6; measured < 7e-7). Reporting the
    unrenormalised logprob is off by -log(kept mass), >= 4e-3 here."""
    eng = engine(eos_token_ids=[])  # no EOS: every row lives to the end, so decode row r is completion r
    calls = []  # (input_ids, last-position logits) of each forward call of the engine
    hook = eng.model.register_forward_hook(
        lambda module, args, kwargs, out: calls.append((kwargs["input_ids"], out.logits[:, -1].clone())),
        with_kwargs=True,
    )
    n, temperature = 4, 0.7
    sampling = SamplingParams(n=n, temperature=temperature, top_k=20, top_p=0.8, max_new_tokens=10, seed=5)
    try:
        results = eng.generate(PROMPTS, sampling)
    finally:
        hook.remove()
    assert len(calls) == sampling.max_new_tokens  # one prefill, then a decode call per further token
    eps = torch.finfo(torch.float32).eps
    for p, (prompt, completions) in enumerate(zip(PROMPTS, results)):
        assert calls[0][0][p, -len(prompt) :].tolist() == prompt  # prefill row p: prompt p, left-padded
        for j, c in enumerate(completions):
            r = p * n + j  # completions flattened prompt-major, n per prompt
            for pos, (tok, lp) in enumerate(zip(c.token_ids, c.logprobs)):
                if pos == 0:
                    logits = calls[0][1][p]  # the prefill's logits, repeated for the n samples
                else:
                    assert calls[pos][0][r].tolist() == [c.token_ids[pos - 1]]
                    logits = calls[pos][1][r]
                logits = logits.double() / temperature
                probs = torch.softmax(logits, -1)
                order = probs.argsort(descending=True)[:20]  # top-k
                kept, mass = [], 0.0
                for i in order.tolist():  # smallest most-likely set with mass >= top_p (within top-k)
                    kept.append(i)
                    mass += probs[i].item() / probs[order].sum().item()
                    if mass >= 0.8:
                        break
                assert tok in kept
                expected = torch.log(probs[tok] / probs[kept].sum()).item()
                assert abs(lp - expected) <= 4 * eps * (1 + logits.abs().max().item())


def test_seeds_are_reproducible_and_distinct():
    eng = engine()
    run = lambda seed: [
        [c.token_ids for c in cs]
        for cs in eng.generate(PROMPTS, SamplingParams(n=4, max_new_tokens=12, seed=seed))
    ]
    first = run(11)
    assert run(11) == first
    assert run(12) != first
    assert len({tuple(t) for t in first[0]}) > 1, "the n samples of one prompt should differ"


def test_stop_strings_and_stop_tokens_end_generation_and_are_reported():
    eng = engine(eos_token_ids=[])
    greedy = SamplingParams(temperature=0, max_new_tokens=20)
    free = eng.generate([PROMPTS[1]], greedy)[0][0]
    assert free.finish_reason == "length" and free.stop_reason is None
    assert free.text == decode(free.token_ids)
    stop = free.text[6:8]
    first = free.text.find(stop)
    c = eng.generate([PROMPTS[1]], SamplingParams(temperature=0, max_new_tokens=20, stop=("zzzz", stop)))[0][
        0
    ]
    assert (c.finish_reason, c.stop_reason) == ("stop", stop)
    assert c.token_ids == free.token_ids[: first + len(stop)]
    assert c.text.endswith(stop)
    token = free.token_ids[4]
    c = eng.generate([PROMPTS[1]], SamplingParams(temperature=0, max_new_tokens=20, stop_token_ids=(token,)))[
        0
    ][0]
    assert (c.finish_reason, c.stop_reason) == ("stop", token)
    assert c.token_ids == free.token_ids[: free.token_ids.index(token) + 1]


def test_continue_from_equals_the_tail_of_a_whole_greedy_generation():
    eng = engine(eos_token_ids=[])
    whole = eng.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=14))
    cut = [3, 7, 1, 10]
    prefixes = [c[0].token_ids[:k] for c, k in zip(whole, cut)]
    rest = [
        continue_from(eng, [p], [q], SamplingParams(temperature=0, max_new_tokens=14 - k))[0][0]
        for p, q, k in zip(PROMPTS, prefixes, cut)
    ]
    for w, r, k in zip(whole, rest, cut):
        assert r.token_ids == w[0].token_ids[k:]
        assert max(abs(a - b) for a, b in zip(r.logprobs, w[0].logprobs[k:])) <= 1e-5
    # batched: prompts with prefixes of different lengths in one call
    batched = continue_from(eng, PROMPTS, prefixes, SamplingParams(temperature=0, max_new_tokens=4))
    assert [b[0].token_ids for b in batched] == [r.token_ids[:4] for r in rest]


def hf_named_weights(model):
    return [(name, p.detach().clone()) for name, p in model.named_parameters()]


def test_update_weights_loads_hf_tensors_strictly():
    source, target = engine(seed=0), engine(seed=1)
    sampling = SamplingParams(n=2, max_new_tokens=8, seed=0)
    report = target.update_weights(hf_named_weights(source.model))
    assert report.missing == [] and report.tensors == len(list(source.model.parameters()))
    assert target.generate(PROMPTS, sampling) == source.generate(PROMPTS, sampling)

    weights = hf_named_weights(engine(seed=2).model)
    name, tensor = weights[1]  # model.layers.0.self_attn.q_proj.weight
    with pytest.raises(
        WeightSyncError, match=r"'model.layers.0.self_attn.qq_proj.weight' is not a weight.*did you mean"
    ):
        target.update_weights([(name.replace("q_proj", "qq_proj"), tensor)])
    with pytest.raises(
        WeightSyncError, match=re.escape(f"'{name}' has shape (63, 64), the engine's model expects (64, 64)")
    ):
        target.update_weights([(name, tensor[:-1])])
    before = {n: p.detach().clone() for n, p in target.model.named_parameters()}
    with pytest.raises(WeightSyncError, match="full sync left 1 weight"):
        target.update_weights(weights[:-1])
    report = target.update_weights(weights[:-1], full=False)
    last = weights[-1][0]
    assert report.missing == [last]
    assert torch.equal(dict(target.model.named_parameters())[last], before[last]), "unsent weight changed"


def test_sleep_and_wake_up_on_cpu_are_tracked():
    eng = engine()
    eng.sleep()
    assert eng.asleep
    with pytest.raises(RuntimeError, match="asleep"):
        eng.generate(PROMPTS, SamplingParams(max_new_tokens=2))
    eng.update_weights(hf_named_weights(eng.model))  # weights can be refreshed while asleep
    eng.wake_up()
    assert not eng.asleep and len(eng.generate(PROMPTS, SamplingParams(max_new_tokens=2))) == len(PROMPTS)


def test_make_engine_serves_policy_and_teacher_side_by_side(tmp_path):
    from scope_mega.data.tokenizer import train_tokenizer

    tok = train_tokenizer(
        ["numbers: 3 5 7\ntarget: 15\nanswer: 3 + 5 + 7 = 15\n\n"] * 20, tmp_path / "teacher"
    )
    teacher_model = tiny_model("qwen2", seed=4, vocab_size=tok.vocab_size, eos_token_id=tok.eos_id)
    teacher_model.save_pretrained(tmp_path / "teacher")
    teacher = make_engine("hf", tmp_path / "teacher")  # decode from the stored tokenizer.model
    policy = make_engine("hf", dict(model_type="llama", **TINY), decode=decode)
    prompt = tok.encode("numbers: 3 5 7\ntarget: 15\n")
    out_t = teacher.generate([prompt], SamplingParams(temperature=0, max_new_tokens=6))[0][0]
    out_p = policy.generate([prompt], SamplingParams(temperature=0, max_new_tokens=6))[0][0]
    assert out_t.text == tok.decode(out_t.token_ids)
    assert out_p.text == decode(out_p.token_ids)
    transformers.AutoConfig.for_model("llama", **TINY).save_pretrained(tmp_path / "config_only")
    fresh = make_engine("hf", tmp_path / "config_only", decode=decode)  # no weights stored: random ones
    assert len(fresh.generate([prompt], SamplingParams(max_new_tokens=3))[0][0].token_ids) <= 3
    with pytest.raises(ValueError, match="decode"):
        make_engine("hf", dict(model_type="llama", **TINY))
    with pytest.raises(ValueError, match="unknown engine kind"):
        make_engine("sglang", tmp_path / "teacher")
