"""vLLM as the rollout engine, running inside the training processes (colocated).

Written against vLLM 0.19 (`vllm.LLM` with `distributed_executor_backend="external_launcher"`,
`enable_sleep_mode`, `LLM.sleep(level)` / `LLM.wake_up(tags)`, `logprobs_mode`, and the layerwise
reload utilities for online-quantized weights). Each training rank hosts one vLLM worker in its own
process (external launcher: no extra processes, no serialization of weights); vLLM's tensor-parallel
size is its own, independent of the trainer's (world = vLLM DP x TP). All ranks of one vLLM TP group
must call `generate` with the same prompts and seed.

Weights arrive as HF-named full tensors (the trainer's `sync_weights`), are checked against the HF
model's parameter names and shapes, and are loaded in bounded buckets through vLLM's own
`model.load_weights`, which fuses QKV / gate-up and takes this rank's TP shard. With
`quantization="fp8"` vLLM quantizes online; reloading then goes through its layerwise reload so each
layer is re-quantized from the new full-precision weights.

vLLM is an optional dependency (the `gpu` extra) and is imported only when this engine is built.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch

from scope_mega.rollout.engine import Completion, Decode, SamplingParams, WeightUpdate
from scope_mega.rollout.weight_sync import CheckedStream, buckets, hf_parameter_shapes

VLLM_MISSING = (
    "the vllm rollout engine needs vLLM, which is not installed: pip install 'scope-mega[gpu]' on a CUDA "
    "machine, or use the transformers engine (kind 'hf')"
)


def import_vllm():
    """The `vllm` module, or an ImportError that names the extra to install."""
    try:
        import vllm
    except ImportError as e:
        raise ImportError(VLLM_MISSING) from e
    return vllm


def vllm_sampling_kwargs(sampling: SamplingParams) -> dict[str, Any]:
    """Our `SamplingParams` as keyword arguments of `vllm.SamplingParams`: one logprob per sampled token
    (`logprobs=0`), stop strings kept in the output so text and token ids agree."""
    return dict(
        n=sampling.n,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k if sampling.top_k > 0 else -1,  # -1: off (also accepted by vLLM >= 0.10)
        max_tokens=sampling.max_new_tokens,
        stop=list(sampling.stop),
        stop_token_ids=list(sampling.stop_token_ids),
        include_stop_str_in_output=True,
        seed=sampling.seed,
        logprobs=0,
    )


def completion_from_vllm(output: Any, decode: Decode) -> Completion:
    """One vLLM `CompletionOutput` as our `Completion`. vLLM reports no stop reason for EOS; ours is the
    EOS id then, as for any stop token."""
    ids = list(output.token_ids)
    logprobs = [float(position[tok].logprob) for tok, position in zip(ids, output.logprobs)]
    if output.finish_reason not in ("stop", "length"):
        raise RuntimeError(f"vLLM finished a completion with reason {output.finish_reason!r}")
    reason = output.stop_reason
    if output.finish_reason == "stop" and reason is None:
        reason = ids[-1]
    return Completion(ids, logprobs, output.finish_reason, reason, decode(ids))


class VLLMEngine:
    """`RolloutEngine` over a colocated `vllm.LLM`."""

    def __init__(
        self,
        model_dir: str,
        decode: Decode,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.5,
        quantization: str | None = None,
        dtype: str = "bfloat16",
        seed: int = 0,
        max_model_len: int | None = None,
        bucket_bytes: int = 1 << 28,
        sleep_level: int = 1,
        **llm_kwargs: Any,
    ) -> None:
        # The engine core must live in this process: weights are loaded into its model directly.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        vllm = import_vllm()
        import torch.distributed as dist
        import transformers

        kwargs = dict(
            model=model_dir,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            quantization=quantization,
            dtype=dtype,
            seed=seed,
            max_model_len=max_model_len,
            enable_sleep_mode=True,
            logprobs_mode="processed_logprobs",
        )
        if dist.is_initialized():
            world = dist.get_world_size()
            if world % tensor_parallel_size:
                raise ValueError(
                    f"vLLM tensor_parallel_size={tensor_parallel_size} must divide world {world}"
                )
            kwargs.update(distributed_executor_backend="external_launcher")
            if world > tensor_parallel_size:
                kwargs.update(data_parallel_size=world // tensor_parallel_size)
        self.llm = vllm.LLM(**kwargs, **llm_kwargs)
        self.vllm = vllm
        self.decode = decode
        self.quantization = quantization
        self.bucket_bytes = bucket_bytes
        self.sleep_level = sleep_level
        self.expected = hf_parameter_shapes(transformers.AutoConfig.from_pretrained(model_dir))
        self.asleep = False
        self.weights_awake = True

    def _model(self) -> torch.nn.Module:
        return self.llm.llm_engine.model_executor.driver_worker.worker.model_runner.model

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingParams) -> list[list[Completion]]:
        if self.asleep:
            raise RuntimeError("VLLMEngine.generate: the engine is asleep; call wake_up() first")
        params = self.vllm.SamplingParams(**vllm_sampling_kwargs(sampling))
        requests = [{"prompt_token_ids": list(p)} for p in prompt_token_ids]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return [[completion_from_vllm(o, self.decode) for o in req.outputs] for req in outputs]

    def update_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], full: bool = True
    ) -> WeightUpdate:
        """Load in buckets of `bucket_bytes` (moved to the GPU one bucket at a time). Asleep, only the
        weights are woken; the KV cache stays released until `wake_up`."""
        if not self.weights_awake:
            self.llm.wake_up(tags=["weights"])
            self.weights_awake = True
        model = self._model()
        device = next(model.parameters()).device
        stream = CheckedStream(named_tensors, self.expected)
        if self.quantization == "fp8":
            from vllm.model_executor.model_loader.reload import (
                finalize_layerwise_reload,
                initialize_layerwise_reload,
            )

            initialize_layerwise_reload(model)
        for bucket in buckets(stream, self.bucket_bytes):
            model.load_weights([(name, t.to(device, non_blocking=True)) for name, t in bucket])
        if self.quantization == "fp8":
            finalize_layerwise_reload(model, self.llm.llm_engine.model_config)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return stream.finish(full)

    def sleep(self) -> None:
        if self.asleep:
            return
        self.llm.sleep(level=self.sleep_level)
        self.asleep = True
        self.weights_awake = False

    def wake_up(self) -> None:
        if not self.asleep:
            return
        self.llm.wake_up(tags=["kv_cache"] if self.weights_awake else None)
        self.asleep = False
        self.weights_awake = True
