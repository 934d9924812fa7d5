"""Megatron `torch_dist` checkpoint -> HF safetensors, streamed layer by layer in one process.

Reads one layer's tensors at a time from `<src>/model` (whatever TP/PP saved it), maps them back
with the same rules as import (`mapping.to_hf`: QKV split, gate/up split, vocab trimmed to the HF
`vocab_size`), casts to the HF config's dtype and streams them into shards planned from the
checkpoint's metadata. Memory: one layer.

Contract: the output is written under `<out>.tmp-XXXXXXXX`, read back and checked against its plan
(`files.SafetensorsShardWriter.verify`: index, headers, sizes), and only then renamed to `<out>`; any
failure removes it, and a failed write is a `ConversionError` naming the tensor and the file.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from scope_mega.models import arch
from scope_mega.run_dir import TRAINER_STATE, resolve_checkpoint
from scope_mega.weights import files
from scope_mega.weights.mapping import (
    Binding,
    ConversionError,
    Dims,
    bindings,
    family_for,
    iter_layers,
    some_names,
    to_hf,
)
from scope_mega.weights.megatron_ckpt import MegatronCheckpoint

DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3


def resolve_hf_source(
    src: Path, hf_config: str | Path | None = None
) -> tuple[transformers.PretrainedConfig, Path | None]:
    """The HF config of a Megatron checkpoint and the folder holding its side files (tokenizer ...):
    `hf_config` if given, else `<src>/hf` (written by import), else the model config recorded in a
    trainer checkpoint's `trainer_state.json` (no side files when that config is inline)."""
    if hf_config is not None:
        folder = Path(hf_config)
    elif (src / "hf" / "config.json").is_file():
        folder = src / "hf"
    elif (src / TRAINER_STATE).is_file():
        source = json.loads((src / TRAINER_STATE).read_text())["config"]["model"]["hf_config"]
        if isinstance(source, dict):
            return arch.load_hf_config(source), None
        folder = Path(source)
    else:
        raise ConversionError(f"{src} has no hf/ folder; pass --hf-config DIR (a folder with config.json)")
    return arch.load_hf_config(folder), folder


def hf_dtype(hf: transformers.PretrainedConfig) -> torch.dtype | None:
    """The dtype the HF config declares (None: keep the checkpoint's)."""
    dtype = getattr(hf, "dtype", None) or getattr(hf, "torch_dtype", None)
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def check_megatron_tensors(ckpt: MegatronCheckpoint, items: list[Binding], hf: transformers.PretrainedConfig):
    """Every checkpoint tensor is used by the mapping, every mapped tensor exists, layer counts agree."""
    used = set()
    for b in items:
        key, layer = ckpt.locate(b.megatron)
        if layer is not None and ckpt.num_layers(key) != hf.num_hidden_layers:
            raise ConversionError(
                f"{key} holds {ckpt.num_layers(key)} layers, the HF config says {hf.num_hidden_layers}"
            )
        used.add(key)
    unused = sorted(set(ckpt.tensors) - used)
    if unused:
        raise ConversionError(
            f"Megatron checkpoint tensors not used by the {family_for(hf).name} mapping: {some_names(unused)}"
        )


def export_hf_checkpoint(
    megatron_dir: str | Path,
    out: str | Path,
    force: bool = False,
    hf_config: str | Path | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    create_file: files.CreateFile = files.create_for_writing,
) -> Path:
    """Write `out` as an HF checkpoint (sharded safetensors + index, config, tokenizer files).
    `megatron_dir` is a checkpoint directory, or a checkpoint root or `latest` marker naming one;
    output files are opened with `create_file`."""
    try:
        src = resolve_checkpoint(megatron_dir)
    except FileNotFoundError as e:  # a `latest` marker naming an incomplete checkpoint
        raise ConversionError(str(e)) from None
    if not (src / "model").is_dir():
        raise ConversionError(
            f"{src} is not a Megatron checkpoint directory (no model/ inside, and no `latest` marker)"
        )
    hf, side_files = resolve_hf_source(src, hf_config)
    dims = Dims.of(hf)
    items = [b for b in bindings(hf) if b.rule.export]
    ckpt = MegatronCheckpoint(src / "model")
    check_megatron_tensors(ckpt, items, hf)
    dtype = hf_dtype(hf)
    plan = plan_hf_tensors(ckpt, items, dims, dtype)
    with files.atomic_output_dir(out, force) as tmp:
        writer = files.SafetensorsShardWriter(tmp, plan, max_shard_bytes, create_file)
        for group in iter_layers(items):
            loaded = ckpt.read([b.megatron for b in group])
            for b in group:
                for name, tensor in zip(b.hf, to_hf(b.rule, loaded.pop(b.megatron), dims)):
                    writer.write(name, tensor if dtype is None else tensor.to(dtype))
        writer.close()
        if side_files is not None:
            files.copy_side_files(side_files, tmp)
        else:
            write_hf_config(hf, tmp, plan[0].dtype)
    return Path(out)


def write_hf_config(hf: transformers.PretrainedConfig, folder: Path, dtype: torch.dtype) -> None:
    """`folder/config.json` for exported weights: `hf`, naming its causal-LM class where it does not
    (vLLM picks the model by it) and the dtype the weights were written in."""
    hf = copy.deepcopy(hf)
    if not getattr(hf, "architectures", None):
        hf.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[hf.model_type]]
    hf.dtype = dtype
    hf.to_json_file(folder / "config.json")


def plan_hf_tensors(
    ckpt: MegatronCheckpoint, items: list[Binding], dims: Dims, dtype: torch.dtype | None
) -> list[files.TensorPlan]:
    """Names, shapes and dtypes of the HF tensors export will write, in order, from the checkpoint's
    metadata alone (the transforms run on meta tensors)."""
    plan = []
    for b in items:
        key, layer = ckpt.locate(b.megatron)
        md = ckpt.tensors[key]
        shape = md.size if layer is None else md.size[1:]
        try:
            tensors = to_hf(b.rule, torch.empty(shape, device="meta"), dims)
        except RuntimeError as e:
            raise ConversionError(f"{b.megatron} {tuple(shape)} does not fit the HF config ({e})") from None
        for name, t in zip(b.hf, tensors):
            plan.append(files.TensorPlan(name, tuple(t.shape), dtype or md.properties.dtype))
    return plan
