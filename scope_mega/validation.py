"""Every check of a whole `RunConfig` beyond its fields' own (types, choices and ranges, which `config`
checks as it builds the dataclasses), behind one `validate(cfg, target, world_size, stage)`. A
mistake is a one-line `ConfigError` that names the key and the fix; the CLI prints it and exits 2.

`validate` runs, in this order (each a function below):
- `_check_sections`: rules across sections (the overlong buffer, the LR decay, THD packing's token
  budget, the SFT batch).
- `_check_layout`: every model the config names against the parallel layout: the policy's HF config
  itself (an inline one names only keys its transformers config class knows, with a did-you-mean;
  sizes are positive integers; what transformers refuses; heads a multiple of the KV heads, a hidden
  size the heads divide, an even head size for RoPE, a positive norm epsilon and RoPE base, SwiGLU's
  `silu`), its heads, KV groups and layers vs TP / PP, what `models.arch` cannot build (family, rope
  scaling, sliding window; its `ArchError` becomes a `ConfigError`), context parallelism's head
  rule (`a2a` needs the heads per TP rank divisible by CP), and the PRM's KV heads vs TP where its
  config.json is readable here.
- `_check_device`, for `target`: None is this machine (`device` resolved here, Transformer Engine
  where it imports); "cuda" is a CUDA node seen from anywhere, a CPU login node included
  (`transformer_impl: auto` resolves to TE, the `[gpu]` extra assumed installed there; FP8 is
  accepted with TE and refused with `transformer_impl: local`); "cpu" is a CPU run. FP8 GEMM shapes
  must be multiples of 16.
- with `world_size` (the launch's; None: unknown, these are skipped): the world must hold whole
  TP x PP x CP model replicas.
- `stage="sft"`: the task's inputs and the SFT batch over the data-parallel ranks.
- a stage, run here (`target` None): its `latest` checkpoint marker, when resuming, names a complete
  checkpoint (`_check_resume`).
- `stage="rl"` (`_check_trainer`): what the RL trainer can run: vLLM against the world size and the
  models' heads, the oracle guide and PRM (Countdown only), the longest prompt plus response against
  the model's positions (`_check_positions`, also in `checked_plan`), the guide engine, off-policy
  clipping, the KL reference's starting weights, the PRM checkpoint, the task's inputs, the RL batch over the
  data-parallel ranks, and on a CUDA node the memory plan for this node (`check_memory_here`); for a
  run here that does not resume its own checkpoint, the weights it starts from (`_check_rl_start`):
  `rl.init_from` names a checkpoint (not a run directory, which the message turns into the path to
  use), or the run's SFT stage left one; `rl.init_from=random` asks for Megatron's initialisation.

`claim_run_dir` (called by `stage.start_stage` on global rank 0, after `validate` and before any write):
one run per run directory. It creates the directory, takes an exclusive `flock` on `<run_dir>/run.lock`
for the process's life (the kernel releases it on any exit, SIGKILL included; on a shared filesystem
the lock server does, NFS after its lease) and writes the holder's pid, host and stage into it. A
directory another run holds, or one this process cannot write, is a one-line `ConfigError`. Where the
filesystem has no `flock` (Lustre mounted without `-o flock`) it says so in one line and goes on.
`CONFIG_ERROR_EXIT_CODE` (2) is the exit status of every config error.

`load_config` (`parse_config` + `validate(cfg)`) is what `scope-mega sft|train CONFIG` reads a config
with; `load_config_for_target` and `checked_plan` are `train --dry-run`'s: the config checked for a
target device, and its memory plan (`plan.make_plan`) refused in one line where a phase does not fit;
for the update phase the line names the knobs that would make it fit (recompute, CP, TP, PP, the
distributed optimizer, the token budget), each with the GiB it would need, found by planning again
with that knob changed where `validate` accepts it (`_refit`).

Imports `config`, `models.arch` and `runtime.distributed`; inside functions the estimate (`plan`),
and `run_dir`. Imported by the stages (`stage`), the CLI, the converters (`convert`,
`weights.hf_to_megatron`), and where a config error can only show at use: the vLLM engine
(`check_vllm_serves`), the math task (`check_math_tokenizer`, `check_prompts_fit`) and the PRM
(`prm_architecture_problem` beside the model it describes).
"""

from __future__ import annotations

import difflib
import errno
import fcntl
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from scope_mega.config import ConfigError, RunConfig, parse_config
from scope_mega.models import arch
from scope_mega.runtime.distributed import resolve_device

if TYPE_CHECKING:
    import transformers

    from scope_mega.plan import Plan

StageName = Literal["sft", "rl"]
CONFIG_ERROR_EXIT_CODE = 2


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML file, apply dotted overrides, build and validate a `RunConfig` for this machine."""
    cfg = parse_config(path, overrides)
    validate(cfg)
    return cfg


def validate(
    cfg: RunConfig, target: str | None = None, world_size: int | None = None, stage: StageName | None = None
) -> None:
    """Every check (module docstring) of `cfg` for `target` ("cpu" / "cuda"; None: this machine), a
    launch of `world_size` processes (None: unknown, the checks that need it are skipped), and the
    stage it starts (None: only what every stage needs)."""
    _check_sections(cfg)
    hf = _check_layout(cfg)
    _check_device(cfg, hf, target)
    if world_size is not None:
        _check_world(cfg, world_size)
    if stage == "sft":
        _check_task(cfg, target)
        if world_size is not None:
            _check_sft_batch(cfg, world_size)
    elif stage == "rl":
        _check_trainer(cfg, world_size, target)
    if stage is not None and target is None:
        _check_resume(cfg, stage)


def load_config_for_target(
    path: str | Path, overrides: list[str] = (), target: str | None = None
) -> tuple[RunConfig, str, str | None]:
    """(config, target, refusal_here) for `train --dry-run`: `cfg` validated for `target` (None picks
    cuda for `device: auto|cuda` configs, else cpu); `refusal_here` is the ConfigError a run on this
    machine would stop with, None if it would start."""
    cfg = parse_config(path, overrides)
    if target is None:
        target = "cpu" if cfg.device == "cpu" else "cuda"
    if target not in ("cpu", "cuda"):
        raise ConfigError(f"--target must be cpu or cuda, got {target!r}")
    validate(cfg, target)
    try:
        validate(cfg)
    except ConfigError as e:
        return cfg, target, str(e)
    return cfg, target, None


# ----------------------------------------------------------------------------- every stage


def _arch(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` from `models.arch`, what it cannot build as a one-line ConfigError."""
    try:
        return fn(*args)
    except arch.ArchError as e:
        raise ConfigError(str(e)) from None


def _check_sections(cfg: RunConfig) -> None:
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


def _check_layout(cfg: RunConfig) -> transformers.PretrainedConfig:
    """The policy's and the PRM's shapes against TP / PP; returns the policy's HF config."""
    par = cfg.parallel
    _check_hf_keys(cfg.model.hf_config)
    hf = _arch(arch.load_hf_config, cfg.model.hf_config)
    _check_hf_fields(hf)
    heads, kv = hf.num_attention_heads, arch.num_kv_heads(hf)
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
    # recompute's layer grouping against each stage's layers (the spec only picks selective's modules)
    _arch(arch.recompute_settings, cfg.model, "local", hf.num_hidden_layers // par.pp)
    _check_context_parallel(cfg, heads, kv)
    _arch(arch.rope_scaling, hf)
    _arch(arch.check_sliding_window, hf)
    if _prm_model_in_use(cfg):
        from scope_mega.plan import model_size_of_dir

        prm = model_size_of_dir(cfg.guide.prm_path)
        if prm is not None and prm.kv_heads % par.tp:
            raise ConfigError(
                f"the PRM in {cfg.guide.prm_path} has {prm.kv_heads} KV heads; it runs at the trainer's "
                f"parallel.tp={par.tp}, which must divide them"
            )
    return hf


def _check_context_parallel(cfg: RunConfig, heads: int, kv_heads: int) -> None:
    """What CP > 1 needs of the heads: Transformer Engine's `a2a` (all-to-all, Ulysses-style) CP
    attention gives each CP rank whole heads, so the query and the KV heads of a TP rank must divide
    by CP; `p2p` (the ring, the default) and `all_gather` split the sequence and take any head count."""
    par = cfg.parallel
    if par.cp == 1 or par.cp_comm_type != "a2a":
        return
    for what, n in (("query heads", heads), ("KV heads", kv_heads)):
        if n // par.tp % par.cp:
            raise ConfigError(
                f"parallel.cp_comm_type=a2a needs the {what} per TP rank ({n} / tp={par.tp} = {n // par.tp}) "
                f"divisible by parallel.cp={par.cp}; use parallel.cp_comm_type=p2p, which takes any head "
                "count"
            )


def _check_positions(cfg: RunConfig) -> None:
    """The longest prompt plus response (the engines' `max_model_len`, `plan.rollout_max_model_len`)
    fits the policy's positions (RL, and the plan of `train --dry-run`)."""
    from scope_mega.plan import rollout_max_model_len

    longest = rollout_max_model_len(cfg)
    positions = _arch(arch.load_hf_config, cfg.model.hf_config).max_position_embeddings
    if longest is not None and longest > positions:
        raise ConfigError(
            f"data.max_prompt_tokens + rollout.max_new_tokens = {cfg.data.max_prompt_tokens} + "
            f"{cfg.rollout.max_new_tokens} = {longest} tokens is more than the model's "
            f"max_position_embeddings={positions}; lower one of them"
        )


def _check_hf_keys(source: dict[str, Any] | str) -> None:
    """An inline `model.hf_config` names only keys its architecture's transformers config knows (a
    directory's config.json is its publisher's, read as it is)."""
    family = source.get("model_type") if isinstance(source, dict) else None
    if family not in arch.SUPPORTED_FAMILIES:
        return  # `arch.load_hf_config` refuses it
    known = arch.known_hf_keys(family)
    for key in source:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            fix = f"did you mean '{close[0]}'?" if close else "remove it"
            raise ConfigError(f"model.hf_config.{key} is not a field of transformers' {family} config; {fix}")


def _check_hf_fields(hf: transformers.PretrainedConfig) -> None:
    """What Megatron, RoPE or this package's SwiGLU build would refuse in a config transformers built."""
    heads, kv = hf.num_attention_heads, arch.num_kv_heads(hf)
    if heads % kv:
        raise ConfigError(
            f"model.hf_config: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv} "
            f"(each KV head serves a whole group of query heads); choose a divisor of {heads}"
        )
    if not getattr(hf, "head_dim", None) and hf.hidden_size % heads:
        raise ConfigError(
            f"model.hf_config: hidden_size={hf.hidden_size} is not a multiple of "
            f"num_attention_heads={heads}; choose a multiple of {heads}"
        )
    if arch.head_dim(hf) % 2:
        raise ConfigError(
            f"model.hf_config: the head size {arch.head_dim(hf)} is odd, and RoPE rotates pairs of channels; "
            "choose hidden_size / num_attention_heads (or head_dim) even"
        )
    if not hf.rms_norm_eps > 0:
        raise ConfigError(f"model.hf_config: rms_norm_eps must be > 0, got {hf.rms_norm_eps}")
    try:
        theta = arch.rope_theta(hf)
    except (TypeError, ValueError):
        theta = float("nan")
    if not theta > 0:
        raise ConfigError("model.hf_config: rope_theta (the RoPE base) must be a number > 0, e.g. 10000.0")
    if getattr(hf, "hidden_act", "silu") != "silu":
        raise ConfigError(
            f"model.hf_config: hidden_act={hf.hidden_act!r}, but the supported families' MLPs are SwiGLU "
            "and this package builds them with silu; set hidden_act: silu"
        )


def _prm_model_in_use(cfg: RunConfig) -> bool:
    """SCOPE runs with a Megatron PRM (the trainer builds one)."""
    return cfg.scope.enabled and cfg.scope.active_method != "grpo" and cfg.guide.prm == "model"


def _check_device(cfg: RunConfig, hf: transformers.PretrainedConfig, target: str | None) -> None:
    if target == "cuda" and cfg.device == "cpu":
        raise ConfigError("device=cpu cannot target a CUDA node; set device: auto (or cuda)")
    if target == "cpu" and cfg.device == "cuda":
        raise ConfigError("device=cuda cannot target a CPU run; set device: auto or cpu")
    if target is None:
        try:
            device = resolve_device(cfg.device)
        except RuntimeError as e:
            raise ConfigError(str(e)) from None
        impl = _arch(arch.check_transformer_impl, cfg.model, device)
    else:
        impl = _arch(arch.resolve_transformer_impl, cfg.model, target == "cuda")
    if impl == "te" and cfg.model.fp8.enabled:
        dims = {
            "hidden_size": hf.hidden_size,
            "intermediate_size / tp": hf.intermediate_size / cfg.parallel.tp,
        }
        for name, value in dims.items():
            if value % 16:
                raise ConfigError(f"FP8 GEMMs need multiples of 16: {name} = {value:g}")


def _check_world(cfg: RunConfig, world_size: int) -> None:
    model_parallel = cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.cp
    if world_size % model_parallel:
        raise ConfigError(f"world size {world_size} is not a multiple of tp*pp*cp = {model_parallel}")


def _data_parallel(cfg: RunConfig, world_size: int) -> int:
    return world_size // (cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.cp)


def _check_task(cfg: RunConfig, target: str | None) -> None:
    """The math task's inputs are named (and, for a run here, exist)."""
    data = cfg.data
    if data.task != "math":
        return
    if not data.tokenizer:
        raise ConfigError("data.task=math needs data.tokenizer (a Hugging Face tokenizer directory)")
    for key in ("train_files", "eval_files"):
        if not getattr(data, key):
            raise ConfigError(f"data.task=math needs data.{key} (JSON Lines in a benchmark format)")
    if target is None:
        for path in [*data.train_files, *data.eval_files, data.tokenizer]:
            if not Path(path).exists():
                raise ConfigError(f"{path} does not exist (data.train_files / eval_files / tokenizer)")


def check_math_tokenizer(tokenizer_dir: str, tokenizer_vocab: int, model_vocab: int) -> None:
    """The math task's tokenizer fits the model's embedding (`tasks.math_task`, once it is loaded)."""
    if tokenizer_vocab > model_vocab:
        raise ConfigError(
            f"the tokenizer in {tokenizer_dir} has {tokenizer_vocab} tokens but the model's vocab_size is "
            f"{model_vocab}; use the tokenizer of the model being trained"
        )


def check_prompts_fit(files: list[str], fitting: int, max_prompt_tokens: int) -> None:
    """Some prompt of `files` fits `data.max_prompt_tokens` (`tasks.math_task`, once they are encoded)."""
    if not fitting:
        raise ConfigError(f"no prompt of {', '.join(files)} fits data.max_prompt_tokens={max_prompt_tokens}")


# ----------------------------------------------------------------------------- the SFT stage


def _check_sft_batch(cfg: RunConfig, world_size: int) -> None:
    dp = _data_parallel(cfg, world_size)
    if cfg.sft.global_batch_size % (cfg.sft.micro_batch_size * dp):
        raise ConfigError(
            f"sft.global_batch_size={cfg.sft.global_batch_size} must be a multiple of "
            f"sft.micro_batch_size x data-parallel size = {cfg.sft.micro_batch_size} x {dp}"
        )


# ----------------------------------------------------------------------------- the RL stage


def _check_trainer(cfg: RunConfig, world_size: int | None, target: str | None) -> None:
    """What the RL trainer cannot run as configured, before any process starts work. A plan for
    another machine (`target`) skips what only this machine's files could tell."""
    if cfg.rollout.engine == "vllm":
        _check_vllm(cfg, world_size, target)
    countdown_only = {
        "scope.guide=oracle": cfg.scope.enabled and cfg.scope.guide == "oracle",
        "guide.prm=oracle": cfg.guide.prm == "oracle" and cfg.scope.enabled,
    }
    for what, asked in countdown_only.items():
        if asked and cfg.data.task != "countdown":
            raise ConfigError(
                f"{what} is Countdown's solver/checker; data.task={cfg.data.task} needs a model"
            )
    _check_positions(cfg)
    if cfg.scope.enabled and cfg.scope.guide == "engine" and not cfg.guide.guide_model:
        raise ConfigError("scope.guide=engine needs guide.guide_model (a Hugging Face model directory)")
    if cfg.loss.off_policy == "clip" and not (cfg.scope.enabled and cfg.scope.guide == "engine"):
        raise ConfigError(
            "loss.off_policy=clip needs the guide's logprobs: set scope.guide=engine, or use "
            "loss.off_policy=shaping"
        )
    _check_partial_rollouts(cfg)
    if cfg.rl.old_logprobs == "rollout" and cfg.loss.tis_cap is not None:
        raise ConfigError(
            "rl.old_logprobs=rollout makes loss.tis_cap's weight, exp(old - rollout logprobs), exactly 1: "
            "unset loss.tis_cap, or use rl.old_logprobs=recompute"
        )
    if cfg.loss.kl_coef > 0 and _rl_start_weights(cfg) is None:
        raise ConfigError(
            "loss.kl_coef > 0 needs the starting weights as the reference: set rl.init_from or run the "
            "SFT stage into this run directory first"
        )
    if cfg.scope.enabled and cfg.guide.prm == "model" and not cfg.guide.prm_path:
        raise ConfigError("guide.prm=model needs guide.prm_path (a converted PRM checkpoint directory)")
    if target is None and world_size is not None:
        check_memory_here(cfg, world_size)
    _check_task(cfg, target)
    if world_size is not None:
        _check_rl_batch(cfg, world_size)
    if target is None and _prm_model_in_use(cfg):
        path = Path(cfg.guide.prm_path)
        if not (path / "model").is_dir() or not (path / "hf").is_dir():
            raise ConfigError(
                f"guide.prm_path={path} is not a converted checkpoint (no model/ and hf/); convert the HF "
                f"PRM with: scope-mega convert hf-to-megatron --hf-dir HF_PRM_DIR --out {path}"
            )
        from scope_mega.models.prm import prm_architecture_problem

        if problem := prm_architecture_problem(_arch(arch.load_hf_config, str(path / "hf"))):
            raise ConfigError(f"guide.prm_path={path}: {problem}")
    if target is None:
        _check_rl_start(cfg)


def _check_resume(cfg: RunConfig, stage: StageName) -> None:
    """The stage's `latest` checkpoint marker, if any, names a complete checkpoint (`checkpoint.resume`)."""
    from scope_mega.run_dir import RL_CHECKPOINTS, SFT_CHECKPOINTS, latest_checkpoint

    if cfg.checkpoint.resume:
        try:
            latest_checkpoint(Path(cfg.run_dir) / (SFT_CHECKPOINTS if stage == "sft" else RL_CHECKPOINTS))
        except FileNotFoundError as e:
            raise ConfigError(str(e)) from None


def _check_rl_start(cfg: RunConfig) -> None:
    """The weights RL starts from exist here, where it uses them: when it does not resume its own
    checkpoint (whose weights win), or for the KL reference."""
    from scope_mega.run_dir import LATEST, RANDOM_INIT, RL_CHECKPOINTS, SFT_CHECKPOINTS, latest_checkpoint

    init, run_dir = cfg.rl.init_from, Path(cfg.run_dir)
    try:
        resuming = cfg.checkpoint.resume and latest_checkpoint(run_dir / RL_CHECKPOINTS) is not None
    except FileNotFoundError as e:  # a `latest` marker that points to an incomplete checkpoint
        raise ConfigError(str(e)) from None
    if init == RANDOM_INIT or (resuming and cfg.loss.kl_coef == 0):
        return
    if not init:
        if _rl_start_weights(cfg) is None:
            raise ConfigError(
                f"the RL stage has no weights to start from: {run_dir / SFT_CHECKPOINTS} holds no SFT "
                f"checkpoint and rl.init_from is unset; run the SFT stage into this run directory first "
                f"(scope-mega sft CONFIG run_dir={run_dir}), set rl.init_from to a checkpoint, or set "
                "rl.init_from=random to train from random weights"
            )
        return
    path = Path(init)
    if not path.exists():
        raise ConfigError(
            f"rl.init_from={init} does not exist; name a checkpoint (an SFT run's {SFT_CHECKPOINTS}/ folder, "
            "a step_* folder in it, or `scope-mega convert hf-to-megatron` output), or rl.init_from=random"
        )
    roots = [path / name for name in (SFT_CHECKPOINTS, RL_CHECKPOINTS) if (path / name / LATEST).is_file()]
    if roots and not (path / "model").is_dir():
        raise ConfigError(
            f"rl.init_from={init} is a run directory, not a checkpoint; use its checkpoints: "
            f"rl.init_from={' or rl.init_from='.join(map(str, roots))}"
        )
    start = _rl_start_weights(cfg)
    if not (start / "model").is_dir():
        raise ConfigError(
            f"rl.init_from={init} is not a checkpoint ({start} has no model/ folder); name an SFT run's "
            f"{SFT_CHECKPOINTS}/ folder, a step_* folder in it, or `scope-mega convert hf-to-megatron` output"
        )


def _rl_start_weights(cfg: RunConfig) -> Path | None:
    from scope_mega.run_dir import rl_start_weights

    try:
        return rl_start_weights(cfg.run_dir, cfg.rl.init_from)
    except FileNotFoundError as e:  # a `latest` marker that points to an incomplete checkpoint
        raise ConfigError(str(e)) from None


# Head sizes the attention backend of vLLM's CPU build runs (vllm/v1/attention/backends/cpu_attn.py,
# `CPUAttentionBackend.get_supported_head_sizes` in 0.32; a test checks this copy against it).
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def vllm_support_problem(hf_config: Any, tensor_parallel_size: int, on_cpu: bool) -> str | None:
    """Why vLLM cannot serve a model of `hf_config` at `tensor_parallel_size` on this platform (None:
    it can): the TP size must divide the attention heads, and divide the KV heads or be a multiple of
    them (vLLM replicates KV heads then); on CPU the head size must be one its attention runs."""
    heads, kv = hf_config.num_attention_heads, hf_config.num_key_value_heads or hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    tp = tensor_parallel_size
    if heads % tp:
        return f"vLLM tensor parallel size {tp} does not divide the model's {heads} attention heads"
    if kv % tp and tp % kv:
        return f"vLLM tensor parallel size {tp} neither divides the model's {kv} KV heads nor is a multiple"
    if on_cpu and head_dim not in CPU_HEAD_SIZES:
        return (
            f"vLLM's CPU attention cannot run head size {head_dim} (hidden_size / num_attention_heads); "
            f"it runs {', '.join(map(str, CPU_HEAD_SIZES))}"
        )
    return None


def check_vllm_serves(model_dir: str | Path, hf_config: Any, tensor_parallel_size: int, on_cpu: bool) -> None:
    """The engine's own check of the model it is given (`vllm_support_problem`)."""
    if problem := vllm_support_problem(hf_config, tensor_parallel_size, on_cpu):
        raise ConfigError(f"{model_dir}: {problem}")


def _check_vllm(cfg: RunConfig, world_size: int | None, target: str | None) -> None:
    """What vLLM cannot serve as configured: its TP against the world size and the policy's (and an
    engine guide's) heads, CPU attention's head sizes, FP8 weights without CUDA. The guide is served
    by a second engine at the policy engine's TP (vLLM keeps one TP layout per process). A plan for
    another machine (`target`) skips a guide whose directory is not on this one."""
    tp = cfg.rollout.vllm_tensor_parallel_size
    if world_size is not None:
        _check_engine_world(cfg, world_size)
    on_cpu = (target or resolve_device(cfg.device).type) == "cpu"
    if on_cpu and cfg.rollout.vllm_fp8_weights:
        raise ConfigError("rollout.vllm_fp8_weights needs CUDA (vLLM's CPU build cannot serve FP8)")
    models = {"the policy": cfg.model.hf_config}
    guide = cfg.guide.guide_model if cfg.scope.enabled and cfg.scope.guide == "engine" else None
    if guide and (target is None or (Path(guide) / "config.json").is_file()):
        models["the guide (guide.guide_model)"] = guide
    for what, source in models.items():
        if problem := vllm_support_problem(_arch(arch.load_hf_config, source), tp, on_cpu):
            raise ConfigError(f"rollout.engine=vllm cannot serve {what}: {problem}")


def _check_engine_world(cfg: RunConfig, world_size: int) -> None:
    tp = cfg.rollout.vllm_tensor_parallel_size
    if cfg.rollout.engine == "vllm" and world_size % tp:
        raise ConfigError(
            f"rollout.vllm_tensor_parallel_size={tp} must divide the world size {world_size} "
            "(vLLM runs world / TP replicas, one worker on every rank)"
        )


def _check_partial_rollouts(cfg: RunConfig) -> None:
    """Partial rollouts (rl.max_staleness > 0) train on tokens of older policies: decoupled PPO needs the
    proximal logprobs recomputed and a cap on the behaviour weight; refill's extra sampling rounds have
    no place in a step that carries its unfinished groups over."""
    if not cfg.rl.max_staleness:
        return
    if cfg.loss.tis_cap is None:
        raise ConfigError(
            f"rl.max_staleness={cfg.rl.max_staleness} trains on tokens of older policies, which decoupled "
            "PPO weights by min(exp(proximal - behaviour logprob), loss.tis_cap): set loss.tis_cap "
            "(e.g. 2), or rl.max_staleness=0"
        )
    if cfg.rl.old_logprobs == "rollout":
        raise ConfigError(
            "rl.max_staleness > 0 needs the proximal policy's logprobs: use rl.old_logprobs=recompute"
        )
    r = cfg.rollout
    if (r.temperature, r.top_p, r.top_k) != (1.0, 1.0, 0):
        raise ConfigError(
            f"rl.max_staleness > 0 weights tokens by the engine's logprobs against the trainer's, which are "
            f"the untempered model's; rollout.temperature={r.temperature}, top_p={r.top_p}, top_k={r.top_k} "
            "sample from another distribution: use temperature 1, top_p 1, top_k 0, or rl.max_staleness=0"
        )
    if cfg.rl.dynamic_sampling == "refill":
        raise ConfigError(
            "rl.dynamic_sampling=refill samples extra rounds within a step; with rl.max_staleness > 0 the "
            "groups in flight (rl.extra_prompts) take that role: use dynamic_sampling=filter or off"
        )


def _check_rl_batch(cfg: RunConfig, world_size: int) -> None:
    dp = _data_parallel(cfg, world_size)
    if cfg.rl.max_staleness and cfg.rl.extra_prompts % dp:
        raise ConfigError(f"rl.extra_prompts={cfg.rl.extra_prompts} must be divisible by the DP size {dp}")
    if cfg.rl.prompts_per_step % dp:
        raise ConfigError(
            f"rl.prompts_per_step={cfg.rl.prompts_per_step} must be divisible by the DP size {dp}"
        )
    seqs = cfg.rl.prompts_per_step // dp * cfg.rl.group_size
    n_micro = -(-seqs // cfg.rl.micro_batch_size)
    if cfg.rl.max_tokens_per_micro_batch is None and n_micro < cfg.rl.ppo_mini_batches:
        raise ConfigError(
            f"rl.ppo_mini_batches={cfg.rl.ppo_mini_batches} is more than the {n_micro} micro-batches of "
            f"rl.micro_batch_size={cfg.rl.micro_batch_size} that {seqs} sequences per DP rank make: "
            "lower one of them"
        )


# ----------------------------------------------------------------------------- the memory plan

_HELPER_SIZES = {"prm": ("prm_path", "prm_params_b"), "guide": ("guide_model", "guide_params_b")}

_KNOBS = {
    "rollout": "lower rollout.vllm_gpu_memory_utilization or guide.vllm_gpu_memory_utilization, raise "
    "rollout.vllm_tensor_parallel_size, or set rl.offload=on",
    "update": "lower rollout.max_new_tokens or rl.max_tokens_per_micro_batch",
    "sync": "raise rollout.vllm_tensor_parallel_size, lower rollout.sync_bucket_mb, or set rl.offload=on",
}


def _update_knobs(cfg: RunConfig, world: int) -> list[dict[str, Any]]:
    """One-knob changes that lower the update phase's memory, as dotted overrides: recompute (selective,
    full), a larger CP, TP or PP (doublings that the world size holds), the distributed optimizer, half
    the token budget. Which of them are legal is `validate`'s to say (`_refit`)."""
    par, m = cfg.parallel, cfg.model
    knobs: list[dict[str, Any]] = []
    if m.recompute == "none":
        knobs.append({"model.recompute": "selective"})
    if m.recompute != "full" or m.recompute_num_layers > 1 or m.recompute_method == "block":
        knobs.append(
            {"model.recompute": "full", "model.recompute_method": "uniform", "model.recompute_num_layers": 1}
        )
    for key, now in (("parallel.cp", par.cp), ("parallel.tp", par.tp), ("parallel.pp", par.pp)):
        n = now * 2
        while world % (par.tp * par.pp * par.cp * n // now) == 0:
            knobs.append({key: n})
            n *= 2
    if not par.distributed_optimizer:
        knobs.append({"parallel.distributed_optimizer": True})
    budget = cfg.rl.max_tokens_per_micro_batch
    if budget and budget > 1:
        knobs.append({"rl.max_tokens_per_micro_batch": budget // 2})
    return knobs


def _with(cfg: RunConfig, changes: dict[str, Any]) -> RunConfig:
    """A copy of `cfg` with dotted `changes` applied."""
    import copy

    new = copy.deepcopy(cfg)
    for dotted, value in changes.items():
        *path, name = dotted.split(".")
        section = new
        for part in path:
            section = getattr(section, part)
        setattr(section, name, value)
    return new


def _current(cfg: RunConfig, dotted: str) -> Any:
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _shown(cfg: RunConfig, changes: dict[str, Any]) -> str:
    """`changes` as the overrides that differ from `cfg` ("model.recompute=full parallel.cp=2")."""
    shown = [
        f"{key}={str(value).lower() if isinstance(value, bool) else value}"
        for key, value in changes.items()
        if _current(cfg, key) != value
    ]
    return " ".join(shown)


def _refit(cfg: RunConfig, plan: Plan, phase: str) -> str:
    """The knobs that make `phase` fit, each with the GiB per GPU it would need there, found by
    planning again with the knob changed (only changes `validate` accepts for this target and world);
    where no single knob fits, recompute with each of the others. Empty where nothing found fits."""
    from scope_mega.plan import GIB, make_plan

    machine = dict(
        gpu_memory_gib=plan.gpu_memory / GIB,
        gpus_per_node=plan.gpus_per_node,
        host_memory_gib=plan.host_memory / GIB,
    )

    def need(changes: dict[str, Any]) -> int | None:
        new = _with(cfg, changes)
        try:
            validate(new, plan.target, plan.world_size)
            _check_rl_batch(new, plan.world_size)
        except ConfigError:
            return None
        return make_plan(new, plan.target, plan.world_size, **machine).phase_total(phase)

    def fitting(candidates: list[dict[str, Any]]) -> list[str]:
        found = []
        for changes in candidates:
            total = need(changes)
            if total is not None and total <= plan.gpu_memory:
                found.append(f"{_shown(cfg, changes)} -> {total / GIB:.1f} GiB")
        return found

    if phase != "update":
        return ""
    knobs = _update_knobs(cfg, plan.world_size)
    found = fitting(knobs)
    if not found:
        full = next((k for k in knobs if k.get("model.recompute") == "full"), None)
        if full is not None:
            found = fitting([full | k for k in knobs if "model.recompute" not in k])
    return "; ".join(found[:6])


def checked_plan(cfg: RunConfig, target: str = "cuda", world_size: int | None = None, **machine: Any) -> Plan:
    """`plan.make_plan(cfg, target, world_size, **machine)` (the machine's GPU and host memory, GPUs
    per node, the refusal here) of a config `validate` accepted for `target`, refused in one line
    where the world does not hold whole model and engine replicas, where a helper model's size is
    unknown, or, for a CUDA target, where a phase does not fit (`check_fits`)."""
    from scope_mega.plan import default_world_size, make_plan

    world = world_size or default_world_size(cfg)
    _check_world(cfg, world)
    _check_engine_world(cfg, world)
    _check_positions(cfg)
    plan = make_plan(cfg, target, world, **machine)
    for name, helper in plan.helpers.items():
        if helper.source is None:
            path_key, size_key = _HELPER_SIZES[name]
            raise ConfigError(
                f"the memory plan needs the size of {getattr(cfg.guide, path_key)}: its config.json is not "
                f"readable here; state it as guide.{size_key}=N (billions of parameters)"
            )
    if target == "cuda":
        check_fits(plan, cfg)
    return plan


def check_fits(plan: Plan, cfg: RunConfig) -> None:
    """A one-line ConfigError naming the first phase (or the host) that does not fit, and what to turn."""
    from scope_mega.plan import GIB, HOST_USABLE, PHASES

    e = plan.engine
    if cfg.rollout.engine == "vllm" and e.max_sequences < 1:
        raise ConfigError(
            f"plan: the policy engine's KV cache ({e.kv_cache / GIB:.1f} GiB of a "
            f"{e.budget / GIB:.1f} GiB budget after {e.weights / GIB:.1f} GiB of weights) holds no full "
            f"{plan.seq_len}-token sequence: raise rollout.vllm_gpu_memory_utilization or "
            "rollout.vllm_tensor_parallel_size, or lower rollout.max_new_tokens"
        )
    guide = plan.helpers.get("guide")
    if guide and cfg.rollout.engine == "vllm" and guide.budget <= guide.weights_per_gpu:
        raise ConfigError(
            f"plan: the guide engine's budget ({guide.budget / GIB:.1f} GiB) does not hold its weights "
            f"({guide.weights_per_gpu / GIB:.1f} GiB) and a KV cache: raise "
            "guide.vllm_gpu_memory_utilization or rollout.vllm_tensor_parallel_size"
        )
    for phase in PHASES:
        need = plan.phase_total(phase)
        if need > plan.gpu_memory:
            parts = sorted(plan.phases[phase].items(), key=lambda kv: -kv[1])[:4]
            biggest = ", ".join(f"{k} {v / GIB:.1f}" for k, v in parts)
            fits = _refit(cfg, plan, phase)
            advice = f"it fits with {fits} (or {_KNOBS[phase]})" if fits else _KNOBS[phase]
            raise ConfigError(
                f"plan: the {phase} phase needs {need / GIB:.1f} GiB per GPU of {plan.gpu_memory / GIB:g} "
                f"({biggest}): {advice}"
            )
    usable = HOST_USABLE * plan.host_memory
    if plan.host_per_node > usable:
        raise ConfigError(
            f"plan: host memory per node needs {plan.host_per_node / GIB:.0f} GiB of {usable / GIB:.0f} "
            f"usable ({plan.gpus_per_node} GPUs x {sum(plan.host_per_gpu.values()) / GIB:.1f} GiB): set "
            "rollout.vllm_sleep_level=2, rl.offload=off, or spread the job over more nodes"
        )


def check_memory_here(cfg: RunConfig, world_size: int) -> None:
    """On a CUDA node, before any rank starts work: `checked_plan` for this node's GPU and host memory,
    so a phase that cannot fit stops the launch with its one-line ConfigError. Nothing on a CPU run."""
    import psutil
    import torch

    from scope_mega.plan import GIB

    if resolve_device(cfg.device).type != "cuda":
        return
    gpus = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", "0")) or 0)
    checked_plan(
        cfg,
        "cuda",
        world_size,
        gpu_memory_gib=torch.cuda.get_device_properties(0).total_memory / GIB,
        gpus_per_node=gpus or torch.cuda.device_count(),
        host_memory_gib=psutil.virtual_memory().total / GIB,
    )


# ----------------------------------------------------------------------------- the run directory

_claimed: dict[Path, int] = {}  # run directory -> the descriptor of its held lock, for this process


def claim_run_dir(run_dir: str | Path, stage: StageName) -> None:
    """Make this process the one run in `run_dir` (module docstring): create it, lock its RUN_LOCK
    file for the process's life and write the holder (pid, host, stage, start time) into it. Claiming
    a directory this process already holds does nothing."""
    from scope_mega.run_dir import RUN_LOCK

    root = Path(run_dir).absolute()
    if root in _claimed:
        return
    lock, problem = root / RUN_LOCK, None
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        problem = f"{e.strerror}: {e.filename}"
    else:  # an earlier run's lock file opens even where the folder became read-only
        if not os.access(root, os.W_OK | os.X_OK):
            os.close(fd)
            problem = f"no permission to write in {root}"
    if problem:
        raise ConfigError(
            f"run_dir {run_dir} is not writable ({problem}); choose a run_dir this user can write, or fix "
            "its permissions"
        )
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = " ".join(lock.read_text(errors="replace").split()) or "one that has not named itself yet"
        os.close(fd)
        raise ConfigError(
            f"run_dir {run_dir} is in use by another run ({holder}); wait for it to end or stop it, or "
            "choose another run_dir"
        ) from None
    except OSError as e:  # no flock on this filesystem (ENOLCK, EOPNOTSUPP, ENOSYS)
        os.close(fd)
        print(
            f"warning: cannot lock {lock} ({errno.errorcode.get(e.errno, e.errno)}: {e.strerror}); nothing "
            "stops a second run in this run_dir",
            file=sys.stderr,
            flush=True,
        )
        return
    holder = f"pid {os.getpid()} on host {socket.gethostname()}, stage {stage}, since {time.strftime('%c')}"
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{holder}\n".encode(), 0)
    _claimed[root] = fd


def _release_in_child() -> None:
    """A forked child does not inherit the run's locks: it closes its copies of their descriptors, so
    the lock lives exactly as long as the run's own process."""
    for fd in _claimed.values():
        os.close(fd)
    _claimed.clear()


os.register_at_fork(after_in_child=_release_in_child)
