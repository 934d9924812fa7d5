"""A model's pipeline stages run over micro-batches through Megatron's pipeline schedule (any PP size).

A micro-batch (`Batch`) is a dict of [b, s] tensors with `input_ids` and `position_ids` (packed ones
also `cu_seqlens`), plus whatever the caller's step reads. `schedule` runs Megatron's forward-backward
function for this PP size with a caller's forward step, built from `on_device` and `model_forward`.
`pipeline_forward` is its forward-only use: the last stage hands each micro-batch's output to a
callback (the PRM's scores, the reference logprobs). `train_step` builds the training step on the same
pieces.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Batch = dict[str, torch.Tensor]


def on_device(batch: Batch, model: torch.nn.Module) -> Batch:
    """The batch's tensors moved to `model`'s device, in place: micro-batches are built in host memory,
    and what a forward stores in them (logprobs) stays beside the rest."""
    device = next(model.parameters()).device
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.device != device:
            batch[key] = value.to(device, non_blocking=True)
    return batch


def model_forward(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """This stage's forward on a micro-batch; one that carries `cu_seqlens` is packed (THD layout:
    one row of sequences end to end, each attending within itself, RoPE restarting at each). Under
    context parallelism `cu_seqlens` are the whole sequences' (each a multiple of 2 x CP, see
    `models.context_parallel`), given as the padded ones too: Transformer Engine's CP attention reads
    those (TE issue #3331: without them a length not divisible by 2 x CP can attend wrongly)."""
    packed = None
    if "cu_seqlens" in batch:
        from megatron.core import parallel_state
        from megatron.core.packed_seq_params import PackedSeqParams

        cu = batch["cu_seqlens"]
        longest = int((cu[1:] - cu[:-1]).max())
        padded = cu if parallel_state.get_context_parallel_world_size() > 1 else None
        packed = PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=cu,
            cu_seqlens_kv=cu,
            cu_seqlens_q_padded=padded,
            cu_seqlens_kv_padded=padded,
            max_seqlen_q=longest,
            max_seqlen_kv=longest,
        )
    return model(batch["input_ids"], batch["position_ids"], attention_mask=None, packed_seq_params=packed)


def schedule(model: list, micro_batches: list[Batch], forward_step_func, forward_only: bool) -> list:
    """Megatron's schedule for this PP size over the micro-batches, which may differ in [batch, seq]
    shape (`variable_seq_lengths`: pipeline stages exchange shapes; see `models.arch`)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    mbs = max(mb["input_ids"].shape[0] for mb in micro_batches)
    seq = max(mb["input_ids"].shape[1] for mb in micro_batches)
    return get_forward_backward_func()(
        forward_step_func=forward_step_func,
        data_iterator=iter(micro_batches),
        model=model,
        num_microbatches=len(micro_batches),
        seq_length=seq,
        micro_batch_size=mbs,
        forward_only=forward_only,
    )


def pipeline_forward(
    model: list, micro_batches: list[Batch], on_output: Callable[[torch.Tensor, Batch], None]
) -> None:
    """Forward only, through the pipeline schedule (any PP size): on the last stage, `on_output(output,
    batch)` gets each micro-batch's model output, in order. Every rank of the model-parallel group
    calls it with micro-batches of the same shapes."""

    def forward_step(data_iterator, chunk):
        batch = on_device(next(data_iterator), chunk)
        output = model_forward(chunk, batch)

        def keep(out: torch.Tensor):
            on_output(out, batch)
            return out.sum() * 0, torch.zeros((), dtype=torch.int), {}

        return output, keep

    with torch.no_grad():
        schedule(model, micro_batches, forward_step, forward_only=True)
