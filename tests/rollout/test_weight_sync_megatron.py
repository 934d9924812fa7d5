"""Per-step weight sync from a TP=2 Megatron model (2 gloo processes) into the transformers engine: the
engine then scores its own samples exactly as Megatron does; the live stream is the HF model's
parameter set, in bounded buckets; a corrupted stream fails with a clear error."""

import re

import pytest
import torch
from _tiny_config import TINY as TINY_SHAPE

from scope_mega.runtime.spawn import spawn_local

pytestmark = [pytest.mark.distributed]

TINY = dict(TINY_SHAPE, eos_token_id=2)  # vocab 100: padded to 128 in Megatron, trimmed back
CONFIGS = [
    dict(model_type="qwen2", tie_word_embeddings=True, **TINY),  # QKV bias, GQA, tied output layer
    dict(model_type="llama", tie_word_embeddings=False, **TINY),
]
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14]]
BUCKET = 32 * 1024


def _megatron_logprobs(model, spec, prompt, completion):
    """Megatron's vocab-parallel logprobs of `completion` after `prompt` (TP-collective)."""
    from scope_mega.models.logprobs import token_logprobs

    ids = torch.tensor([prompt + completion])
    pos = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        logits = model(ids[:, :-1], pos[:, :-1], attention_mask=None)
    return token_logprobs(logits, ids[:, 1:], spec.vocab_size)[0, len(prompt) - 1 :]


def _worker():
    import torch.distributed as dist

    from scope_mega.config import ModelConfig, ParallelConfig
    from scope_mega.models.arch import load_hf_config
    from scope_mega.models.gpt import build_gpt_model
    from scope_mega.rollout import SamplingParams, WeightSyncError, sync_weights
    from scope_mega.rollout.hf_engine import HFEngine
    from scope_mega.rollout.weight_sync import hf_parameter_shapes
    from scope_mega.runtime.distributed import destroy_distributed, init_distributed
    from scope_mega.weights.stream_collective import iter_hf_weights

    for i, hf_dict in enumerate(CONFIGS):
        dev = init_distributed(tp=2, device="cpu", seed=100 + i)
        model, spec = build_gpt_model(ModelConfig(hf_config=dict(hf_dict)), ParallelConfig(tp=2), dev)
        model.eval()
        rank = dist.get_rank()
        hf = load_hf_config(dict(hf_dict))
        torch.manual_seed(999)  # the engine starts from different random weights
        engine = HFEngine.from_config(hf, decode=str) if rank == 0 else None
        report = sync_weights(engine, model, spec, bucket_bytes=BUCKET)
        with torch.no_grad():  # an optimizer step, then the steady-state sync into the engine's weights
            for p in model.parameters():
                p.mul_(0.9)
        report = sync_weights(engine, model, spec, bucket_bytes=BUCKET)
        if rank == 1:  # only model-parallel rank 0 receives: an engine elsewhere is refused
            with pytest.raises(ValueError, match="model-parallel rank 0"):
                sync_weights(object(), model, spec, bucket_bytes=BUCKET)
        else:
            sync_weights(engine, model, spec, bucket_bytes=BUCKET)

        # Engine samples (rank 0) -> both ranks score them with TP=2 Megatron -> identical logprobs.
        samples = [None]
        if rank == 0:
            assert report.missing == [] and report.tensors == len(hf_parameter_shapes(hf))
            outs = engine.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=10, seed=1))
            outs += engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=10))
            samples[0] = [[(c.token_ids, c.logprobs) for c in cs] for cs in outs]
        dist.broadcast_object_list(samples, src=0)
        samples = samples[0]
        for prompt, completions in zip(PROMPTS * 2, samples):
            for ids, engine_lp in completions:
                ref = _megatron_logprobs(model, spec, prompt, ids)
                diff = (torch.tensor(engine_lp) - ref).abs().max().item()
                assert diff <= 1e-4, f"{hf.model_type}: engine vs Megatron logprobs differ by {diff}"

        # The live stream: exactly the HF model's parameters, with their shapes, in bounded buckets.
        stream = list(iter_hf_weights(model, spec, BUCKET))
        if rank == 0:
            expected = hf_parameter_shapes(hf)
            names = [n for bucket in stream for n, _ in bucket]
            assert sorted(names) == sorted(expected), "stream names != HF model parameters"
            for bucket in stream:
                nbytes = sum(t.numel() * t.element_size() for _, t in bucket)
                assert nbytes <= BUCKET or len(bucket) == 1
                for n, t in bucket:
                    assert t.shape == expected[n], f"{n}: {tuple(t.shape)} vs HF {tuple(expected[n])}"
            flat = [(n, t) for bucket in stream for n, t in bucket]
            j = next(k for k, (n, _) in enumerate(flat) if n.endswith("self_attn.k_proj.weight"))
            name, tensor = flat[j]
            bad_name = flat[:j] + [(name.replace("k_proj", "key_proj"), tensor)] + flat[j + 1 :]
            with pytest.raises(WeightSyncError, match=re.escape(name.replace("k_proj", "key_proj"))):
                engine.update_weights(bad_name)
            bad_shape = flat[:j] + [(name, tensor.t())] + flat[j + 1 :]
            with pytest.raises(
                WeightSyncError, match=re.escape(f"'{name}' has shape {tuple(tensor.t().shape)}")
            ):
                engine.update_weights(bad_shape)
            with pytest.raises(WeightSyncError, match="full sync left 1 weight"):
                engine.update_weights(flat[:j] + flat[j + 1 :])
        destroy_distributed(keep_process_group=True)
    destroy_distributed()


def test_megatron_tp2_sync_gives_the_engine_megatrons_logprobs():
    spawn_local(_worker, 2)
