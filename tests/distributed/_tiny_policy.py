"""The tiny random Llama policy that the single-process trainer tests train (CPU or CUDA)."""

import torch

HF = dict(
    model_type="llama",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    vocab_size=64,
    max_position_embeddings=128,
)


def build_state(
    dev, dtype: str = "float32", distributed: bool = False, lr: float = 1e-4, clip_grad: float = 1.0
):
    """The policy wrapped for training (Megatron DDP, Adam, a constant LR), from seed 0 each time."""
    from scope_mega.config import ModelConfig, OptimConfig, ParallelConfig
    from scope_mega.models.gpt import build_gpt_model
    from scope_mega.train_step import setup_training

    torch.manual_seed(0)
    parallel = ParallelConfig(distributed_optimizer=distributed)
    model, spec = build_gpt_model(ModelConfig(hf_config=dict(HF), params_dtype=dtype), parallel, dev)
    return setup_training(model, spec.vocab_size, OptimConfig(lr=lr, clip_grad=clip_grad), parallel, 10)
