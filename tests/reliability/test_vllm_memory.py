"""Issue 27, item 4: vLLM on CPU took half the machine per rank (~12 GB on 24 GB) unless
VLLM_CPU_KVCACHE_SPACE was set. Its KV cache is now sized from the config (the tokens one RL step's
rollouts hold at once), handed to vLLM as `kv_cache_memory_bytes`, and counted by the CPU plan."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import transformers

from scope_mega.plan import GIB, ModelSize, make_plan, vllm_cpu_kv_tokens, vllm_kv_cache_tokens
from scope_mega.rollout import vllm_engine
from scope_mega.validation import load_config_for_target

TINY_CPU = Path(__file__).resolve().parents[2] / "examples" / "tiny_cpu.yaml"
VLLM_TP2 = ["parallel.tp=2", "rollout.engine=vllm", "rollout.vllm_tensor_parallel_size=2"]
SERVABLE = dict(  # head size 32, which vLLM's CPU attention runs
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


def test_vllm_cpu_kv_cache_is_sized_from_the_step_not_the_machine():
    """The README's two-rank vLLM run: 16 prompts x 8 samples, each at most the model's 128 positions
    (one 128-token block), plus the block vLLM holds back; a few MiB per rank, not half the machine."""
    cfg, target, _ = load_config_for_target(TINY_CPU, VLLM_TP2)
    assert vllm_kv_cache_tokens(cfg, replicas=1) == (16 * 8 + 1) * 128
    assert vllm_kv_cache_tokens(cfg, replicas=2) == (8 * 8 + 1) * 128  # prompts are dealt to replicas
    # whole blocks per sequence, and never less than one sequence of the engine's max_model_len
    assert vllm_cpu_kv_tokens(sequences=3, seq_tokens=129, max_model_len=256) == (3 * 2 + 1) * 128
    assert vllm_cpu_kv_tokens(sequences=1, seq_tokens=100, max_model_len=4096) == (32 + 1) * 128

    plan = make_plan(cfg, target, world_size=2)  # the plan counts the same cache on CPU
    e = plan.engine
    assert e.kv_cache == vllm_kv_cache_tokens(cfg, replicas=1) * e.kv_bytes_per_token
    assert e.budget == e.weights + e.kv_cache and e.budget < 0.1 * GIB
    assert all(plan.phases[p]["policy engine"] == e.budget for p in ("rollout", "update", "sync"))


def test_vllm_engine_on_cpu_passes_its_kv_cache_size_to_vllm(tmp_path, monkeypatch):
    """Without starting vLLM: the arguments `vllm.LLM` receives on CPU."""
    transformers.LlamaConfig(**SERVABLE).save_pretrained(tmp_path)
    received = {}
    fake = SimpleNamespace(LLM=lambda **kw: received.update(kw))
    monkeypatch.setattr(vllm_engine, "import_vllm", lambda: fake)
    monkeypatch.setattr(vllm_engine, "_launch_unique_cpu_shm_names", lambda: None)
    monkeypatch.setattr(vllm_engine.torch.cuda, "is_available", lambda: False)
    per_token = ModelSize.from_hf(transformers.AutoConfig.from_pretrained(tmp_path)).kv_bytes_per_token(1, 4)

    vllm_engine.VLLMEngine(str(tmp_path), decode=str, kv_cache_tokens=1000)
    assert received["kv_cache_memory_bytes"] == 1000 * per_token
    vllm_engine.VLLMEngine(str(tmp_path), decode=str)  # not told: room for one max_model_len sequence
    assert received["kv_cache_memory_bytes"] == (4 + 1) * 128 * per_token


def test_eval_sizes_its_vllm_kv_cache_from_one_engine_call(tmp_path):
    """`scope-mega eval --engine vllm`: --batch-size prompts x -n samples of the longest prompt plus
    --max-new-tokens (here 2 problems, so 2 prompts per call)."""
    from scope_mega.data.benchmarks import Problem
    from scope_mega.eval import _engine_kwargs

    transformers.LlamaConfig(**SERVABLE).save_pretrained(tmp_path)
    args = SimpleNamespace(
        engine="vllm", model=str(tmp_path), template="raw", batch_size=64, n=8, max_new_tokens=100
    )
    problems = [[Problem("a" * 20, "1", 0, "x"), Problem("a" * 50, "2", 1, "x")]]
    kwargs = _engine_kwargs(args, problems, encode=lambda text: [0] * len(text))
    assert kwargs == {"kv_cache_tokens": vllm_cpu_kv_tokens(2 * 8, 50 + 100, 512)}
    assert _engine_kwargs(SimpleNamespace(engine="hf"), problems, encode=len) == {}
