"""Cluster example configs validate on this CPU machine (as if on CUDA) and the plan's numbers match
hand computations."""

from __future__ import annotations

from pathlib import Path

import pytest

from scope_mega.cli import main
from scope_mega.config import ConfigError
from scope_mega.models.arch import load_hf_config
from scope_mega.plan import GIB, PHASES, RESERVE, SLEEPING_ENGINE, make_plan
from scope_mega.plan import ModelSize as Arch
from scope_mega.validation import load_config_for_target

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CLUSTER = {  # example -> (world size, expected trainer layout line, HF parameter count)
    "qwen2.5-math-7b.yaml": (8, "TP=2 PP=1 DP=4", 7_615_616_512),
    "qwen2.5-32b.yaml": (32, "TP=8 PP=1 DP=4", 32_763_876_352),
    "llama-3.3-70b.yaml": (64, "TP=8 PP=4 DP=2", 70_553_706_496),
    "qwen2.5-32b-32k.yaml": (64, "TP=8 PP=1 CP=2 DP=4", 32_763_876_352),
    "llama-3.3-70b-16k.yaml": (64, "TP=8 PP=4 DP=2", 70_553_706_496),
}


@pytest.mark.parametrize("name", sorted(CLUSTER))
def test_example_dry_run_validates_on_cpu(name, capsys):
    world, layout, _ = CLUSTER[name]
    assert main(["train", str(EXAMPLES / name), "--dry-run", "--world-size", str(world)]) == 0
    out = capsys.readouterr().out
    assert "# plan (target: cuda" in out
    assert layout in out
    for role in ("rollout engine (vllm)", "PRM (Megatron, forward only)", "guide engine (vllm)"):
        assert role in out
    for item in ("weights", "grads (fp32)", "Adam states", "activations (rough)", "KV cache"):
        assert item in out
    assert "memory per GPU by phase, GiB (offload on; 80 GiB per GPU)" in out
    assert "WARNING" not in out and "unknown" not in out and "not runnable" not in out
    cfg, target, _ = load_config_for_target(EXAMPLES / name)
    plan = make_plan(cfg, target, world_size=world)  # raises if a phase does not fit
    for phase in PHASES:
        assert 0.6 * plan.gpu_memory < plan.phase_total(phase) <= plan.gpu_memory or phase == "sync"
    assert plan.host_per_node <= 0.9 * plan.host_memory


def test_a_phase_that_cannot_fit_is_refused_in_one_line(capsys):
    ex = str(EXAMPLES / "qwen2.5-math-7b.yaml")
    cases = {
        "rollout.vllm_gpu_memory_utilization=0.6": "the rollout phase needs 89.2 GiB per GPU of 80",
        "rl.offload=off": "the rollout phase needs 98.0 GiB per GPU of 80",
        "parallel.distributed_optimizer=false": "the update phase needs 97.2 GiB per GPU of 80",
        "rollout.vllm_gpu_memory_utilization=0.05": "the policy engine's KV cache",
        "guide.vllm_gpu_memory_utilization=0.05": "the guide engine's budget (4.0 GiB) does not hold",
        "--host-memory-gib=128": "host memory per node needs 199 GiB of 115 usable",
    }
    for override, message in cases.items():
        assert main(["train", ex, "--dry-run", "--world-size", "8", override]) == 2, override
        err = capsys.readouterr().err
        assert err.startswith(f"config error: plan: {message}") and err.count("\n") == 1, err
    # the knob to turn is named
    main(["train", ex, "--dry-run", "--world-size", "8", "rollout.vllm_gpu_memory_utilization=0.6"])
    assert "lower rollout.vllm_gpu_memory_utilization" in capsys.readouterr().err


def test_a_launch_that_cannot_fit_stops_before_any_rank_starts(monkeypatch):
    """On a CUDA node the RL stage's config check (`validate(cfg, world_size, stage="rl")`, which
    `stage.start_stage` runs before `init_distributed`) plans with the node's own GPU and host memory
    (here: a stand-in CUDA node with 80 GiB GPUs and 1 TiB of host memory)."""
    import types

    import psutil
    import torch

    from scope_mega.validation import check_memory_here

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(total_memory=80 * GIB)
    )
    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(total=1024 * GIB))
    cfg, _, _ = load_config_for_target(
        EXAMPLES / "qwen2.5-math-7b.yaml", ["rollout.vllm_gpu_memory_utilization=0.6"]
    )
    with pytest.raises(ConfigError, match="the rollout phase needs 89.2 GiB per GPU of 80"):
        check_memory_here(cfg, 8)
    cfg, _, _ = load_config_for_target(EXAMPLES / "qwen2.5-math-7b.yaml")
    check_memory_here(cfg, 8)  # the example fits: it goes on


def test_phases_by_hand(tmp_path):
    """Every component of every phase, computed by hand for a small config: Llama h=1024, f=4096, 8
    layers, 16 heads, 4 KV heads (d=64), vocab 32000 untied; TP=2, DP=2 (4 GPUs of 16 GiB), bf16,
    distributed optimizer; vLLM TP=2; a 0.5 B PRM and a 1 B guide stated in the config."""
    config = tmp_path / "small.yaml"
    config.write_text(
        """
device: auto
model:
  hf_config: {model_type: llama, hidden_size: 1024, intermediate_size: 4096, num_hidden_layers: 8,
              num_attention_heads: 16, num_key_value_heads: 4, vocab_size: 32000,
              max_position_embeddings: 2048, tie_word_embeddings: false}
parallel: {tp: 2, distributed_optimizer: true}
rollout: {engine: vllm, max_new_tokens: 1024, vllm_tensor_parallel_size: 2, vllm_gpu_memory_utilization: 0.5}
rl: {micro_batch_size: 2, prompts_per_step: 8, group_size: 4}
scope: {enabled: true, method: scope, guide: engine}
guide: {prm: model, prm_path: /absent/prm, guide_model: /absent/guide, vllm_gpu_memory_utilization: 0.25,
        prm_params_b: 0.5, guide_params_b: 1.0}
"""
    )
    cfg, target, _ = load_config_for_target(config)
    plan = make_plan(cfg, target, world_size=4, gpu_memory_gib=16)
    # per GPU: 8 layers x (sharded (1536 + 1024) x 1024 + 3 x 1024 x 4096 = 15,204,352 / 2 + norms 2048)
    # + embedding and output layer 2 x 32000 x 1024 / 2 + final norm 1024
    p = 8 * (15_204_352 // 2 + 2048) + 32000 * 1024 + 1024
    assert p == 93_602_816 == plan.trainer.params_per_gpu
    weights, grads, adam = 2 * p, 4 * p, 12 * p // 2  # bf16; fp32 grads; Adam / DP=2
    # activations: 2 x (4h + ((2x16 + 2x4) x 64 + 3f) / TP) = 23,040 B per token and layer, 2 x 1024
    # tokens, 8 layers; the loss's fp32 logits buffers and their gradients 2048 x 32000 / 2 x 25
    act = 8 * 2048 * 23_040 + 2048 * 32000 // 2 * 25
    prm_weights, prm_act = 500_000_000 * 2 // 2, 8 * 1024 * 23_040  # 8 sequences, one layer alive
    engine_weights = (2 * 32000 * 1024 + 8 * (15_204_352 + 2048) + 1024) * 2 // 2
    guide_weights = 1_000_000_000 * 2 // 2
    bucket = 64 << 20
    assert plan.phases["rollout"] == {
        "trainer weights": weights,
        "PRM weights": prm_weights,
        "activations": prm_act,
        "policy engine": 8 * GIB,  # 0.5 x 16 GiB: weights and KV cache
        "guide engine": 4 * GIB,  # 0.25 x 16 GiB
        "reserve": RESERVE,
    }
    assert plan.phases["update"] == {
        "trainer weights": weights,
        "PRM weights": prm_weights,
        "grads (fp32)": grads,
        "Adam states": adam,
        "activations": act,
        "policy engine": SLEEPING_ENGINE,
        "guide engine": SLEEPING_ENGINE,
        "reserve": RESERVE,
    }
    assert plan.phases["sync"] == {
        "trainer weights": weights,
        "PRM weights": prm_weights,
        "activations": 2 * bucket,
        "policy engine": engine_weights + SLEEPING_ENGINE,
        "guide engine": SLEEPING_ENGINE,
        "reserve": RESERVE,
    }
    # KV cache: 8 GiB - weights, 2 x 8 layers x (4 KV heads / TP 2) x 64 x 2 bytes per token
    assert plan.engine.kv_bytes_per_token == 4096 and plan.engine.kv_cache == 8 * GIB - engine_weights
    assert plan.host_per_gpu == {
        "offloaded Adam states": adam,
        "policy engine weights": engine_weights,
        "guide engine weights": guide_weights,
    }
    assert plan.host_per_node == 4 * (adam + engine_weights + guide_weights)  # 4 GPUs on the node
    cfg_off, _, _ = load_config_for_target(config, ["rl.offload=off"])
    off = make_plan(cfg_off, target, world_size=4, gpu_memory_gib=20)  # 16 GiB would not fit
    assert off.phases["rollout"]["Adam states"] == adam and off.phases["sync"]["grads (fp32)"] == grads
    assert off.host_per_gpu["offloaded Adam states"] == 0


@pytest.mark.parametrize("name", sorted(CLUSTER))
def test_example_parameter_counts(name):
    """The HF parameter counts of the real models (model cards / safetensors index totals)."""
    cfg, target, _ = load_config_for_target(EXAMPLES / name)
    assert target == "cuda" and cfg.model.fp8.enabled and cfg.device == "auto"
    assert cfg.data.task == "math" and cfg.data.train_files
    assert cfg.guide.prm == "model" and cfg.guide.prm_path and cfg.guide.guide_model
    assert Arch.from_hf(load_hf_config(cfg.model.hf_config)).total() == CLUSTER[name][2]


def test_llama33_rope_scaling_inline():
    from scope_mega.models.arch import rope_scaling

    cfg, _, _ = load_config_for_target(EXAMPLES / "llama-3.3-70b.yaml")
    scaling = rope_scaling(load_hf_config(cfg.model.hf_config))
    assert scaling["rope_type"] == "llama3"
    assert (scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]) == (8.0, 1.0, 4.0)
    assert scaling["original_max_position_embeddings"] == 8192


def test_7b_tp2_memory_by_hand():
    cfg, _, _ = load_config_for_target(EXAMPLES / "qwen2.5-math-7b.yaml")
    plan = make_plan(cfg, "cuda", world_size=8, gpu_memory_gib=80)
    h, L, f, V = 3584, 28, 18944, 152064
    total = 7_615_616_512
    replicated = L * 2 * h + h  # RMSNorm weights live whole on every TP rank
    assert V % (128 * 2) == 0 and plan.padded_vocab == V  # no padding at TP=2
    per_gpu = (total - replicated) // 2 + replicated
    t = plan.trainer
    assert t.params_per_gpu == per_gpu
    assert t.weights == per_gpu * 2  # bf16
    assert t.grads == per_gpu * 4  # fp32 main grads
    assert t.adam == per_gpu * 12 and t.adam_distributed == per_gpu * 12 // 4  # DP=4
    # activations: one 4096-token micro batch, 28 layers, SP on, plus fp32 logits + grad
    per_tok_layer = 2 * (4 * h / 2 + ((2 * 28 + 2 * 4) * 128 + 3 * f) / 2)
    assert per_tok_layer == 79360
    assert t.activations == int(L * 4096 * per_tok_layer + 4096 * V // 2 * 25)
    # engine: TP=2 bf16 weights, KV = 2 * layers * kv_heads / TP * head_dim * 2 bytes per token
    e = plan.engine
    assert e.weights == total * 2 // 2
    assert e.kv_bytes_per_token == 2 * 28 * 2 * 128 * 2
    assert e.budget == int(0.4 * 80 * GIB) and e.kv_cache == e.budget - e.weights


def test_70b_pipeline_stage_and_in_flight():
    cfg, _, _ = load_config_for_target(EXAMPLES / "llama-3.3-70b.yaml")
    plan = make_plan(cfg, "cuda", world_size=64)
    h, f, V_pad = 8192, 28672, 129024
    assert plan.padded_vocab == V_pad  # 128256 rounded up to a multiple of 128 * 8
    sharded = (8192 + 2 * 1024) * h + h * h + 3 * h * f
    stage = 20 * (sharded // 8 + 2 * h) + V_pad * h // 8 + h  # 20 layers + output layer + final norm
    assert plan.trainer.params_per_gpu == stage
    assert plan.trainer.micro_batches_in_flight == 4  # 1F1B on the first stage holds PP micro batches
    assert plan.engine.weights == 70_553_706_496 // 8  # FP8 weights: 1 byte per parameter


def test_fp8_rules_for_target(tmp_path, capsys):
    ex = str(EXAMPLES / "qwen2.5-math-7b.yaml")
    assert main(["train", ex, "--dry-run", "model.transformer_impl=local"]) == 2
    assert "model.fp8.enabled needs Transformer Engine" in capsys.readouterr().err
    assert main(["train", ex, "--dry-run", "parallel.tp=3"]) == 2  # structural errors still apply
    assert "does not divide" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="cannot target a CUDA node"):
        load_config_for_target(ex, ["device=cpu"], target="cuda")
    import torch

    if not torch.cuda.is_available():  # --target cpu checks what a run here checks: FP8 is refused
        assert main(["train", ex, "--dry-run", "--target", "cpu"]) == 2


def test_tiny_cpu_plan_targets_cpu(capsys):
    assert main(["train", str(EXAMPLES / "tiny_cpu.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "# plan (target: cpu; world size 1" in out and "params float32" in out


def test_helper_sizes_come_from_config_json_where_readable(tmp_path):
    """A guide directory's config.json and a converted PRM's hf/config.json give the sizes (they win over
    the stated ones); a PRM whose KV heads the trainer's TP cannot divide is refused, as build_prm does."""
    import transformers

    guide_dir, prm_dir = tmp_path / "guide", tmp_path / "prm"
    shape = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4)
    transformers.LlamaConfig(**shape, num_key_value_heads=2, vocab_size=1000).save_pretrained(guide_dir)
    transformers.Qwen2Config(**shape, num_key_value_heads=1, vocab_size=1000).save_pretrained(prm_dir / "hf")
    ex = EXAMPLES / "qwen2.5-math-7b.yaml"
    paths = [f"guide.guide_model={guide_dir}", f"guide.prm_path={prm_dir}", "parallel.tp=1"]
    cfg, target, _ = load_config_for_target(ex, [*paths, "rollout.vllm_tensor_parallel_size=1"])
    plan = make_plan(cfg, target, world_size=8, gpu_memory_gib=200)  # a 7B at TP=1 needs more than 80
    guide, prm = plan.helpers["guide"], plan.helpers["prm"]
    assert guide.source == f"{guide_dir}/config.json" and prm.source == f"{prm_dir}/config.json"
    # embedding + untied LM head, 2 layers of (q, k, v, o, gate/up/down, two norms), final norm
    layer = 256 * 256 + 2 * 256 * 128 + 256 * 256 + 3 * 256 * 512 + 2 * 256
    assert guide.params == 2 * 1000 * 256 + 2 * layer + 256
    assert guide.weights_per_gpu == guide.params * 2  # bf16, vLLM TP=1
    with pytest.raises(ConfigError, match="has 1 KV heads; it runs at the trainer's parallel.tp=2"):
        make_plan(load_config_for_target(ex, paths[:2])[0], "cuda", world_size=8)


def _plan(name: str, overrides: list[str], world: int, target: str = "cuda"):
    cfg, _, _ = load_config_for_target(EXAMPLES / name, overrides, target)
    return make_plan(cfg, target, world_size=world)


def test_a_sequence_longer_than_the_budget_is_its_own_micro_batch():
    """Issue 28: 30000-token responses with an 8192-token budget. The trainer gives such a sequence a
    micro batch of its own, so the update holds 1024 + 30000 tokens, not 8192."""
    short = _plan("qwen2.5-32b.yaml", [], 32).trainer
    long = _plan("qwen2.5-32b.yaml", ["rollout.max_new_tokens=30000"], 32).trainer
    assert short.tokens_per_micro_batch == 8192 and long.tokens_per_micro_batch == 31024
    assert long.activations > 3.5 * short.activations
    # at CP=2 a GPU holds half of it; the budget is per GPU, so a shorter sequence leaves it at 8192
    assert (
        _plan(
            "qwen2.5-32b.yaml", ["rollout.max_new_tokens=30000", "parallel.cp=2"], 32
        ).trainer.tokens_per_micro_batch
        == 15512
    )
    assert _plan("qwen2.5-32b.yaml", ["parallel.cp=2"], 32).trainer.tokens_per_micro_batch == 8192


def test_activations_with_recompute_cp_and_sp_by_hand():
    """The module docstring's formula for the 32B (h=5120, H=40, G=8, d=128, f=27648, 64 layers) on
    Transformer Engine at TP=8 with SP, one micro batch of T tokens per GPU, bf16: what the layers keep,
    plus the larger of one recomputed layer and the logits buffers."""
    from scope_mega.plan import LOGIT_BYTES

    h, H, G, d, f, L, V, t = 5120, 40, 8, 128, 27648, 64, 152576, 8
    none = 4 * h / t + (2 * H + 2 * G) * d / t + 3 * f / t  # per token and layer
    base = ["rollout.max_new_tokens=31744", "rl.max_tokens_per_micro_batch=16384"]
    for cp in (1, 2):
        T = 32768 // cp
        logits = T * V // t * LOGIT_BYTES
        cases = {  # (kept, recomputed at once) per token
            "none": (L * none, 0),
            "selective": (L * (none - 3 * f / t - h / t), 0),  # TE: the MLP with its fused norm
            "full": (L * h / t, none),  # uniform, 1 layer: each layer's input, one layer recomputed
        }
        for recompute, (kept, once) in cases.items():
            plan = _plan("qwen2.5-32b.yaml", [*base, f"parallel.cp={cp}", f"model.recompute={recompute}"], 64)
            assert plan.trainer.activations == int(2 * T * kept + max(2 * T * once, logits)), (cp, recompute)
    T, logits = 32768, 32768 * V // t * LOGIT_BYTES
    block = _plan(
        "qwen2.5-32b.yaml",
        [*base, "model.recompute=full", "model.recompute_method=block", "model.recompute_num_layers=16"],
        64,
    )
    assert block.trainer.activations == int(2 * T * (16 * h / t + 48 * none) + max(2 * T * none, logits))
    no_sp = _plan("qwen2.5-32b.yaml", [*base, "parallel.sequence_parallel=false", "model.recompute=none"], 64)
    assert no_sp.trainer.activations == int(2 * T * L * (none + 4 * h - 4 * h / t) + logits)


def test_the_local_attention_counts_its_s_squared_probabilities():
    """transformer_impl local (CPU runs) materialises [heads, s, s] probabilities and expands K and V to
    every query head; selective recompute (core_attn, layernorm, mlp) keeps the attention's inputs."""
    from scope_mega.plan import ActivationLayout, ModelSize, activation_bytes

    size = ModelSize(
        hidden=256,
        layers=4,
        heads=8,
        kv_heads=2,
        head_dim=32,
        ffn=688,
        vocab=1000,
        tied=False,
        qkv_bias=False,
        qk_norm=False,
    )
    local = ActivationLayout(
        local_spec=True, dtype_bytes=4, selective_modules=("core_attn", "layernorm", "mlp")
    )
    for s in (1024, 4096):
        per_token = 4 * 256 + 4 * 8 * 32 + 8 * s + 3 * 688
        assert activation_bytes(size, local, 4, s, s) == 4 * s * 4 * per_token
    selective = ActivationLayout(**{**local.__dict__, "recompute": "selective"})
    assert activation_bytes(size, selective, 4, 4096, 4096) == 4 * 4096 * 4 * (2 * 256 + (16 + 4) * 32)
    cp2 = ActivationLayout(**{**local.__dict__, "cp": 2})  # K, V of the whole sequence gathered
    assert activation_bytes(size, cp2, 1, 2048, 4096) == 4 * 2048 * (
        4 * 256 + (2 + 4) * 8 * 32 + 8 * 4096 + 3 * 688
    )


def test_a_refusal_names_the_knobs_that_fit_with_their_figures(capsys):
    ex = str(EXAMPLES / "qwen2.5-32b.yaml")
    argv = ["--world-size", "32", "rollout.max_new_tokens=30000", "model.recompute=none"]
    assert main(["train", ex, "--dry-run", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the update phase needs 130.5 GiB" in err
    assert "it fits with model.recompute=full -> 79.4 GiB" in err
    ex = str(EXAMPLES / "qwen2.5-math-7b.yaml")  # only the TP and PP the heads and layers allow
    assert main(["train", ex, "--dry-run", "--world-size", "8", "parallel.distributed_optimizer=false"]) == 2
    err = capsys.readouterr().err
    assert "parallel.tp=4 -> 51.1 GiB; parallel.pp=2 -> 54.7 GiB" in err and "parallel.tp=8" not in err


@pytest.mark.parametrize(
    "name, world, override, knob",
    [
        ("qwen2.5-32b-32k.yaml", 64, "model.recompute=none", "model.recompute=selective -> 77.3 GiB"),
        ("qwen2.5-32b-32k.yaml", 64, "parallel.cp=1", "parallel.cp=2 -> 77.3 GiB"),
        ("llama-3.3-70b-16k.yaml", 64, "model.recompute=none", "model.recompute=selective -> 51.7 GiB"),
    ],
)
def test_long_examples_fit_only_with_their_recompute_and_cp(name, world, override, knob, capsys):
    assert main(["train", str(EXAMPLES / name), "--dry-run", "--world-size", str(world), override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("config error: plan: the update phase needs") and err.count("\n") == 1, err
    assert knob in err, err


def test_context_parallel_rules(capsys):
    """CP > 1 is a layout like any other; a2a needs the heads per TP rank divisible by CP (the 32B at
    TP=8 has 5 query heads and 1 KV head per rank: p2p)."""
    ex = str(EXAMPLES / "qwen2.5-32b-32k.yaml")
    assert main(["train", ex, "--dry-run", "--world-size", "64", "parallel.cp_comm_type=a2a"]) == 2
    err = capsys.readouterr().err
    assert "parallel.cp_comm_type=a2a needs the query heads per TP rank (40 / tp=8 = 5) divisible by " in err
    assert "use parallel.cp_comm_type=p2p" in err
    assert main(["train", ex, "--dry-run", "--world-size", "40"]) == 2
    assert "world size 40 is not a multiple of tp*pp*cp = 16" in capsys.readouterr().err


def test_engines_get_the_longest_prompt_plus_response_as_max_model_len(capsys):
    from scope_mega.plan import rollout_max_model_len

    cfg, _, _ = load_config_for_target(EXAMPLES / "qwen2.5-32b-32k.yaml")
    assert rollout_max_model_len(cfg) == 32768
    plan = make_plan(cfg, "cuda", world_size=64)  # the KV cache counts full sequences of that length
    assert plan.engine.max_sequences == plan.engine.kv_cache // (2 * 64 * 1 * 128 * 2) // 32768 == 16
    ex = str(EXAMPLES / "qwen2.5-math-7b.yaml")  # 4096 positions
    assert main(["train", ex, "--dry-run", "--world-size", "8", "rollout.max_new_tokens=3584"]) == 2
    err = capsys.readouterr().err
    assert "1024 + 3584 = 4608 tokens is more than the model's max_position_embeddings=4096" in err
