"""Checks of a whole `RunConfig` that need the resolved architecture or the device (heads and KV
groups vs TP, layers vs PP, FP8 vs Transformer Engine), and `load_config`, which runs them.

What `models.arch` cannot build (its `ArchError`) is reported as the same one-line `ConfigError`.
"""

from __future__ import annotations

from pathlib import Path

from scope_mega.config import ConfigError, RunConfig, parse_config
from scope_mega.models.arch import ArchError, check_transformer_impl, load_hf_config
from scope_mega.runtime.distributed import resolve_device


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML file, apply dotted overrides, build and validate a `RunConfig`."""
    cfg = parse_config(path, overrides)
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Cross-field checks that need the resolved architecture (heads vs TP, layers vs PP, FP8 vs TE)."""
    par = cfg.parallel
    if par.cp != 1:
        raise ConfigError("parallel.cp > 1 (context parallel) is not supported yet; set parallel.cp=1")
    try:
        hf = load_hf_config(cfg.model.hf_config)
    except ArchError as e:
        raise ConfigError(str(e)) from None
    heads, kv = hf.num_attention_heads, getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads
    if heads % par.tp:
        raise ConfigError(
            f"parallel.tp={par.tp} does not divide num_attention_heads={heads}; choose a divisor of {heads}"
        )
    if kv % par.tp:
        raise ConfigError(
            f"parallel.tp={par.tp} does not divide num_key_value_heads={kv} (KV groups); "
            f"choose a divisor of {kv}"
        )
    if hf.num_hidden_layers % par.pp:
        raise ConfigError(
            f"parallel.pp={par.pp} does not divide num_hidden_layers={hf.num_hidden_layers}; "
            f"choose a divisor of {hf.num_hidden_layers}"
        )
    try:
        device = resolve_device(cfg.device)
    except RuntimeError as e:
        raise ConfigError(str(e)) from None
    try:
        check_transformer_impl(cfg.model, device)
    except ArchError as e:
        raise ConfigError(str(e)) from None
    if cfg.rl.overlong == "penalty" and not 1 <= cfg.rl.overlong_buffer <= cfg.rollout.max_new_tokens:
        raise ConfigError(
            f"rl.overlong=penalty needs 1 <= rl.overlong_buffer <= rollout.max_new_tokens="
            f"{cfg.rollout.max_new_tokens}, got {cfg.rl.overlong_buffer}"
        )
    if cfg.rl.decay_style != "constant" and cfg.rl.min_lr > cfg.rl.lr:
        raise ConfigError(
            f"rl.min_lr={cfg.rl.min_lr} is above rl.lr={cfg.rl.lr}: rl.decay_style={cfg.rl.decay_style} "
            "decays from rl.lr down to rl.min_lr; lower rl.min_lr"
        )
    if cfg.rl.packing == "thd" and cfg.rl.max_tokens_per_micro_batch is None:
        raise ConfigError(
            "rl.packing=thd packs micro-batches by a token budget: set rl.max_tokens_per_micro_batch "
            "(e.g. 4 x the longest sequence), or rl.packing=padded"
        )
    if cfg.sft.global_batch_size % cfg.sft.micro_batch_size:
        raise ConfigError(
            f"sft.global_batch_size={cfg.sft.global_batch_size} is not a multiple of "
            f"sft.micro_batch_size={cfg.sft.micro_batch_size}"
        )
