"""Trainer-side decoding straight from the Megatron model (evaluation without a rollout engine).

Plain full-recompute decoding (no KV cache): simple and exact, and fast enough for the tiny models
this is used with (SFT evaluation on CPU). Works with TP (logits are gathered over the TP group);
pipeline- and context-parallel models must go through a rollout engine instead.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_id: int,
    vocab_size: int,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    batch_size: int = 64,
) -> list[list[int]]:
    """Continue each prompt until `eos_id` (included) or `max_new_tokens`; greedy when temperature is 0.

    Prompts are batched with others of the same length so no padding ever enters attention.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        raise ValueError("models.generate needs PP=1; decode pipeline-parallel models with a rollout engine")
    if parallel_state.get_context_parallel_world_size() > 1:
        raise ValueError("models.generate needs CP=1; decode context-parallel models with a rollout engine")
    model = getattr(model, "module", model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[list[int]] = [[] for _ in prompts]
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    for _, idx_all in sorted(by_len.items()):
        for start in range(0, len(idx_all), batch_size):
            idx = idx_all[start : start + batch_size]
            seqs = torch.tensor([prompts[i] for i in idx], device=device)
            done = torch.zeros(len(idx), dtype=torch.bool, device=device)
            for _ in range(max_new_tokens):
                pos = torch.arange(seqs.shape[1], device=device).expand_as(seqs)
                logits = model(seqs, pos, attention_mask=None)[:, -1]
                logits = gather_from_tensor_model_parallel_region(logits)[:, :vocab_size].float()
                if temperature > 0:
                    probs = torch.softmax(logits / temperature, dim=-1)
                    nxt = torch.multinomial(probs, 1, generator=generator)[:, 0]
                else:
                    nxt = logits.argmax(dim=-1)
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                seqs = torch.cat([seqs, nxt[:, None]], dim=1)
                done |= nxt == eos_id
                if bool(done.all()):
                    break
            for row, i in enumerate(idx):
                new = seqs[row, len(prompts[i]) :].tolist()
                out[i] = new[: new.index(eos_id) + 1] if eos_id in new else new
    model.train(was_training)
    return out
