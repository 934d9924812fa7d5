"""Tiny random HF checkpoints of every supported family, built locally from transformers' own config and
model classes (the ground truth we did not write), and a Megatron PRM stage for the tests."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

COMMON = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=100,  # padded to 128 (TP=1) / 256 (TP=2): padding rows always exist
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
)
LLAMA31_ROPE = dict(
    rope_type="llama3",
    rope_theta=500000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=16,
)
CASES = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=False)),
    "llama31_tied": ("LlamaConfig", dict(tie_word_embeddings=True, rope_parameters=LLAMA31_ROPE)),
    "qwen2_tied": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(tie_word_embeddings=False, head_dim=24)),
    "mistral": ("MistralConfig", dict(tie_word_embeddings=False, sliding_window=None)),
    "qwen2_prm": ("Qwen2Config", dict(tie_word_embeddings=False)),
}
LM_CASES = [c for c in CASES if c != "qwen2_prm"]
TOKENIZER_CONFIG = '{"model_max_length": 64, "note": "side file that must survive the round trip"}\n'


def hf_model(case: str, seed: int = 0) -> torch.nn.Module:
    """A random fp32 HF model of `case`; every tensor (norms included) drawn at random."""
    cls_name, extra = CASES[case]
    config = getattr(transformers, cls_name)(**COMMON, **extra)
    if case == "qwen2_prm":
        from scope_mega.weights.hf_prm import Qwen2ForProcessRewardModel

        model = Qwen2ForProcessRewardModel(config)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if "norm" in name else 0.0
            p.copy_(base + 0.2 * torch.randn(p.shape, generator=gen))
    return model.eval()


def write_hf_checkpoint(case: str, path: Path, seed: int = 0) -> Path:
    hf_model(case, seed).save_pretrained(path)
    (path / "tokenizer_config.json").write_text(TOKENIZER_CONFIG)
    return path
