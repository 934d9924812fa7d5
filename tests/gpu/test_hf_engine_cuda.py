"""The transformers rollout engine on a CUDA device: greedy parity with `generate`, exact logprobs,
seeded sampling on the device generator, and sleep/wake_up actually releasing GPU memory."""

import pytest
import torch
import transformers

from scope_mega.rollout import SamplingParams
from scope_mega.rollout.hf_engine import HFEngine

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [15]]


def _engine(dtype=torch.float32):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
        max_position_embeddings=256,
        initializer_range=0.3,
        eos_token_id=None,
        pad_token_id=0,
    )
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).cuda().eval()
    return HFEngine(model, decode=lambda ids: " ".join(map(str, ids)))


def test_greedy_matches_generate_and_logprobs_are_exact_on_cuda():
    eng = _engine()
    ours = eng.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=24))
    width = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS], device="cuda")
    ref = eng.model.generate(
        input_ids=ids, attention_mask=(ids != 0).long(), do_sample=False, max_new_tokens=24, pad_token_id=0
    )
    assert [c[0].token_ids for c in ours] == ref[:, width:].tolist()
    for prompt, completions in zip(
        PROMPTS, eng.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=16, seed=0))
    ):
        for c in completions:
            with torch.no_grad():
                logits = eng.model(torch.tensor([prompt + c.token_ids], device="cuda")).logits[0].double()
            ref = torch.log_softmax(logits[len(prompt) - 1 : -1], -1)
            ref = ref.gather(-1, torch.tensor(c.token_ids, device="cuda")[:, None])[:, 0].cpu()
            assert (torch.tensor(c.logprobs, dtype=torch.float64) - ref).abs().max().item() <= 1e-4


def test_seeded_sampling_is_reproducible_on_cuda():
    eng = _engine(torch.bfloat16)
    run = lambda seed: [
        [c.token_ids for c in cs]
        for cs in eng.generate(PROMPTS, SamplingParams(n=4, max_new_tokens=16, seed=seed))
    ]
    assert run(3) == run(3)
    assert run(3) != run(4)


def test_sleep_releases_gpu_memory_and_wake_up_restores_the_model():
    eng = _engine()
    greedy = SamplingParams(temperature=0, max_new_tokens=8)
    before = eng.generate(PROMPTS, greedy)
    weights = [(n, p.detach().clone().cpu()) for n, p in eng.model.named_parameters()]
    torch.cuda.synchronize()
    awake = torch.cuda.memory_allocated()
    eng.sleep()
    assert next(eng.model.parameters()).device.type == "cpu"
    assert torch.cuda.memory_allocated() < awake - sum(t.numel() * t.element_size() for _, t in weights) // 2
    eng.update_weights(weights)  # allowed while asleep: lands in the CPU copy
    eng.wake_up()
    assert next(eng.model.parameters()).device.type == "cuda"
    assert eng.generate(PROMPTS, greedy) == before
