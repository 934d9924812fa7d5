"""The mapping tables and transforms, checked against transformers' own weight names and hand layouts."""

from pathlib import Path

import pytest
import torch
import transformers
from _tiny_models import CASES, write_hf_checkpoint
from safetensors import safe_open

from scope_mega.models import arch
from scope_mega.weights.hf_to_megatron import check_hf_tensors
from scope_mega.weights.mapping import (
    EMBEDDING,
    ConversionError,
    Dims,
    Rule,
    bind_parameters,
    canonical_name,
    family_for,
    hf_names,
    megatron_layout,
    to_hf,
    to_megatron,
    tp_merge,
)

QKV = Rule("self_attention.linear_qkv.weight", ("q", "k", "v"), "qkv", 0)
GATE_UP = Rule("mlp.linear_fc1.weight", ("gate", "up"), "gate_up", 0)
DIMS = Dims(heads=4, groups=2, head_dim=1, vocab_size=5)


@pytest.mark.parametrize("case", list(CASES))
def test_mapping_names_are_exactly_the_saved_hf_names(case, tmp_path: Path):
    """transformers' save_pretrained is the ground truth: nothing unmapped, nothing invented."""
    write_hf_checkpoint(case, tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        saved = set(f.keys())  # noqa: SIM118
    hf = arch.load_hf_config(tmp_path)
    assert set(hf_names(hf)) == saved
    assert family_for(hf).name == ("qwen2_prm" if case == "qwen2_prm" else hf.model_type)


def test_qkv_fuses_per_kv_group_and_tp_splits_whole_groups():
    q = torch.tensor([[0.0], [1.0], [2.0], [3.0]])  # 4 query heads, head_dim 1
    k = torch.tensor([[10.0], [11.0]])  # 2 KV groups
    v = torch.tensor([[20.0], [21.0]])
    fused = to_megatron(QKV, [q, k, v], DIMS, padded_vocab=0)
    assert fused.flatten().tolist() == [0, 1, 10, 20, 2, 3, 11, 21]
    rank_shards = [torch.tensor([[0.0], [1], [10], [20]]), torch.tensor([[2.0], [3], [11], [21]])]
    assert torch.equal(tp_merge(QKV, rank_shards), fused)  # TP rank r holds whole group r
    assert [t.flatten().tolist() for t in to_hf(QKV, fused, DIMS)] == [[0, 1, 2, 3], [10, 11], [20, 21]]
    bias = to_megatron(QKV, [q.flatten(), k.flatten(), v.flatten()], DIMS, padded_vocab=0)
    assert bias.tolist() == [0, 1, 10, 20, 2, 3, 11, 21]


def test_gate_up_tp_rank_holds_its_gate_then_its_up():
    gate, up = torch.arange(4.0)[:, None], 10 + torch.arange(4.0)[:, None]
    full = to_megatron(GATE_UP, [gate, up], DIMS, padded_vocab=0)
    assert full.flatten().tolist() == [0, 1, 2, 3, 10, 11, 12, 13]
    rank_shards = [torch.tensor([[0.0], [1], [10], [11]]), torch.tensor([[2.0], [3], [12], [13]])]
    assert torch.equal(tp_merge(GATE_UP, rank_shards), full)


def test_vocab_padding_is_zero_rows_and_export_trims_it():
    emb = torch.randn(5, 3)
    padded = to_megatron(EMBEDDING, [emb], DIMS, padded_vocab=8)
    assert padded.shape == (8, 3) and torch.equal(padded[5:], torch.zeros(3, 3))
    assert torch.equal(to_hf(EMBEDDING, padded, DIMS)[0], emb)


def test_layouts_place_every_hf_row_once_and_only_padding_is_left_zero():
    dims = Dims(heads=8, groups=4, head_dim=3, vocab_size=10)
    for rule, rows in [(QKV, [24, 12, 12]), (GATE_UP, [8, 8]), (EMBEDDING, [10])]:
        layout = megatron_layout(rule, rows, dims, padded_vocab=16)
        placed = sorted((b.dst, b.dst + b.rows) for b in layout.blocks)
        assert all(a[1] <= b[0] for a, b in zip(placed, placed[1:])), rule  # no overlap
        for part, n in enumerate(rows):  # each HF row exactly once
            assert sorted(
                r for b in layout.blocks if b.part == part for r in range(b.src, b.src + b.rows)
            ) == list(range(n))
        assert layout.gaps() == ([(10, 16)] if rule is EMBEDDING else [])
    with pytest.raises(ConversionError, match="k_proj has 6 rows, expected 12"):
        megatron_layout(QKV, [24, 6, 12], dims, padded_vocab=16)
    with pytest.raises(ConversionError, match="up has shape"):
        to_megatron(GATE_UP, [torch.zeros(8, 6), torch.zeros(8, 1)], dims, padded_vocab=16)


def test_every_transform_inverts():
    dims = Dims(heads=8, groups=4, head_dim=3, vocab_size=10)
    cases = [
        (QKV, [torch.randn(24, 6), torch.randn(12, 6), torch.randn(12, 6)]),
        (QKV, [torch.randn(24), torch.randn(12), torch.randn(12)]),
        (GATE_UP, [torch.randn(8, 6), torch.randn(8, 6)]),
        (EMBEDDING, [torch.randn(10, 6)]),
        (Rule("n", ("n",)), [torch.randn(6)]),
    ]
    for rule, tensors in cases:
        full = to_megatron(rule, tensors, dims, padded_vocab=16)
        assert all(torch.equal(a, b) for a, b in zip(to_hf(rule, full, dims), tensors)), rule


def test_unsupported_architecture_names_the_supported_ones():
    with pytest.raises(ConversionError, match="supported: llama, qwen2, qwen3, mistral"):
        family_for(transformers.AutoConfig.for_model("gpt2"))


def _config(case: str):
    cls_name, extra = CASES[case]
    from _tiny_models import COMMON

    config = getattr(transformers, cls_name)(**COMMON, **extra)
    if case == "qwen2_prm":
        config.architectures = ["Qwen2ForProcessRewardModel"]
    return config


def test_hf_tensor_unused_or_missing_fails_loudly():
    hf = _config("qwen2_prm")
    names = hf_names(hf)
    check_hf_tensors(hf, names)
    with pytest.raises(ConversionError, match="not used by the qwen2_prm mapping.*lm_head.weight"):
        check_hf_tensors(hf, [*names, "lm_head.weight"])
    with pytest.raises(ConversionError, match="missing: score.2.bias"):
        check_hf_tensors(hf, [n for n in names if n != "score.2.bias"])
    with pytest.raises(ConversionError, match="not used by the qwen2 mapping.*score.0.weight"):
        check_hf_tensors(_config("qwen2_tied"), names)  # a PRM checkpoint read as a plain LM


def test_megatron_parameter_without_mapping_fails_loudly():
    def module(*names):
        m = torch.nn.Module()
        for name in names:
            parent = m
            *path, leaf = name.split(".")
            for part in path:
                if not hasattr(parent, part):
                    parent.add_module(part, torch.nn.Module())
                parent = getattr(parent, part)
            parent.register_parameter(leaf, torch.nn.Parameter(torch.zeros(1)))
        return m

    lm = _config("llama")
    assert len(bind_parameters(module("embedding.word_embeddings.weight", "output_layer.weight"), lm)) == 2
    prm_head = module("embedding.word_embeddings.weight", "score.0.weight", "score.2.bias")
    with pytest.raises(ConversionError, match="no llama mapping: score.0.weight, score.2.bias"):
        bind_parameters(prm_head, lm)
    with pytest.raises(ConversionError, match="no qwen2_prm mapping: output_layer.weight"):
        bind_parameters(module("output_layer.weight"), _config("qwen2_prm"))


def test_local_and_transformer_engine_norm_names_bind_to_one_rule():
    """Local spec `input_layernorm` / `pre_mlp_layernorm` are the TE spec's fused-norm weights; layer
    indices become global (this stage's first layer is global layer 5)."""
    local = {0: 5}
    assert canonical_name("decoder.layers.0.input_layernorm.weight", local) == (
        "decoder.layers.5.self_attention.linear_qkv.layer_norm_weight"
    )
    assert canonical_name("decoder.layers.0.pre_mlp_layernorm.weight", local) == (
        "decoder.layers.5.mlp.linear_fc1.layer_norm_weight"
    )
    te = "decoder.layers.0.mlp.linear_fc1.layer_norm_weight"
    assert canonical_name(te, local) == "decoder.layers.5.mlp.linear_fc1.layer_norm_weight"
    assert canonical_name("output_layer.weight", local) == "output_layer.weight"
