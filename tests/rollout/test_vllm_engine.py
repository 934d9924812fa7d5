"""Everything around vLLM that runs without it: the missing-extra error, sampling translation, output
conversion, bucket assembly and the HF name/shape contract the weight stream is checked against."""

import sys
from types import SimpleNamespace

import pytest
import torch
import transformers
from _tiny_config import TINY

from scope_mega.rollout import SamplingParams, WeightSyncError, make_engine
from scope_mega.rollout.vllm_engine import (
    VLLM_MISSING,
    completion_from_vllm,
    import_vllm,
    vllm_sampling_kwargs,
)
from scope_mega.rollout.weight_sync import CheckedStream, buckets, hf_parameter_shapes

CONFIGS = {
    "llama-untied": dict(model_type="llama", tie_word_embeddings=False, **TINY),
    "qwen2-tied": dict(model_type="qwen2", tie_word_embeddings=True, **TINY),
    "qwen3": dict(model_type="qwen3", head_dim=16, tie_word_embeddings=False, **TINY),
}


def test_missing_vllm_names_the_gpu_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import fails even where vLLM is installed
    with pytest.raises(ImportError, match=r"pip install 'scope-mega\[gpu\]'"):
        import_vllm()
    with pytest.raises(ImportError, match=r"scope-mega\[gpu\]"):
        make_engine("vllm", tmp_path, decode=str)
    assert "kind 'hf'" in VLLM_MISSING


def test_sampling_params_translate_to_vllm_kwargs():
    assert vllm_sampling_kwargs(SamplingParams()) == dict(
        n=1,
        temperature=1.0,
        top_p=1.0,
        top_k=-1,
        max_tokens=256,
        stop=[],
        stop_token_ids=[],
        include_stop_str_in_output=True,
        seed=None,
        logprobs=0,
    )
    sp = SamplingParams(
        n=8,
        temperature=0.6,
        top_p=0.95,
        top_k=50,
        max_new_tokens=1024,
        stop=["\n\n"],
        stop_token_ids=[151643],
        seed=7,
    )
    kw = vllm_sampling_kwargs(sp)
    assert (kw["n"], kw["temperature"], kw["top_p"], kw["top_k"], kw["max_tokens"], kw["seed"]) == (
        8,
        0.6,
        0.95,
        50,
        1024,
        7,
    )
    assert (kw["stop"], kw["stop_token_ids"], kw["logprobs"]) == (["\n\n"], [151643], 0)
    assert vllm_sampling_kwargs(SamplingParams(temperature=0))["temperature"] == 0


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


def _vllm_output(ids, finish, stop_reason):
    logprobs = [
        {t: SimpleNamespace(logprob=-0.5 * i), t + 1: SimpleNamespace(logprob=-9.0)}
        for i, t in enumerate(ids)
    ]
    return SimpleNamespace(token_ids=ids, logprobs=logprobs, finish_reason=finish, stop_reason=stop_reason)


def test_vllm_outputs_become_completions():
    dec = lambda ids: ",".join(map(str, ids))
    eos = completion_from_vllm(_vllm_output([5, 6, 2], "stop", None), dec)
    assert (eos.token_ids, eos.logprobs, eos.stop_reason, eos.text) == (
        [5, 6, 2],
        [0.0, -0.5, -1.0],
        2,
        "5,6,2",
    )
    text_stop = completion_from_vllm(_vllm_output([5, 7], "stop", "\n\n"), dec)
    assert (text_stop.finish_reason, text_stop.stop_reason) == ("stop", "\n\n")
    length = completion_from_vllm(_vllm_output([5, 7, 9], "length", None), dec)
    assert (length.finish_reason, length.stop_reason) == ("length", None)
    with pytest.raises(RuntimeError, match="abort"):
        completion_from_vllm(_vllm_output([5], "abort", None), dec)


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


class _FakeModel(torch.nn.Module):
    """Stands in for vLLM's model: records what `load_weights` receives."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the model a device
        self.loads = []

    def load_weights(self, weights):
        self.loads.append([(name, t.clone()) for name, t in weights])


class _FakeLLM:
    """The slice of `vllm.LLM` the engine uses, recording calls."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.calls = []
        self.model = _FakeModel()
        runner = SimpleNamespace(model=self.model)
        self.llm_engine = SimpleNamespace(
            model_executor=SimpleNamespace(
                driver_worker=SimpleNamespace(worker=SimpleNamespace(model_runner=runner))
            )
        )

    def generate(self, requests, params, use_tqdm):
        self.calls.append(("generate", requests, params))
        return [
            SimpleNamespace(
                outputs=[_vllm_output(r["prompt_token_ids"][-1:] + [2], "stop", None)] * params["n"]
            )
            for r in requests
        ]

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tags))


@pytest.fixture
def fake_vllm_engine(monkeypatch, tmp_path):
    from scope_mega.models.arch import load_hf_config

    fake = SimpleNamespace(LLM=_FakeLLM, SamplingParams=lambda **kw: kw)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    hf = load_hf_config(CONFIGS["qwen2-tied"])
    hf.save_pretrained(tmp_path)
    engine = make_engine("vllm", tmp_path, decode=str, tensor_parallel_size=1, bucket_bytes=40_000)
    return engine, hf


def test_vllm_engine_wiring_with_a_stand_in_llm(fake_vllm_engine):
    engine, hf = fake_vllm_engine
    llm = engine.llm
    assert llm.kwargs["enable_sleep_mode"] and llm.kwargs["logprobs_mode"] == "processed_logprobs"
    assert "distributed_executor_backend" not in llm.kwargs  # no process group: plain in-process engine

    out = engine.generate([[5, 6], [7]], SamplingParams(n=2, temperature=0.5, seed=3))
    _, requests, params = llm.calls[-1]
    assert requests == [{"prompt_token_ids": [5, 6]}, {"prompt_token_ids": [7]}]
    assert params == vllm_sampling_kwargs(SamplingParams(n=2, temperature=0.5, seed=3))
    assert [[c.token_ids for c in cs] for cs in out] == [[[6, 2]] * 2, [[7, 2]] * 2]

    weights = [
        (n, torch.randn(p.shape))
        for n, p in transformers.AutoModelForCausalLM.from_config(hf).named_parameters()
    ]
    engine.sleep()
    report = engine.update_weights(iter(weights))
    assert report.missing == [] and report.tensors == len(weights)
    loads = llm.model.loads
    assert [n for bucket in loads for n, _ in bucket] == [n for n, _ in weights]
    for bucket in loads:
        assert sum(t.numel() * t.element_size() for _, t in bucket) <= 40_000 or len(bucket) == 1
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip([x for bucket in loads for x in bucket], weights))
    engine.wake_up()
    assert [c for c in llm.calls if c[0] != "generate"] == [
        ("sleep", 1),
        ("wake_up", ["weights"]),  # weights back for the load, KV cache still released
        ("wake_up", ["kv_cache"]),
    ]
    engine.sleep()
    engine.wake_up()
    assert llm.calls[-1] == ("wake_up", None)

    with pytest.raises(WeightSyncError, match="did you mean"):
        engine.update_weights([(weights[1][0].replace("q_proj", "qproj"), weights[1][1])])
    with pytest.raises(WeightSyncError, match="full sync left"):
        engine.update_weights(weights[:-1])
