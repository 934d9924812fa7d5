"""tools/make_tiny_math_kit.py builds, offline, a kit whose every part loads the way the pipeline loads it:
the tokenizer, the transformers policy/guide/PRM, the converted Megatron policy and PRM (built and loaded
as the trainer does, holding the HF weights), and the train/eval benchmark files."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from scope_mega.config import ModelConfig, ParallelConfig
from scope_mega.data.benchmarks import load_benchmark
from scope_mega.data.hf_tokenizer import HFTokenizer
from scope_mega.runtime.spawn import spawn_local
from scope_mega.weights.mapping import ConversionError

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("make_tiny_math_kit", ROOT / "tools" / "make_tiny_math_kit.py")
kit_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kit_tool)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<extra_0>"]


def _load_worker(kit: str, report: str) -> None:
    """Build the policy and the PRM from their HF configs and load the converted checkpoints into them,
    as the trainer does; save the loaded embedding and PRM head for comparison with the HF files."""
    from scope_mega.models.gpt import build_gpt_model
    from scope_mega.models.prm import build_prm_model, load_prm_weights
    from scope_mega.runtime.distributed import destroy_distributed, init_distributed
    from scope_mega.weights.megatron_ckpt import load_model_weights

    kit_dir = Path(kit)
    device = init_distributed(device="cpu")
    try:
        config = ModelConfig(hf_config=str(kit_dir / "policy"), transformer_impl="local")
        policy, spec = build_gpt_model(config, ParallelConfig(), device)
        load_model_weights(kit_dir / "policy_megatron", policy)
        config = ModelConfig(hf_config=str(kit_dir / "prm"), transformer_impl="local")
        prm, prm_spec = build_prm_model(config, ParallelConfig(), device)
        load_prm_weights(kit_dir / "prm_megatron", prm, prm_spec)  # fails unless every parameter is set
        loaded = {
            "embedding": policy.embedding.word_embeddings.weight[: spec.vocab_size],
            "output": policy.output_layer.weight[: spec.vocab_size],
            "prm_score": prm.score[2].weight,
        }
        torch.save({k: v.detach().clone() for k, v in loaded.items()}, report)
    finally:
        destroy_distributed()


@pytest.fixture(scope="module")
def kit(tmp_path_factory) -> dict[str, Path]:
    return kit_tool.build_kit(tmp_path_factory.mktemp("kit") / "kit", seed=0)


def test_layout_and_refusal_to_overwrite(kit):
    root = kit["policy"].parent
    assert sorted(p.name for p in root.iterdir()) == sorted(p.name for p in kit.values())
    assert not [p for p in root.parent.iterdir() if p.name != "kit"], "temp dir left behind"
    with pytest.raises(ConversionError, match="already exists"):
        kit_tool.build_kit(root)


def test_tokenizer(kit):
    hf = transformers.AutoTokenizer.from_pretrained(kit["tokenizer"], local_files_only=True)
    tok = HFTokenizer(hf)
    assert 400 <= tok.vocab_size <= 600 and tok.is_byte_level
    ids = {t: hf.convert_tokens_to_ids(t) for t in SPECIALS}
    for special in SPECIALS:
        assert tok.encode(special) == [ids[special]]
    assert (tok.eos_id, tok.pad_id, tok.bos_id) == (ids["<|im_end|>"], ids["<|endoftext|>"], None)
    assert tok.stop_token_ids == [ids["<|im_end|>"], ids["<|endoftext|>"]]
    for text in ["Janet's ducks lay 16 eggs.\n\n#### 18", "½ of √2 is π? 😀 数学 \\boxed{\\frac{1}{2}}", ""]:
        assert tok.decode(tok.encode(text)) == text
        offsets = tok.token_offsets(tok.encode(text))
        assert (offsets[-1][1] if offsets else 0) == len(text)
    chat = hf.apply_chat_template(
        [{"role": "user", "content": "Q?"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n"
    for model_dir in ("policy", "guide", "prm"):
        assert HFTokenizer.from_dir(kit[model_dir]).encode(chat) == tok.encode(chat)


def test_hf_models_load(kit):
    policy = transformers.AutoModelForCausalLM.from_pretrained(kit["policy"], local_files_only=True)
    guide = transformers.AutoModelForCausalLM.from_pretrained(kit["guide"], local_files_only=True)
    vocab = len(transformers.AutoTokenizer.from_pretrained(kit["tokenizer"], local_files_only=True))
    for model in (policy, guide):
        assert type(model).__name__ == "Qwen2ForCausalLM"
        cfg = model.config
        shape = (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads)
        assert shape == (64, 64, 2, 2) and cfg.num_key_value_heads == 2
        assert (cfg.vocab_size, cfg.max_position_embeddings, cfg.tie_word_embeddings) == (vocab, 512, False)
        assert model.dtype == torch.float32
    assert not torch.equal(policy.lm_head.weight, guide.lm_head.weight)
    eos = policy.generation_config.eos_token_id
    assert eos[0] == policy.config.eos_token_id == HFTokenizer.from_dir(kit["policy"]).eos_id
    config = json.loads((kit["prm"] / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForProcessRewardModel"]


def test_megatron_checkpoints_load_as_the_trainer_loads_them(kit, tmp_path):
    for name in ("policy_megatron", "prm_megatron"):
        assert (kit[name] / "model").is_dir() and (kit[name] / "hf" / "tokenizer.json").is_file()
    spawn_local(_load_worker, 1, str(kit["policy"].parent), str(tmp_path / "loaded.pt"))
    loaded = torch.load(tmp_path / "loaded.pt")
    policy = load_file(kit["policy"] / "model.safetensors")
    prm = load_file(kit["prm"] / "model.safetensors")
    assert torch.equal(loaded["embedding"], policy["model.embed_tokens.weight"])
    assert torch.equal(loaded["output"], policy["lm_head.weight"])
    assert torch.equal(loaded["prm_score"], prm["score.2.weight"])


def test_benchmark_files(kit, data_dir):
    train, evaluation = load_benchmark(kit["train"]), load_benchmark(kit["eval"])
    assert len(train) == 64 and len(evaluation) == 8
    gsm8k = (data_dir / "benchmarks" / "gsm8k.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    assert kit["train"].read_text(encoding="utf-8") == "".join(gsm8k[:64])
    assert train[0].answer == "18" and evaluation[0].answer == "27"
