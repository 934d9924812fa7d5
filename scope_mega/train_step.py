"""The training engine: Megatron DDP + Megatron optimizer + `get_forward_backward_func`.

A step takes this data-parallel rank's micro-batches (dicts of [b, s] tensors with `input_ids`,
`position_ids`, `targets`, plus whatever the loss needs; packed ones also `cu_seqlens`) and a loss
function over per-token log-probabilities. Pipeline parallelism (run through `models.pipeline`),
micro-batching and gradient reduction are Megatron's own.

Loss contract (`LossFn`): `loss_fn(logprobs, batch, entropy) -> (loss_sum, normaliser, metrics)`.
`loss_sum` is a scalar, `normaliser` an int tensor, `metrics` maps a name to a (sum, count) pair of
tensors. Megatron runs with `calculate_per_token_loss=True`: it sums `normaliser` over micro-batches
and data-parallel ranks and divides the summed gradients by it, so the step optimises
sum(loss_sum) / sum(normaliser) over the whole global batch, independent of the DP/micro-batch split.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from scope_mega.config import OptimConfig, ParallelConfig
from scope_mega.models.logprobs import token_logprobs, vocab_parallel_entropy
from scope_mega.models.pipeline import Batch, model_forward, on_device, pipeline_forward, schedule

Metrics = dict[str, tuple[torch.Tensor, torch.Tensor]]
LossFn = Callable[[torch.Tensor, Batch, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor, Metrics]]


@dataclass
class TrainState:
    model: list  # Megatron DDP-wrapped model chunks (one per rank: no virtual pipeline stages)
    optimizer: object  # megatron.core.optimizer.MegatronOptimizer
    scheduler: object  # megatron.core.optimizer_param_scheduler.OptimizerParamScheduler
    vocab_size: int


def setup_training(
    model: torch.nn.Module,
    vocab_size: int,
    optim: OptimConfig,
    parallel: ParallelConfig,
    total_steps: int,
) -> TrainState:
    """Wrap a built model in Megatron DDP, create the Megatron optimizer and the LR schedule."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    config = model.config
    ddp = DistributedDataParallel(
        config=config,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=parallel.distributed_optimizer,
        ),
        module=model,
    )
    ddp.broadcast_params()  # DP replicas start from identical weights
    chunks = [ddp]
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp.no_sync
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=optim.lr,
            min_lr=optim.min_lr,
            weight_decay=optim.weight_decay,
            adam_beta1=optim.adam_beta1,
            adam_beta2=optim.adam_beta2,
            adam_eps=optim.adam_eps,
            clip_grad=optim.clip_grad,
            bf16=config.bf16,
            params_dtype=config.params_dtype,
            use_distributed_optimizer=parallel.distributed_optimizer,
        ),
        chunks,
    )
    steps = max(total_steps, 1)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if optim.warmup_steps else optim.lr,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=optim.warmup_steps,
        lr_decay_steps=max(steps, optim.warmup_steps + 1),
        lr_decay_style=optim.decay_style,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=steps,
        wd_incr_style="constant",
    )
    return TrainState(chunks, optimizer, scheduler, vocab_size)


def _forward_step(vocab_size: int, loss_fn: LossFn, need_entropy: bool, data_iterator, model):
    """Megatron forward_step_func: run the stage; on the last stage turn logits into token logprobs."""
    from megatron.core import parallel_state

    batch = on_device(next(data_iterator), model)
    output = model_forward(model, batch)
    if not parallel_state.is_pipeline_last_stage():
        return output, None

    def loss_func(logits: torch.Tensor):
        entropy = vocab_parallel_entropy(logits, vocab_size) if need_entropy else None
        logprobs = token_logprobs(logits, batch["targets"], vocab_size)
        loss_sum, normaliser, metrics = loss_fn(logprobs, batch, entropy)
        return loss_sum, normaliser.to(torch.int), {"loss": (loss_sum.detach(), normaliser), **metrics}

    return output, loss_func


def _run_schedule(
    model: list,
    vocab_size: int,
    micro_batches: list[Batch],
    loss_fn: LossFn,
    forward_only: bool,
    need_entropy: bool,
) -> list:
    step = partial(_forward_step, vocab_size, loss_fn, need_entropy)
    return schedule(model, micro_batches, step, forward_only)


def _reduce_metrics(outputs: list[Metrics]) -> dict[str, float]:
    """Sum (sum, count) pairs over micro-batches and DP x CP ranks (a CP rank holds part of each
    sequence) on the last stage; share with all stages."""
    from megatron.core import parallel_state

    result: dict[str, float] = {}
    if parallel_state.is_pipeline_last_stage():
        names = sorted(outputs[0]) if outputs else []
        totals = torch.zeros(2 * len(names), dtype=torch.float64)
        for out in outputs:
            for i, name in enumerate(names):
                totals[2 * i] += out[name][0].double().sum().cpu()
                totals[2 * i + 1] += out[name][1].double().sum().cpu()
        dp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        if dist.get_world_size(dp_group) > 1:
            dist.all_reduce(totals, group=dp_group)
        result = {n: (totals[2 * i] / totals[2 * i + 1].clamp(min=1)).item() for i, n in enumerate(names)}
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        box = [result]
        group = parallel_state.get_pipeline_model_parallel_group()
        src = dist.get_global_rank(group, dist.get_world_size(group) - 1)
        dist.broadcast_object_list(box, src=src, group=group)
        result = box[0]
    return result


def train_step(
    state: TrainState, micro_batches: list[Batch], loss_fn: LossFn, need_entropy: bool = False
) -> dict[str, float]:
    """One optimizer step over this DP rank's micro-batches; returns global metrics (same on all ranks)."""
    for chunk in state.model:
        chunk.zero_grad_buffer()
    state.optimizer.zero_grad()
    outputs = _run_schedule(
        state.model, state.vocab_size, micro_batches, loss_fn, forward_only=False, need_entropy=need_entropy
    )
    lr = state.optimizer.param_groups[0]["lr"]  # the rate this step uses (the scheduler moves it after)
    ok, grad_norm, _ = state.optimizer.step()
    if not ok:
        raise RuntimeError("optimizer step was skipped (non-finite gradients)")
    state.scheduler.step(increment=1)
    metrics = _reduce_metrics(outputs)
    metrics["grad_norm"] = float(grad_norm)
    metrics["lr"] = lr
    return metrics


def backward_grad_norm(state: TrainState, micro_batches: list[Batch], loss_fn: LossFn) -> float:
    """The norm of the gradient of the loss over this DP rank's micro-batches (reduced over DP as in
    `train_step`, normed over the model-parallel ranks by the optimizer), without an optimizer step;
    the gradient buffers are zeroed before and after."""
    for chunk in state.model:
        chunk.zero_grad_buffer()
    state.optimizer.zero_grad()
    _run_schedule(
        state.model, state.vocab_size, micro_batches, loss_fn, forward_only=False, need_entropy=False
    )
    state.optimizer.prepare_grads()
    norm = float(state.optimizer.get_grad_norm())
    for chunk in state.model:
        chunk.zero_grad_buffer()
    state.optimizer.zero_grad()
    return norm


def evaluate_loss(state: TrainState, micro_batches: list[Batch], loss_fn: LossFn) -> dict[str, float]:
    """Forward-only pass with the same loss contract (no gradients, no optimizer step)."""
    with torch.no_grad():
        outputs = _run_schedule(
            state.model, state.vocab_size, micro_batches, loss_fn, forward_only=True, need_entropy=False
        )
    return _reduce_metrics(outputs)


def store_logprobs(model: list, vocab_size: int, micro_batches: list[Batch], key: str) -> None:
    """Set `batch[key]` to the per-token logprobs [b, s] of each micro-batch's `targets` under `model`'s
    weights (chunks of any model of the policy's shape, e.g. the frozen KL reference). Forward only,
    through the same pipeline schedule, so the logprobs land on the last stage, where the loss reads them.
    """

    def stash(logits: torch.Tensor, batch: Batch) -> None:
        batch[key] = token_logprobs(logits, batch["targets"], vocab_size)

    pipeline_forward(model, micro_batches, stash)


def shard_for_data_parallel(items: list, dp_rank: int, dp_size: int) -> list:
    """This DP rank's contiguous slice of a global list (its length must divide evenly)."""
    if len(items) % dp_size:
        raise ValueError(f"{len(items)} items cannot be split evenly over {dp_size} data-parallel ranks")
    per = len(items) // dp_size
    return items[dp_rank * per : (dp_rank + 1) * per]


def lm_loss(logprobs: torch.Tensor, batch: Batch, entropy: torch.Tensor | None = None):
    """Token-mean negative log-likelihood over `loss_mask` (SFT); the normaliser is the token count."""
    mask = batch["loss_mask"].float()
    return -(logprobs * mask).sum(), mask.sum().to(torch.int), {}
