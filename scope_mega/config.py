"""Typed run configuration: dataclasses, YAML loading, dotted `key=value` overrides, field checks.

Every error a user can make in a config raises `ConfigError` with a one-line message that names the
key and the fix; the CLI prints that line and exits with status 2 (no traceback). This module checks
each field (types, choices, ranges) and imports only `ranges` and the option dataclasses of the
packages it configures (`data.countdown`, `rl.advantages`, `rl.loss`, `scope.config`; Python loads
the `scope` and `rewards` packages with them), none of which imports it back. Checks across
sections, or that need the model architecture, the device or the launch, live in `validation`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from scope_mega.data.countdown import TaskConfig
from scope_mega.ranges import Checked, RangeError, between, ge, gt
from scope_mega.rl.advantages import AdvantageConfig
from scope_mega.rl.loss import PolicyLossConfig
from scope_mega.scope.config import ScopeConfig


class ConfigError(ValueError):
    """A user-facing configuration mistake; the message is one line and says how to fix it."""


@dataclass
class FP8Config(Checked):
    """Transformer Engine FP8 settings, passed through to Megatron's TransformerConfig."""

    enabled: bool = False
    format: Literal["e4m3", "hybrid"] = "hybrid"
    recipe: Literal["delayed", "tensorwise", "mxfp8", "blockwise"] = "delayed"
    amax_history_len: int = field(default=1024, metadata=ge(1))
    amax_compute_algo: Literal["max", "most_recent"] = "max"
    margin: int = field(default=0, metadata=ge(0))


@dataclass
class ModelConfig(Checked):
    """The architecture comes from a Hugging Face config: a dict (with `model_type`) or a directory path."""

    hf_config: dict[str, Any] | str = field(default_factory=dict)
    transformer_impl: Literal["auto", "local", "te"] = "auto"
    params_dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    make_vocab_size_divisible_by: int = field(default=128, metadata=ge(1))
    init_method_std: float = field(default=0.02, metadata=gt(0))
    fp8: FP8Config = field(default_factory=FP8Config)
    # activation recompute in the policy's training forwards (update and SFT): "selective" recomputes
    # the cheap, large modules of each layer; "full" whole layers, `recompute_num_layers` at a time
    # ("uniform": layers grouped in chunks of that size; "block": that many layers of each stage)
    recompute: Literal["none", "selective", "full"] = "none"
    recompute_method: Literal["uniform", "block"] = "uniform"
    recompute_num_layers: int = field(default=1, metadata=ge(1))


@dataclass
class ParallelConfig(Checked):
    tp: int = field(default=1, metadata=ge(1))
    pp: int = field(default=1, metadata=ge(1))
    cp: int = field(default=1, metadata=ge(1))  # context parallel: each sequence split over cp ranks
    cp_comm_type: Literal["p2p", "a2a", "all_gather"] = "p2p"  # Transformer Engine's CP attention exchange
    sequence_parallel: bool = False
    distributed_optimizer: bool = False


@dataclass
class OptimConfig(Checked):
    lr: float = field(default=1e-4, metadata=gt(0))
    min_lr: float = field(default=0.0, metadata=ge(0))
    warmup_steps: int = field(default=0, metadata=ge(0))
    decay_style: Literal["constant", "linear", "cosine"] = "constant"
    weight_decay: float = field(default=0.0, metadata=ge(0))
    adam_beta1: float = field(default=0.9, metadata=between(0, 1, hi_open=True))
    adam_beta2: float = field(default=0.999, metadata=between(0, 1, hi_open=True))
    adam_eps: float = field(default=1e-8, metadata=gt(0))
    clip_grad: float = field(default=1.0, metadata=ge(0))  # max global grad norm; 0: no clipping


@dataclass
class CheckpointConfig(Checked):
    save_interval: int = field(default=0, metadata=ge(0))  # steps between saves; 0 saves only at the end
    keep_last: int = field(default=2, metadata=ge(0))  # 0 keeps every checkpoint
    resume: bool = True  # pick up `<run_dir>/checkpoints/latest` when present
    load_weights: str | None = None  # initialise model weights from this checkpoint directory
    # The RL policy as an HF model directory (config, safetensors, tokenizer, generation config):
    # "off"; "final": <run_dir>/hf at the end; N: also <run_dir>/hf_steps/step_XXXXXXXX every N steps.
    export_hf: Literal["off", "final"] | int = field(default="off", metadata=ge(1))


@dataclass
class SFTConfig(Checked):
    """Supervised warm-start on solver-written solutions of the toy task."""

    steps: int = field(default=300, metadata=ge(0))
    global_batch_size: int = field(default=32, metadata=ge(1))
    micro_batch_size: int = field(default=16, metadata=ge(1))
    num_train_problems: int = field(default=4000, metadata=ge(1))
    num_eval_problems: int = field(default=200, metadata=ge(1))
    eval_interval: int = field(default=0, metadata=ge(0))  # 0: evaluate only at the end
    # an upper bound; sentencepiece needs 101 for the printable ASCII characters and special tokens
    tokenizer_vocab_size: int = field(default=128, metadata=ge(101))


@dataclass
class DataConfig(Checked):
    """Where RL prompts come from: the built-in Countdown task, or math JSON Lines (benchmark formats)."""

    task: Literal["countdown", "math"] = "countdown"
    train_files: list[str] = field(default_factory=list)  # math: JSON Lines with question/answer fields
    eval_files: list[str] = field(default_factory=list)
    tokenizer: str | None = None  # math: a Hugging Face tokenizer directory (countdown trains its own)
    template: str = "qwen-boxed"  # math: a name in `eval.TEMPLATES` or a string containing {question}
    max_prompt_tokens: int = field(default=1024, metadata=ge(1))


@dataclass
class RolloutConfig(Checked):
    """The rollout engine and its sampling settings (the policy's engine; a guide engine mirrors it)."""

    engine: Literal["hf", "vllm"] = "hf"
    max_new_tokens: int = field(default=48, metadata=ge(1))
    temperature: float = field(default=1.0, metadata=ge(0))  # 0: greedy
    top_p: float = field(default=1.0, metadata=between(0, 1, lo_open=True))
    top_k: int = field(default=0, metadata=ge(0))  # 0: no top-k filtering
    stop: list[str] = field(default_factory=list)
    # MiB in flight per bucket when streaming weights to the engine
    sync_bucket_mb: int = field(default=64, metadata=ge(1))
    vllm_tensor_parallel_size: int = field(default=1, metadata=ge(1))
    vllm_gpu_memory_utilization: float = field(default=0.5, metadata=between(0, 1, lo_open=True))
    vllm_fp8_weights: bool = False
    # CUDA: what sleep releases while the trainer runs -- 1 offloads the weights to host memory and drops
    # the KV cache, 2 drops both (the next sync rewrites every weight anyway; a guide engine, never
    # re-synced, always sleeps at level 1); vLLM's CPU build cannot sleep
    vllm_sleep_level: int = field(default=1, metadata=between(1, 2))


@dataclass
class GuideConfig(Checked):
    """The off-policy guide (SCOPE/LUFFY) and the PRM; `oracle` kinds use the task's own solver/checker."""

    prm: Literal["oracle", "model"] = "oracle"
    prm_path: str | None = None  # prm: model -- a Qwen2.5-Math-PRM checkpoint converted to Megatron
    guide_model: str | None = None  # an HF model directory served by a second engine (scope.guide: engine)
    # the guide engine's share of each GPU (vLLM on CUDA), beside rollout.vllm_gpu_memory_utilization
    vllm_gpu_memory_utilization: float = field(default=0.2, metadata=between(0, 1, lo_open=True))
    # sizes in billions of parameters, for the memory plan when prm_path / guide_model have no
    # config.json on the machine that plans (a login node); a readable config.json wins
    prm_params_b: float | None = field(default=None, metadata=gt(0))
    guide_params_b: float | None = field(default=None, metadata=gt(0))


@dataclass
class RLConfig(Checked):
    """The RL stage: GRPO groups, SCOPE, rollout budget per step."""

    steps: int = field(default=30, metadata=ge(0))
    prompts_per_step: int = field(default=8, metadata=ge(1))
    group_size: int = field(default=8, metadata=ge(2))  # GRPO compares samples within a group
    micro_batch_size: int = field(default=16, metadata=ge(1))
    # when set, micro-batches are packed by this token budget instead (rl/packing.py; a longer sequence
    # gets a micro-batch of its own) and rl.micro_batch_size is not used; the padding is logged. The
    # budget is per GPU: at parallel.cp > 1 a micro-batch packs budget x cp tokens, split over the cp ranks
    max_tokens_per_micro_batch: int | None = field(default=None, metadata=ge(1))
    # the layout of packed micro-batches: "padded" (rows of similar lengths, rows x longest row within
    # the budget), "thd" (the sequences end to end in one row, attention within each by cu_seqlens, no
    # padding but a rounding of the row for FP8 and sequence parallelism; Transformer Engine's
    # variable-length attention, or the local one a sequence at a time), "auto": thd where the
    # layers are Transformer Engine's, padded elsewhere
    packing: Literal["auto", "padded", "thd"] = "auto"
    # samples move between data-parallel replicas before the update so that each trains on about the same
    # number of tokens (rl/balance.py; advantages are computed before, on each sample's own replica); the
    # imbalance (max over mean of the replicas' tokens) is logged before and after. Nothing runs at DP=1
    balance_tokens: bool = True
    # every this many steps, the gradient norm of each part of the step's batch (the policy's failures
    # and successes, salvaged prefixes, guide suffixes) at the pre-update weights: 7 extra backward
    # passes over the batch (rl/parts.py). 0: never
    grad_parts_interval: int = field(default=0, metadata=ge(0))
    eval_interval: int = field(default=10, metadata=ge(0))  # 0: evaluate only before and after training
    num_eval_problems: int = field(default=100, metadata=ge(1))
    eval_samples: int = field(default=8, metadata=ge(1))  # n samples per eval problem for pass@k / avg@k
    # the checkpoint RL starts from: a checkpoint root (e.g. an SFT run's `checkpoints`, its newest), a
    # step_* folder, or converted weights (`convert hf-to-megatron`); unset: this run directory's own
    # SFT checkpoint, which must exist; "random": Megatron's random initialisation, asked for by name
    init_from: str | None = None
    # the RL learning rate (the `optim` schedule is the SFT stage's): constant, or decayed over the run's
    # optimizer steps to rl.min_lr (linear or cosine), which settles the final policy; a resumed run keeps
    # the schedule its checkpoint started with (Megatron's scheduler state), even if rl.steps changed
    lr: float = field(default=1e-5, metadata=gt(0))
    decay_style: Literal["constant", "linear", "cosine"] = "constant"
    min_lr: float = field(default=0.0, metadata=ge(0))  # used by linear / cosine only
    # PPO: the rollout batch is split into ppo_mini_batches mini-batches (of micro-batches), one optimizer
    # step each, for ppo_epochs passes; with more than one step the old-policy logprobs come from one
    # Megatron forward before the first (ratio exactly 1 there), and clipping acts from the second on
    ppo_mini_batches: int = field(default=1, metadata=ge(1))
    ppo_epochs: int = field(default=1, metadata=ge(1))
    # the PPO ratio's old policy: "recompute" (that forward, above) or "rollout": the engine's own
    # per-token logprobs, for every update, with no forward. Safe only where engine and trainer agree
    # on the logprobs (same weights, dtype and kernels): the first update's `update_1/abs_log_ratio`
    # (or `abs_log_ratio` with one update) is the mean |trainer - engine| logprob over the policy's
    # tokens, and PPO clips a token whose mismatch passes the clip bounds. Guide tokens never read it
    old_logprobs: Literal["recompute", "rollout"] = "recompute"
    # partial rollouts (rl/partial.py): a token's policy version may trail the trained one by at most this
    # many steps. 0: the synchronous loop (every response generated to its end by the current weights).
    # k > 0: each step keeps rl.extra_prompts groups more in flight than it trains on, generates in
    # segments of rl.partial_segment tokens, stops once its groups are finished, and carries the
    # unfinished responses over; decoupled PPO (loss.tis_cap, the cap of the behaviour weight) corrects
    max_staleness: int = field(default=0, metadata=ge(0))
    extra_prompts: int = field(default=4, metadata=ge(0))  # over all replicas; a multiple of dp
    partial_segment: int = field(default=32, metadata=ge(1))
    # a group with a token older than max_staleness steps: "regenerate" (its prompt starts again: every
    # prompt of the stream is still trained once) or "drop" (its prompt is given up); both counted
    stale_groups: Literal["regenerate", "drop"] = "regenerate"
    # DAPO's dynamic sampling: "filter" drops the groups whose final rewards (after SCOPE and the overlong
    # penalty) are all equal -- every advantage in them is zero; "refill" also samples further prompts,
    # up to max_sampling_rounds rounds in all, until rl.prompts_per_step groups carry a signal
    dynamic_sampling: Literal["off", "filter", "refill"] = "off"
    max_sampling_rounds: int = field(default=3, metadata=ge(1))
    # responses the generation limit (rollout.max_new_tokens) cut off: "keep" them as they are, "mask" them
    # out of the loss (DAPO's overlong filtering; their group's advantages still count them), or "penalty":
    # DAPO's soft overlong punishment, a reward falling linearly from 0 at max_new_tokens - overlong_buffer
    # tokens to -overlong_penalty at max_new_tokens (for every response in that window, cut off or not)
    overlong: Literal["keep", "mask", "penalty"] = "keep"
    overlong_buffer: int = field(default=0, metadata=ge(0))
    overlong_penalty: float = field(default=1.0, metadata=ge(0))
    # the trainer's optimizer state to host memory and its gradient buffers released while the engines
    # roll out (runtime/offload.py); auto: on CUDA, where the engines share the trainer's GPUs
    offload: Literal["auto", "on", "off"] = "auto"


@dataclass
class RunConfig(Checked):
    run_dir: str = "runs/demo"
    seed: int = field(default=1234, metadata=ge(0))
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_interval: int = field(default=10, metadata=ge(1))
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    loss: PolicyLossConfig = field(default_factory=PolicyLossConfig)
    scope: ScopeConfig = field(default_factory=ScopeConfig)
    guide: GuideConfig = field(default_factory=GuideConfig)


# ----------------------------------------------------------------------------- building from dicts


def _did_you_mean(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1)
    return f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(options))}"


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping, got {value!r}")
        return from_dict(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        wanted = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as e:
                wanted.append(str(e).removeprefix(f"{path} must be ").removesuffix(f", got {value!r}"))
        raise ConfigError(f"{path} must be {' or '.join(wanted)}, got {value!r}")
    if origin is Literal:
        if isinstance(value, bool) and ("on" if value else "off") in typing.get_args(tp):
            value = "on" if value else "off"  # YAML 1.1 reads a bare `on`/`off` as true/false
        if value not in typing.get_args(tp):
            choices = ", ".join(repr(a) for a in typing.get_args(tp))
            raise ConfigError(f"{path} must be one of {choices}, got {value!r}")
        return value
    if origin in (dict, list, tuple):
        if not isinstance(value, origin if origin is not tuple else (list, tuple)):
            raise ConfigError(f"{path} must be a {origin.__name__}, got {value!r}")
        return tuple(value) if origin is tuple else value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path} must be a string, got {value!r}")
        return value
    if tp is Any:
        return value
    raise ConfigError(f"{path}: unsupported config type {tp}")


def from_dict(cls: type, data: dict[str, Any], path: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys with a did-you-mean."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else key
        if key not in names:
            raise ConfigError(f"unknown config key '{full}'{_did_you_mean(key, names)}")
        kwargs[key] = _coerce(value, hints[key], full)
    try:
        return cls(**kwargs)
    except RangeError as e:  # "steps must be >= 0, ..." -> "rl.steps must be >= 0, ..."
        raise ConfigError(f"{path}.{e}" if path else str(e)) from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path or cls.__name__}: {e}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a nested dict, in order."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        key, raw = item.split("=", 1)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: '{part}' is not a mapping")
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            why = str(e).splitlines()[0]
            raise ConfigError(f"override {item!r}: the value is not YAML ({why}); quote it") from None
    return data


def parse_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML file, apply dotted overrides, build a `RunConfig` with every field checked
    (types, choices, ranges); `validation.load_config` adds the checks that need the architecture."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p} must contain a mapping at the top level")
    return from_dict(RunConfig, apply_overrides(data, list(overrides)))
