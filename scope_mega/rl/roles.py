"""The RL stage's roles, built once (torchtitan's `Trainer.__init__`): the policy's training stage,
the task, the engines, SCOPE's PRM and guide, the KL reference, and who drives.

`setup_rl` returns an `RLRun` that the loop (`trainer.py`) reads and nothing else builds. Roles: the
first rank of each replica (TP x CP x PP ranks, the driver) runs the algorithm for its data-parallel
replica; `driven` runs such work with the engines awake while the group's other ranks serve its
collective calls (`runtime.served`), and gives every rank the driver's result. Engines: the
transformers engine (`rollout.engine=hf`) lives on the driver alone; vLLM has a worker on every rank,
in its own TP layout, and the driver generates through a `CollectiveEngine`. Between updates the
trainer's optimizer state sits in host memory (`rl.offload`), so the engines, built after it moves
there, find the device memory free. Every config check ran before (`stage.start_stage`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from scope_mega.config import ConfigError, RunConfig
from scope_mega.metrics import phase_memory
from scope_mega.models.arch import load_hf_config
from scope_mega.models.gpt import build_gpt_model
from scope_mega.plan import rollout_max_model_len, vllm_kv_cache_tokens
from scope_mega.rl.batch import MicroBatchLayout, micro_batch_layout
from scope_mega.rl.partial import RolloutBuffer
from scope_mega.rl.rollouts import sampling_params
from scope_mega.rollout.factory import make_engine
from scope_mega.rollout.weight_sync import sync_weights
from scope_mega.run_dir import RL_CHECKPOINTS, rl_start_weights
from scope_mega.runtime.distributed import replica_group
from scope_mega.runtime.offload import offload_wanted
from scope_mega.runtime.served import Served, from_driver
from scope_mega.scope.guides import SampledContinuer, make_guide
from scope_mega.scope.prm import CountdownOraclePRM
from scope_mega.stage import Stage, build_stage, open_logger, start_stage
from scope_mega.tasks import Prompt, Task, build_task
from scope_mega.weights.megatron_ckpt import load_model_weights


@dataclass
class RLRun:
    """Everything the RL loop reads: built by `setup_rl`, the step's progress in `stage.progress`."""

    cfg: RunConfig
    stage: Stage  # the policy's model, optimizer, offload, checkpoints, logger
    task: Task
    layout: MicroBatchLayout  # how a step's samples become micro-batches
    is_driver: bool  # replica rank 0: runs the algorithm for its replica
    dp_rank: int
    dp: int
    served: Served  # the driver's collective calls, joined by its group's other ranks
    engines: list  # this rank's engines, woken for rollouts and evaluation
    engine: Any  # this rank's policy engine, the weight sync's target (None: an hf engine's non-driver)
    policy: Any  # the driver's view of the policy engine
    guide_engine: Any  # the driver's view of an engine guide, else None
    prm: Any  # SCOPE's PRM, else None
    reference: torch.nn.Module | None  # the frozen KL reference (loss.kl_coef > 0)
    eval_prompts: list[Prompt]  # this replica's share of the held-out prompts
    buffer: RolloutBuffer | None  # the driver's groups in flight (rl.max_staleness > 0), else None

    @property
    def scope_on(self) -> bool:
        return rectifies(self.cfg)


def rectifies(cfg: RunConfig) -> bool:
    """Whether the run rectifies failed rollouts (SCOPE or a baseline other than plain GRPO)."""
    return cfg.scope.enabled and cfg.scope.active_method != "grpo"


def setup_rl(cfg: RunConfig) -> RLRun:
    """Check the config for this launch, start the process groups, and build every role, in this
    order: task, policy (resumed, or from `rl.init_from` / the run's SFT checkpoint), its optimizer
    state to the host, reference, PRM, engines; then the first weight sync and the logger."""
    from megatron.core import parallel_state

    device = start_stage(cfg, "rl")
    task = build_task(cfg)
    cfg = task.cfg
    decays = cfg.rl.decay_style != "constant"
    rl_optim = dataclasses.replace(
        cfg.optim,
        lr=cfg.rl.lr,
        min_lr=cfg.rl.min_lr if decays else cfg.rl.lr,
        warmup_steps=0,
        decay_style=cfg.rl.decay_style,
    )
    optimizer_steps = cfg.rl.steps * cfg.rl.ppo_mini_batches * cfg.rl.ppo_epochs
    start = rl_start_weights(cfg.run_dir, cfg.rl.init_from)
    offload = offload_wanted(cfg.rl.offload, device.type)
    stage = build_stage(cfg, "rl", device, RL_CHECKPOINTS, rl_optim, optimizer_steps, start, offload)
    stage.offload.to_host()
    reference = build_reference(cfg, device) if cfg.loss.kl_coef > 0 else None
    is_driver = replica_group().rank() == 0
    served = Served(is_driver)
    scope_on = rectifies(cfg)
    prm = build_prm(cfg, device, served) if scope_on else None
    source = rollout_model_dir(cfg) if cfg.rollout.engine == "vllm" else cfg.model.hf_config
    engine, policy = build_engine(cfg, task, source, "policy", served)
    guide_local = guide_engine = None
    if scope_on and cfg.scope.guide == "engine":
        guide_local, guide_engine = build_engine(cfg, task, cfg.guide.guide_model, "guide", served)
    engines = [e for e in (engine, guide_local) if e is not None]
    dp_rank = parallel_state.get_data_parallel_rank()
    dp = parallel_state.get_data_parallel_world_size()
    run = RLRun(
        cfg,
        stage,
        task,
        micro_batch_layout(cfg, stage.spec.transformer_impl, parallel_state.get_context_parallel_rank()),
        is_driver,
        dp_rank,
        dp,
        served,
        engines,
        engine,
        policy,
        guide_engine,
        prm,
        reference,
        task.eval[dp_rank::dp],
        rollout_buffer(cfg, stage.progress.extra, dp_rank, dp) if is_driver else None,
    )
    sync_policy_weights(run)
    open_logger(
        stage,
        cfg.rl.steps,
        bar_keys=("reward", "rollout/accuracy", "scope/salvage_rate_failed", "tokens_per_s"),
    )
    return run


def rollout_buffer(cfg: RunConfig, extra: dict[str, Any], dp_rank: int, dp: int) -> RolloutBuffer | None:
    """A driver's partial-rollout buffer: its replica's, from the checkpoint's `extra["rollouts"]`
    (one per replica) when resumed, else empty at stream position `dp_rank`. None: synchronous."""
    if not cfg.rl.max_staleness:
        return None
    states = extra.get("rollouts")
    if states is None:
        return RolloutBuffer(next_position=dp_rank)
    if len(states) != dp:
        raise ConfigError(
            f"the checkpoint holds partial rollouts of {len(states)} data-parallel replicas, this launch has "
            f"{dp}: resume with {len(states)} replicas (the same world size and layout)"
        )
    return RolloutBuffer.from_state(states[dp_rank])


def sync_policy_weights(run: RLRun) -> None:
    """The trainer's weights to the policy's engines, in bounded buckets: the driver's engine (hf),
    or every rank's vLLM worker."""
    cfg = run.cfg
    model = run.stage.state.model[0]
    every_rank = cfg.rollout.engine == "vllm"
    sync_weights(run.engine, model, run.stage.spec, cfg.rollout.sync_bucket_mb << 20, every_rank=every_rank)


def driven(run: RLRun, work: Callable[[], Any], memory: dict[str, float] | None = None) -> Any:
    """`work()` on the driver while the group's other ranks serve its collective calls, with this
    rank's engines awake (their memory, CUDA, into `memory` before they sleep); the driver's result,
    on every rank of the group."""
    for e in run.engines:
        e.wake_up()
    result = None
    if run.is_driver:
        try:
            result = work()
        finally:
            run.served.release()
    else:
        run.served.serve()
    if memory is not None:
        memory.update(phase_memory("rollout", run.stage.device))
    for e in run.engines:
        e.sleep()
    return from_driver(result, run.is_driver)


def build_prm(cfg: RunConfig, device: torch.device, served: Served):
    """SCOPE's PRM: Countdown's exact step checker, or a Megatron PRM loaded on every rank of the
    replica (in the policy's TP, CP and PP layout), driven by the replica's driver (`ServedPRM`)."""
    if cfg.guide.prm == "oracle":
        return CountdownOraclePRM(cfg.task.ops)
    import transformers

    from scope_mega.models.prm import MegatronPRM, ServedPRM, build_prm_model, load_prm_weights

    path = Path(cfg.guide.prm_path)
    model_cfg = dataclasses.replace(cfg.model, hf_config=str(path / "hf"))
    model, spec = build_prm_model(model_cfg, cfg.parallel, device)
    load_prm_weights(path, model, spec)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path / "hf", local_files_only=True)
    return ServedPRM(MegatronPRM(model, tokenizer), served)


def rollout_model_dir(cfg: RunConfig) -> Path:
    """A model directory for the policy's vLLM engine: the resolved HF config (vocab from the task's
    tokenizer), no weights -- vLLM starts from dummy ones, replaced by the first sync before any
    generate. Every rank writes its own copy and renames it into place (identical content)."""
    out = Path(cfg.run_dir) / "rollout_model"
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".config.json.{dist.get_rank()}"
    load_hf_config(cfg.model.hf_config).to_json_file(tmp)
    tmp.replace(out / "config.json")
    return out


def build_engine(cfg: RunConfig, task: Task, model, name: str, served: Served):
    """The engine serving `model` (the policy's config, or the guide's model directory) as this rank
    holds it, and as its driver generates with it: the transformers engine on drivers only (others:
    None, None); vLLM on every rank, a `CollectiveEngine` for the driver."""
    kwargs = dict(decode=task.tokenizer.decode, eos_token_ids=task.stop_token_ids)
    if cfg.rollout.engine == "hf":
        engine = make_engine("hf", model, **kwargs) if served.is_driver else None
        return engine, engine
    from scope_mega.rollout.collective import CollectiveEngine

    policy = name == "policy"
    tp = cfg.rollout.vllm_tensor_parallel_size
    local = make_engine(
        "vllm",
        model,
        tensor_parallel_size=tp,
        kv_cache_tokens=vllm_kv_cache_tokens(cfg, dist.get_world_size() // tp),  # used on CPU
        max_model_len=rollout_max_model_len(cfg),  # the longest prompt + response, not the model's positions
        gpu_memory_utilization=(cfg.rollout if policy else cfg.guide).vllm_gpu_memory_utilization,
        quantization="fp8" if cfg.rollout.vllm_fp8_weights else None,
        sleep_level=cfg.rollout.vllm_sleep_level if policy else 1,  # a guide is never re-synced
        seed=cfg.seed,
        **kwargs,
    )
    return local, CollectiveEngine(local, served, name)


def step_guide(cfg: RunConfig, task: Task, engine, seed: int):
    """The SCOPE/LUFFY guide for one step: Countdown's solver, or a teacher served by `engine` (the
    driver's view of the engine for `guide.guide_model`, same tokenizer as the policy), sampling with
    the rollout settings. Seeded by the step, so a resumed run draws what the straight run drew."""
    return make_guide(
        cfg.scope.guide,
        delimiter=cfg.scope.step_delimiter,
        engine=None if engine is None else SampledContinuer(engine, sampling_params(cfg, task, 1, seed)),
        oracle_ops=cfg.task.ops,
        seed=seed,
    )


def build_reference(cfg: RunConfig, device: torch.device) -> torch.nn.Module:
    """The frozen KL reference: the policy's architecture holding the weights RL starts from."""
    reference, _ = build_gpt_model(cfg.model, cfg.parallel, device)
    load_model_weights(rl_start_weights(cfg.run_dir, cfg.rl.init_from), reference)
    reference.eval()
    reference.requires_grad_(False)
    return reference
