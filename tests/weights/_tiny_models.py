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


def countdown_policy_run(root: Path, calib: int, **config) -> dict:
    """A Countdown run directory under `root` as the trainer leaves it (its tokenizer, one RL checkpoint
    with the config it recorded) holding a random tiny Llama whose weights are bf16 values (in the
    dtype of `config`, default fp32); also the model's HF folder and the first `calib` training prompts.
    `config` overrides the Llama's shape."""
    import json
    import shutil
    import subprocess
    import sys

    from scope_mega.config import parse_config, to_dict
    from scope_mega.tasks import build_task, prepare_tokenizer

    repo = Path(__file__).resolve().parents[2]
    cfg = parse_config(repo / "examples" / "tiny_cpu.yaml", [f"run_dir={root / 'run'}"])
    tok = prepare_tokenizer(cfg)
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
    shape.update(num_key_value_heads=1, max_position_embeddings=128, tie_word_embeddings=True)
    shape.update(config)
    hf = transformers.LlamaConfig(
        vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, **shape
    )
    model = transformers.LlamaForCausalLM(hf).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if "norm" in name else 0.0
            p.copy_((base + 0.05 * torch.randn(p.shape, generator=gen)).bfloat16().to(p.dtype))
    model.save_pretrained(root / "hf")
    imported = root / "megatron"
    result = subprocess.run(
        [sys.executable, "-m", "checkpoints_convert", "hf-to-megatron", "--hf-dir", str(root / "hf")]
        + ["--out", str(imported)],
        cwd=repo, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    step = root / "run" / "checkpoints_rl" / "step_00000001"
    shutil.copytree(imported / "model", step / "model")
    config_dict = to_dict(cfg)
    config_dict["model"]["hf_config"] = str(root / "hf")
    (step / "trainer_state.json").write_text(json.dumps({"config": config_dict}))
    (step.parent / "latest").write_text(step.name)
    prompts = [torch.tensor([p.ids]) for p in build_task(cfg).train[:calib]]
    return dict(root=root, run=root / "run", hf=root / "hf", cfg=cfg, prompts=prompts)
