"""The fused TP merge of the shared-memory weight export (`stream_shm.merge_plan` + `copy_blocks`) gives
exactly `mapping.to_hf(tp_merge(shards))` for every rule of every LM family, at any TP size and however
the shards are cut into row blocks."""

import pytest
import torch

from scope_mega.models.arch import load_hf_config
from scope_mega.rollout.weight_sync import hf_parameter_shapes
from scope_mega.weights.mapping import Dims, bindings, to_hf, to_megatron, tp_merge
from scope_mega.weights.stream_shm import copy_blocks, merge_plan

SIZES = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=1,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=4,
    vocab_size=100,
    max_position_embeddings=32,
)
CONFIGS = [
    dict(model_type="qwen2", tie_word_embeddings=False, **SIZES),  # QKV bias, untied head
    dict(model_type="qwen3", tie_word_embeddings=True, **SIZES),  # q/k norms
    dict(model_type="llama", tie_word_embeddings=False, **SIZES),
]
PADDED_VOCAB = 128


def _full_megatron_shapes(hf) -> list[tuple]:
    """(binding, full Megatron shape) of every exported tensor, from the HF model's shapes."""
    hf_shapes = hf_parameter_shapes(hf)
    out = []
    for b in bindings(hf):
        if b.rule.export:
            meta = [torch.empty(hf_shapes[n], device="meta") for n in b.hf]
            out.append((b, to_megatron(b.rule, meta, Dims.of(hf), PADDED_VOCAB).shape))
    return out


@pytest.mark.parametrize("config", CONFIGS, ids=[c["model_type"] for c in CONFIGS])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_fused_merge_equals_tp_merge_then_to_hf(config, tp):
    hf = load_hf_config(dict(config))
    dims = Dims.of(hf)
    gen = torch.Generator().manual_seed(tp)
    for binding, full in _full_megatron_shapes(hf):
        rule = binding.rule
        ranks = tp if rule.tp_dim is not None else 1
        shard_shape = list(full)
        if rule.tp_dim is not None:
            shard_shape[rule.tp_dim] //= tp
        shards = [torch.randn(shard_shape, generator=gen) for _ in range(ranks)]
        expected = to_hf(rule, tp_merge(rule, shards), dims)

        plan = merge_plan(rule, tuple(shard_shape), tp, dims)
        outs = [torch.full(shape, float("nan")) for shape in plan.shapes]
        for rank, shard in enumerate(shards):
            cuts = sorted(set(torch.randint(0, shard.shape[0] + 1, (3,), generator=gen).tolist()))
            edges = [0, *cuts, shard.shape[0]]
            for first, last in zip(edges, edges[1:]):
                copy_blocks(plan, outs, rank, shard[first:last], first)
        assert len(outs) == len(expected) == len(binding.hf)
        for name, got, want in zip(binding.hf, outs, expected):
            assert torch.equal(got, want), f"{name} (tp={tp})"


def test_a_rule_that_is_not_block_copies_is_refused():
    from scope_mega.weights.mapping import Rule

    hf = load_hf_config(dict(CONFIGS[2]))
    # a column-split tensor whose HF form drops rows (vocab trimming) cannot be row/column blocks
    rule = Rule("output_layer.weight", ("lm_head.weight",), "vocab", 1)
    with pytest.raises(ValueError, match="not row/column block copies"):
        merge_plan(rule, (PADDED_VOCAB, 16), 2, Dims.of(hf))
