"""Process groups: torch.distributed from torchrun or Slurm variables, then Megatron parallel state."""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def first_host(nodelist: str) -> str:
    """First hostname of a Slurm nodelist: `gpu[003-005,010],cpu1` -> `gpu003`."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?([^,]*)", nodelist.strip())
    if not m:
        raise ValueError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}")
    prefix, ranges, suffix = m.groups()
    if not ranges:
        return prefix + suffix
    return prefix + ranges.split(",")[0].split("-")[0] + suffix


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dist_env_from_environ(environ: dict[str, str] | None = None) -> DistEnv:
    """Rank layout from torchrun (RANK/WORLD_SIZE), else Slurm (SLURM_PROCID/...), else one process.

    Under Slurm the master is the first host of SLURM_JOB_NODELIST and the port is MASTER_PORT, or one
    derived from the job id so that every task of a job agrees without talking to each other.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        job_id = int(env.get("SLURM_JOB_ID", "0"))
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=env.get("MASTER_ADDR") or first_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")),
            master_port=int(env.get("MASTER_PORT") or 20000 + job_id % 20000),
        )
    return DistEnv(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT") or _free_port()))


def resolve_device(device: str) -> torch.device:
    """`auto` picks CUDA when a GPU is visible, else CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda requested but no CUDA device is visible; use device=cpu")
    return torch.device(device)


def init_distributed(
    tp: int = 1, pp: int = 1, cp: int = 1, device: str = "auto", seed: int = 1234
) -> torch.device:
    """Start torch.distributed (NCCL on GPU, gloo on CPU) and Megatron's TP/PP/CP/DP groups; seed RNGs.

    Idempotent within a process. On CPU, installs `runtime.cpu` first so Megatron's CUDA assumptions
    are redirected before any Megatron object is built.
    """
    from megatron.core import parallel_state

    dev = resolve_device(device)
    if dev.type == "cpu":
        from scope_mega.runtime.cpu import enable_cpu_execution

        enable_cpu_execution()
    env = dist_env_from_environ()
    if not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if "TORCHELASTIC_RUN_ID" in os.environ:  # torchrun: its agent's store is the rendezvous
            dist.init_process_group(backend=backend)
        else:
            dist.init_process_group(
                backend=backend,
                init_method=f"tcp://{env.master_addr}:{env.master_port}",
                rank=env.rank,
                world_size=env.world_size,
            )
    world = dist.get_world_size()
    if world % (tp * pp * cp):
        raise ValueError(f"world size {world} is not divisible by tp*pp*cp = {tp}*{pp}*{cp}")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            context_parallel_size=cp,
        )
        _init_replica_group(tp, pp, cp, world)
    seed_all(seed, dev)
    return dev


_REPLICA_GROUP = None


def _init_replica_group(tp: int, pp: int, cp: int, world: int) -> None:
    """The ranks of each data-parallel replica (TP x CP x PP, in Megatron's rank order), created on
    every rank as torch.distributed requires; this rank keeps its own. Megatron's model-parallel group
    is TP x PP alone, which leaves a replica's CP ranks out."""
    global _REPLICA_GROUP
    from megatron.core.parallel_state import RankGenerator

    _REPLICA_GROUP = None
    if cp == 1:
        return
    ranks = RankGenerator(tp=tp, ep=1, dp=world // (tp * pp * cp), pp=pp, cp=cp, order="tp-cp-ep-dp-pp")
    for members in ranks.get_ranks("tp-cp-pp"):
        group = dist.new_group(members)
        if dist.get_rank() in members:
            _REPLICA_GROUP = group


def replica_group():
    """This rank's data-parallel replica: every rank that holds the same data (TP x CP x PP). Its rank 0
    drives the replica's rollouts; at CP=1 it is Megatron's model-parallel group."""
    from megatron.core import parallel_state

    return _REPLICA_GROUP or parallel_state.get_model_parallel_group()


def seed_all(seed: int, device: torch.device) -> None:
    """Seed torch (same on every rank, so CPU-initialised weights agree) and Megatron's RNG tracker."""
    from megatron.core import parallel_state, tensor_parallel

    torch.manual_seed(seed)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    if device.type == "cuda":
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        from scope_mega.runtime.cpu import seed_cpu_rng_tracker

        seed_cpu_rng_tracker(seed, tp_rank)


def destroy_distributed(keep_process_group: bool = False) -> None:
    """Tear down Megatron's groups, and the default process group unless `keep_process_group`
    (so one set of processes can run several parallel layouts in turn)."""
    from megatron.core import parallel_state

    global _REPLICA_GROUP
    _REPLICA_GROUP = None
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized() and not keep_process_group:
        dist.destroy_process_group()
