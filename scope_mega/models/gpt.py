"""The policy: a Megatron-Core `GPTModel` built from an HF architecture config for this rank's stage."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import transformers

from scope_mega.config import ModelConfig, ParallelConfig
from scope_mega.models import arch


@dataclass
class ModelSpec:
    """What the rest of the system needs to know about a built model."""

    hf_config: transformers.PretrainedConfig
    vocab_size: int  # the tokenizer's (HF) vocab size
    padded_vocab_size: int  # rows in the embedding / output layer, all TP ranks together
    transformer_impl: str  # "local" | "te"
    dtype: torch.dtype


def layer_spec(impl: str, qk_norm: bool):
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if impl == "te":
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_norm)
    from scope_mega.models.attention import PackedDotProductAttention

    spec = get_gpt_layer_local_spec(qk_layernorm=qk_norm, normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = PackedDotProductAttention
    return spec


def build_gpt_model(
    model_cfg: ModelConfig, parallel: ParallelConfig, device: torch.device
) -> tuple[torch.nn.Module, ModelSpec]:
    """Build this rank's pipeline stage of the policy (weights initialised; load a checkpoint to set them).

    Must run after `runtime.init_distributed`. Weights are created with Megatron's CPU initialisation
    on CPU (identical for every TP layout given the same seed) and on the GPU otherwise.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    hf = arch.load_hf_config(model_cfg.hf_config)
    impl = arch.check_transformer_impl(model_cfg, device)
    config = arch.transformer_config(hf, model_cfg, parallel, device)
    padded = arch.padded_vocab_size(hf.vocab_size, model_cfg.make_vocab_size_divisible_by, parallel.tp)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(impl, arch.has_qk_norm(hf)),
        vocab_size=padded,
        max_sequence_length=hf.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=bool(hf.tie_word_embeddings),
        position_embedding_type="rope",
        rotary_base=arch.rope_theta(hf),
    )
    scaling = arch.rope_scaling(hf)
    if scaling is not None:
        inv_freq = arch.llama3_inv_freq(arch.rope_theta(hf), arch.head_dim(hf), scaling)
        model.rotary_pos_emb.inv_freq = inv_freq.to(model.rotary_pos_emb.inv_freq.device)
    if device.type == "cuda":
        model.cuda(torch.cuda.current_device())
    spec = ModelSpec(hf, hf.vocab_size, padded, impl, config.params_dtype)
    return model, spec
