"""HF safetensors -> Megatron `torch_dist` checkpoint, one process per TP x PP shard.

Each rank builds its own stage of the model, fills every parameter from the HF tensors it is made of
(read one at a time, fused and TP-sliced by `mapping`), and all ranks save together with
`dist_checkpointing.save(model.sharded_state_dict())`, so the trainer can load the result at any
TP/PP. Output layout (the trainer's checkpoints use the same `model/`):

    <out>/model/   torch_dist checkpoint of the unwrapped GPTModel's sharded_state_dict() (no prefix)
    <out>/hf/      the HF config, generation config, tokenizer files: what export needs to go back

Everything is written under `<out>.tmp-XXXXXXXX` and renamed to `<out>` only when complete.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import transformers

from scope_mega.config import ModelConfig, ParallelConfig, RunConfig, validate
from scope_mega.models import arch
from scope_mega.weights import files
from scope_mega.weights.mapping import (
    ConversionError,
    Dims,
    bind_parameters,
    family_for,
    hf_names,
    is_prm,
    some_names,
    to_megatron,
    tp_shard,
)


@dataclass
class ImportPlan:
    """What every rank needs, checked before any process group exists (so bad input fails everywhere
    at once, with one message, instead of hanging a collective)."""

    hf: transformers.PretrainedConfig
    checkpoint: files.HFCheckpoint
    model: ModelConfig
    parallel: ParallelConfig


def plan_import(
    hf_dir: str | Path, out: str | Path, tp: int, pp: int, force: bool, vocab_divisible_by: int = 128
) -> ImportPlan:
    """Check the HF checkpoint (supported family, TP/PP fit, files complete, every tensor mapped)."""
    if not Path(hf_dir).is_dir():
        raise ConversionError(f"HF checkpoint directory {hf_dir} does not exist")
    hf = arch.load_hf_config(hf_dir)
    family_for(hf)
    ckpt = files.HFCheckpoint(hf_dir)
    check_hf_tensors(hf, ckpt.names)
    exact = "bfloat16" if set(ckpt.dtypes.values()) == {torch.bfloat16} else "float32"
    model = ModelConfig(
        hf_config=str(Path(hf_dir).resolve()),
        transformer_impl="local",
        params_dtype=exact,  # fp32 holds bf16 and fp16 values exactly; export casts back
        make_vocab_size_divisible_by=vocab_divisible_by,
    )
    parallel = ParallelConfig(tp=tp, pp=pp)
    validate(RunConfig(device="cpu", model=model, parallel=parallel))
    files.check_output_dir(out, force)
    return ImportPlan(hf, ckpt, model, parallel)


def check_hf_tensors(hf: transformers.PretrainedConfig, present: list[str]) -> None:
    """Every HF tensor is used by the mapping, and every tensor the mapping needs is present."""
    expected = hf_names(hf)
    family = family_for(hf).name
    missing = [n for n in expected if n not in set(present)]
    if missing:
        raise ConversionError(f"HF tensors the {family} mapping needs are missing: {some_names(missing)}")
    unused = [n for n in present if n not in set(expected)]
    if unused:
        tied = bool(getattr(hf, "tie_word_embeddings", False))
        raise ConversionError(
            f"HF tensors not used by the {family} mapping (tie_word_embeddings={tied}): {some_names(unused)}"
        )


def load_hf_into_model(model: torch.nn.Module, hf: transformers.PretrainedConfig, read, padded_vocab: int):
    """Fill this rank's stage from HF tensors (`read(name) -> Tensor`); return the HF names used.

    Holds at most one parameter's HF tensors at a time besides the model itself.
    """
    from megatron.core import parallel_state

    rank = parallel_state.get_tensor_model_parallel_rank()
    size = parallel_state.get_tensor_model_parallel_world_size()
    dims = Dims.of(hf)
    used: set[str] = set()
    with torch.no_grad():
        for binding, name, param in bind_parameters(model, hf):
            full = to_megatron(binding.rule, [read(n) for n in binding.hf], dims, padded_vocab)
            shard = tp_shard(binding.rule, full, rank, size)
            if shard.shape != param.shape:
                raise ConversionError(
                    f"{', '.join(binding.hf)} give {tuple(shard.shape)} for {name} on TP rank {rank}, "
                    f"but the Megatron parameter is {tuple(param.shape)}"
                )
            param.copy_(shard)
            used.update(binding.hf)
    return used


def save_megatron_checkpoint(model: torch.nn.Module, plan: ImportPlan, padded_vocab: int, tmp: Path) -> None:
    """Collective: load this stage from HF, check all HF tensors were used across ranks, save `model/`."""
    from megatron.core import dist_checkpointing

    used = load_hf_into_model(model, plan.hf, plan.checkpoint.read, padded_vocab)
    everyone: list[set[str]] = [set() for _ in range(dist.get_world_size())]
    dist.all_gather_object(everyone, used)
    unused = sorted(set(plan.checkpoint.names).difference(*everyone))
    if unused:  # same verdict on every rank: all raise together
        raise ConversionError(f"HF tensors not written to any Megatron parameter: {some_names(unused)}")
    dist_checkpointing.save(model.sharded_state_dict(), str(tmp / "model"))


def build_model(plan: ImportPlan, device: torch.device):
    """This rank's stage of the model the HF checkpoint describes."""
    if is_prm(plan.hf):
        raise ConversionError(
            "importing a process-reward model needs the Megatron PRM model (scope_mega.models.prm), "
            "which is not available yet; export and live streaming of PRMs work"
        )
    from scope_mega.models.gpt import build_gpt_model

    return build_gpt_model(plan.model, plan.parallel, device)


def import_worker(
    hf_dir: str, out: str, tp: int, pp: int, force: bool = False, vocab_divisible_by: int = 128
) -> None:
    """Run on every rank of a world of exactly tp*pp processes (torchrun, srun or `spawn_local`)."""
    from scope_mega.runtime.distributed import destroy_distributed, init_distributed

    plan = plan_import(hf_dir, out, tp, pp, force, vocab_divisible_by)
    device = init_distributed(tp=tp, pp=pp, device="cpu")
    try:
        if dist.get_world_size() != tp * pp:
            raise ConversionError(f"launched {dist.get_world_size()} processes for --tp {tp} --pp {pp}")
        rank = dist.get_rank()
        box = [None]
        if rank == 0:
            box[0] = files.new_temp_dir(out)
            (box[0] / "model").mkdir()
        dist.broadcast_object_list(box, src=0)
        tmp: Path = box[0]
        try:
            model, spec = build_model(plan, device)
            save_megatron_checkpoint(model, plan, spec.padded_vocab_size, tmp)
            if rank == 0:
                files.copy_side_files(hf_dir, tmp / "hf")
            dist.barrier()
            if rank == 0:
                files.publish(tmp, out)
        except BaseException:
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        dist.barrier()
    finally:
        destroy_distributed()
