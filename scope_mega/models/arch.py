"""Hugging Face architecture config -> Megatron `TransformerConfig` for the supported families.

One place decides how an HF config maps onto Megatron: GQA (`num_query_groups`), head dim, RMSNorm
epsilon, SwiGLU, QKV bias (Qwen2), q/k norm (Qwen3), RoPE base and Llama-3.1 rope scaling, tied
embeddings, TP vocab padding, the layer implementation (local or Transformer Engine), and activation
recompute (`recompute_settings`).

What it cannot build raises `ArchError` (a `ValueError`) with a one-line message; `validation` runs
the same functions on a run's config first and reports that message as a `ConfigError`. An HF config
whose sizes are not positive integers, or whose values transformers itself refuses (types, rope
parameters, hidden size vs heads), is such an `ArchError` naming the field and where it came from
(`model.hf_config` or the directory's config.json), never transformers' own traceback.
"""

from __future__ import annotations

import copy
import functools
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers

from scope_mega.config import ModelConfig, ParallelConfig

SUPPORTED_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


class ArchError(ValueError):
    """An HF config this package cannot build (family, rope scaling, sliding window), or a layer
    implementation the device cannot run; the message is one line and says how to fix it."""


# The sizes of an HF config that must be positive integers (None, where allowed, means "derive it").
SIZE_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "vocab_size",
)
# Keys read beside a config class's fields: the legacy ones transformers 5 folds into them
# (`rope_parameters`, `dtype`), and `head_dim`, which Qwen2's modeling and `head_dim` below read by getattr.
EXTRA_HF_KEYS = ("rope_theta", "rope_scaling", "torch_dtype", "head_dim")
QUOTES = "\"'"  # around a KeyError's message


def load_hf_config(source: dict[str, Any] | str | Path) -> transformers.PretrainedConfig:
    """An HF config from an inline dict (must name `model_type`) or a local directory / config.json.
    The dict is copied, never changed."""
    if isinstance(source, dict):
        if "model_type" not in source:
            raise ArchError("model.hf_config must name a model_type, e.g. model_type: llama")
        where, data = "model.hf_config", copy.deepcopy(source)
        family = data.pop("model_type")
        _check_family(family)
        _check_sizes(data, where)
        return _built(where, lambda: transformers.AutoConfig.for_model(family, **data))
    path = Path(source)
    if path.is_file():
        path = path.parent
    where = path / "config.json"
    if not where.is_file():
        raise ArchError(f"model.hf_config: no config.json in {path}")
    try:
        data = json.loads(where.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ArchError(f"{where} is not a readable JSON file: {e}") from None
    if not isinstance(data, dict):
        raise ArchError(f"{where} must hold a JSON object")
    _check_family(data.get("model_type"))
    _check_sizes(data, str(where))
    return _built(str(where), lambda: transformers.AutoConfig.from_pretrained(path, local_files_only=True))


def _check_sizes(data: dict[str, Any], where: str) -> None:
    for key in SIZE_FIELDS:
        value = data.get(key)
        if key not in data or (value is None and key in ("num_key_value_heads", "head_dim")):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ArchError(f"{where}: {key} must be a positive integer, got {value!r}")


def _built(where: str, build: Callable[[], transformers.PretrainedConfig]) -> transformers.PretrainedConfig:
    """`build()`, what transformers refuses in it (its field types, rope parameters, ...) as one line."""
    try:
        return build()
    except Exception as e:  # transformers validates the values it is given, each check its own error type
        cause = e.__cause__ or e
        text = str(cause).strip() or type(cause).__name__
        raise ArchError(f"{where}: {text.splitlines()[0].strip(QUOTES)}") from None


@functools.cache
def known_hf_keys(family: str) -> frozenset[str]:
    """The keys an HF config of `family` may hold: its transformers config's fields, their aliases
    (`attribute_map`) and EXTRA_HF_KEYS."""
    hf = transformers.AutoConfig.for_model(family)
    return frozenset(hf.to_dict()) | frozenset(hf.attribute_map) | frozenset(EXTRA_HF_KEYS)


def _check_family(family: str) -> None:
    if family not in SUPPORTED_FAMILIES:
        raise ArchError(f"unsupported architecture '{family}'; supported: {', '.join(SUPPORTED_FAMILIES)}")


def head_dim(hf: transformers.PretrainedConfig) -> int:
    return getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads


def num_kv_heads(hf: transformers.PretrainedConfig) -> int:
    return getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads


def has_qkv_bias(hf: transformers.PretrainedConfig) -> bool:
    """Qwen2 always has a QKV bias; Llama/Mistral/Qwen3 only with `attention_bias: true`."""
    return hf.model_type == "qwen2" or bool(getattr(hf, "attention_bias", False))


def has_qk_norm(hf: transformers.PretrainedConfig) -> bool:
    return hf.model_type == "qwen3"


def rope_theta(hf: transformers.PretrainedConfig) -> float:
    params = getattr(hf, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(hf, "rope_theta", 10000.0)))


def rope_scaling(hf: transformers.PretrainedConfig) -> dict[str, Any] | None:
    """The rope scaling dict, or None for plain RoPE (transformers 5 keeps it in `rope_parameters`)."""
    params = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise ArchError(f"rope scaling type '{kind}' is not supported; supported: llama3")
    return dict(params)


def llama3_inv_freq(base: float, dim: int, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama-3.1 frequency scaling with the checkpoint's own factors (Megatron hard-codes 1/4/8192)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_ctx = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def check_sliding_window(hf: transformers.PretrainedConfig) -> None:
    """Refuse sliding-window attention that a sequence could exceed (Megatron's is not HF's)."""
    window = getattr(hf, "sliding_window", None)
    windowed = hf.model_type == "mistral" or getattr(hf, "use_sliding_window", False)
    if windowed and window is not None and window < hf.max_position_embeddings:
        raise ArchError(
            f"sliding-window attention (sliding_window={window}) is not supported; "
            "set sliding_window: null (exact for sequences up to the window)"
        )


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Vocab rounded up so every TP rank holds an equal, `divisible_by`-aligned slice."""
    multiple = divisible_by * tp
    return int(math.ceil(vocab_size / multiple) * multiple)


def check_transformer_impl(model: ModelConfig, device: torch.device) -> str:
    """Resolve `transformer_impl` (auto|local|te) on `device`; reject TE or FP8 where Transformer
    Engine can't run."""
    return resolve_transformer_impl(model, device.type == "cuda" and _te_importable())


def resolve_transformer_impl(model: ModelConfig, te_ok: bool) -> str:
    """`transformer_impl` where Transformer Engine runs (`te_ok`) or not: auto picks TE where it runs;
    TE and FP8 are refused where it does not."""
    impl = model.transformer_impl
    if impl == "auto":
        impl = "te" if te_ok else "local"
    if impl == "te" and not te_ok:
        raise ArchError(
            "model.transformer_impl=te needs Transformer Engine on a CUDA device "
            "(pip install 'scope-mega[gpu]' on a GPU node), or set model.transformer_impl=local"
        )
    if model.fp8.enabled and impl != "te":
        raise ArchError(
            "model.fp8.enabled needs Transformer Engine on a CUDA device "
            "(pip install 'scope-mega[gpu]' and transformer_impl=te/auto), or set model.fp8.enabled=false"
        )
    return impl


def _te_importable() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


def resolve_dtype(model: ModelConfig, device: torch.device) -> torch.dtype:
    if model.params_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, model.params_dtype)


# `model.recompute: selective` recomputes these submodules of every layer in the backward pass
# (Megatron's `recompute_modules`, megatron-core >= 0.12). Local spec (CPU, and GPU without Transformer
# Engine): its core attention materialises the [b, heads, s, s] scores, probabilities and dropout mask,
# the one term that grows with s^2, so "core_attn" is what pays most at long lengths; "mlp" (SwiGLU's
# fc1 output and activation, ~3 x ffn per token, the largest linear-sized activations) next. Not
# "layernorm": megatron-core 0.16.1's `CheckpointWithoutOutput` sets `fp8 = fp8 is not None` (True for
# its default False) and then calls Transformer Engine's `FP8GlobalStateManager`, a NameError without TE;
# the two RMSNorm outputs are 2 x hidden per token, small beside the rest. Transformer Engine:
# fused/flash attention keeps no s^2 term, so recomputing "core_attn" saves almost nothing, and the TE
# spec fuses both layernorms into the next linear layer (Megatron sees `IdentityOp`, and "layernorm"
# recomputes nothing): "mlp".
SELECTIVE_MODULES = {"local": ("core_attn", "mlp"), "te": ("mlp",)}


def recompute_settings(model: ModelConfig, impl: str, layers_per_stage: int) -> dict[str, Any]:
    """The `TransformerConfig` fields for `model.recompute` on layers of the `impl` spec ("local"|"te").

    none: nothing recomputed. selective: `SELECTIVE_MODULES[impl]` in every layer. full: whole layers,
    by `recompute_method` -- "uniform": the stage's layers in chunks of `recompute_num_layers`, only each
    chunk's input kept (the number must divide the stage's layers); "block": the first
    `recompute_num_layers` layers of each stage (capped at the stage's layers), the rest keep all.
    Megatron recomputes only in training forwards (`full` and `core_attn` check `module.training`); with
    gradients off (the logprob forwards) a checkpoint saves nothing (`tests/distributed/test_recompute`).
    """
    if model.recompute == "none":
        return {"recompute_granularity": None}
    if model.recompute == "selective":
        return {"recompute_granularity": "selective", "recompute_modules": list(SELECTIVE_MODULES[impl])}
    layers = model.recompute_num_layers
    if model.recompute_method == "uniform":
        if layers_per_stage % layers:
            raise ArchError(
                f"model.recompute_num_layers={layers} must divide the {layers_per_stage} layers of each "
                "pipeline stage with model.recompute_method=uniform (or use recompute_method=block)"
            )
    else:
        layers = min(layers, layers_per_stage)
    return {
        "recompute_granularity": "full",
        "recompute_method": model.recompute_method,
        "recompute_num_layers": layers,
    }


def transformer_config(
    hf: transformers.PretrainedConfig,
    model: ModelConfig,
    parallel: ParallelConfig,
    device: torch.device,
):
    """Megatron `TransformerConfig` equivalent to `hf` under the given parallel layout."""
    from megatron.core.transformer import TransformerConfig

    check_sliding_window(hf)
    dtype = resolve_dtype(model, device)
    fp8 = model.fp8
    impl = check_transformer_impl(model, device)
    recompute = recompute_settings(model, impl, hf.num_hidden_layers // parallel.pp)
    return TransformerConfig(
        num_layers=hf.num_hidden_layers,
        hidden_size=hf.hidden_size,
        ffn_hidden_size=hf.intermediate_size,
        num_attention_heads=hf.num_attention_heads,
        num_query_groups=num_kv_heads(hf),
        kv_channels=head_dim(hf),
        normalization="RMSNorm",
        layernorm_epsilon=hf.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=has_qkv_bias(hf),
        qk_layernorm=has_qk_norm(hf),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        context_parallel_size=parallel.cp,
        cp_comm_type=parallel.cp_comm_type,  # Transformer Engine's exchange; the local attention gathers
        sequence_parallel=parallel.sequence_parallel and parallel.tp > 1,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=device.type == "cpu",
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        calculate_per_token_loss=True,
        # micro-batches of one step may differ in shape (RL packs them by a token budget): pipeline
        # stages exchange each activation's shape before the activation. Megatron refuses that beside
        # its default MoE dispatcher even in a dense model; alltoall is the one it allows
        variable_seq_lengths=True,
        moe_token_dispatcher_type="alltoall",
        fp8=fp8.format if fp8.enabled else None,
        fp8_recipe=fp8.recipe,
        fp8_amax_history_len=fp8.amax_history_len,
        fp8_amax_compute_algo=fp8.amax_compute_algo,
        fp8_margin=fp8.margin,
        **recompute,
    )
