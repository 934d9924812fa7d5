"""Checkpoints written under one TP/PP/CP layout load under another with bitwise-identical weights
(CP ranks hold replicated weights: a run saved at CP=2 loads at CP=1 and the reverse)."""

from pathlib import Path

import pytest
import torch

from scope_mega.runtime.spawn import spawn_local

pytestmark = [pytest.mark.distributed]

HF = dict(
    model_type="qwen2",  # QKV bias + GQA: the layouts that a wrong reshard would scramble
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=100,
    max_position_embeddings=64,
    tie_word_embeddings=True,  # tied output layer across pipeline stages
)


def _build(tp, pp, cp=1):
    from scope_mega.config import ModelConfig, ParallelConfig
    from scope_mega.models.gpt import build_gpt_model
    from scope_mega.runtime.distributed import init_distributed

    par = ParallelConfig(tp=tp, pp=pp, cp=cp)
    seed = 11 + tp * 10 + pp + cp * 100  # different init per layout
    dev = init_distributed(tp=tp, pp=pp, cp=cp, device="cpu", seed=seed)
    model, spec = build_gpt_model(ModelConfig(hf_config=dict(HF), make_vocab_size_divisible_by=32), par, dev)
    return model, spec, par


def _worker(tmp: str):
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from scope_mega.checkpointing import TrainerState, save_checkpoint
    from scope_mega.config import OptimConfig
    from scope_mega.runtime.distributed import destroy_distributed
    from scope_mega.train_step import setup_training
    from scope_mega.weights.megatron_ckpt import load_model_weights

    tmp = Path(tmp)
    model, _, _ = _build(1, 1)
    reference = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    if dist.get_rank() == 0:
        (tmp / "ref" / "model").mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), str(tmp / "ref" / "model"))
    destroy_distributed(keep_process_group=True)
    for tp, pp, cp in [(2, 1, 1), (1, 2, 1), (2, 2, 1), (1, 1, 2), (2, 1, 2)]:
        # reference (TP=1) -> this layout -> trainer checkpoint at this layout -> back to TP=1
        model, spec, par = _build(tp, pp, cp)
        load_model_weights(tmp / "ref", model)
        state = setup_training(model, spec.vocab_size, OptimConfig(), par, total_steps=1)
        run_name = f"run_{tp}x{pp}" + (f"x{cp}" if cp > 1 else "")
        ckpt = save_checkpoint(tmp / run_name, state, TrainerState(step=1), config={})
        destroy_distributed(keep_process_group=True)
        model, _, _ = _build(1, 1)
        load_model_weights(ckpt, model)
        loaded = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
        assert loaded.keys() == reference.keys()
        for name, tensor in reference.items():
            assert torch.equal(loaded[name], tensor), f"{tp}x{pp}x{cp}: {name} changed in the round trip"
        destroy_distributed(keep_process_group=True)
    destroy_distributed()


def test_checkpoint_reshards_bitwise(tmp_path):
    spawn_local(_worker, 4, str(tmp_path))
    for layout in ("2x1", "1x2", "2x2", "1x1x2", "2x1x2"):
        root = tmp_path / f"run_{layout}"
        assert (root / "latest").read_text() == "step_00000001"
        assert not list(root.glob("*.tmp")), "no temp directory may survive a completed save"
